"""The benchmark's base builder: a first round from scratch, then a second round that
continues it (--init) with a head-only warm-up; base.json adds the rounds up."""

from __future__ import annotations

import json
import math
import random

from benchmarks.continual import prepare_base
from das_engine.bases import load_model, load_tokenizer


def _general(tmp_path, seed: int):  # noqa: ANN001, ANN202
    rng = random.Random(seed)
    words = "the cat sat on a mat while dogs ran in the park and birds sang".split()
    general = tmp_path / "general.txt"
    general.write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)) + "\n"
    )
    return general


def test_two_rounds_with_a_head_only_warm_up(tmp_path):
    general = _general(tmp_path, 0)
    out = tmp_path / "base"
    common = ["--general", str(general), "--out", str(out), "--eval-batches", "1"]
    common += ["--batch-size", "4", "--block-size", "32", "--threads", "1"]
    first = prepare_base.main(
        common
        + ["--vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2"]
        + ["--intermediate", "64", "--max-steps", "3"]
    )
    assert first["steps"] == 3 and first["rounds"] == 1
    before = {k: v.clone() for k, v in load_model(out / "model").state_dict().items()}
    second = prepare_base.main(
        common + ["--init", str(out / "model"), "--max-steps", "4", "--head-steps", "2"]
    )
    assert second["rounds"] == 2 and second["steps"] == 7
    assert second["head_steps"] == 2 and second["init"] is None  # round 1 started from scratch
    assert [r["steps"] for r in second["round_summaries"]] == [3, 4]
    assert second["initial_eval_loss"] == first["initial_eval_loss"]
    assert math.isfinite(second["final_eval_loss"]) and second["unigram_entropy"] > 0
    saved = json.loads((out / "base.json").read_text())
    assert saved["steps"] == 7
    after = load_model(out / "model").state_dict()
    assert any(not after[k].equal(before[k]) for k in before)  # round 2 trained
    # the held-out general corpus never overlaps the training part
    held = set((out / "general_eval.txt").read_text().split("\n\n"))
    train = set((out / "general_train.txt").read_text().split("\n\n"))
    assert held - {""} and not (held & train) - {""}
    # a head-only round leaves the encoder's layers exactly as they were
    third = prepare_base.main(
        common + ["--init", str(out / "model"), "--max-steps", "2", "--head-steps", "2"]
    )
    assert third["rounds"] == 3
    final = load_model(out / "model").state_dict()
    layer_keys = [k for k in final if ".encoder.layer." in k]
    assert layer_keys and all(final[k].equal(after[k]) for k in layer_keys)
    assert not final["lm_head.dense.weight"].equal(after["lm_head.dense.weight"])


def test_a_decoder_base_with_dropout_zero(tmp_path):
    """``--architecture llama --dropout 0``: a causal base (next-token loss) whose config
    has no dropout, as real Llama checkpoints do; its held-out loss goes down."""
    general = _general(tmp_path, 1)
    out = tmp_path / "llama"
    report = prepare_base.main(
        ["--general", str(general), "--out", str(out), "--eval-batches", "1"]
        + ["--batch-size", "4", "--block-size", "32", "--threads", "1", "--lr", "3e-3"]
        + ["--vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2"]
        + ["--intermediate", "64", "--max-steps", "30", "--architecture", "llama"]
        + ["--dropout", "0"]
    )
    assert report["architecture"] == "llama" and report["steps"] == 30
    assert report["final_eval_loss"] < report["initial_eval_loss"]
    model = load_model(out / "model")
    assert model.config.model_type == "llama" and model.config.attention_dropout == 0.0
    assert not model.config.is_encoder_decoder and model.can_generate()
    tok = load_tokenizer(out / "model")  # a decoder's tokenizer: BOS first, no </s> after
    ids = tok("the licence")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id and tok.sep_token_id is None
