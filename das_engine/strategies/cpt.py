"""CPT (Ke et al. 2022, "Continual Training of Language Models for Few-Shot Learning"):
a frozen backbone, a CL-plugin in every transformer layer, and HAT task masks over the
plugin's neurons so that a domain, once trained, is never changed.

The plugin: a small FFN of the layer's own form, ``cpt_plugin_size`` neurons wide, run in
*parallel* with the layer's FFN on the FFN's input ``x`` and added to the FFN's output
projection (before the residual sum, dropout and, for BERT, the LayerNorm):
``FFN(x) + W_out (m_t * act(W_in x + b_in))``; for a gated MLP (Llama, Qwen, Gemma, and
Phi-3, which stacks gate and up) the neurons are gated like the MLP's,
``act(W_gate x) * (W_up x)``. ``act`` is the
family's FFN activation, biases mirror the FFN's input projections, ``W_out`` has no bias
and starts at zero (training starts at the base model). The forward hooks sit on the unit
map's FFN modules, so every family with a unit map works.

Task masks (HAT, Serra et al. 2018): domain t has a learned embedding ``e_t`` (one value
per plugin neuron and layer); during its stage the neurons are scaled by
``sigmoid(s * e_t)``, with ``s`` annealed linearly over the stage's steps from
``1 / cpt_s_max`` to ``cpt_s_max``. A domain's *binary* mask is ``e_t > 0`` (the limit of
the soft one). Neurons in the union of earlier domains' binary masks are claimed: every
plugin weight of theirs (their rows of ``W_in``/``W_gate``/``W_up`` and biases, their
column of ``W_out``) gets a zero gradient and is restored after each optimizer step (AdamW's
weight decay would otherwise move it), so it stays bit-identical; a new domain may still
*use* them (transfer). The loss adds ``cpt_sparsity`` times the share of free neurons the
soft mask claims (HAT's regulariser); the embedding's gradient gets HAT's compensation for
the sigmoid's flatness at large ``s`` (after clipping) and is clamped to [-6, 6].

Exact, by construction: the backbone is the base model at every stage (never trained);
domain i's model (backbone + plugin under its binary mask) is the same function after any
later stage, bit for bit. Training uses the soft mask, use uses the binary one: the two
differ only where ``|s_max * e| `` is small (neurons with mask in (0.02, 0.98) at the default
``s_max = 400`` have ``|e| < 0.01``).

Export: the stage's ``model/`` is the backbone *widened* by the plugin: each layer's FFN
gets the neurons the mask keeps as extra intermediate units (their ``W_in`` rows appended
to the input projection(s), their masked ``W_out`` columns to the output projection;
``intermediate_size``, or GPT-2's ``n_inner``, grows by the largest per-layer count, layers
with fewer padded by all-zero units). Because the plugin has the FFN's
own activation, gating and input, this is the same function as the plugin model under that
mask, up to float summation order; plain ``transformers`` loads it. ``cpt_export_mask``:
``domain`` (domain t's binary mask) or ``union`` (every domain's so far).

State (``strategy/cpt.safetensors`` + ``strategy/cpt.json`` in each stage): the plugin's
weights and every domain's embedding, read back by the next stage; within a stage the
plugin (and its step count, which sets ``s``) is part of the model's step checkpoints, so
a resumed stage continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from das_engine.errors import IncompatibleConfigError
from das_engine.families import text_config
from das_engine.storage import atomic_path, read_json, write_json
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategies.replay import stage_name
from das_engine.strategy_params import StrategyParams, param
from das_engine.units import UnitMap, build_unit_map

WEIGHTS, META = "cpt.safetensors", "cpt.json"
ATTR = "cpt_plugin"  # the plugin's name on the model during a stage
EMB_CLAMP = 6.0  # HAT's bound on mask embeddings
COSH_CLAMP = 50.0  # HAT's bound inside the compensation's cosh


@dataclass
class CptParams(StrategyParams):
    cpt_plugin_size: int = param(
        64,
        "Strategy `cpt`: neurons of the CL-plugin in every layer (shared by all domains; "
        "each domain's mask claims some).",
        minimum=1,
        maximum=65536,
    )
    cpt_s_max: float = param(
        400.0,
        "Strategy `cpt`: the mask scale s reached at the stage's last step (mask = "
        "sigmoid(s * e)); larger is closer to binary.",
        minimum=1.0,
        maximum=1e5,
    )
    cpt_sparsity: float = param(
        0.75,
        "Strategy `cpt`: weight of the loss term that is the share of free plugin neurons "
        "the domain's mask claims.",
        minimum=0.0,
        maximum=1e3,
    )
    cpt_export_mask: Literal["domain", "union"] = param(
        "domain",
        "Strategy `cpt`: the mask of the exported model: the stage's domain's, or the "
        "union of every domain's so far.",
    )


def anneal(step: int, total: int, s_max: float) -> float:
    """HAT's schedule over one stage: 1/s_max at the first step, s_max at the last."""
    lo = 1.0 / s_max
    return lo + (s_max - lo) * step / max(1, total - 1)


def soft_mask(embedding: torch.Tensor, s: float) -> torch.Tensor:
    return torch.sigmoid(s * embedding)


def binary_mask(embedding: torch.Tensor) -> torch.Tensor:
    """The limit of ``soft_mask`` as s grows: 1 where e > 0 (0.5 exactly at e = 0 is 0)."""
    return (embedding > 0).to(embedding.dtype)


def _activation(unit_map: UnitMap, config) -> nn.Module:
    """The FFN's own activation (its config key is the family's: Gemma 2 names it
    ``hidden_activation``, GPT-2 ``activation_function``)."""
    from transformers.activations import ACT2FN

    return ACT2FN[getattr(text_config(config), unit_map.family.activation)]


def _features(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """(in, out) of a Linear ([out, in]) or a GPT-2 Conv1D ([in, out])."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])


class LayerPlugin(nn.Module):
    """One layer's plugin: ``ins[0]`` goes through the activation, any further input
    projection multiplies it (a gated MLP's ``up``), ``out`` adds back to the hidden size."""

    def __init__(self, hidden: int, size: int, n_in: int, bias: bool, act: nn.Module) -> None:
        super().__init__()
        self.ins = nn.ModuleList(nn.Linear(hidden, size, bias=bias) for _ in range(n_in))
        self.out = nn.Linear(size, hidden, bias=False)
        nn.init.zeros_(self.out.weight)
        self.act = act

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.ins[0](x))
        for extra in self.ins[1:]:
            h = h * extra(x)
        return h

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return self.out(h * mask.to(h.dtype))

    def neuron_params(self) -> list[tuple[nn.Parameter, int]]:
        """Every weight with the axis along which its entries belong to the neurons."""
        return [(w, 0) for lin in self.ins for w in lin.parameters()] + [(self.out.weight, 1)]


class Plugin(nn.Module):
    """Every layer's plugin, the current domain's mask embedding and the stage's step.

    ``fixed`` (a [layers, size] 0/1 tensor) replaces the annealed soft mask: use time."""

    def __init__(self, unit_map: UnitMap, size: int, act: nn.Module) -> None:
        super().__init__()
        fam = unit_map.family
        first = unit_map.module(0, fam.ffn_in[0])
        bias = getattr(first, "bias", None) is not None
        hidden = unit_map.hidden_size
        self.layers = nn.ModuleList(
            LayerPlugin(hidden, size, len(fam.ffn_in) * fam.ffn_in_stacked, bias, act)
            for _ in range(unit_map.num_layers)
        )
        self.embedding = nn.Parameter(torch.randn(unit_map.num_layers, size))
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        self.s = 1.0
        self.fixed: torch.Tensor | None = None

    def mask(self, layer: int) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed[layer]
        return soft_mask(self.embedding[layer], self.s)


def attach(model: nn.Module, unit_map: UnitMap, plugin: Plugin) -> list:
    """Hooks adding each layer's plugin output to its FFN output; returns their handles."""
    fam = unit_map.family
    handles = []
    for i in range(unit_map.num_layers):
        pending: list[torch.Tensor] = []  # the FFN input -> output, inside one layer call

        def keep_input(_module, args, i=i, pending=pending):
            pending.append(plugin.layers[i](args[0], plugin.mask(i)))

        def add_output(_module, _args, output, pending=pending):
            return output + pending.pop().to(output.dtype)

        handles.append(unit_map.module(i, fam.ffn_in[0]).register_forward_pre_hook(keep_input))
        handles.append(unit_map.module(i, fam.ffn_out).register_forward_hook(add_output))
    return handles


def _append(module: nn.Module, extra_w: torch.Tensor, extra_b, out_axis: bool, conv1d: bool):
    """Append rows (output units, ``out_axis``) or columns (input units) to a projection.

    ``extra_w`` is in Linear layout ([out, in]); a Conv1D gets it transposed."""
    w = module.weight
    axis = (1 if conv1d else 0) if out_axis else (0 if conv1d else 1)
    add = extra_w.T if conv1d else extra_w
    module.weight = nn.Parameter(torch.cat([w.data, add.to(w.dtype)], dim=axis))
    if out_axis and module.bias is not None:
        module.bias = nn.Parameter(torch.cat([module.bias.data, extra_b.to(w.dtype)]))
    n_in, n_out = _features(module, conv1d)
    if conv1d:
        module.nx, module.nf = n_in, n_out
    else:
        module.in_features, module.out_features = n_in, n_out


def _append_stacked(module: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor | None]]):
    """Append rows to each part of a stacked projection (Phi-3's [gate | up]): part k's
    new rows go after part k's, so the model's own split still finds gate, then up."""
    k = len(parts)
    w = module.weight.data
    chunks = w.chunk(k, dim=0)
    module.weight = nn.Parameter(
        torch.cat(
            [t for c, (rows, _) in zip(chunks, parts, strict=True) for t in (c, rows.to(w.dtype))]
        )
    )
    if module.bias is not None:
        biases = module.bias.data.chunk(k)
        module.bias = nn.Parameter(
            torch.cat(
                [t for c, (_, b) in zip(biases, parts, strict=True) for t in (c, b.to(w.dtype))]
            )
        )
    module.out_features = module.weight.shape[0]


@torch.no_grad()
def widen(model: nn.Module, unit_map: UnitMap, plugin: Plugin, mask: torch.Tensor) -> int:
    """Fold the plugin under the 0/1 ``mask`` [layers, size] into the FFNs as extra
    intermediate units; returns how many each layer got (0: the model is unchanged)."""
    fam = unit_map.family
    extra = int(mask.sum(1).max()) if mask.numel() else 0
    if extra == 0:
        return 0
    for i, lp in enumerate(plugin.layers):
        # the neurons the mask keeps, in order; then padding units, all zeros (they add
        # exactly nothing, and do not depend on what later domains train)
        order = torch.argsort(-mask[i], stable=True)[:extra]
        keep = mask[i, order]
        k = fam.ffn_in_stacked  # the plugin's input projections, k per FFN input module
        for j, path in enumerate(fam.ffn_in):
            parts = [
                (
                    lin.weight[order] * keep[:, None],
                    lin.bias[order] * keep if lin.bias is not None else None,
                )
                for lin in lp.ins[j * k : (j + 1) * k]
            ]
            if k == 1:
                _append(unit_map.module(i, path), *parts[0], True, fam.conv1d)
            else:
                _append_stacked(unit_map.module(i, path), parts)
        cols = lp.out.weight[:, order] * keep
        _append(unit_map.module(i, fam.ffn_out), cols, None, False, fam.conv1d)
    config = text_config(model.config)
    if getattr(config, "model_type", None) == "gpt2":
        config.n_inner = (config.n_inner or 4 * config.n_embd) + extra
    else:
        config.intermediate_size += extra
    return extra


def load_state(stage_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(plugin weights + every domain's embedding, metadata) saved by a stage, or None."""
    path = stage_dir / "strategy" / WEIGHTS
    if not path.exists():
        return None
    return load_file(str(path)), read_json(stage_dir / "strategy" / META)


@torch.no_grad()
def domain_model(model: nn.Module, stage_dir: Path, domain: int | None = None) -> nn.Module:
    """``model`` (the lineage's base, loaded) widened in place by the plugin that stage
    ``stage_dir`` saved, under domain ``domain``'s binary mask (0-based, in stage order;
    None: the union of all). Domain i's model from any later stage equals stage i's."""
    saved = load_state(Path(stage_dir))
    if saved is None:
        raise FileNotFoundError(f"{stage_dir} holds no cpt state ({WEIGHTS})")
    tensors = dict(saved[0])
    masks = binary_mask(tensors.pop("embeddings"))
    unit_map = build_unit_map(model)
    plugin = Plugin(unit_map, masks.shape[2], _activation(unit_map, model.config)).to(model.device)
    plugin.layers.load_state_dict(tensors)
    widen(model, unit_map, plugin, masks[domain] if domain is not None else masks.amax(0))
    return model


class Cpt(Strategy):
    name = "cpt"
    params = CptParams
    starts_from_base = True  # the backbone is the base at every stage; the plugin carries on

    def prepare(self, ctx: StageContext) -> None:
        super().prepare(ctx)
        self._record: dict | None = None  # the stage's growth record, set by finish
        model, p = ctx.model, self.params
        for w in model.parameters():
            w.requires_grad_(False)
        torch.manual_seed(self.config.seed + 1009 * (len(ctx.previous_stage_dirs) + 1))
        plugin = Plugin(ctx.unit_map, p.cpt_plugin_size, _activation(ctx.unit_map, model.config))
        self.earlier = torch.zeros(0, ctx.unit_map.num_layers, p.cpt_plugin_size)
        self.meta: dict = {"stages": []}
        saved = load_state(ctx.previous_stage_dirs[-1]) if ctx.previous_stage_dirs else None
        if saved is not None:
            tensors, self.meta = saved
            self.earlier = tensors.pop("embeddings")
            if self.earlier.shape[1:] != plugin.embedding.shape:
                raise IncompatibleConfigError(
                    f"cpt: the lineage's plugin is {tuple(self.earlier.shape[1:])} "
                    f"(layers, neurons); cpt_plugin_size cannot change between stages",
                    details=[{"field": "cpt_plugin_size", "message": "differs from stage 1"}],
                )
            plugin.layers.load_state_dict(tensors)
        plugin.to(ctx.device)
        self.earlier = self.earlier.to(ctx.device)
        # the union of earlier binary masks, per neuron; 1 = claimed (frozen)
        self.claimed = (self.earlier > 0).any(0).float()
        # each weight with its claimed entries (broadcastable) and their values now
        self.frozen: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for layer, lp in enumerate(plugin.layers):
            for w, axis in lp.neuron_params() if self.claimed[layer].any() else []:
                shape = [1] * w.dim()
                shape[axis] = -1
                claimed = self.claimed[layer].view(shape).bool()
                self.frozen.append((w, claimed, w.detach().clone()))
        model.add_module(ATTR, plugin)  # trained, checkpointed and resumed with the model
        self.plugin = plugin
        self.handles = attach(model, ctx.unit_map, plugin)
        self.total = 1

    def build_optimizer(self, params, **adamw_kwargs) -> torch.optim.Optimizer:
        """No weight decay on the mask embedding (it would pull every mask towards 0.5)."""
        groups = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in params]
        emb = self.plugin.embedding
        for g in groups:
            g["params"] = [w for w in g["params"] if w is not emb]
        groups.append({"params": [emb], "weight_decay": 0.0})
        return super().build_optimizer(groups, **adamw_kwargs)

    def build_scheduler(self, optimizer, config, total: int):
        self.total = total  # the annealing of s runs over the stage's steps
        return super().build_scheduler(optimizer, config, total)

    def _anneal(self) -> float:
        return anneal(int(self.plugin.step), self.total, self.params.cpt_s_max)

    def sparsity(self) -> torch.Tensor:
        """HAT's regulariser: the share of the free neurons the current soft mask claims."""
        free = 1.0 - self.claimed
        if float(free.sum()) == 0:
            return self.plugin.embedding.sum() * 0.0
        return (soft_mask(self.plugin.embedding, self.plugin.s) * free).sum() / free.sum()

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        self.plugin.s = self._anneal()
        lm, logs = super().loss(model, batch)
        reg = self.sparsity()
        logs["cpt_sparsity"] = float(reg.detach())
        return lm + self.params.cpt_sparsity * reg, logs

    @torch.no_grad()
    def after_backward(self) -> None:
        """Block the gradient into every claimed neuron's weights."""
        for w, claimed, _ in self.frozen:
            if w.grad is not None:
                w.grad.masked_fill_(claimed, 0.0)

    @torch.no_grad()
    def before_step(self) -> None:
        """HAT's compensation: the embedding's gradient scaled back up where the sigmoid at
        scale s is flat (after clipping, so it does not shrink the plugin's gradients)."""
        e, s, s_max = self.plugin.embedding, self.plugin.s, self.params.cpt_s_max
        if e.grad is not None:
            num = torch.cosh(torch.clamp(s * e, -COSH_CLAMP, COSH_CLAMP)) + 1
            e.grad.mul_(s_max / s * num / (torch.cosh(e) + 1))

    @torch.no_grad()
    def after_step(self) -> None:
        """Claimed neurons back to their values (exact, whatever the optimizer did), the
        embedding clamped, the step counted."""
        for w, claimed, saved in self.frozen:
            w.copy_(torch.where(claimed, saved, w))
        self.plugin.embedding.clamp_(-EMB_CLAMP, EMB_CLAMP)
        self.plugin.step += 1

    def masks(self) -> torch.Tensor:
        """Every domain's binary mask so far, this stage's last: [domains, layers, size]."""
        current = self.plugin.embedding.detach()[None]
        return binary_mask(torch.cat([self.earlier, current]))

    def export_mask(self) -> torch.Tensor:
        """The 0/1 mask [layers, size] the stage's checkpoint applies (``cpt_export_mask``)."""
        masks = self.masks()
        return masks[-1] if self.params.cpt_export_mask == "domain" else masks.amax(0)

    def finish(self, ctx: StageContext) -> None:
        embeddings = torch.cat([self.earlier, self.plugin.embedding.detach()[None]])
        tensors = {
            k: v.detach().contiguous().cpu() for k, v in self.plugin.layers.state_dict().items()
        }
        tensors["embeddings"] = embeddings.contiguous().cpu()
        masks = self.masks()
        assert ctx.stage_dir is not None
        meta = {
            "plugin_size": self.params.cpt_plugin_size,
            "layers": ctx.unit_map.num_layers,
            "stages": [*self.meta.get("stages", []), stage_name(ctx.stage_dir)],
            # neurons each domain's binary mask keeps, and the union's, per layer
            "mask_neurons": [m.sum(1).int().tolist() for m in masks],
            "claimed_neurons": masks.amax(0).sum(1).int().tolist(),
            "export_mask": self.params.cpt_export_mask,
            # growth: the plugin's weights, and the FFN units the export adds per layer
            "plugin_parameters": sum(w.numel() for w in self.plugin.layers.parameters()),
            "export_units": int(self.export_mask().sum(1).max()),
        }
        with atomic_path(ctx.strategy_dir() / WEIGHTS) as tmp:
            save_file(tensors, str(tmp))
        write_json(ctx.strategy_dir() / META, meta)
        self._record = {k: v for k, v in meta.items() if k != "stages"}

    def growth(self) -> dict | None:
        return self._record

    def final_model(self, model: nn.Module) -> nn.Module:
        """The backbone widened by the plugin under the exported mask (see the module doc)."""
        for h in self.handles:
            h.remove()
        widen(model, self.ctx.unit_map, self.plugin, self.export_mask())
        delattr(model, ATTR)
        for w in model.parameters():
            w.requires_grad_(True)
        return model
