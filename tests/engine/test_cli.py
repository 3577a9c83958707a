"""The das-engine CLI end to end, and its checkpoint loaded by plain transformers."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import COOKING, LEGAL, write_corpus

CLI = [sys.executable, "-m", "das_engine.cli"]


def _run(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, **kw)


def test_run_two_domains_then_add_and_load_without_das_engine(tmp_path):
    legal = write_corpus(tmp_path / "legal.txt", LEGAL)
    cooking = tmp_path / "cooking.jsonl"
    cooking.write_text(
        "\n".join(json.dumps({"text": COOKING[i:] + COOKING[:i]}) for i in range(0, 200, 5)) + "\n"
    )
    out = tmp_path / "lineage"
    flags = [
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--set",
        "eval_max_batches=2",
        "--set",
        "importance_max_batches=2",
    ]
    r = _run(
        [
            "run",
            "--base",
            "tiny-roberta",
            "--strategy",
            "das",
            "--out",
            str(out),
            "--json",
            *flags,
            str(legal),
            str(cooking),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "forgetting rate" in r.stdout and "training" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["domains"] == ["legal", "cooking"]
    assert len(metrics["loss_matrix"]) == 2 and len(metrics["loss_matrix"][1]) == 2
    for key in ("forgetting_rate", "bwt", "fwt"):
        assert math.isfinite(metrics[key])

    third = write_corpus(tmp_path / "more.txt", COOKING + LEGAL)
    r = _run(["add", "--lineage", str(out), "--json", str(third)])
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "metrics.json").read_text())["domains"][-1] == "more"

    model_dir = next((out / "stages").glob("003-*")) / "model"
    probe = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForMaskedLM, AutoTokenizer
        m = AutoModelForMaskedLM.from_pretrained({str(model_dir)!r})
        t = AutoTokenizer.from_pretrained({str(model_dir)!r})
        ids = t("The licensee shall <mask> copies.", return_tensors="pt")
        out = m(**ids)
        assert out.logits.shape[-1] == len(t)
        assert not any(k.startswith("das_engine") for k in sys.modules)
        print("loaded", sum(p.numel() for p in m.parameters()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("loaded")


def test_errors_are_one_line_with_a_code(tmp_path):
    r = _run(["run", "--base", "tiny-roberta", "--out", str(tmp_path / "x"), "missing.txt"])
    assert r.returncode == 2 and "invalid_corpus" in r.stderr and "missing.txt" in r.stderr
    assert not (tmp_path / "x").exists()  # nothing created for a run that cannot start
    (tmp_path / "a.txt").write_text(LEGAL)
    r = _run(
        ["run", "--base", "no-such-model", "--out", str(tmp_path / "x"), "a.txt"], cwd=tmp_path
    )
    assert r.returncode == 2
    assert "base_model_unloadable" in r.stderr and "Traceback" not in r.stderr
    args = ["run", "--base", "tiny-roberta", "--out", str(tmp_path / "y"), "--lr", "-1", "a.txt"]
    r = _run(args, cwd=tmp_path)
    assert r.returncode == 2 and "learning_rate" in r.stderr
    # a domain name outside the one rule (das_engine.names), from the file name or given
    (tmp_path / "naïve notes.txt").write_text(LEGAL)
    for corpus in ("naïve notes.txt", "新闻=a.txt"):
        args = ["run", "--base", "tiny-roberta", "--out", str(tmp_path / "z"), corpus]
        r = _run(args, cwd=tmp_path)
        assert r.returncode == 2 and "domain name must be" in r.stderr and "NAME=PATH" in r.stderr
        assert not (tmp_path / "z").exists()


def test_init_base_builds_a_loadable_model(tmp_path):
    corpus = write_corpus(tmp_path / "general.txt", LEGAL + COOKING, docs=80)
    out = tmp_path / "base"
    r = _run(
        [
            "init-base",
            "--out",
            str(out),
            "--from-corpus",
            str(corpus),
            "--vocab-size",
            "400",
            "--hidden-size",
            "32",
            "--intermediate-size",
            "64",
        ]
    )
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok("Whisk the eggs")["input_ids"]) > 3
    assert AutoModelForMaskedLM.from_pretrained(str(out)).config.hidden_size == 32
    r = _run(["bases"])
    assert r.returncode == 0 and '"tiny-roberta"' in r.stdout
    assert Path(out / "tokenizer.json").exists()
