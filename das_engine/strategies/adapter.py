"""Adapter (the paper's Adapter-ONE): a frozen backbone and one LoRA adapter per domain.

Each stage starts from the base model, freezes every weight, and trains only low-rank
adapters (``peft`` LoRA, rank ``adapter_rank``, scale ``adapter_alpha / adapter_rank``) on
every 2-D projection of the transformer layers (query, key, value, attention output, FFN
in and out; B starts at zero, so training starts at the base model). The projections come
from the unit map's layers, so any family with a unit map works. LoRA runs as a side path
``x A^T B^T`` (nothing of the size of W is rebuilt per forward).

``peft`` injects its layers into the model object in place, so the trainer, the step
checkpoints (the model's own state dict, LoRA keys included) and exact resume see one
model throughout. At the end of the stage the adapter is saved as the stage's
``adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained`` on the base) and *merged* into the weights: the stage
checkpoint is a plain transformers model that loads without any adapter library.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from das_engine.storage import atomic_dir
from das_engine.strategies.base import StageContext, Strategy
from das_engine.strategy_params import StrategyParams, param

DIR = "adapter"  # under the stage directory


@dataclass
class AdapterParams(StrategyParams):
    adapter_rank: int = param(8, "Strategy `adapter`: LoRA rank.", minimum=1, maximum=4096)
    adapter_alpha: float = param(
        16.0,
        "Strategy `adapter`: LoRA scaling numerator (scale = alpha / rank).",
        minimum=0.0,
        maximum=1e4,
        exclusive_minimum=True,
    )


def adapted_modules(ctx: StageContext) -> list[str]:
    """Full names of every module with a 2-D ``weight`` inside the transformer layers."""
    inside: list[nn.Module] = []
    for layer in ctx.unit_map.layers:
        for module in layer.modules():
            w = getattr(module, "weight", None)
            if isinstance(module, nn.Embedding) or not isinstance(w, nn.Parameter):
                continue
            if w.dim() == 2:
                inside.append(module)
    wanted = {id(m) for m in inside}
    return [name for name, m in ctx.model.named_modules() if id(m) in wanted]


class Adapter(Strategy):
    name = "adapter"
    params = AdapterParams
    starts_from_base = True

    def prepare(self, ctx: StageContext) -> None:
        from peft import LoraConfig, get_peft_model

        super().prepare(ctx)
        cfg = self.config
        targets = adapted_modules(ctx)
        conv1d = [type(ctx.model.get_submodule(n)).__name__ == "Conv1D" for n in targets]
        lora = LoraConfig(
            r=self.params.adapter_rank,
            lora_alpha=self.params.adapter_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=bool(conv1d) and all(conv1d),  # GPT-2 stores W as [in, out]
        )
        torch.manual_seed(cfg.seed)  # the A matrices' initialisation
        # wraps the model object in place (its modules replaced by LoRA layers, every
        # weight but the LoRA ones frozen); ctx.model stays the object the trainer uses
        with warnings.catch_warnings():  # peft reads a property transformers deprecated
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            self.peft = get_peft_model(ctx.model, lora)
        self.targets = targets

    def finish(self, ctx: StageContext) -> None:
        assert ctx.stage_dir is not None
        with atomic_dir(ctx.stage_dir / DIR) as tmp:
            self.peft.save_pretrained(str(tmp), save_embedding_layers=False)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card stub

    def final_model(self, model: nn.Module) -> nn.Module:
        """Merge every adapter into its weight and drop the LoRA layers."""
        merged = self.peft.merge_and_unload()
        assert merged is model, "peft must have wrapped the trainer's model in place"
        if hasattr(model, "peft_config"):
            del model.peft_config
        for p in model.parameters():
            p.requires_grad_(True)
        self.peft = None
        return model
