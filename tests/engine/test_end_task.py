"""End-task evaluation: labelled sets, the linear probe, a lineage's matrix, the CLI."""

import json
import random
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from das_engine import end_task
from das_engine.end_task import (
    Example,
    TaskFormatError,
    TooFewClassesError,
    TooFewExamplesError,
    end_task_matrix,
    load_task,
    probe,
    split_examples,
    summarize_scores,
)
from das_engine.lineage import Lineage

from .conftest import COOKING, LEGAL, TINY_CONFIG, tiny, write_corpus


def _words(text: str) -> set[str]:
    return set(re.sub(r"[^a-z ]", " ", text.lower()).split())


VOCAB_A = sorted(_words(LEGAL) - _words(COOKING))
VOCAB_B = sorted(_words(COOKING) - _words(LEGAL))


def two_vocab_examples(n: int, seed: int = 0) -> list[Example]:
    """Class 0 texts use only legal words, class 1 only cooking words: linearly easy."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        vocab = VOCAB_A if i % 2 == 0 else VOCAB_B
        words = [rng.choice(vocab) for _ in range(rng.randint(6, 14))]
        out.append(Example(" ".join(words), i % 2))
    return out


def write_task(path, examples) -> str:
    path.write_text(
        "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples)
    )
    return str(path)


@pytest.fixture(scope="module")
def model_and_tok():
    from das_engine.bases import bundled_tokenizer

    tok = bundled_tokenizer()
    return tiny(tok), tok


def test_probe_separates_disjoint_vocabularies(model_and_tok):
    model, tok = model_and_tok
    r = probe(model, tok, two_vocab_examples(120))
    assert r["accuracy"] >= 0.9 and r["macro_f1"] >= 0.9
    assert r["n_train"] + r["n_test"] == 120 and r["n_test"] == 36


def test_probe_is_near_chance_on_random_labels(model_and_tok):
    model, tok = model_and_tok
    rng = random.Random(1)
    examples = [Example(e.text, rng.randint(0, 1)) for e in two_vocab_examples(400)]
    r = probe(model, tok, examples)
    assert 0.3 <= r["accuracy"] <= 0.7


def test_probe_is_deterministic(model_and_tok):
    model, tok = model_and_tok
    rng = random.Random(2)
    examples = [Example(e.text, rng.choice("xyz")) for e in two_vocab_examples(60)]
    assert probe(model, tok, examples, seed=3) == probe(model, tok, examples, seed=3)


def test_probe_loads_a_checkpoint_dir_and_refuses_other_modes(tmp_path, model_and_tok):
    model, tok = model_and_tok
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    examples = two_vocab_examples(40)
    assert probe(tmp_path / "m", None, examples) == probe(model, tok, examples)
    with pytest.raises(end_task.ConfigError, match="'linear' or 'finetune'"):
        probe(model, tok, examples, mode="svm")


@pytest.mark.slow
def test_finetune_mode_learns_is_seeded_and_leaves_the_model_alone(model_and_tok):
    model, tok = model_and_tok
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = two_vocab_examples(60)
    kw = {"mode": "finetune", "epochs": 3, "lr": 1e-3, "batch_size": 8}
    r = probe(model, tok, examples, **kw)
    assert r["mode"] == "finetune" and r["accuracy"] >= 0.9
    assert probe(model, tok, examples, **kw) == r
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 30), min_size=2, max_size=5),
    frac=st.floats(0.1, 0.9),
    seed=st.integers(0, 100),
)
def test_split_is_seeded_stratified_and_complete(sizes, frac, seed):
    examples = [Example(f"t{c}-{k}", c) for c, n in enumerate(sizes) for k in range(n)]
    train, test = split_examples(examples, test_fraction=frac, seed=seed)
    assert (train, test) == split_examples(examples, test_fraction=frac, seed=seed)
    assert sorted(e.text for e in train + test) == sorted(e.text for e in examples)
    for c in range(len(sizes)):  # every class on both sides
        assert any(e.label == c for e in train) and any(e.label == c for e in test)


@pytest.mark.parametrize(
    "lines, error, needle",
    [
        (
            ['{"text": "a", "label": 0}', "{oops", '{"text": "b", "label": 1}'],
            TaskFormatError,
            "line 2",
        ),
        (
            ['{"text": "a", "label": 0}', "", '{"text": "b"}'],
            TaskFormatError,
            "line 3: missing field(s) label",
        ),
        (['{"text": "a", "label": true}'], TaskFormatError, "line 1"),
        (['{"text": "  ", "label": 1}'], TaskFormatError, "line 1"),
        (['["a", 1]'], TaskFormatError, "line 1"),
        (
            [json.dumps({"text": f"t{i}", "label": "same"}) for i in range(10)],
            TooFewClassesError,
            "at least 2",
        ),
        (
            [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(4)],
            TooFewExamplesError,
            "4 example",
        ),
        (
            [json.dumps({"text": f"t{i}", "label": min(i, 1)}) for i in range(10)],
            TooFewExamplesError,
            "label(s) 0",
        ),
    ],
)
def test_bad_task_files_name_the_problem(tmp_path, lines, error, needle):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(error) as info:
        load_task(path)
    assert needle in info.value.message and str(path) in info.value.message


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    T=st.integers(2, 5),
)
def test_accuracy_drop_gives_positive_forgetting(data, T):
    acc = st.floats(0.0, 1.0, allow_nan=False)
    A = [[data.draw(acc) for _ in range(T)] for _ in range(T)]
    drops = [data.draw(st.floats(0.0, 1.0)) for _ in range(T - 1)]
    drops[data.draw(st.integers(0, T - 2))] = data.draw(st.floats(0.05, 1.0))
    for i in range(T - 1):  # the final row lost `drops[i]` on every earlier task
        A[T - 1][i] = A[i][i] - drops[i]
    domains = [f"d{i}" for i in range(T)]
    base = [data.draw(acc) for _ in range(T)]
    s = summarize_scores(domains, domains, base, A)
    expected = sum(drops) / (T - 1)
    assert s["forgetting_rate"] > 0 and s["forgetting_rate"] == pytest.approx(expected)
    assert s["bwt"] == pytest.approx(-expected)
    assert s["max_forgetting"] >= s["forgetting_rate"] - 1e-12
    fwt = sum(A[i - 1][i] - base[i] for i in range(1, T)) / (T - 1)
    assert s["fwt"] == pytest.approx(fwt)


def test_tasks_are_aligned_to_domains_by_name():
    # task columns in another order plus an extra task: only the named ones count
    s = summarize_scores(
        ["a", "b"], ["b", "x", "a"], [0.5, 0.5, 0.5], [[0.6, 0.1, 0.9], [0.8, 0.2, 0.7]]
    )
    assert s["aligned_tasks"] == ["a", "b"]
    assert s["forgetting_rate"] == pytest.approx(0.9 - 0.7)
    assert s["fwt"] == pytest.approx(0.6 - 0.5)


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("endtask")
    lin = Lineage.create(
        root / "lin", "tiny-roberta", {**TINY_CONFIG, "strategy": "ncl", "max_steps": 2}
    )
    lin.add_domain(write_corpus(root / "legal.txt", LEGAL), "legal")
    lin.add_domain(write_corpus(root / "cooking.txt", COOKING), "cooking")
    rng = random.Random(5)
    tasks = {
        "legal": write_task(root / "legal.jsonl", two_vocab_examples(40)),
        "cooking": write_task(
            root / "cooking.jsonl",
            [Example(e.text, rng.choice(["sweet", "salty"])) for e in two_vocab_examples(40, 1)],
        ),
    }
    return lin, tasks, root


def test_lineage_matrix_shape_storage_and_incremental(two_stage, monkeypatch):
    lin, tasks, root = two_stage
    calls = []
    real = end_task.probe

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(end_task, "probe", counting)
    first = end_task_matrix(lin, tasks)
    assert first["rows"] == ["base", "legal", "cooking"] and first["tasks"] == ["legal", "cooking"]
    for key in ("accuracy", "macro_f1"):
        assert len(first[key]) == 3 and all(len(r) == 2 for r in first[key])
        assert all(0.0 <= x <= 1.0 for r in first[key] for x in r)
    assert all(first["accuracy"][r][0] >= 0.9 for r in range(3))  # the easy task stays easy
    assert first["computed"] == 6 and len(calls) == 6
    stored = json.loads((lin.path / "end_task" / "matrix.json").read_text())
    assert stored["latest"]["accuracy"] == first["accuracy"] and len(stored["cells"]) == 6
    summary = first["summary"]["accuracy"]
    assert summary["aligned_tasks"] == ["legal", "cooking"]
    assert summary["forgetting_rate"] == pytest.approx(
        first["accuracy"][1][0] - first["accuracy"][2][0]
    )

    again = end_task_matrix(lin, tasks)
    assert again["computed"] == 0 and len(calls) == 6
    assert {k: v for k, v in again.items() if k != "computed"} == {
        k: v for k, v in first.items() if k != "computed"
    }

    # a changed task file is a new column of cells: only its 3 cells are computed
    changed = dict(tasks, cooking=write_task(root / "cooking2.jsonl", two_vocab_examples(30, 9)))
    third = end_task_matrix(lin, changed)
    assert third["computed"] == 3 and len(calls) == 9
    assert [r[0] for r in third["accuracy"]] == [r[0] for r in first["accuracy"]]


@pytest.mark.slow
def test_cli_eval_prints_both_matrices_and_metrics_shows_them(two_stage):
    lin, tasks, _root = two_stage
    cli = [sys.executable, "-m", "das_engine.cli"]
    task_args = [a for name, path in tasks.items() for a in ("--task", f"{name}={path}")]
    r = subprocess.run(
        cli + ["eval", "--lineage", str(lin.path), *task_args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "end-task accuracy" in r.stdout and "end-task macro-F1" in r.stdout
    assert re.search(r"^cooking\s+[\d.]+\s+[\d.]+$", r.stdout, re.M)
    assert r.stdout.count("forgetting rate") == 2

    r = subprocess.run(
        cli + ["eval", "--lineage", str(lin.path), "--json", *task_args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["rows"] == ["base", "legal", "cooking"] and len(out["macro_f1"]) == 3

    r = subprocess.run(
        cli + ["metrics", "--lineage", str(lin.path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "end-task accuracy" in r.stdout

    bad = subprocess.run(
        cli + ["eval", "--lineage", str(lin.path), "--task", "x=/nonexistent"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "invalid_end_task" in bad.stderr
