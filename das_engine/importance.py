"""Unit importance: the gradient magnitude of a loss w.r.t. each unit's gate, averaged
over batches, normalised per layer and unit kind, and accumulated with element-wise max.

General knowledge uses the proxy KL between two dropout views (spec, step 0; a model
without dropout gets ``importance_dropout`` for those views only); a domain uses its own
LM loss. Snapshots are safetensors files with their unit kinds and shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from das_engine import distributed
from das_engine.errors import ImportanceError
from das_engine.objective import lm_forward
from das_engine.units import EXTRA_KINDS, UNIT_KINDS, UnitMap, gates_attached, ones_gates
from das_engine.view_dropout import injected_dropout, native_dropout, view_dropout


@dataclass
class Importance:
    """Per-unit importance in [0, 1): ``values[kind]`` has shape [layers, units].

    Always holds the three UNIT_KINDS; may hold EXTRA_KINDS (embedding rows, norm elements)
    when a stage asked for them.
    """

    values: dict[str, torch.Tensor]

    @property
    def kinds(self) -> set[str]:
        return set(self.values)

    def emax(self, other: Importance) -> Importance:
        """Element-wise max: the accumulated importance I_acc = EMax(I_1, ..., I_t).

        A kind only one side holds is kept as it is (a stage that did not measure it
        protects nothing extra there)."""
        out = {**self.values, **other.values}
        for k in self.kinds & other.kinds:
            out[k] = torch.maximum(self.values[k], other.values[k])
        return Importance(out)

    def permuted(self, seed: int) -> Importance:
        """Same values shuffled onto random units within each layer and kind (a control)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in self.values.items():
            perms = torch.stack(
                [torch.randperm(v.shape[1], generator=gen) for _ in range(v.shape[0])]
            )
            out[k] = torch.gather(v, 1, perms)
        return Importance(out)

    def budgeted(self, share: float) -> Importance:
        """Only the ``ceil(share * n)`` most important units of each layer and kind keep
        their importance; the others get 0 (no protection; ties at the cut are broken by
        ``torch.topk``). ``share >= 1`` returns the importance unchanged."""
        if share >= 1.0:
            return self
        out = {}
        for k, v in self.values.items():
            n = v.shape[1]
            keep = max(1, math.ceil(share * n))
            if keep >= n:
                out[k] = v
                continue
            top = torch.topk(v, keep, dim=1, sorted=False).indices
            mask = torch.zeros_like(v, dtype=torch.bool).scatter_(1, top, True)
            out[k] = torch.where(mask, v, torch.zeros_like(v))
        return Importance(out)

    def stats(self) -> dict[str, dict[str, float]]:
        return {
            k: {
                "mean": float(v.mean()),
                "max": float(v.max()),
                "share_above_half": float((v > 0.5).float().mean()),
            }
            for k, v in self.values.items()
        }

    def save(self, path: Path, kind: str, extra: dict | None = None) -> None:
        """Write atomically (temp file, fsync, rename) so a crash never leaves half a file."""
        from das_engine.storage import atomic_path

        meta = {
            "kind": kind,
            "unit_kinds": json.dumps(list(self.values)),
            "shapes": json.dumps({k: list(v.shape) for k, v in self.values.items()}),
        }
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        with atomic_path(path) as tmp:
            save_file(
                {k: v.detach().float().cpu().contiguous() for k, v in self.values.items()},
                str(tmp),
                meta,
            )

    @classmethod
    def load(cls, path: Path) -> Importance:
        tensors = load_file(str(path))
        missing = [k for k in UNIT_KINDS if k not in tensors]
        if missing:
            raise ImportanceError(f"importance snapshot {path} lacks unit kinds {missing}")
        return cls({k: tensors[k] for k in (*UNIT_KINDS, *EXTRA_KINDS) if k in tensors})


def standardize(raw: torch.Tensor) -> torch.Tensor:
    """Per layer (row): mean 0, std 1 across that layer's units; a constant row gives 0."""
    mean = raw.mean(dim=1, keepdim=True)
    std = raw.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > 0, (raw - mean) / std.clamp_min(1e-12), torch.zeros_like(raw))


def normalize(raw: dict[str, torch.Tensor], method: str = "paper") -> Importance:
    """Map raw |grad| averages to [0, 1).

    ``paper``: |tanh(z)| (the published rule; note it also rewards *below*-average units);
    ``one_sided``: tanh(max(z, 0)) (only above-average units count);
    ``rank``: the unit's rank quantile within its layer, r / n.
    """
    out = {}
    for kind, x in raw.items():
        x = x.float()
        if method == "paper":
            out[kind] = torch.tanh(standardize(x)).abs()
        elif method == "one_sided":
            out[kind] = torch.tanh(standardize(x).clamp_min(0.0))
        elif method == "rank":
            ranks = x.argsort(dim=1).argsort(dim=1).float()
            out[kind] = ranks / x.shape[1]
        else:
            raise ValueError(f"unknown normalization {method!r}")
        # tanh rounds to exactly 1.0 in float32 for z > ~9; keep the [0, 1) contract
        out[kind] = out[kind].clamp(0.0, 1.0 - 1e-6)
    return Importance(out)


LossFn = Callable[[nn.Module, UnitMap, dict], torch.Tensor]


def raw_gate_gradients(
    model: nn.Module,
    unit_map: UnitMap,
    batches: Iterable[dict],
    loss_fn: LossFn,
    extra_kinds: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """I_u = (1/N) sum_n |dL(x_n)/dg_u| with all gates at 1.

    ``torch.autograd.grad`` returns fresh gradients per batch, which is exactly "zero the
    gate grads between batches" (the research code forgot to, defect 4).

    ``extra_kinds`` units (embedding rows, norm elements) have no module output to hook:
    a gate g_u scaling every parameter entry the unit owns has, at g = 1,
    dL/dg_u = sum over those entries of w * dL/dw ((1 + w) * dL/dw for a norm that scales
    by 1 + w, Gemma's), so their gates come from the weights'
    own gradients (signed sum per batch, then |.|, like the hooked gates).
    """
    device = next(model.parameters()).device
    gates = ones_gates(unit_map, device)
    total = {k: torch.zeros_like(g) for k, g in gates.items()}
    extra = unit_map.slices_of(extra_kinds)
    for kind, shape in unit_map.extra_shapes().items():
        if kind in extra_kinds:
            total[kind] = torch.zeros(shape, device=device)
    extra_params = list({id(s.param): s.param for s in extra}.values())
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only gate gradients are needed: skip weight grads
    for p in extra_params:
        p.requires_grad_(True)
    index = {id(p): i for i, p in enumerate(extra_params)}
    n = 0
    try:
        with gates_attached(model, unit_map, gates):
            for batch in distributed.shard_batches(batches):  # this rank's, RNG per batch
                loss = loss_fn(model, unit_map, batch)
                grads = torch.autograd.grad(
                    loss, [gates[k] for k in UNIT_KINDS] + extra_params, allow_unused=True
                )
                for k, g in zip(UNIT_KINDS, grads[: len(UNIT_KINDS)], strict=True):
                    if g is not None:
                        total[k] += g.detach().abs()
                signed = {k: torch.zeros_like(total[k]) for k in extra_kinds if k in total}
                for sl in extra:
                    g = grads[len(UNIT_KINDS) + index[id(sl.param)]]
                    if g is None:
                        continue
                    prod = ((sl.param.detach() + sl.offset) * g.detach()).float()
                    others = tuple(d for d in range(prod.dim()) if d != sl.axis)
                    per_unit = prod.sum(dim=others) if others else prod  # sum(dim=()) = all
                    signed[sl.kind][sl.layer].index_add_(0, sl.unit_index.to(device), per_unit)
                for k, v in signed.items():
                    total[k] += v.abs()
                n += 1
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    distributed.all_reduce_sum_(list(total.values()))  # every rank masks the same units
    n = int(distributed.sum_over_ranks([n])[0])
    if n == 0:
        raise ImportanceError("importance needs at least one batch")
    return {k: (v / n).cpu() for k, v in total.items()}


def has_active_dropout(model: nn.Module) -> bool:
    """Whether the model's own dropout is on now (train mode and some p > 0)."""
    return model.training and native_dropout(model) > 0


def proxy_kl_loss(model: nn.Module, unit_map: UnitMap, batch: dict) -> torch.Tensor:
    """KL(softmax(f1) || softmax(f2)) over the hidden dim, f1/f2 two dropout views of x."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    f1 = model.base_model(**kwargs).last_hidden_state.float()
    f2 = model.base_model(**kwargs).last_hidden_state.float()
    kl = F.kl_div(F.log_softmax(f2, -1), F.log_softmax(f1, -1), log_target=True, reduction="none")
    per_token = kl.sum(-1)
    mask = batch["attention_mask"].to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def domain_loss(model: nn.Module, unit_map: UnitMap, batch: dict) -> torch.Tensor:
    return lm_forward(model, unit_map, batch).loss


def general_importance(
    model: nn.Module,
    unit_map: UnitMap,
    batches: list[dict],
    normalization: str = "paper",
    extra_kinds: tuple[str, ...] = (),
    dropout: float = 0.1,
) -> Importance:
    """Step 0: importance for the general knowledge via the robustness proxy.

    The two views use the model's own dropout when it has some; a dropout-free model
    (Llama-style, or every dropout set to 0) gets ``dropout`` (the config's
    ``importance_dropout``) by hooks, for these views only (``view_dropout``). With no
    dropout at all it refuses: both views would be identical, the KL identically 0, and
    the "importance" floating-point noise (defect 1 of the research code).
    """
    was_training = model.training
    model.train()
    p = injected_dropout(model, dropout)
    try:
        if native_dropout(model) == 0 and p == 0:
            raise ImportanceError(
                "proxy-KL importance needs dropout: this model has none of its own and "
                "importance_dropout is 0, so both views are identical and KL = 0; set "
                "importance_dropout > 0 (e.g. 0.1) or a dropout probability in the model config"
            )
        with view_dropout(model, unit_map, p):
            with torch.no_grad():
                probe = proxy_kl_loss(model, unit_map, batches[0])
            if not float(probe) > 0.0:
                raise ImportanceError(
                    f"proxy KL is {float(probe)} on the first batch: the two dropout views are "
                    "identical (or not finite)"
                )
            raw = raw_gate_gradients(model, unit_map, batches, proxy_kl_loss, extra_kinds)
    finally:
        model.train(was_training)
    return normalize(raw, normalization)


def domain_importance(
    model: nn.Module,
    unit_map: UnitMap,
    batches: list[dict],
    normalization: str = "paper",
    extra_kinds: tuple[str, ...] = (),
) -> Importance:
    """Importance of the units for a domain, from that domain's own LM loss (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        raw = raw_gate_gradients(model, unit_map, batches, domain_loss, extra_kinds)
    finally:
        model.train(was_training)
    return normalize(raw, normalization)


def layer_summary(path: Path) -> dict[str, dict]:
    """Per unit kind, per layer: the mean importance and the share of units above 0.5
    (the units the soft mask mostly protects). Reads the snapshot's tensors with numpy, one
    at a time, without a model: cheap enough for a request."""
    from safetensors import safe_open

    out: dict[str, dict] = {}
    with safe_open(str(path), framework="np") as f:
        for kind in f.keys():
            values = f.get_tensor(kind)
            if values.ndim != 2 or values.shape[1] == 0:
                continue
            out[kind] = {
                "layers": int(values.shape[0]),
                "units": int(values.shape[1]),
                "mean": [float(v) for v in values.mean(axis=1)],
                "share_above_half": [float(v) for v in (values > 0.5).mean(axis=1)],
            }
    return out
