"""A lineage on disk: one base model adapted to a sequence of domains.

    <lineage>/lineage.json                 base model, objective, training config
    <lineage>/base/                        the base model + tokenizer (HF format)
    <lineage>/general/eval/                optional general reference corpus (tokenized)
    <lineage>/importance/general.safetensors   I_general (DAS, step 0)
    <lineage>/stages/001-<name>/           a finished stage, renamed into place atomically:
        model/                             HF checkpoint (loads with plain transformers)
        importance/{domain,accumulated}.safetensors
        data/{train,eval}/                 tokenized, memory-mapped chunks
        stage.json                         evaluation row, back-filled column, counts
    <lineage>/stages/002-<name>.partial/   a stage in progress (step checkpoints for resume)

A stage exists only once its directory is renamed from ``.partial``: a crash leaves the
lineage as it was plus a partial stage that the next ``add_domain`` resumes.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from das_engine import distributed
from das_engine.bases import load_model, load_tokenizer, resolve_base
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, build_datasets, build_single_split
from das_engine.errors import Cancelled, DomainExistsError, LineageBusyError, LineageError
from das_engine.evaluate import heldout_loss
from das_engine.importance import Importance, domain_importance, general_importance
from das_engine.metrics import summarize
from das_engine.objective import Batcher
from das_engine.storage import atomic_dir, read_json, write_json
from das_engine.strategies import StageContext, make_strategy
from das_engine.trainer import (
    CancelFn,
    ProgressEvent,
    ProgressFn,
    Trainer,
    apply_freezing,
    select_device,
)
from das_engine.units import build_unit_map

FORMAT_VERSION = 1
NAME_RE = re.compile(r"^[\w][\w .,:+()/-]{0,99}$", re.UNICODE)

__all__ = ["Lineage", "ProgressEvent", "StageInfo", "StageResult"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "domain"


@dataclass
class StageInfo:
    position: int
    name: str
    dir: Path
    meta: dict

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def importance_dir(self) -> Path:
        return self.dir / "importance"

    @property
    def eval_dir(self) -> Path:
        return self.dir / "data" / "eval"


@dataclass
class StageResult:
    position: int
    name: str
    model_dir: Path
    importance_dir: Path
    steps: int
    trained_tokens: int
    eval_losses: dict[str, float]
    general_loss: float | None
    column: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from_step: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_dir"], d["importance_dir"] = str(self.model_dir), str(self.importance_dir)
        return d


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class Lineage:
    def __init__(self, path: Path, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self.config = TrainingConfig.from_dict(meta["config"])

    # -- creation and opening ---------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path,
        base_model: str,
        config: TrainingConfig | dict | None = None,
        *,
        general_corpus: Path | None = None,
        models_dir: Path | None = None,
        allow_hub: bool = False,
    ) -> Lineage:
        path = Path(path)
        if (path / "lineage.json").exists():
            raise LineageError(f"{path} already holds a lineage; use add to continue it")
        if path.exists() and any(path.iterdir()):
            raise LineageError(f"{path} exists and is not empty")
        cfg = config if isinstance(config, TrainingConfig) else TrainingConfig.from_dict(config)
        info = resolve_base(base_model, models_dir, allow_hub=allow_hub)
        path.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(info.path)
        model = load_model(info.path)
        with atomic_dir(path / "base") as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        meta = {
            "format": FORMAT_VERSION,
            "base_model": base_model,
            "base": info.to_dict(),
            "objective": info.objective,
            "config": cfg.to_dict(),
            "created_at": time.time(),
            "general": None,
        }
        lineage = cls(path, meta)
        if general_corpus is not None:
            build_single_split(
                Path(general_corpus),
                tokenizer,
                path / "general" / "eval",
                block_size=cfg.block_size,
                objective=info.objective,
            )
            unit_map = build_unit_map(model)
            loss = lineage._eval(model, unit_map, tokenizer, path / "general" / "eval")
            meta["general"] = {"corpus": str(general_corpus), "base_loss": _finite(loss)}
        write_json(path / "lineage.json", meta)
        return lineage

    @classmethod
    def open(cls, path: Path) -> Lineage:
        path = Path(path)
        try:
            meta = read_json(path / "lineage.json")
        except FileNotFoundError:
            raise LineageError(f"{path} is not a lineage (no lineage.json)") from None
        except ValueError as exc:
            raise LineageError(f"{path}/lineage.json is corrupt: {exc}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise LineageError(f"{path}: unsupported lineage format {meta.get('format')!r}")
        return cls(path, meta)

    # -- layout ------------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.path / "base"

    @property
    def stages(self) -> list[StageInfo]:
        out = []
        root = self.path / "stages"
        if not root.exists():
            return out
        for d in sorted(root.iterdir()):
            if d.name.endswith(".partial") or d.name.startswith(".") or not d.is_dir():
                continue
            meta_file = d / "stage.json"
            if not meta_file.exists():
                continue
            meta = read_json(meta_file)
            if meta.get("status") == "complete":
                out.append(StageInfo(meta["position"], meta["name"], d, meta))
        return sorted(out, key=lambda s: s.position)

    @property
    def domains(self) -> list[str]:
        return [s.name for s in self.stages]

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """One writer per lineage: a second trainer on the same lineage fails fast."""
        if not distributed.is_main():  # the ranks of one job share rank 0's lock
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LineageBusyError(f"{self.path} is being trained by another process") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- helpers -------------------------------------------------------------------------
    def _eval(self, model, unit_map, tokenizer, split_dir: Path) -> float:
        batcher = Batcher(tokenizer, unit_map.objective, self.config.mlm_probability)
        return heldout_loss(
            model,
            unit_map,
            ChunkStore(split_dir),
            batcher,
            batch_size=self.config.batch_size,
            max_batches=self.config.eval_max_batches,
        )

    def _importance_batches(self, store: ChunkStore, batcher: Batcher, device) -> list[dict]:
        cfg = self.config
        n = max(1, int(round(cfg.importance_sample_ratio * len(store))))
        n = min(n, cfg.importance_max_batches * cfg.batch_size, len(store))
        torch.manual_seed(cfg.seed + 13)  # proxy-KL dropout masks: reproducible on resume
        gen = torch.Generator().manual_seed(cfg.seed + 17)
        picked = torch.randperm(len(store), generator=gen)[:n].tolist()
        batches = []
        for j in range(0, n, cfg.batch_size):
            rows = store.rows(picked[j : j + cfg.batch_size])
            b = batcher(rows["input_ids"], rows["attention_mask"], seed=cfg.seed + 31 + j)
            batches.append({k: v.to(device) for k, v in b.items()})
        return batches

    # -- the stage pipeline ------------------------------------------------------------
    def add_domain(
        self,
        corpus: Path,
        name: str,
        *,
        eval_corpus: Path | None = None,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> StageResult:
        """Train the next stage on ``corpus``; resume it if a partial stage of that name exists."""
        progress = progress or (lambda _e: None)
        should_cancel = should_cancel or (lambda: False)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise LineageError(
                "domain name must be 1-100 characters: letters, digits, space and . , : + ( ) / -"
            )
        corpus = Path(corpus)
        if not corpus.is_file():
            raise LineageError(f"corpus file {corpus} does not exist")
        with self._lock():
            return self._add_domain(corpus, name, eval_corpus, progress, should_cancel)

    def _add_domain(self, corpus, name, eval_corpus, progress, should_cancel) -> StageResult:
        started = time.perf_counter()
        cfg = self.config
        previous = self.stages
        if name in [s.name for s in previous]:
            raise DomainExistsError(f"domain {name!r} is already stage of this lineage")
        position = len(previous) + 1
        distributed.wait_for_main()  # rank 0 prepares the partial stage, the others read it
        stages_root = self.path / "stages"
        stages_root.mkdir(exist_ok=True)
        final_dir = stages_root / f"{position:03d}-{_slug(name)}"
        partial = final_dir.with_name(final_dir.name + ".partial")
        sha = sha256_file(corpus)
        for other in stages_root.glob(f"{position:03d}-*.partial"):
            if other != partial:  # an abandoned attempt at another domain
                shutil.rmtree(other)
        state = read_json(partial / "stage.json") if (partial / "stage.json").exists() else None
        if state and (state.get("corpus_sha256") != sha or state.get("name") != name):
            shutil.rmtree(partial)
            state = None
        partial.mkdir(parents=True, exist_ok=True)
        if state is None:
            state = {
                "position": position,
                "name": name,
                "corpus_sha256": sha,
                "corpus": str(corpus),
                "status": "partial",
            }
            write_json(partial / "stage.json", state)

        tokenizer = load_tokenizer(self.base_dir)
        objective = self.meta["objective"]
        data_dir = partial / "data"
        if not (data_dir / "train").exists() or not (data_dir / "eval").exists():
            progress(ProgressEvent("training", 0, 0, message="tokenizing the corpus"))
            with atomic_dir(data_dir) as tmp:
                counts = build_datasets(
                    corpus,
                    tokenizer,
                    tmp,
                    block_size=cfg.block_size,
                    objective=objective,
                    eval_fraction=cfg.eval_fraction,
                    seed=cfg.seed,
                )
                if eval_corpus is not None:
                    counts.update(
                        build_single_split(
                            Path(eval_corpus),
                            tokenizer,
                            tmp / "eval",
                            block_size=cfg.block_size,
                            objective=objective,
                        )
                    )
            state["counts"] = counts
            write_json(partial / "stage.json", state)
        distributed.release_others()
        train_store = ChunkStore(data_dir / "train")
        eval_dir = data_dir / "eval"

        device = select_device(cfg.device)
        strategy = make_strategy(cfg)
        from_base = strategy.starts_from_base or position == 1
        start_dir = self.base_dir if from_base else previous[-1].model_dir
        model = load_model(start_dir).to(device)
        unit_map = build_unit_map(model)
        batcher = Batcher(tokenizer, unit_map.objective, cfg.mlm_probability)

        # I_acc(t-1): EMax(I_general, I(1), ..., I(t-1)); stored per stage, so one load
        accumulated = None
        if strategy.uses_importance:
            extra = cfg.extra_unit_kinds()
            general_path = self.path / "importance" / "general.safetensors"
            acc_path = previous[-1].importance_dir / "accumulated.safetensors" if previous else None
            if acc_path is not None and acc_path.exists():
                accumulated = Importance.load(acc_path)
                if not set(extra) <= accumulated.kinds:  # extra kinds asked for only now
                    accumulated = None
            if accumulated is None:
                general = Importance.load(general_path) if general_path.exists() else None
                if general is None or not set(extra) <= general.kinds:
                    progress(
                        ProgressEvent("importance", 0, 1, message="general importance (proxy KL)")
                    )
                    base_model = model if from_base else load_model(self.base_dir).to(device)
                    batches = self._importance_batches(train_store, batcher, device)
                    general = general_importance(
                        base_model,
                        build_unit_map(base_model),
                        batches,
                        cfg.normalization,
                        extra,
                        dropout=cfg.importance_dropout,
                    )
                    if distributed.is_main():  # every rank holds the same all-reduced values
                        general.save(general_path, "general", {"normalization": cfg.normalization})
                accumulated = general
                for s in previous:  # a lineage switched to DAS later: fold earlier stages in
                    dom = s.importance_dir / "domain.safetensors"
                    if dom.exists():
                        accumulated = accumulated.emax(Importance.load(dom))

        # the new domain's column: earlier models (and the base) on its held-out split
        progress(
            ProgressEvent(
                "evaluating", 0, position, message="scoring earlier stages on the new domain"
            )
        )
        column: dict[str, float | None] = {}
        column["0" if from_base else str(position - 1)] = _finite(
            self._eval(model, unit_map, tokenizer, eval_dir)
        )
        for key, mdir in [("0", self.base_dir)] + [
            (str(s.position), s.model_dir) for s in previous
        ]:
            if key in column:
                continue
            other = load_model(mdir).to(device)
            column[key] = _finite(self._eval(other, build_unit_map(other), tokenizer, eval_dir))
            del other

        # train
        apply_freezing(model, cfg)
        ctx = StageContext(
            model,
            unit_map,
            cfg,
            accumulated,
            stage_dir=partial,
            previous_stage_dirs=[s.dir for s in previous],
            base_dir=self.base_dir,
            train_store=train_store,
            batcher=batcher,
        )
        strategy.prepare(ctx)
        trainer = Trainer(
            model,
            strategy,
            cfg,
            train_store,
            batcher,
            partial / "checkpoints",
            progress=progress,
            should_cancel=should_cancel,
        )
        summary = trainer.run()
        model = trainer.accelerator.unwrap_model(trainer.model)
        if distributed.any_rank(should_cancel()):
            raise Cancelled("cancelled after the last training step")
        if distributed.is_main():  # finish only saves state files
            strategy.finish(ctx)
        model = strategy.final_model(model)

        # I(t) from the domain's own loss, then I_acc(t) = EMax(I_acc(t-1), I(t))
        if strategy.uses_importance:
            progress(ProgressEvent("importance", 0, 1, message="domain importance"))
            batches = self._importance_batches(train_store, batcher, device)
            dom = domain_importance(
                model, unit_map, batches, cfg.normalization, cfg.extra_unit_kinds()
            )
            if distributed.is_main():
                dom.save(
                    partial / "importance" / "domain.safetensors",
                    "domain",
                    {"normalization": cfg.normalization, "domain": name},
                )
                accumulated.emax(dom).save(
                    partial / "importance" / "accumulated.safetensors",
                    "accumulated",
                    {"normalization": cfg.normalization},
                )
            state["importance"] = {
                "domain": dom.stats(),
                "accumulated": accumulated.emax(dom).stats(),
            }

        # this stage's row: held-out loss on every domain so far, and the general corpus
        progress(ProgressEvent("evaluating", 0, position, message="held-out evaluation"))
        row = {
            s.name: _finite(self._eval(model, unit_map, tokenizer, s.eval_dir)) for s in previous
        }
        row[name] = _finite(self._eval(model, unit_map, tokenizer, eval_dir))
        general_loss = None
        if (self.path / "general" / "eval").exists():
            general_loss = _finite(
                self._eval(model, unit_map, tokenizer, self.path / "general" / "eval")
            )

        if distributed.is_main():  # rank 0 commits the stage (below); the others wait
            with atomic_dir(partial / "model") as tmp:
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(partial / "checkpoints", ignore_errors=True)
        seconds = time.perf_counter() - started
        state.update(
            {
                "status": "complete",
                "eval": row,
                "column": column,
                "general_loss": general_loss,
                "steps": summary.steps,
                "trained_tokens": summary.trained_tokens,
                "final_train_loss": summary.final_loss,
                "resumed_from_step": summary.resumed_from,
                "seconds": seconds,
                "strategy": cfg.strategy,
            }
        )
        if distributed.is_main():
            write_json(partial / "stage.json", state)
            os.replace(partial, final_dir)
        distributed.barrier()  # the next stage, on any rank, starts from the committed one
        result = StageResult(
            position=position,
            name=name,
            model_dir=final_dir / "model",
            importance_dir=final_dir / "importance",
            steps=summary.steps,
            trained_tokens=summary.trained_tokens,
            eval_losses=row,
            general_loss=general_loss,
            column=column,
            seconds=seconds,
            resumed_from_step=summary.resumed_from,
        )
        return result

    # -- read-outs ---------------------------------------------------------------------
    def loss_matrix(self) -> tuple[list[str], list[list[float | None]], list[float | None]]:
        """L[t][i] (row = after stage t+1, column = domain i+1) and the base row."""
        stages = self.stages
        names = [s.name for s in stages]
        L: list[list[float | None]] = []
        for t, s in enumerate(stages):
            row = []
            for i, d in enumerate(stages):
                if i <= t:
                    row.append(s.meta["eval"].get(d.name))
                else:
                    row.append(d.meta.get("column", {}).get(str(t + 1)))
            L.append(row)
        base = [s.meta.get("column", {}).get("0") for s in stages]
        return names, L, base

    def metrics(self) -> dict:
        names, L, base = self.loss_matrix()
        general = {}
        if self.meta.get("general"):
            base_loss = self.meta["general"].get("base_loss")
            losses = [s.meta.get("general_loss") for s in self.stages]
            last = losses[-1] if losses else None
            general = {
                "base_loss": base_loss,
                "losses": losses,
                "change": (last - base_loss)
                if last is not None and base_loss is not None
                else None,
            }
        out = summarize(names, L, base, general)
        out["strategy"] = self.config.strategy
        out["stages"] = [
            {
                "position": s.position,
                "name": s.name,
                "steps": s.meta.get("steps"),
                "trained_tokens": s.meta.get("trained_tokens"),
                "seconds": s.meta.get("seconds"),
            }
            for s in self.stages
        ]
        return out

    def fork(self, out: Path, upto: int) -> Lineage:
        """A new lineage holding this one's base and stages 1..upto (a branch point)."""
        out = Path(out)
        if out.exists() and any(out.iterdir()):
            raise LineageError(f"{out} exists and is not empty")
        stages = self.stages
        if not 0 <= upto <= len(stages):
            raise LineageError(f"upto must be in [0, {len(stages)}]")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.base_dir, out / "base")
        for extra in ("importance", "general"):
            if (self.path / extra).exists():
                shutil.copytree(self.path / extra, out / extra)
        for s in stages[:upto]:
            shutil.copytree(s.dir, out / "stages" / s.dir.name)
        meta = dict(self.meta, forked_from={"path": str(self.path), "stage": upto})
        write_json(out / "lineage.json", meta)
        return Lineage.open(out)
