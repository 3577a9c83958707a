"""Each job in a fresh child process of the worker, so that nothing one job sets up (mixed
precision and accelerate's process-wide state, seeds, thread counts, a CUDA context,
monkey-patched modules, leaked memory) reaches the next one.

- The child is started with the ``spawn`` method: a new interpreter, not a fork of the
  worker (a fork would inherit the worker's imported and initialised libraries).
- The worker (parent) keeps the claim's lease alive with its heartbeat; the child writes
  progress, events and the outcome itself, every write guarded by the claim token, as the
  in-process path does, and sends its outcome back over a pipe.
- The child dies with the worker: ``PR_SET_PDEATHSIG`` (Linux) asks the kernel to SIGKILL it
  when its parent goes, and a watcher thread checks the parent's pid elsewhere. A job whose
  worker was ``kill -9``-ed is therefore never trained by two processes at once.
- SIGTERM to the child asks it to stop at the next step (the worker forwards its own warm
  shutdown); SIGINT is ignored there (Ctrl-C in a terminal reaches the whole process group,
  and the worker decides).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service_core.processes import set_parent_death_signal

log = logging.getLogger("das.worker")


@dataclass
class ChildOutcome:
    """What the worker learns of a child: its outcome, or how it died (``outcome`` None)."""

    outcome: str | None
    exitcode: int | None
    asked_to_stop: bool = False

    @property
    def died(self) -> str:
        """How the child ended without an outcome, in words."""
        code = self.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (the kernel's out-of-memory killer sends this)" if -code == 9 else ""
            return f"killed by {name}{hint}"
        return f"exited with status {code}"


def _die_with_parent(parent_pid: int) -> None:
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(70)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(70)

    threading.Thread(target=watch, name="das-parent-watch", daemon=True).start()


def _lower_priority(nice: int) -> None:
    """Let the API's status reads win the cores over training (see ``job_nice``); raising
    one's own niceness needs no privilege."""
    if nice > 0:
        os.nice(nice)


def _child_main(
    parent_pid: int,
    settings: Any,
    claim: Any,
    conn: Any,
    setup: Callable[[], None] | None,
) -> None:
    """The child: train the claimed job, send the outcome, exit."""
    _die_with_parent(parent_pid)
    _lower_priority(int(getattr(settings, "job_nice", 0)))
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    logging.basicConfig(
        level=logging.INFO,
        format=f"[%(asctime)s: %(levelname)s/job-{claim.job_id}] %(name)s: %(message)s",
    )
    if setup is not None:  # tests inject faults here (a function importable by name)
        setup()
    from service_core.db import make_engine, make_session_factory
    from worker.run_context import RunContext

    engine = make_engine(settings)
    try:
        context = RunContext(settings, make_session_factory(engine), claim, stop.is_set)
        outcome = context.execute()
    finally:
        engine.dispose()
    # Every write is committed and every file renamed into place: exit now, without the
    # interpreter's slow tear-down of torch & co. (the worker waits for this exit before it
    # takes the next message).
    conn.send(outcome)
    conn.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class ChildJob:
    """One job's child process, seen from the worker."""

    def __init__(self, settings: Any, claim: Any, setup: Callable[[], None] | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_child_main,
            args=(os.getpid(), settings, claim, send, setup),
            name=f"das-job-{claim.job_id}",
            daemon=False,
        )
        self.process.start()
        send.close()  # the child holds the only writer: EOF when it is gone
        self._asked_to_stop = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def ask_to_stop(self) -> None:
        """Stop at the next step (the child re-queues the job)."""
        if not self._asked_to_stop and self.process.is_alive():
            self._asked_to_stop = True
            try:
                os.kill(self.process.pid, signal.SIGTERM)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass

    def wait(self, stopping: threading.Event, poll_s: float = 0.5) -> ChildOutcome:
        """Wait for the child; forward ``stopping`` to it once it is set."""
        outcome = None
        while True:
            if stopping.is_set():
                self.ask_to_stop()
            if self._recv.poll(poll_s):
                try:
                    outcome = self._recv.recv()
                except (EOFError, OSError):  # the child is gone without a word
                    pass
                break
        self.process.join(timeout=10 if outcome is not None else 60)
        if self.process.is_alive():  # it sent its outcome but hangs on its way out
            self.process.kill()
            self.process.join()
        self._recv.close()
        return ChildOutcome(outcome, self.process.exitcode, self._asked_to_stop)
