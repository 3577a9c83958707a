"""AdamW whose step is scaled per unit: ``w <- w + (1 - I) * delta_AdamW(w)``.

This is DAS's update mask folded into the optimizer, so that no copy of the weights and
no dense multiplier tensor is ever kept: each masked parameter carries one or two small
broadcast vectors (shape ``[out, 1]``, ``[1, in]`` or ``[n]``). For a masked parameter
the step computes the decoupled-weight-decay AdamW change

    delta = -lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)

into a transient, scales it by the vectors and adds it to ``w``. The moments ``m``, ``v``
and the step count are updated from the unmasked gradient, exactly as plain AdamW does,
and live in the same state entries, so checkpoints load into either class.

No per-step allocation of parameter size: masked parameters are processed in buckets of
at most ``bucket_elements`` elements (large parameters split into row blocks), a few
``_foreach`` kernels per bucket, and the Adam denominator lives in one scratch buffer of a
bucket's size (64 MiB in fp32) kept across steps. Unmasked parameters go through torch's
own AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam

#: elements per bucket of masked parameters: the size of the step's scratch (64 MiB fp32)
DEFAULT_BUCKET_ELEMENTS = 1 << 24


class MaskedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with per-parameter broadcast multipliers on the change.

    ``multipliers`` maps a parameter to the factors its change is multiplied by (each
    broadcastable to the parameter, at most one per axis). ``fused`` is not supported for
    the masked parameters and is dropped; ``amsgrad``, ``capturable`` and ``differentiable``
    are refused.
    """

    def __init__(
        self,
        params: Iterable,
        multipliers: Mapping[Tensor, Sequence[Tensor]],
        *,
        bucket_elements: int = DEFAULT_BUCKET_ELEMENTS,
        **adamw_kwargs,
    ) -> None:
        for flag in ("amsgrad", "capturable", "differentiable"):
            if adamw_kwargs.get(flag):
                raise ValueError(f"MaskedAdamW does not support {flag}=True")
        adamw_kwargs.pop("fused", None)
        super().__init__(params, **adamw_kwargs)
        if bucket_elements < 1:
            raise ValueError("bucket_elements must be positive")
        self.bucket_elements = bucket_elements
        self._factors: dict[int, tuple[Tensor, ...]] = {}
        for p, factors in multipliers.items():
            for f in factors:
                if f.dim() != p.dim() or any(
                    n not in (1, m) for n, m in zip(f.shape, p.shape, strict=True)
                ):
                    shapes = f"{tuple(f.shape)} to {tuple(p.shape)}"
                    raise ValueError(f"factor does not broadcast: {shapes}")
            self._factors[id(p)] = tuple(factors)
        self._plans: dict[tuple[int, ...], list] = {}
        self._scratch: dict[tuple, Tensor] = {}  # per (device, dtype): the step's denominator

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            # torch's own lazy state initialisation: the state format stays plain AdamW's
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, [], steps)
            masked = [i for i, p in enumerate(params) if id(p) in self._factors]
            if len(masked) < len(params):
                chosen = set(masked)
                plain = [i for i in range(len(params)) if i not in chosen]
                beta1, beta2 = group["betas"]
                adam(
                    *([lst[i] for i in plain] for lst in (params, grads, exp_avgs, exp_avg_sqs)),
                    [],
                    [steps[i] for i in plain],
                    foreach=group["foreach"],
                    has_complex=has_complex,
                    decoupled_weight_decay=True,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                )
            if masked:
                self._masked_step(
                    group,
                    *([lst[i] for i in masked] for lst in (params, grads, exp_avgs, exp_avg_sqs)),
                    [steps[i] for i in masked],
                )
        return loss

    def _masked_step(self, group, params, grads, exp_avgs, exp_avg_sqs, steps) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), group["eps"]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        # moments from the unmasked gradient, as plain AdamW
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [float(s) for s in steps]
        for bucket in self._plan(params):
            w, m, v, first, scratch, step_size, bc2_sqrt = [], [], [], [], [], [], []
            two_axes: list[tuple[int, tuple[Tensor, ...]]] = []  # no shipped family has one
            for j, (i, rows, fs, buf) in enumerate(bucket):
                w.append(_block(params[i], rows))
                m.append(_block(exp_avgs[i], rows))
                v.append(_block(exp_avg_sqs[i], rows))
                first.append(fs[0])
                scratch.append(buf)
                if len(fs) > 1:
                    two_axes.append((j, fs))
                step_size.append(-lr / (1 - beta1 ** counts[i]))
                bc2_sqrt.append((1 - beta2 ** counts[i]) ** 0.5)
            # decoupled weight decay, scaled: w <- w - lr * wd * f * w
            if wd != 0:
                skip = {j for j, _ in two_axes}
                one = [j for j in range(len(w)) if j not in skip]
                if one:
                    ws = [w[j] for j in one]
                    torch._foreach_addcmul_(ws, ws, [first[j] for j in one], -lr * wd)
                for j, fs in two_axes:  # w * f1 * f2 through the scratch, never a dense product
                    tmp = scratch[j].copy_(w[j])
                    for f in fs:
                        tmp.mul_(f)
                    w[j].add_(tmp, alpha=-lr * wd)
            # Adam, scaled: the multiplier and -step_size fold into the denominator, so
            # w + m / (denom / (-step_size * f)) adds -step_size * f * m / denom in one pass
            # (f = 0 makes the denominator -inf: an exact zero change). The denominator
            # lives in a scratch buffer kept across steps: no allocation per step.
            torch._foreach_copy_(scratch, v)
            torch._foreach_sqrt_(scratch)
            torch._foreach_div_(scratch, bc2_sqrt)
            torch._foreach_add_(scratch, eps)
            torch._foreach_div_(scratch, torch._foreach_mul(first, step_size))
            for j, fs in two_axes:
                for f in fs[1:]:
                    scratch[j].div_(f)
            torch._foreach_addcdiv_(w, m, scratch)

    def _plan(self, params: list[Tensor]) -> list[list[tuple]]:
        """Buckets of (index, row block, factor blocks, scratch view), at most
        ``bucket_elements`` elements each, one device and dtype per bucket.

        Built once per set of parameters with gradients (normally once per stage); the
        tensors of a step are sliced from it, so state reloaded from a checkpoint is used.
        """
        key = tuple(id(p) for p in params)
        if key in self._plans:
            return self._plans[key]
        budget = self.bucket_elements
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        planned: list[tuple[tuple, list[tuple[int, slice, int]]]] = []
        for kind, indices in by_kind.items():
            buckets: list[list[tuple[int, slice, int]]] = [[]]
            size = 0
            for i in indices:
                p = params[i]
                n_rows = p.shape[0] if p.dim() else 1
                per_row = p.numel() // n_rows if n_rows else 0
                block = max(1, budget // max(1, per_row))
                for lo in range(0, n_rows, block):
                    rows = slice(lo, min(n_rows, lo + block))
                    n = (rows.stop - lo) * per_row
                    if size and size + n > budget:
                        buckets.append([])
                        size = 0
                    buckets[-1].append((i, rows, n))
                    size += n
            planned.extend((kind, b) for b in buckets if b)
        need: dict[tuple, int] = {}
        for kind, b in planned:
            need[kind] = max(need.get(kind, 0), sum(n for _, _, n in b))
        if any(self._scratch.get(k, _EMPTY).numel() < n for k, n in need.items()):
            self._plans.clear()  # their views point into the smaller buffers
            for (device, dtype), n in need.items():
                if self._scratch.get((device, dtype), _EMPTY).numel() < n:
                    self._scratch[(device, dtype)] = torch.empty(n, device=device, dtype=dtype)
        plan = []
        for kind, b in planned:
            flat, offset, entries = self._scratch[kind], 0, []
            for i, rows, n in b:
                p = params[i]
                shape = p.shape if p.dim() == 0 else (rows.stop - rows.start, *p.shape[1:])
                buf = flat[offset : offset + n].view(shape)
                factors = tuple(_factor_block(f, rows) for f in self._factors[id(p)])
                entries.append((i, rows, factors, buf))
                offset += n
            plan.append(entries)
        if len(self._plans) >= 8:  # grads that come and go: keep the cache small
            self._plans.clear()
        self._plans[key] = plan
        return plan


_EMPTY = torch.empty(0)


def _block(t: Tensor, rows: slice) -> Tensor:
    return t if t.dim() == 0 else t[rows]


def _factor_block(factor: Tensor, rows: slice) -> Tensor:
    """The rows ``rows`` of a broadcast factor (all of it when it broadcasts over dim 0)."""
    return factor if factor.dim() == 0 or factor.shape[0] == 1 else factor[rows]
