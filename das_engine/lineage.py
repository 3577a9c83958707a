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
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from das_engine import distributed
from das_engine.bases import load_model, load_tokenizer, resolve_base
from das_engine.config import TrainingConfig
from das_engine.data import ChunkStore, build_single_split
from das_engine.errors import Cancelled, DomainExistsError, LineageBusyError, LineageError
from das_engine.evaluate import heldout_loss
from das_engine.expansion import parameter_count
from das_engine.jsonsafe import finite
from das_engine.layout import LINEAGE_FILE, PARTIAL_SUFFIX, STAGE_FILE, STAGES_DIR
from das_engine.metrics import summarize
from das_engine.names import domain_name_problem
from das_engine.objective import Batcher
from das_engine.precision import Precision, save_dtype_for, save_pretrained_as
from das_engine.preflight import preflight
from das_engine.progress import CancelFn, ProgressEvent, ProgressFn, no_progress
from das_engine.stage_dir import PartialStage, sha256_file
from das_engine.storage import atomic_dir, read_json, write_json
from das_engine.strategies import StageContext, make_strategy
from das_engine.strategies.das_importance import GENERAL_FILE
from das_engine.trainer import Trainer, TrainSummary, apply_freezing
from das_engine.units import build_unit_map

FORMAT_VERSION = 1

__all__ = ["Artifact", "Lineage", "ProgressEvent", "StageInfo", "StageResult", "sha256_file"]


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


IMPORTANCE_KINDS = ("general", "domain", "accumulated")


@dataclass(frozen=True)
class Artifact:
    """One file (or HF directory) of a stage: ``kind`` is "checkpoint" or an importance
    kind (``IMPORTANCE_KINDS``); ``stats`` its summary statistics, when it has some."""

    kind: str
    path: Path
    stats: dict = field(default_factory=dict)


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
    #: the checkpoint's parameter count, and what the strategy grew (ELLE, CPT) or None
    parameters: int | None = None
    growth: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_dir"], d["importance_dir"] = str(self.model_dir), str(self.importance_dir)
        return d

    @classmethod
    def from_meta(cls, stage_dir: Path, meta: dict) -> StageResult:
        """The result of the complete stage in ``stage_dir`` (``meta``: its stage.json)."""
        return cls(
            position=meta["position"],
            name=meta["name"],
            model_dir=stage_dir / "model",
            importance_dir=stage_dir / "importance",
            steps=meta["steps"],
            trained_tokens=meta["trained_tokens"],
            eval_losses=meta["eval"],
            general_loss=meta.get("general_loss"),
            column=meta.get("column") or {},
            seconds=meta.get("seconds") or 0.0,
            resumed_from_step=meta.get("resumed_from_step") or 0,
            parameters=meta.get("parameters"),
            growth=meta.get("growth"),
        )


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
        if (path / LINEAGE_FILE).exists():
            raise LineageError(f"{path} already holds a lineage; use add to continue it")
        if path.exists() and any(path.iterdir()):
            raise LineageError(f"{path} exists and is not empty")
        cfg = config if isinstance(config, TrainingConfig) else TrainingConfig.from_dict(config)
        info = resolve_base(base_model, models_dir, allow_hub=allow_hub)
        device = preflight(cfg, info.path)  # before anything is written
        path.mkdir(parents=True, exist_ok=True)
        tokenizer = load_tokenizer(info.path)
        model = load_model(info.path, dtype="auto")  # the base is copied in its own dtype
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
            model = model.float().to(device)  # scored like the stages: fp32 under autocast
            unit_map = build_unit_map(model)
            precision = Precision.for_stage(cfg, device)
            loss = lineage._eval(model, unit_map, tokenizer, path / "general" / "eval", precision)
            meta["general"] = {"corpus": str(general_corpus), "base_loss": finite(loss)}
        write_json(path / LINEAGE_FILE, meta)
        return lineage

    @staticmethod
    def exists(path: Path) -> bool:
        """Whether ``path`` holds a lineage (a creation that crashed half-way leaves none)."""
        return (Path(path) / LINEAGE_FILE).is_file()

    @classmethod
    def open(cls, path: Path) -> Lineage:
        path = Path(path)
        try:
            meta = read_json(path / LINEAGE_FILE)
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
        root = self.path / STAGES_DIR
        if not root.exists():
            return out
        for d in sorted(root.iterdir()):
            if d.name.endswith(PARTIAL_SUFFIX) or d.name.startswith(".") or not d.is_dir():
                continue
            meta_file = d / STAGE_FILE
            if not meta_file.exists():
                continue
            meta = read_json(meta_file)
            if meta.get("status") == "complete":
                out.append(StageInfo(meta["position"], meta["name"], d, meta))
        return sorted(out, key=lambda s: s.position)

    @property
    def domains(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, position: int) -> StageInfo:
        for s in self.stages:
            if s.position == position:
                return s
        raise LineageError(f"{self.path} has no complete stage {position}")

    def stage_result(self, position: int) -> StageResult:
        """What ``add_domain`` returned for the complete stage at ``position``."""
        info = self.stage(position)
        return StageResult.from_meta(info.dir, info.meta)

    def artifacts(self, position: int) -> list[Artifact]:
        """The files that belong with the complete stage at ``position``: its checkpoint,
        then the importance snapshots (the lineage's I_general they build on, the stage's
        I(t) and I_acc(t)) with their summary statistics. What a caller stores or serves,
        without knowing the directory layout."""
        info = self.stage(position)
        out = [Artifact("checkpoint", info.model_dir, {})]
        general = self.path / GENERAL_FILE
        if general.is_file():
            out.append(Artifact("general", general, {}))
        stats = info.meta.get("importance") or {}
        for path in sorted(info.importance_dir.glob("*.safetensors")):
            kind = path.stem if path.stem in IMPORTANCE_KINDS else "domain"
            out.append(Artifact(kind, path, stats.get(kind, {})))
        return out

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
    def _eval(self, model, unit_map, tokenizer, split_dir: Path, precision: Precision) -> float:
        batcher = Batcher(tokenizer, unit_map.objective, self.config.mlm_probability)
        return heldout_loss(
            model,
            unit_map,
            ChunkStore(split_dir),
            batcher,
            batch_size=self.config.batch_size,
            max_batches=self.config.eval_max_batches,
            precision=precision,
        )

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
        progress = progress or no_progress
        should_cancel = should_cancel or (lambda: False)
        problem = domain_name_problem(name)
        if problem:
            raise LineageError(problem)
        corpus = Path(corpus)
        if not corpus.is_file():
            raise LineageError(f"corpus file {corpus} does not exist")
        device = preflight(self.config, self.base_dir)  # before any stage directory exists
        with self._lock():
            return self._add_domain(corpus, name, eval_corpus, progress, should_cancel, device)

    def _add_domain(
        self, corpus, name, eval_corpus, progress, should_cancel, device
    ) -> StageResult:
        """The phases of a stage, in order (each below)."""
        started = time.perf_counter()
        precision = Precision.for_stage(self.config, device)  # this stage's only precision
        previous = self.stages
        if name in [s.name for s in previous]:
            raise DomainExistsError(f"domain {name!r} is already stage of this lineage")
        stage, tokenizer = self._open_stage(len(previous) + 1, name, corpus, eval_corpus, progress)
        strategy = make_strategy(self.config)
        ctx = self._load_start_model(stage, previous, strategy, tokenizer, device)
        ctx.precision, ctx.progress = precision, progress
        strategy.begin_stage(ctx)  # DAS: I_acc(t-1), I_general at stage 1
        column = self._score_column(ctx, stage, previous, tokenizer)
        summary, model = self._train(ctx, strategy, stage, should_cancel)
        stage.state.update(strategy.end_stage(ctx, model))  # DAS: I(t), I_acc(t)
        stage.state.update(parameters=parameter_count(model), growth=strategy.growth())
        row, general_loss = self._score_row(ctx, model, stage, previous, tokenizer)
        if distributed.is_main():  # rank 0 commits the stage (below); the others wait
            # the stage checkpoint in save_dtype (the base's own by default); fp32 masters end
            save_dtype = save_dtype_for(self.config, self.base_dir)
            save_pretrained_as(model, tokenizer, stage.model_dir, save_dtype)
        final_dir = stage.commit(
            {
                "eval": row,
                "column": column,
                "general_loss": general_loss,
                "steps": summary.steps,
                "trained_tokens": summary.trained_tokens,
                "final_train_loss": summary.final_loss,
                "resumed_from_step": summary.resumed_from,
                "seconds": time.perf_counter() - started,
                "strategy": self.config.strategy,
            }
        )
        return StageResult.from_meta(final_dir, stage.state)

    def _open_stage(self, position, name, corpus, eval_corpus, progress):
        """The partial stage directory with the corpus tokenized (rank 0 first, the others
        then find it there), and the lineage's tokenizer."""
        distributed.wait_for_main()
        stage = PartialStage.open(self.path / STAGES_DIR, position, name, corpus)
        tokenizer = load_tokenizer(self.base_dir)
        objective = self.meta["objective"]
        stage.tokenize(corpus, eval_corpus, tokenizer, self.config, objective, progress)
        distributed.release_others()
        return stage, tokenizer

    def _load_start_model(self, stage, previous, strategy, tokenizer, device) -> StageContext:
        """The model the stage starts from (the base at stage 1 or for ONE, else the
        previous stage's) and the context the strategy's hooks see."""
        cfg = self.config
        from_base = strategy.starts_from_base or stage.position == 1
        start_dir = self.base_dir if from_base else previous[-1].model_dir
        model = load_model(start_dir).to(device)
        unit_map = build_unit_map(model)
        return StageContext(
            model,
            unit_map,
            cfg,
            None,
            stage_dir=stage.dir,
            previous_stage_dirs=[s.dir for s in previous],
            base_dir=self.base_dir,
            train_store=stage.train_store(),
            batcher=Batcher(tokenizer, unit_map.objective, cfg.mlm_probability),
            lineage_dir=self.path,
            domain=stage.name,
            from_base=from_base,
        )

    def _score_column(self, ctx, stage, previous, tokenizer) -> dict[str, float | None]:
        """The new domain's column: the base and every earlier stage on its held-out split
        (the start model scored as it is loaded, the others loaded one at a time)."""
        position = stage.position
        ctx.progress(
            ProgressEvent(
                "evaluating", 0, position, message="scoring earlier stages on the new domain"
            )
        )
        column: dict[str, float | None] = {}
        column["0" if ctx.from_base else str(position - 1)] = finite(
            self._eval(ctx.model, ctx.unit_map, tokenizer, stage.eval_dir, ctx.precision)
        )
        for key, mdir in [("0", self.base_dir)] + [
            (str(s.position), s.model_dir) for s in previous
        ]:
            if key in column:
                continue
            other = load_model(mdir).to(ctx.device)
            column[key] = finite(
                self._eval(other, build_unit_map(other), tokenizer, stage.eval_dir, ctx.precision)
            )
            del other
        return column

    def _train(self, ctx, strategy, stage, should_cancel) -> tuple[TrainSummary, nn.Module]:
        """The strategy's training steps (resumed from the newest step checkpoint), its
        ``finish`` and the model to save."""
        apply_freezing(ctx.model, self.config)
        strategy.prepare(ctx)
        trainer = Trainer(
            ctx.model,
            strategy,
            self.config,
            ctx.train_store,
            ctx.batcher,
            stage.checkpoints_dir,
            progress=ctx.progress,
            should_cancel=should_cancel,
            precision=ctx.precision,
        )
        summary = trainer.run()
        model = trainer.unwrapped_model
        if distributed.any_rank(should_cancel()):
            raise Cancelled("cancelled after the last training step")
        if distributed.is_main():  # finish only saves state files
            with ctx.precision.autocast_unscaled():
                strategy.finish(ctx)
        return summary, strategy.final_model(model)

    def _score_row(self, ctx, model, stage, previous, tokenizer):
        """This stage's row: held-out loss on every domain so far, and the general corpus."""
        ctx.progress(ProgressEvent("evaluating", 0, stage.position, message="held-out evaluation"))

        def score(split_dir: Path) -> float | None:
            return finite(self._eval(model, ctx.unit_map, tokenizer, split_dir, ctx.precision))

        row = {s.name: score(s.eval_dir) for s in previous}
        row[stage.name] = score(stage.eval_dir)
        general_dir = self.path / "general" / "eval"
        general_loss = score(general_dir) if general_dir.exists() else None
        return row, general_loss

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
                "parameters": s.meta.get("parameters"),
                "growth": s.meta.get("growth"),
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
            shutil.copytree(s.dir, out / STAGES_DIR / s.dir.name)
        meta = dict(self.meta, forked_from={"path": str(self.path), "stage": upto})
        write_json(out / LINEAGE_FILE, meta)
        return Lineage.open(out)
