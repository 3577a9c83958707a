"""Function-preserving model growth (ELLE, Qin et al. 2022): wider FFNs, more layers.

Width: the FFN intermediate layer grows by duplicating units. A copy of unit j has the
same input weights (rows of every input projection: Llama's gate *and* up rows together,
so the gated product is duplicated too) and so the same activation; unit j's outgoing
column in the output projection is shared among its ``c_j`` copies, each getting
``1/c_j`` of it, plus optional noise that sums to zero over the copies. The sum over the
copies is the original column, so the expanded network computes the same function (up to
float rounding), for any activation. Exact for BERT/RoBERTa, GPT-2 and Llama alike.

Depth: a new layer is a copy of an existing one inserted right after it, with its
attention output projection and FFN output projection (weights and biases) set to zero,
so the block adds nothing to the residual stream. For pre-LN decoders (GPT-2, Llama) the
new block is then exactly the identity. For post-LN encoders (BERT/RoBERTa) the block's
two LayerNorms still apply to a stream that is already normalised: exact only when those
LayerNorms have weight 1 and bias 0, otherwise approximate; ELLE's function-recovery
warm-up (``recover_function``) closes the gap.

Works on the model in place (same module objects, new weight tensors), so the trainer,
hooks and optimizer built afterwards see the grown model; ``model.config`` is updated so
``save_pretrained`` writes a standard, larger config that plain ``transformers`` loads.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from das_engine.families import text_config
from das_engine.units import Family, build_unit_map

#: config attribute holding the FFN width / the layer count, by family layer path
_FFN_KEYS = ("intermediate_size", "n_inner")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer")
#: config lists with one entry per layer (attention kind; SmolLM3's rotary on/off): a
#: copied layer gets its source's entry, or a saved deeper model would not load
_PER_LAYER_LISTS = ("layer_types", "no_rope_layers")


def _set_config(config, keys: tuple[str, ...], value: int) -> None:
    for key in keys:
        if hasattr(config, key):
            setattr(config, key, value)
            return
    raise ValueError(f"the model config has none of {keys}")


def split_plan(width: int, new_width: int, gen: torch.Generator) -> torch.Tensor:
    """The original unit each of ``new_width`` units copies: 0..width-1 first, then
    the duplicates, each original unit chosen at most once per round (random order)."""
    if new_width < width:
        raise ValueError("a width expansion cannot shrink the layer")
    extra = new_width - width
    rounds = [torch.randperm(width, generator=gen) for _ in range(math.ceil(extra / width))]
    return torch.cat([torch.arange(width), *rounds])[:new_width]


def _out_axis(conv1d: bool) -> int:
    return 1 if conv1d else 0  # Conv1D weights are [in, out]; Linear weights [out, in]


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))


def _resize_attrs(module: nn.Module, out_features: int | None, in_features: int | None) -> None:
    if out_features is not None:
        for key in ("out_features", "nf"):  # nn.Linear / GPT-2 Conv1D
            if hasattr(module, key):
                setattr(module, key, out_features)
    if in_features is not None and hasattr(module, "in_features"):
        module.in_features = in_features
    if in_features is not None and hasattr(module, "nx"):
        module.nx = in_features


@torch.no_grad()
def widen_ffn_layer(
    layer: nn.Module, family: Family, plan: torch.Tensor, noise: float, gen: torch.Generator
) -> None:
    """Grow one layer's FFN to ``len(plan)`` units, unit k copying unit ``plan[k]``."""
    out_axis = _out_axis(family.conv1d)
    in_axis = 1 - out_axis
    for path in family.ffn_in:  # duplicated rows: the same pre-activations
        module = layer.get_submodule(path)
        old = module.weight.shape[out_axis] // family.ffn_in_stacked
        # a stacked projection ([gate | up]) duplicates the same units in each part
        idx = torch.cat([plan + k * old for k in range(family.ffn_in_stacked)])
        idx = idx.to(module.weight.device)
        _replace(module, "weight", module.weight.index_select(out_axis, idx))
        if getattr(module, "bias", None) is not None:
            _replace(module, "bias", module.bias.index_select(0, idx))
        _resize_attrs(module, len(idx), None)
    down = layer.get_submodule(family.ffn_out)
    w = down.weight.float()
    idx = plan.to(w.device)
    copies = torch.bincount(idx, minlength=w.shape[in_axis]).to(w.dtype)
    shape = [1, 1]
    shape[in_axis] = len(plan)
    share = (1.0 / copies.index_select(0, idx)).view(shape)
    new = w.index_select(in_axis, idx) * share
    if noise > 0:
        eps = torch.randn(new.shape, generator=gen).to(w.device) * (noise * float(w.std()))
        # remove each group's mean: the copies' noise sums to zero, the function is kept
        group_sum = torch.zeros_like(w).index_add_(in_axis, idx, eps)
        eps = eps - group_sum.index_select(in_axis, idx) * share
        new = new + eps
    _replace(down, "weight", new)
    _resize_attrs(down, None, len(plan))


def widen_ffn(
    model: nn.Module, new_width: int, *, noise: float = 0.0, seed: int = 0
) -> dict[str, int]:
    """Every layer's FFN intermediate width to ``new_width``; returns the old and new size."""
    unit_map = build_unit_map(model)
    gen = torch.Generator().manual_seed(seed)
    old = unit_map.intermediate_size
    for layer in unit_map.layers:
        widen_ffn_layer(layer, unit_map.family, split_plan(old, new_width, gen), noise, gen)
    _set_config(text_config(model.config), _FFN_KEYS, new_width)
    return {"intermediate_size_before": old, "intermediate_size": new_width}


def copy_sources(num_layers: int, new_layers: int) -> list[int]:
    """The layers to copy: evenly spaced, distinct while there are fewer new layers than
    old ones (then every layer, round after round)."""
    if new_layers > num_layers:
        return [k % num_layers for k in range(new_layers)]
    return [(2 * k + 1) * num_layers // (2 * new_layers) for k in range(new_layers)]


@torch.no_grad()
def deepen(model: nn.Module, new_layers: int) -> dict[str, int]:
    """Insert ``new_layers`` copies of existing layers, each right after its source, with
    its output projections zeroed (see the module docstring for what that preserves)."""
    unit_map = build_unit_map(model)
    fam = unit_map.family
    stack = model.base_model.get_submodule(fam.layers)
    old = len(stack)
    sources = sorted(copy_sources(old, new_layers), reverse=True)
    for src in sources:  # from the end, so earlier indices stay valid
        new = copy.deepcopy(stack[src])
        for path in (fam.attn_out, fam.ffn_out):
            module = new.get_submodule(path)
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        stack.insert(src + 1, new)
    for i, layer in enumerate(stack):  # KV-cache slots and per-layer config follow the index
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    config = text_config(model.config)
    _set_config(config, _DEPTH_KEYS, len(stack))
    for key in _PER_LAYER_LISTS:
        per_layer = getattr(config, key, None)
        if isinstance(per_layer, list) and len(per_layer) == old:
            for src in sources:
                per_layer.insert(src + 1, per_layer[src])
    return {"num_layers_before": old, "num_layers": len(stack)}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """The LM head's logits at the batch's real (non-padding) tokens: [N, vocab]."""
    unit_map = build_unit_map(model)
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    return unit_map.logits(model, out.last_hidden_state[keep])


def output_gap(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """How far the student's logits are from the teacher's: mean squared error, or
    KL(teacher || student) per token."""
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    return F.kl_div(
        F.log_softmax(student.float(), -1),
        F.log_softmax(teacher.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


def recover_function(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[dict],
    *,
    steps: int,
    lr: float,
    kind: str = "kl",
    tol: float = 1e-6,
) -> list[float]:
    """ELLE's function-recovery warm-up: up to ``steps`` AdamW steps training the grown
    model to match the pre-growth model's logits on ``batches`` (cycled; dropout off in
    both). Stops once the gap is at most ``tol``: an exact expansion is left untouched
    (AdamW's first steps would move it away). Returns the gap at each step, before its
    update."""
    if steps == 0 or not batches:
        return []
    was_training = student.training
    student.eval()
    teacher.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gaps = []
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            with torch.no_grad():
                target = logits(teacher, batch)
            loss = output_gap(logits(student, batch), target, kind)
            gaps.append(float(loss.detach()))
            if gaps[-1] <= tol:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        student.train(was_training)
    return gaps


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
