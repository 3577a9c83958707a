"""Crash-safe writes: a failure while saving leaves the previous version intact."""

import errno

import pytest
import torch

from das_engine import storage
from das_engine.importance import Importance
from das_engine.lineage import Lineage
from das_engine.storage import atomic_dir, atomic_path

from .conftest import TINY_CONFIG


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_text("new, half")
        _enospc()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_failed_rename_keeps_the_old_snapshot(tmp_path, monkeypatch):
    path = tmp_path / "accumulated.safetensors"
    old = Importance({k: torch.zeros(1, 3) for k in ("head", "intermediate", "output")})
    old.save(path, "accumulated")
    new = Importance({k: torch.ones(1, 3) for k in ("head", "intermediate", "output")})
    monkeypatch.setattr(storage.os, "replace", _enospc)
    with pytest.raises(OSError):
        new.save(path, "accumulated")
    monkeypatch.undo()
    assert torch.equal(Importance.load(path).values["head"], torch.zeros(1, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["accumulated.safetensors"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "w").write_text("v2")
        _enospc()
    assert (target / "w").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_disk_full_during_a_checkpoint_then_retry_succeeds(tmp_path, corpora, monkeypatch):
    """The stage fails with the OSError, the lineage is unchanged, a retry completes."""
    cfg = {**TINY_CONFIG, "strategy": "ncl", "max_steps": 6}
    lin = Lineage.create(tmp_path / "l", "tiny-roberta", cfg)
    import das_engine.trainer as trainer_mod

    real = trainer_mod.save_model
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint hits a full disk
            _enospc()
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "save_model", flaky)
    with pytest.raises(OSError) as err:
        lin.add_domain(corpora[0], "legal", should_cancel=lambda: False)
    assert err.value.errno == errno.ENOSPC
    assert lin.domains == []
    partial = next((lin.path / "stages").glob("*.partial"))
    ckpts = sorted(p.name for p in (partial / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]  # the good one survived, no temp dir left
    monkeypatch.setattr(trainer_mod, "save_model", real)
    result = lin.add_domain(corpora[0], "legal")
    assert result.resumed_from_step == 2 and lin.domains == ["legal"]
