"""Data-parallel training over several processes (``torchrun`` / ``accelerate launch``).

The engine reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); without it every function here is a no-op and the engine runs as one process.

Why each piece exists:

- every rank builds the *global* micro-batch of step s exactly as one process would (same
  samples, same MLM masks: both are functions of (seed, s)) and keeps its contiguous slice
  of rows, so a run is the same computation whatever the number of ranks, and an exact
  resume still holds;
- DDP wraps a small module whose forward is the strategy's loss on the *bare* model, so
  strategies keep using ``model.base_model`` / the LM head while DDP still sees one forward
  per micro-batch and averages the gradients;
- each rank's loss is weighted by its share of the global batch's predicted tokens, so
  DDP's average equals the token mean a single process computes over the whole batch;
- importance batches are dealt out round-robin and the gate-gradient sums all-reduced, so
  every rank masks the same units; each batch reseeds the RNG from its index, so its
  dropout masks do not depend on which rank runs it;
- files are written by rank 0 only; the other ranks wait at a barrier where they must read
  what rank 0 wrote.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from das_engine.errors import ConfigError, DasError

T = TypeVar("T")

#: how long a rank waits for rank 0 at a barrier (rank 0 may be tokenizing a large corpus)
WAIT_TIMEOUT_S = float(os.environ.get("DAS_DIST_WAIT_SECONDS", 4 * 3600))
#: per-rank offset of the dropout seed: rank 0 keeps the single-process seed
RANK_SEED_STRIDE = 1_000_003

_solo = False  # inside ``solo()``: behave as a single process
_wait_group: Any = None  # a gloo group for barriers and small CPU reductions


class RankFailed(DasError):
    """Rank 0 failed in a step the other ranks were waiting on."""

    code = "rank_failed"


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def topology() -> Topology:
    """This process's place in the job, from the launcher's environment variables."""
    if _solo:
        return Topology()
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Topology()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return Topology(rank, world, local)


def world_size() -> int:
    return topology().world_size


def is_main() -> bool:
    return topology().is_main


def seed_offset() -> int:
    """Added to the per-step dropout seed: ranks draw different dropout masks."""
    return topology().rank * RANK_SEED_STRIDE


def device(preference: str = "auto") -> torch.device:
    """cuda > cpu; with several ranks, ``cuda`` means this rank's GPU, cuda:LOCAL_RANK."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(preference)
    top = topology()
    if dev.type == "cuda" and dev.index is None and top.world_size > 1:
        dev = torch.device("cuda", top.local_rank % max(1, torch.cuda.device_count()))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return dev


def ensure_initialized() -> bool:
    """Join the process group on first use; False when running as a single process."""
    global _wait_group
    if topology().world_size == 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(
                    f"WORLD_SIZE > 1 but {var} is not set: launch with torchrun or accelerate "
                    "launch, which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
                )
        # CPU tensors go through gloo, CUDA tensors through NCCL (one group, two backends)
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_TIMEOUT_S))
    return True


def shutdown() -> None:
    """Leave the process group (at the end of a command), if one was joined."""
    global _wait_group
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def barrier() -> None:
    if ensure_initialized():
        import torch.distributed as dist

        dist.barrier(group=_wait_group)


def wait_for_main() -> None:
    """Ranks other than 0 wait here until rank 0 calls ``release_others``.

    Put it before a block that writes files: rank 0 runs the block first, the others
    then run it and find the files already there."""
    if not is_main():
        barrier()


def release_others() -> None:
    if is_main():
        barrier()


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Sum of a few numbers over the ranks (float64, on CPU)."""
    if not ensure_initialized():
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, group=_wait_group)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (e.g. a cancel seen by rank 0 only)."""
    return sum_over_ranks([1.0 if flag else 0.0])[0] > 0


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """In-place sum over the ranks, each tensor on its own device."""
    if not ensure_initialized():
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)


def owns(index: int) -> bool:
    """Whether this rank handles item ``index`` of a round-robin split."""
    top = topology()
    return index % top.world_size == top.rank


def shard_batches(batches: Iterable[dict]) -> Iterator[dict]:
    """This rank's batches of an importance sample (batch i goes to rank i % world).

    Before each batch the RNG is reseeded from the seed in force at the start plus i, so a
    batch's dropout masks are the same whichever rank runs it, and in a single process.
    """
    base = torch.initial_seed()
    for i, batch in enumerate(batches):
        if owns(i):
            torch.manual_seed(base + i)
            yield batch


def run_on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 alone (as a single process); the others wait for it.

    Returns fn's result on rank 0 and None elsewhere; when rank 0 fails, the other ranks
    raise ``RankFailed`` instead of waiting for ever."""
    if not ensure_initialized():
        return fn()
    import torch.distributed as dist

    status: list[Any] = [None]
    result = None
    if is_main():
        try:
            with solo():
                result = fn()
        except BaseException as exc:
            status = [f"{type(exc).__name__}: {exc}"]
            dist.broadcast_object_list(status, src=0, group=_wait_group)
            raise
        dist.broadcast_object_list(status, src=0, group=_wait_group)
        return result
    dist.broadcast_object_list(status, src=0, group=_wait_group)
    if status[0] is not None:
        raise RankFailed(f"rank 0 failed: {status[0]}")
    return None


@contextmanager
def solo() -> Iterator[None]:
    """Inside the block this process acts as a single process (no collectives)."""
    global _solo
    before, _solo = _solo, True
    try:
        yield
    finally:
        _solo = before


def predicted_tokens(batch: dict, objective: str) -> int:
    """Positions the LM loss averages over (labels != -100; shifted for causal LMs)."""
    labels = batch["labels"][:, 1:] if objective == "clm" else batch["labels"]
    return int((labels != -100).sum())


class StrategyForward(nn.Module):
    """What DDP wraps: forward = the strategy's loss on the bare model."""

    def __init__(self, model: nn.Module, strategy: Any) -> None:
        super().__init__()
        self.model = model
        self.strategy = strategy

    def forward(self, batch: dict):
        return self.strategy.loss(self.model, batch)


def _no_buffer_sync() -> dict:
    """DDP's "do not sync buffers each forward" flag under its name in this torch:
    ``forward_sync_buffers`` since 2.13, ``broadcast_buffers`` before (then deprecated)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    return {
        "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False
    }


class DataParallel:
    """The trainer's view of data parallelism; with one process every method is a no-op."""

    def __init__(self, model: nn.Module, strategy: Any, objective: str) -> None:
        self.model, self.strategy, self.objective = model, strategy, objective
        self.topology = topology()
        self.ddp: nn.Module | None = None
        if self.topology.world_size > 1 and any(p.requires_grad for p in model.parameters()):
            from torch.nn.parallel import DistributedDataParallel as DDP

            ensure_initialized()
            dev = next(model.parameters()).device
            self.ddp = DDP(
                StrategyForward(model, strategy),
                device_ids=[dev.index] if dev.type == "cuda" else None,
                **_no_buffer_sync(),  # no running statistics in these models
                # a micro-batch without a masked token skips the LM head; a strategy may
                # leave other parameters out of a step's graph
                find_unused_parameters=True,
            )

    def shard(self, batch: dict) -> tuple[dict, float]:
        """This rank's contiguous rows of a global micro-batch, and the loss weight that
        makes DDP's gradient average equal the single-process token mean."""
        top = self.topology
        if top.world_size == 1:
            return batch, 1.0
        rows = batch["input_ids"].shape[0]
        if rows < top.world_size:
            raise ConfigError(
                f"batch_size {rows} is the global micro-batch and must be at least the number "
                f"of processes ({top.world_size})"
            )
        sizes = [len(p) for p in torch.tensor_split(torch.arange(rows), top.world_size)]
        start = sum(sizes[: top.rank])
        local = {k: v[start : start + sizes[top.rank]] for k, v in batch.items()}
        total = predicted_tokens(batch, self.objective)
        mine = predicted_tokens(local, self.objective)
        return local, (top.world_size * mine / total if total else 1.0)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ddp is not None:
            return self.ddp(batch)
        return self.strategy.loss(self.model, batch)

    def sync(self, last_micro_batch: bool):
        """Gradients are all-reduced on the last micro-batch of a step only."""
        if self.ddp is not None and not last_micro_batch:
            return self.ddp.no_sync()
        return nullcontext()

    def mean(self, value: float) -> float:
        """Mean over ranks of a per-rank (already weighted) figure such as the step loss."""
        if self.topology.world_size == 1:
            return value
        return sum_over_ranks([value])[0] / self.topology.world_size
