"""The multi-process half of test_distributed.py, launched with ``torchrun``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_job.py WORK LINEAGE CORPUS

Every rank: (1) computes general and domain importance of a tiny model on the shared
importance batches and saves what it got; (2) trains one DAS stage of LINEAGE and saves
the weights it holds in memory at the end of training (rank 0 also commits the stage);
the stage is cancelled by rank 0 at step 2 and resumed from its checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from das_engine import distributed, lineage
from das_engine.bases import build_tiny_model, bundled_tokenizer
from das_engine.errors import Cancelled, DasError
from das_engine.importance import domain_importance, general_importance
from das_engine.lineage import Lineage
from das_engine.objective import Batcher
from das_engine.units import build_unit_map

TEXT = (
    "The licensee shall not distribute copies of the program without the notice. "
    "Whisk the eggs with sugar until pale, then fold in the flour and melted butter. "
    "Any warranty is disclaimed to the extent permitted by applicable law. "
)


def importance_model():
    """A tiny RoBERTa with dropout 0.1 (the proxy KL needs it), the same in every process."""
    model = build_tiny_model(
        bundled_tokenizer(),
        hidden_size=32,
        layers=2,
        heads=4,
        intermediate_size=64,
        max_positions=128,
        seed=3,
    )
    return model, build_unit_map(model)


def importance_batches(n: int = 3, rows: int = 2, length: int = 24) -> list[dict]:
    """n MLM batches (an odd n: the ranks get unequal shares)."""
    tok = bundled_tokenizer()
    words = TEXT.split()
    texts = [" ".join(words[k:] + words[:k]) for k in range(0, n * rows * 5, 5)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    batcher = Batcher(tok, "mlm")
    return [
        batcher(enc["input_ids"][i : i + rows], enc["attention_mask"][i : i + rows], seed=i)
        for i in range(0, n * rows, rows)
    ]


def main(work: Path, lineage_dir: Path, corpus: Path) -> None:
    rank = distributed.topology().rank
    assert distributed.world_size() == 2, "launch with two processes"

    model, unit_map = importance_model()
    batches = importance_batches()
    torch.manual_seed(123)
    general = general_importance(model, unit_map, batches, "paper", ("embedding", "layernorm"))
    domain = domain_importance(model, unit_map, batches, "paper", ("embedding", "layernorm"))
    save_file(
        {f"general.{k}": v for k, v in general.values.items()}
        | {f"domain.{k}": v for k, v in domain.values.items()},
        str(work / f"importance-rank{rank}.safetensors"),
    )

    class RecordingTrainer(lineage.Trainer):
        def run(self):
            summary = super().run()
            state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            save_file(state, str(work / f"weights-rank{rank}.safetensors"))
            return summary

    # a cancel seen by rank 0 only stops every rank; a failure of rank 0 alone reaches them
    agreed = distributed.any_rank(rank == 0)
    try:
        distributed.run_on_main(lambda: Lineage.create(lineage_dir, "tiny-roberta"))
        failed = "none"
    except DasError as exc:
        failed = type(exc).__name__
    (work / f"collective-rank{rank}").write_text(f"{agreed} {failed}")

    lineage.Trainer = RecordingTrainer
    # stopped by rank 0 alone at step 2 (just after the step-2 checkpoint), then resumed
    calls = iter(range(100))
    try:
        Lineage.open(lineage_dir).add_domain(
            corpus, "legal", should_cancel=lambda: rank == 0 and next(calls) == 2
        )
        raise AssertionError("the cancel did not stop the stage")
    except Cancelled:
        pass
    result = Lineage.open(lineage_dir).add_domain(corpus, "legal")
    (work / f"done-rank{rank}").write_text(str(result.trained_tokens))
    distributed.shutdown()


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:4]))
