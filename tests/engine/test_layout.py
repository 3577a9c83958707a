"""``das_engine.layout``: the step checkpoints of an unfinished stage, read where the
trainer really writes them (the service lists them with this, knowing no paths)."""

from __future__ import annotations

from das_engine.layout import step_checkpoints, step_of, unfinished_stage_checkpoints
from das_engine.lineage import Lineage

from .conftest import TINY_CONFIG, interrupt


def test_an_interrupted_stage_shows_its_step_checkpoints_until_it_completes(tmp_path, corpora):
    cfg = {**TINY_CONFIG, "max_steps": 8, "checkpoint_every": 2}
    lin = Lineage.create(tmp_path / "lin", "tiny-roberta", cfg)
    interrupt(lin, corpora[0], "legal", after_steps=5)
    found = unfinished_stage_checkpoints(lin.path, 1, "legal")
    steps = [c.step for c in found]
    assert steps and steps == sorted(steps) and len(steps) <= 2  # the trainer keeps two
    assert all(s % 2 == 0 and 2 <= s <= 8 for s in steps)
    assert all(c.path.is_dir() and c.written_at > 0 for c in found)
    assert unfinished_stage_checkpoints(lin.path, 1, "cooking") == []  # another domain's
    assert unfinished_stage_checkpoints(lin.path, 2, "legal") == []
    result = lin.add_domain(corpora[0], "legal")  # resumes from the newest of them
    assert result.resumed_from_step == steps[-1]
    assert unfinished_stage_checkpoints(lin.path, 1, "legal") == []  # gone with the partial


def test_folders_that_are_not_finished_checkpoints_are_skipped(tmp_path):
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "trainer.json").write_text("{}")
    (tmp_path / "step-00000006").mkdir()  # being written: no trainer.json yet
    (tmp_path / "step-x").mkdir()
    (tmp_path / "notes").mkdir()
    assert [c.step for c in step_checkpoints(tmp_path)] == [4]
    assert step_checkpoints(tmp_path / "missing") == []
    assert step_of(tmp_path / "step-00000012") == 12 and step_of(tmp_path / "step-") is None
