"""One shared watch per job and API process: a short poll of the job's row and new events,
fanned out to every stream (server-sent events) and conditional read of that job.

Why: with N dashboards on one job, polling costs N requests a second, each a full
authenticated read. Here N streams (or N ``If-None-Match`` polls) cost one small query per
tick (``stream_poll_seconds``) for the whole process; a client hears of a change within one
tick. The database stays the truth: a watch holds only a cached copy, dropped when idle.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy import func, select
from sqlalchemy.orm import Session, noload, sessionmaker

from service_core.models import JOB_TERMINAL, Job, JobEvent, Lineage, Stage

RING = 500  # events kept per watch for streams that join late
PAGE = 500  # events read per query when a stream catches up from the database


def job_etag(body: dict[str, Any]) -> str:
    """A strong validator of a job's representation: the hash of its JSON."""
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return f'"j{digest[:32]}"'


def events_etag(job_id: str, last_event_id: int, after: int, limit: int) -> str:
    """Events are append-only, numbered 1, 2, ... per job, so a page (after, limit) changes
    only when the job's newest event number does. ``job_id`` is the public id."""
    return f'"e{job_id}-{last_event_id}-{after}-{limit}"'


KEEPALIVE = b": keep-alive\n\n"


def json_body(body: dict[str, Any]) -> bytes:
    """``body`` encoded exactly as starlette's JSONResponse encodes it."""
    return json.dumps(
        body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


def sse_frame(kind: str, payload: dict[str, Any] | None) -> bytes:
    """One server-sent event: a job event (``id:`` = its id) or a named one (``job``,
    ``end``); the JSON is ASCII, so no character can break the line-based framing."""
    if kind == "keepalive":
        return KEEPALIVE
    data = json.dumps(payload, separators=(",", ":"))
    if kind == "event":
        return f"id: {payload['id']}\ndata: {data}\n\n".encode()  # type: ignore[index]
    return f"event: {kind}\ndata: {data}\n\n".encode()


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of ``If-None-Match`` against ``etag``."""
    if not if_none_match:
        return False
    bare = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == bare:
            return True
    return False


def event_body(event: JobEvent, settings: Any = None) -> dict[str, Any]:
    from app.presenters import event_out  # scrubbed of server details, as the pages are

    return event_out(event, settings).model_dump(mode="json")


def ring_page(watch: _Watch, after: int, limit: int) -> bytes | None:
    """The events page (``after``, ``limit``) as the events route encodes it, from the
    watch's ring; None when the ring does not hold every event after ``after``."""
    if after < watch.ring_start:
        return None
    newer = [e for e in watch.events if e["id"] > after]
    data, has_more = newer[:limit], len(newer) > limit
    cursor = str(data[-1]["id"]) if has_more and data else None
    return json_body({"data": data, "has_more": has_more, "next_after": cursor})


@dataclass
class _Watch:
    job_id: str  # the public id (what the routes and the fast path are given)
    owner: str | None = None
    body: dict[str, Any] | None = None  # the job's JSON as GET /v1/jobs/{id} shows it
    etag: str | None = None
    token: tuple | None = None  # the row's change token when ``body`` was read
    body_json: bytes = b""  # ``body`` as the job route's JSONResponse encodes it (once)
    job_frame: bytes = b""  # ``body`` as a server-sent ``event: job`` frame (once)
    terminal: bool = False
    last_event_id: int = 0  # the newest event's number (``seq``) within the job
    events: list[dict[str, Any]] = field(default_factory=list)  # the newest RING events
    frames: dict[int, bytes] = field(default_factory=dict)  # event seq -> its SSE frame
    ring_start: int = 0  # every event numbered > ring_start is in ``events``
    loaded: bool = False
    gone: bool = False  # the job does not exist (deleted)
    subscribers: int = 0
    last_used: float = field(default_factory=time.monotonic)
    version: int = 0  # bumped on every change
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    loop: asyncio.AbstractEventLoop | None = None


class JobWatcher:
    """Per-process registry of watches, created on first use and dropped when idle."""

    def __init__(
        self,
        read_factory: sessionmaker[Session],
        poll_seconds: float = 0.05,
        idle_seconds: float = 30.0,
        settings: Any = None,
    ) -> None:
        self.read_factory = read_factory
        self.settings = settings  # events are scrubbed with it, as the routes scrub them
        self.poll_seconds = poll_seconds
        self.idle_seconds = idle_seconds
        self._watches: dict[str, _Watch] = {}

    # -- reading the database (in a worker thread) ---------------------------------------
    @staticmethod
    def _token(session: Session, job_id: str) -> tuple | None:
        """What a change of the job's representation or event log must change: one row of
        plain columns, no ORM objects (each tick of every watch runs it)."""
        newest = select(func.max(JobEvent.seq)).where(JobEvent.job_id == Job.id).scalar_subquery()
        row = session.execute(
            select(
                Job.updated_at,
                Job.status,
                Job.phase,
                Job.progress,
                Job.step,
                Job.heartbeat_at,
                Job.attempts,
                Lineage.deleted_at,
                newest,
            )
            .join(Lineage, Lineage.id == Job.lineage_id)
            .where(Job.public_id == job_id)
        ).first()
        return None if row is None else tuple(row)

    def _load(
        self, job_id: str, after_event: int, first: bool, known: tuple | None = None
    ) -> dict[str, Any] | None:
        """The job's state, or ``{"token": known}`` alone when its token is ``known``
        (nothing changed: the common tick, a single cheap query)."""
        from app.presenters import job_out

        with self.read_factory() as session:
            token = self._token(session, job_id)
            if token is not None and token == known and not first:
                return {"token": token}
            row = session.execute(
                select(Job, Stage)
                .join(Stage, Stage.id == Job.stage_id)
                .join(Lineage, Lineage.id == Job.lineage_id)
                .where(Job.public_id == job_id, Lineage.deleted_at.is_(None))  # deleted: gone
                .options(noload(Stage.job))  # job_out needs the two rows, nothing more
            ).first()
            if row is None:
                return None
            job, stage = row
            body = job_out(job, stage).model_dump(mode="json")
            stmt = select(JobEvent).where(JobEvent.job_id == job.id)
            if first:  # only the newest RING: older ones are read on demand
                events = list(session.scalars(stmt.order_by(JobEvent.seq.desc()).limit(RING)))[::-1]
            else:
                events = list(
                    session.scalars(
                        stmt.where(JobEvent.seq > after_event).order_by(JobEvent.seq).limit(PAGE)
                    )
                )
            return {
                "token": token,
                "owner": job.owner,
                "body": body,
                "terminal": job.status in JOB_TERMINAL,
                "events": [event_body(e, self.settings) for e in events],
            }

    def read_events(self, job_id: str, after: int, before: int) -> list[dict[str, Any]]:
        """Events numbered after < seq <= before, from the database (a late stream catching
        up)."""
        row_id = select(Job.id).where(Job.public_id == job_id).scalar_subquery()
        with self.read_factory() as session:
            rows = session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == row_id, JobEvent.seq > after, JobEvent.seq <= before)
                .order_by(JobEvent.seq)
                .limit(PAGE)
            )
            return [event_body(e, self.settings) for e in rows]

    # -- the poll loop -------------------------------------------------------------------
    async def _refresh(self, watch: _Watch) -> None:
        state = await anyio.to_thread.run_sync(
            self._load, watch.job_id, watch.last_event_id, not watch.loaded, watch.token
        )
        changed = False
        if state is not None and "body" not in state:
            return  # the token is unchanged: so is everything the watch holds
        if state is None:
            changed = not watch.gone
            watch.gone, watch.terminal, watch.owner = True, True, None
        else:
            etag = job_etag(state["body"])
            if etag != watch.etag:
                watch.body, watch.etag, changed = state["body"], etag, True
                # encoded once per change, not once per reader: N streams or N polls of
                # the same job then cost a write each, not N JSON encodings
                watch.body_json = json_body(state["body"])
                watch.job_frame = sse_frame("job", state["body"])
            watch.owner, watch.terminal = state["owner"], state["terminal"]
            new = state["events"]
            # a page of PAGE new events may not be all of them: poll in full next tick
            watch.token = state["token"] if len(new) < PAGE else None
            if not watch.loaded:  # fewer than RING: the ring holds every event of the job
                watch.ring_start = new[0]["id"] - 1 if len(new) >= RING else 0
            if new:
                watch.events.extend(new)
                watch.frames.update((e["id"], sse_frame("event", e)) for e in new)
                watch.last_event_id = new[-1]["id"]
                if len(watch.events) > RING:
                    drop = len(watch.events) - RING
                    watch.ring_start = watch.events[drop - 1]["id"]
                    for gone in watch.events[:drop]:
                        watch.frames.pop(gone["id"], None)
                    del watch.events[:drop]
                changed = True
        watch.loaded = True
        if changed:
            watch.version += 1
            old, watch.changed = watch.changed, asyncio.Event()
            old.set()

    async def _run(self, watch: _Watch) -> None:
        try:
            while True:
                try:
                    await self._refresh(watch)
                except Exception:  # noqa: BLE001 - a dropped connection: try again next tick
                    await asyncio.sleep(self.poll_seconds * 10)
                idle = time.monotonic() - watch.last_used
                if watch.subscribers == 0 and idle > self.idle_seconds:
                    break
                if watch.gone and watch.subscribers == 0:
                    break
                await asyncio.sleep(self.poll_seconds)
        finally:
            if self._watches.get(watch.job_id) is watch:
                del self._watches[watch.job_id]
            watch.changed.set()

    def _watch(self, job_id: str) -> _Watch:
        loop = asyncio.get_running_loop()
        watch = self._watches.get(job_id)
        if watch is None or watch.loop is not loop or watch.task is None or watch.task.done():
            watch = _Watch(job_id=job_id, loop=loop)
            self._watches[job_id] = watch
            watch.task = loop.create_task(self._run(watch))
        watch.last_used = time.monotonic()
        return watch

    # -- what requests use ---------------------------------------------------------------
    def peek(self, job_id: str) -> _Watch | None:
        """The cached state of ``job_id`` if it is loaded (no database access); starts a
        watch otherwise, so the next conditional read of this job is answered from it."""
        watch = self._watch(job_id)
        return watch if watch.loaded and not watch.gone else None

    def cached(self, job_id: str) -> _Watch | None:
        """The loaded watch of ``job_id``, if any; never starts one (any thread)."""
        watch = self._watches.get(job_id)
        return watch if watch is not None and watch.loaded and not watch.gone else None

    def start_from_thread(self, job_id: str) -> None:
        """``peek`` from a sync route (a worker thread of the event loop): start watching
        a polled job so that its next conditional read is answered from the watch."""
        try:
            anyio.from_thread.run_sync(self.peek, job_id)
        except RuntimeError:  # not in an event loop's worker thread: nothing to start
            pass

    def forget(self, job_id: str) -> None:
        """Drop the cached state (after this process changed the job: read-your-writes)."""
        watch = self._watches.pop(job_id, None)  # may run in a worker thread
        if watch is not None and watch.task is not None and watch.loop is not None:
            try:
                watch.loop.call_soon_threadsafe(watch.task.cancel)
            except RuntimeError:  # that loop is closed: nothing runs there any more
                pass

    async def follow(
        self, job_id: str, after: int, keepalive_seconds: float
    ) -> AsyncIterator[tuple[str, dict[str, Any] | None, bytes]]:
        """("event", e, frame) for every event numbered > after, ("job", body, frame)
        whenever the job changes, ("keepalive", None, frame) on silence; ends after the job
        is finished and every event was sent. ``frame`` is the encoded server-sent event."""
        watch = self._watch(job_id)
        watch.subscribers += 1
        sent_etag: str | None = None
        try:
            while True:
                seen = watch.version
                if not watch.loaded:
                    await self._wait(watch, keepalive_seconds)
                    watch = self._watch(job_id)
                    continue
                if watch.gone:
                    return
                # catch up from the database when the stream starts before the ring
                while after < watch.ring_start:
                    older = await anyio.to_thread.run_sync(
                        self.read_events, job_id, after, watch.ring_start
                    )
                    if not older:
                        after = watch.ring_start
                        break
                    for event in older:
                        yield "event", event, sse_frame("event", event)
                        after = event["id"]
                for event in [e for e in watch.events if e["id"] > after]:
                    frame = watch.frames.get(event["id"]) or sse_frame("event", event)
                    yield "event", event, frame
                    after = event["id"]
                if watch.etag != sent_etag and watch.body is not None:
                    sent_etag = watch.etag
                    yield "job", watch.body, watch.job_frame
                if watch.terminal and after >= watch.last_event_id:
                    return
                if watch.version == seen and not await self._wait(watch, keepalive_seconds):
                    yield "keepalive", None, KEEPALIVE
                watch.last_used = time.monotonic()
                if watch.task is None or watch.task.done():  # dropped: start a fresh one
                    fresh = self._watch(job_id)
                    fresh.subscribers += 1
                    watch.subscribers -= 1
                    watch = fresh
        finally:
            watch.subscribers -= 1

    @staticmethod
    async def _wait(watch: _Watch, timeout: float) -> bool:
        try:
            await asyncio.wait_for(watch.changed.wait(), timeout)
            return True
        except TimeoutError:
            return False
