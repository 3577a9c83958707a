"""Model families as data: where a family keeps its units, what its LM head does to the
logits, and how long a sequence it embeds.

Adding a model family is one ``Family`` entry in ``FAMILIES``
(``tests/engine/test_families.py`` runs every entry). Everything that depends on the family
reads it from here: the unit map (``units.py``), the LM loss (``objective.py``), the
block-size limit (the engine's and the API's pre-flight), the built-in tiny bases
(``bases.build_tiny_model``), CPT's plugins and ELLE's growth. Imports no
torch: the web API checks hyper-parameters against a base's config with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Family:
    """Module paths (relative to one transformer layer) of a model family, and the few
    things its task model does outside those modules."""

    layers: str  # path of the layer list, relative to the base model
    objective: str  # "mlm" or "clm"
    head: str  # attribute of the task model holding the LM head
    attn_out: str  # projection whose *input* is the concatenated head contexts
    ffn_in: tuple[str, ...]  # projection(s) whose outputs are the intermediate neurons
    ffn_out: str  # projection from intermediate neurons to the hidden size
    q: str | None = None
    k: str | None = None
    v: str | None = None
    fused_qkv: str | None = None  # one projection holding q, k and v ([q | k | v])
    #: fused q/k/v laid out per head ([q_h k_h v_h] for each head h: GPT-NeoX), not as
    #: [q | k | v] (GPT-2)
    qkv_per_head: bool = False
    conv1d: bool = False  # GPT-2 Conv1D stores weights as [in, out]
    #: each ``ffn_in`` projection stacks this many (Phi-3's gate_up_proj: [gate | up], 2)
    ffn_in_stacked: int = 1
    #: config attribute naming the FFN's activation (CPT's plugins use the same one)
    activation: str = "hidden_act"
    #: position ids start after the padding index (RoBERTa): pad_token_id + 1 fewer positions
    padded_positions: bool = False
    #: config attribute the task model divides its logits by (Granite's logits_scaling)
    logits_divisor: str | None = None
    #: config attribute of a final tanh soft-cap on the logits (Gemma 2's, 30.0)
    logits_softcap: str | None = None
    #: norm layers scale by (offset + weight) (Gemma's RMSNorm: 1 + weight)
    norm_weight_offset: float = 0.0
    #: ``bases.build_tiny_model`` gives its config num_key_value_heads and head_dim (the
    #: decoders with grouped K/V heads)
    llama_config_keys: bool = False
    #: the task model wraps the language model beside a vision tower (Gemma 3 4B-27B):
    #: its text settings are in ``config.text_config`` (``text_config``); DAS trains on text
    with_vision: bool = False


_BERT = Family(
    layers="encoder.layer",
    objective="mlm",
    head="cls",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
)
_ROBERTA = replace(_BERT, head="lm_head", padded_positions=True)
_GPT2 = Family(
    layers="h",
    objective="clm",
    head="lm_head",
    fused_qkv="attn.c_attn",
    attn_out="attn.c_proj",
    ffn_in=("mlp.c_fc",),
    ffn_out="mlp.c_proj",
    conv1d=True,
    activation="activation_function",
)
_GPT_NEOX = Family(
    layers="layers",
    objective="clm",
    head="lm_head",  # Pythia checkpoints name it embed_out; transformers renames it on load
    fused_qkv="attention.query_key_value",
    qkv_per_head=True,
    attn_out="attention.dense",
    ffn_in=("mlp.dense_h_to_4h",),
    ffn_out="mlp.dense_4h_to_h",
)
#: Llama's layout: q/k/v/o projections (grouped K/V heads), a gated FFN (gate, up, down)
_LLAMA = Family(
    layers="layers",
    objective="clm",
    head="lm_head",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    llama_config_keys=True,
)
#: Phi-3 (and Phi-3.5 / Phi-4-mini): q/k/v fused as [q | k | v] with grouped K/V heads,
#: gate and up fused as [gate | up]
_PHI3 = replace(
    _LLAMA,
    q=None,
    k=None,
    v=None,
    fused_qkv="self_attn.qkv_proj",
    ffn_in=("mlp.gate_up_proj",),
    ffn_in_stacked=2,
)
#: Phi-1.5 / Phi-2: separate q/k/v, an ungated FFN (fc1, fc2), one norm per parallel block
_PHI = replace(_LLAMA, attn_out="self_attn.dense", ffn_in=("mlp.fc1",), ffn_out="mlp.fc2")
_GEMMA = replace(_LLAMA, norm_weight_offset=1.0)
_GEMMA2 = replace(_GEMMA, logits_softcap="final_logit_softcapping", activation="hidden_activation")

FAMILIES: dict[str, Family] = {
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "camembert": _ROBERTA,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,  # Pythia
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,  # + per-head q/k norms (head_dim wide: inside the heads, not masked)
    "olmo2": _LLAMA,  # + q/k norms over the whole projection
    "olmo3": _LLAMA,
    "smollm3": _LLAMA,  # + layers without rotary embeddings (NoPE)
    "granite": replace(_LLAMA, logits_divisor="logits_scaling"),
    "gemma": _GEMMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    # Gemma 3 4B-27B checkpoints: the text model beside a vision tower, trained on text;
    # this task model applies no soft-cap (its checkpoints set none)
    "gemma3": replace(
        _GEMMA, layers="language_model.layers", activation="hidden_activation", with_vision=True
    ),
    "phi3": _PHI3,
    "phi": _PHI,
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_of(model_config: Any) -> Family | None:
    return FAMILIES.get(getattr(model_config, "model_type", None))


def text_config(model_config: Any) -> Any:
    """The language model's settings: ``model_config`` itself, or the ``text_config`` of a
    model that also has a vision tower (transformers' ``get_text_config``)."""
    get = getattr(model_config, "get_text_config", None)
    return get() if callable(get) else model_config


def max_positions(model_config: Any) -> int | None:
    """The longest sequence a model of ``model_config`` can embed (None: no limit known).

    The one rule for the engine's and the API's pre-flight: GPT-2 names it ``n_positions``,
    the others ``max_position_embeddings``; a family with ``padded_positions`` loses the
    positions up to the padding index (RoBERTa's 514 hold 512 tokens).
    """
    family = family_of(model_config)
    model_config = text_config(model_config)
    limit = getattr(model_config, "n_positions", None)
    if limit is None:
        limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    if family is not None and family.padded_positions:
        pad = getattr(model_config, "pad_token_id", None)
        limit -= (pad if isinstance(pad, int) else 1) + 1
    return limit


def logits_transform(family: Family, model_config: Any) -> tuple[float | None, float | None]:
    """(divisor, soft-cap) the task model applies to its head's logits, None where it
    applies none: the loss must score the logits the model itself produces."""
    model_config = text_config(model_config)
    divisor = getattr(model_config, family.logits_divisor, None) if family.logits_divisor else None
    cap = getattr(model_config, family.logits_softcap, None) if family.logits_softcap else None
    divisor = float(divisor) if divisor not in (None, 1, 1.0) else None
    cap = float(cap) if cap else None
    return divisor, cap
