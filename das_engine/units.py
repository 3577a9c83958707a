"""Unit maps: which module of an architecture writes each unit (attention head, FFN
intermediate neuron, FFN output neuron), and the forward-hook gates that scale them.

Which modules those are is data: one ``Family`` per model type (``families.py``);
nothing copies model code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from das_engine.errors import UnsupportedArchitectureError
from das_engine.families import (
    FAMILIES,
    Family,
    logits_transform,
    supported_model_types,
    text_config,
)

UNIT_KINDS = ("head", "intermediate", "output")
#: optional unit kinds the paper never masks: one unit per vocabulary row of the word
#: embeddings (and of a separate output projection), one per element of each norm layer
EXTRA_KINDS = ("embedding", "layernorm")


@dataclass
class ParamSlice:
    """One parameter written by units of one kind in one layer.

    ``unit_index[j]`` is the unit that owns position ``j`` along ``axis``; with grouped
    KV heads, ``group`` query heads share one K/V head, whose importance is their max.
    ``-1``: no unit of this slice owns position ``j`` (a fused [q | k | v] with grouped K/V
    heads is two slices of one parameter: the query rows', the K/V rows').
    """

    name: str
    param: nn.Parameter
    kind: str
    layer: int
    axis: int
    unit_index: torch.Tensor
    group: int = 1
    #: the parameter acts as (offset + value): Gemma's norm weights (1 + weight)
    offset: float = 0.0


@dataclass
class UnitMap:
    """The units of one model: counts per kind and the parameter slices each unit writes."""

    model_type: str
    family: Family
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_size: int
    layers: list[nn.Module]
    slices: list[ParamSlice]
    #: slices of the EXTRA_KINDS units; masked only when a config asks for them
    extra_slices: list[ParamSlice] = field(default_factory=list)
    #: what the task model does to its head's logits (Granite's division, Gemma 2's
    #: soft-cap), read from the config once: ``logits`` runs every step
    logits_divisor: float | None = None
    logits_softcap: float | None = None

    @property
    def objective(self) -> str:
        return self.family.objective

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {
            "head": (self.num_layers, self.num_heads),
            "intermediate": (self.num_layers, self.intermediate_size),
            "output": (self.num_layers, self.hidden_size),
        }

    def extra_shapes(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for s in self.extra_slices:
            rows, cols = out.get(s.kind, (0, 0))
            out[s.kind] = (max(rows, s.layer + 1), max(cols, len(s.unit_index)))
        return out

    def slices_of(self, kinds: tuple[str, ...] | list[str]) -> list[ParamSlice]:
        """The parameter slices written by units of ``kinds`` (base or extra)."""
        return [s for s in self.slices + self.extra_slices if s.kind in kinds]

    def module(self, layer: int, path: str) -> nn.Module:
        return self.layers[layer].get_submodule(path)

    def head_module(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.family.head)

    def logits(self, model: nn.Module, states: torch.Tensor) -> torch.Tensor:
        """The task model's logits for hidden ``states``: its LM head, then what the
        family's task model does after it (Granite's division, Gemma 2's soft-cap)."""
        out = self.head_module(model)(states)
        if self.logits_divisor is not None:
            out = out / self.logits_divisor
        if self.logits_softcap is not None:
            out = torch.tanh(out / self.logits_softcap) * self.logits_softcap
        return out


def _out_features(module: nn.Module, conv1d: bool) -> int:
    return module.weight.shape[1] if conv1d else module.weight.shape[0]


def _in_features(module: nn.Module, conv1d: bool) -> int:
    return module.weight.shape[0] if conv1d else module.weight.shape[1]


def build_unit_map(model: nn.Module) -> UnitMap:
    """Find the unit map of a Hugging Face model, or raise naming the supported families."""
    model_type = getattr(model.config, "model_type", None)
    config = text_config(model.config)  # the language model's (Gemma 3 beside its vision)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} has no unit map; supported: "
            + ", ".join(supported_model_types())
        )
    base = model.base_model
    layers = list(base.get_submodule(family.layers))
    num_heads = getattr(config, "num_attention_heads", None) or config.n_head
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    conv = family.conv1d
    ffn_out0 = layers[0].get_submodule(family.ffn_out)
    hidden = _out_features(ffn_out0, conv)
    inter = _in_features(ffn_out0, conv)
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    name_of = {id(p): n for n, p in model.named_parameters()}

    slices: list[ParamSlice] = []

    def add(module: nn.Module, kind: str, layer: int, writes_output: bool, index, group=1):
        # Linear weights are [out, in]; Conv1D weights are [in, out].
        w_axis = (1 if conv else 0) if writes_output else (0 if conv else 1)
        slices.append(
            ParamSlice(name_of[id(module.weight)], module.weight, kind, layer, w_axis, index, group)
        )
        if writes_output and getattr(module, "bias", None) is not None:
            slices.append(
                ParamSlice(name_of[id(module.bias)], module.bias, kind, layer, 0, index, group)
            )

    for i, layer in enumerate(layers):
        q_heads = torch.arange(num_heads * head_dim) // head_dim
        if family.fused_qkv:
            fused = layer.get_submodule(family.fused_qkv)
            width = _out_features(fused, conv)
            pos = torch.arange(width)
            q_width, kv_width = num_heads * head_dim, num_kv * head_dim
            if family.qkv_per_head:  # [q_h k_h v_h] per head h
                add(fused, "head", i, True, pos // (width // num_heads))
            elif num_kv == num_heads:  # [q | k | v]
                add(fused, "head", i, True, (pos % q_width) // head_dim)
            else:  # [q | k | v] with grouped K/V heads: query rows, then K/V rows
                q_rows = torch.where(pos < q_width, pos // head_dim, -1)
                kv_rows = torch.where(pos >= q_width, ((pos - q_width) % kv_width) // head_dim, -1)
                add(fused, "head", i, True, q_rows)
                add(fused, "head", i, True, kv_rows, num_heads // num_kv)
        else:
            add(layer.get_submodule(family.q), "head", i, True, q_heads)
            kv_heads = torch.arange(num_kv * head_dim) // head_dim
            group = num_heads // num_kv
            add(layer.get_submodule(family.k), "head", i, True, kv_heads, group)
            add(layer.get_submodule(family.v), "head", i, True, kv_heads, group)
        add(layer.get_submodule(family.attn_out), "head", i, False, q_heads)
        for path in family.ffn_in:  # a stacked one ([gate | up]) holds each unit k times
            stacked = torch.arange(inter * family.ffn_in_stacked) % inter
            add(layer.get_submodule(path), "intermediate", i, True, stacked)
        add(layer.get_submodule(family.ffn_out), "output", i, True, torch.arange(hidden))

    divisor, cap = logits_transform(family, model.config)
    return UnitMap(
        model_type=model_type,
        family=family,
        num_layers=len(layers),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        hidden_size=hidden,
        layers=layers,
        slices=slices,
        extra_slices=_extra_slices(model, hidden, name_of, family.norm_weight_offset),
        logits_divisor=divisor,
        logits_softcap=cap,
    )


def _is_norm(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and weight.shape[0] == hidden
        and (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm"))
    )


def _extra_slices(
    model: nn.Module, hidden: int, name_of: dict[int, str], norm_offset: float = 0.0
) -> list[ParamSlice]:
    """Embedding rows (input, and output projection when untied) and norm-layer elements.

    A unit owns its row/element in every parameter listed here, so one virtual gate on the
    unit's output has gradient sum_p sum_row((offset + p) * dL/dp) over those parameters
    (offset 0, except the norm weights of a family that scales by 1 + weight).
    """
    out: list[ParamSlice] = []
    seen: set[int] = set()

    def add(param, kind: str, layer: int, offset: float = 0.0) -> None:
        if param is None or id(param) in seen or id(param) not in name_of:
            return
        seen.add(id(param))
        index = torch.arange(param.shape[0])
        out.append(ParamSlice(name_of[id(param)], param, kind, layer, 0, index, offset=offset))

    emb = model.get_input_embeddings()
    add(emb.weight, "embedding", 0)
    head = model.get_output_embeddings()
    if head is not None and head.weight.shape[0] == emb.weight.shape[0]:
        add(head.weight, "embedding", 0)  # no-op when tied to the input embeddings
        bias = getattr(head, "bias", None)
        if bias is not None and bias.shape[0] == emb.weight.shape[0]:
            add(bias, "embedding", 0)
    norms = [m for m in model.modules() if _is_norm(m, hidden)]
    for j, norm in enumerate(norms):
        add(norm.weight, "layernorm", j, norm_offset)
        add(getattr(norm, "bias", None), "layernorm", j)
    return out


def ones_gates(unit_map: UnitMap, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Virtual parameters: tensors of ones with requires_grad, used only for their gradient."""
    return {
        kind: torch.ones(shape, device=device, requires_grad=True)
        for kind, shape in unit_map.shapes().items()
    }


@contextmanager
def gates_attached(
    model: nn.Module, unit_map: UnitMap, gates: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Multiply each unit's output by its gate for the duration of the ``with`` block."""
    handles = []
    H, hd = unit_map.num_heads, unit_map.head_dim
    fam = unit_map.family

    def head_gate(layer: int):
        def pre_hook(_module, args):
            x = args[0]
            shaped = x.view(*x.shape[:-1], H, hd) * gates["head"][layer].to(x.dtype)[:, None]
            return (shaped.view(x.shape), *args[1:])

        return pre_hook

    def inter_gate(layer: int):
        def pre_hook(_module, args):
            x = args[0]
            return (x * gates["intermediate"][layer].to(x.dtype), *args[1:])

        return pre_hook

    def out_gate(layer: int):
        def hook(_module, _args, output):
            return output * gates["output"][layer].to(output.dtype)

        return hook

    try:
        for i in range(unit_map.num_layers):
            handles.append(unit_map.module(i, fam.attn_out).register_forward_pre_hook(head_gate(i)))
            ffn_out = unit_map.module(i, fam.ffn_out)
            handles.append(ffn_out.register_forward_pre_hook(inter_gate(i)))
            handles.append(ffn_out.register_forward_hook(out_gate(i)))
        yield
    finally:
        for h in handles:
            h.remove()
