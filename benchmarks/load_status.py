"""Load benchmark (not a test): many clients polling a job's status and events while it trains.

    python benchmarks/load_status.py                       # embedded `das-service serve`
    python benchmarks/load_status.py --duration 60 --clients 200 --interval 1
    python benchmarks/load_status.py --url http://127.0.0.1:8000 --key das_...

Without ``--url`` it starts ``das-service serve`` (SQLite, the filesystem broker, one worker)
in a fresh data folder on a free loopback port. It creates a lineage on the built-in
``tiny-roberta`` base and adds one domain whose job trains for longer than the run, waits
until the job is training, then starts a *second process* (asyncio with the lean keep-alive
client of benchmarks/http_client.py, loopback only) with ``--clients`` concurrent clients
for ``--duration`` seconds (at most 600). Each client
loops: ``GET /v1/jobs/{id}``, then ``GET /v1/jobs/{id}/events?after=<last seen>`` (tailing
the log as a dashboard would), then waits ``--interval`` seconds (0: as fast as it can, a
saturation test). A request counts as an error unless it answers 200 within 10 s.

``--modes`` (default all three, in turn, against the same job): ``plain`` as above;
``conditional``: the same loop sending each route's last ``ETag`` as ``If-None-Match``
(a 304 is a good answer); ``stream``: each client holds one server-sent-event stream
(``/events?stream=true``) and the figure is the *delivery delay*: from a job update's
``updated_at`` (written by the worker) to its arrival at the client, also split into the
*first arrival* per update (the writer's commit after stamping, plus one poll tick) and the
*fan-out* past it (the server writing to every stream, the client reading them); the
first ``STREAM_WARMUP_S`` seconds, while all streams connect at once, are not counted.

Prints, per route and overall: requests, requests/s, p50/p90/p99/max latency (ms) and the
error count; and how many training steps the job made during the run (the API shares the
machine with the worker). ``--json FILE`` also writes them. At the end the job is cancelled
and an embedded server is stopped (Ctrl-C, as a user would).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the benchmarks package

from benchmarks.http_client import Connection  # noqa: E402

TIMEOUT_S = 10.0
# stream mode: deliveries in the first seconds, while every stream connects at once (the
# "open stream" row), are not counted: the figure is the steady state of open streams
STREAM_WARMUP_S = 3.0


# -- the load: a second process ------------------------------------------------------------


async def _client(
    http: Connection, job_id: str, interval: float, stop_at: float, out: dict
) -> None:
    """Plain polling (``conditional`` False) or conditional polling: each route's last
    ``ETag`` sent back as ``If-None-Match``, a 304 counting as a good answer."""
    import random

    after = ""
    tags: dict[str, str] = {}
    conditional = out["mode"] == "conditional"
    await asyncio.sleep(random.uniform(0, interval or 0.05))  # spread the first requests
    while time.monotonic() < stop_at:
        cycle = time.monotonic()
        for route, path in (
            ("GET /v1/jobs/{id}", f"/v1/jobs/{job_id}"),
            ("GET /v1/jobs/{id}/events", f"/v1/jobs/{job_id}/events?limit=100&after={after}"),
        ):
            headers = {"If-None-Match": tags[route]} if conditional and route in tags else {}
            started = time.perf_counter()
            try:
                r = await asyncio.wait_for(http.get(path, headers), TIMEOUT_S)
                ok = r.status in ((200, 304) if conditional else (200,))
                why = str(r.status)
                if r.status == 304:
                    out["not_modified"] = out.get("not_modified", 0) + 1
                if r.status == 200 and "etag" in r.headers:
                    tags[route] = r.headers["etag"]
                if r.status == 200 and route.endswith("events"):
                    page = json.loads(r.body)
                    new_after = page["next_after"] or (
                        str(page["data"][-1]["id"]) if page["data"] else after
                    )
                    if new_after != after:
                        tags.pop(route, None)  # another page: its tag is another one
                    after = new_after
            except Exception as exc:  # noqa: BLE001 - a time-out or a refused connection
                ok, why = False, type(exc).__name__
                await http.close()
            elapsed_ms = (time.perf_counter() - started) * 1000
            out["latencies"].setdefault(route, []).append(elapsed_ms)
            if not ok:
                out["errors"][route] = out["errors"].get(route, 0) + 1
                out["why"][why] = out["why"].get(why, 0) + 1
        if interval:
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - cycle)))


def _utc_seconds(stamp: str) -> float:
    from datetime import UTC, datetime

    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


async def _streamer(http: Connection, job_id: str, stop_at: float, out: dict) -> None:
    """One server-sent-event stream: the time to open it, and for every job update it
    delivers, the delay from the update's ``updated_at`` (written by the worker) to its
    arrival here (one machine, one clock)."""
    import random

    route_open, route_deliver = "open stream", "stream delivery"
    await asyncio.sleep(random.uniform(0, 1.0))
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        lines = http.stream_lines(f"/v1/jobs/{job_id}/events?stream=true")
        try:
            status = await asyncio.wait_for(anext(lines), TIMEOUT_S)
            out["latencies"].setdefault(route_open, []).append(
                (time.perf_counter() - started) * 1000
            )
            if status != 200:
                raise RuntimeError(f"status {status}")
            kind = "message"
            async for line in lines:
                if time.monotonic() > stop_at:
                    return
                if line.startswith("event: "):
                    kind = line[7:]
                elif (
                    line.startswith("data: ")
                    and kind == "job"
                    and time.monotonic() >= out["count_from"]
                ):
                    job = json.loads(line[6:])
                    delay = (time.time() - _utc_seconds(job["updated_at"])) * 1000
                    out["latencies"].setdefault(route_deliver, []).append(delay)
                    out.setdefault("by_update", {}).setdefault(job["updated_at"], []).append(delay)
                elif line == "":
                    kind = "message"
        except Exception as exc:  # noqa: BLE001 - a refused connection or a reset
            out["errors"][route_open] = out["errors"].get(route_open, 0) + 1
            out["why"][type(exc).__name__] = out["why"].get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.5)
        finally:
            await lines.aclose()


async def _load(  # noqa: ANN202
    url: str, key: str, job_id: str, clients: int, duration: float, interval: float, mode: str
):
    """``clients`` pollers, each with its own keep-alive connection (benchmarks/http_client.py:
    a lean client, so that the load generator's own CPU does not become the measurement)."""
    conns = [Connection(url, {"Authorization": f"Bearer {key}"}) for _ in range(clients)]
    out: dict = {"latencies": {}, "errors": {}, "why": {}, "mode": mode}
    started = time.monotonic()
    stop_at = started + duration
    out["count_from"] = started + STREAM_WARMUP_S
    try:
        if mode == "stream":
            await asyncio.gather(*(_streamer(c, job_id, stop_at, out) for c in conns))
        else:
            await asyncio.gather(*(_client(c, job_id, interval, stop_at, out) for c in conns))
    finally:
        out["seconds"] = time.monotonic() - started
        for c in conns:
            await c.close()
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _split_delivery(raw: dict) -> None:
    """Split each stream delivery delay in two: ``first arrival`` (per job update, the
    delay of the first client to get it: the writer's commit after stamping ``updated_at``,
    plus the watch's poll tick) and ``fan-out`` (each client's delay past that first one:
    the server writing the update to every stream, and this process reading them)."""
    updates = raw.pop("by_update", {})
    if updates:
        firsts = [min(delays) for delays in updates.values()]
        spread = [d - min(delays) for delays in updates.values() for d in delays]
        raw["latencies"]["  first arrival"] = firsts
        raw["latencies"]["  fan-out"] = spread


def summarize(raw: dict) -> dict:
    _split_delivery(raw)
    rows = {}
    every: list[float] = []
    for route, values in sorted(raw["latencies"].items()):
        every += values
        rows[route] = _row(values, raw["errors"].get(route, 0), raw["seconds"])
    if raw["mode"] != "stream":
        rows["all"] = _row(every, sum(raw["errors"].values()), raw["seconds"])
    else:
        rows["all"] = {"requests": 0, "errors": sum(raw["errors"].values())}
    if raw.get("not_modified"):
        rows["all"]["not_modified"] = raw["not_modified"]
    if raw["why"]:
        rows["all"]["error_kinds"] = raw["why"]  # status codes or exception names
    return rows


def _row(values: list[float], errors: int, seconds: float) -> dict:
    if not values:
        return {"requests": 0, "errors": errors}
    return {
        "requests": len(values),
        "requests_per_s": round(len(values) / seconds, 1),
        "p50_ms": round(statistics.median(values), 1),
        "p90_ms": round(_percentile(values, 90), 1),
        "p99_ms": round(_percentile(values, 99), 1),
        "max_ms": round(max(values), 1),
        "errors": errors,
    }


def run_client(args: argparse.Namespace) -> int:
    raw = asyncio.run(
        _load(args.url, args.key, args.job, args.clients, args.duration, args.interval, args.mode)
    )
    print(json.dumps(summarize(raw)))
    return 0


# -- the server and the job --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded(data: Path, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    port = _free_port()
    env = {**os.environ, "DAS_DATA_DIR": str(data), "PORT": str(port), "PYTHONUNBUFFERED": "1"}
    for var in ("DATABASE_URL", "CELERY_BROKER_URL"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log = log_path.open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"das-service serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise TimeoutError("das-service serve did not become ready")
    key = re.search(r"API key \(owner 'local'\): (\S+)", log_path.read_text()).group(1)
    return server, url, key


def start_training_job(url: str, key: str, max_steps: int) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        lineage = http.post(
            "/v1/lineages",
            json={
                "name": "load-benchmark",
                "base_model": "tiny-roberta",
                "hyperparameters": {
                    "max_steps": max_steps,
                    "batch_size": 8,
                    "block_size": 64,
                    "checkpoint_every": 1000,
                    "eval_max_batches": 2,
                    "importance_max_batches": 2,
                },
            },
        )
        lineage.raise_for_status()
        text = "".join(
            f"Shares of company {i} rose {i % 7} percent after the central bank held rates.\n\n"
            for i in range(400)
        )
        r = http.post(
            f"/v1/lineages/{lineage.json()['id']}/domains",
            data={"name": "news"},
            files={"file": ("news.txt", text.encode())},
        )
        r.raise_for_status()
        job_id = r.json()["job"]["id"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["phase"] == "training" and (job["step"] or 0) >= 1:
                return job_id
            if job["status"] in ("failed", "cancelled", "succeeded"):
                raise RuntimeError(f"the job ended before the load started: {job}")
            time.sleep(0.5)
    raise TimeoutError("the job did not start training")


def job_step(url: str, key: str, job_id: str) -> int:
    import httpx

    r = httpx.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    return int(r.json().get("step") or 0)


def _run_mode(args: argparse.Namespace, url: str, key: str, job_id: str, mode: str) -> dict:
    """One load run of ``mode`` in a second process; prints and returns its figures."""
    steps_before = job_step(url, key, job_id)
    print(
        f"\n[{mode}] job {job_id} training; {args.clients} clients for {args.duration:.0f} s, "
        f"interval {args.interval} s, on {url} ({os.cpu_count()} CPUs)",
        flush=True,
    )
    load = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--client",
            "--url",
            url,
            "--key",
            key,
            "--job",
            str(job_id),
            "--clients",
            str(args.clients),
            "--duration",
            str(args.duration),
            "--interval",
            str(args.interval),
            "--mode",
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=args.duration + 120,
        check=False,
    )
    if load.returncode != 0:
        raise RuntimeError(f"the load process failed:\n{load.stderr[-3000:]}")
    rows = json.loads(load.stdout.strip().splitlines()[-1])
    steps = job_step(url, key, job_id) - steps_before
    print(
        f"{'route':<28}{'req':>8}{'req/s':>9}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}{'errors':>8}"
    )
    for route, row in rows.items():
        print(
            f"{route:<28}{row['requests']:>8}{row.get('requests_per_s', 0):>9}"
            f"{row.get('p50_ms', 0):>8}{row.get('p90_ms', 0):>8}"
            f"{row.get('p99_ms', 0):>8}{row.get('max_ms', 0):>9}{row['errors']:>8}"
        )
    extra = f", {rows['all']['not_modified']} answered 304" if "not_modified" in rows["all"] else ""
    print(f"(latencies in ms) the job trained {steps} steps during the run{extra}")
    if rows["all"].get("error_kinds"):
        print(f"errors: {rows['all']['error_kinds']}")
    return {"rows": rows, "training_steps_during_run": steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start das-service serve)")
    parser.add_argument("--key", help="its API key (with --url)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (at most 600)")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between a client's polls (0: none)"
    )
    parser.add_argument("--max-steps", type=int, default=100_000, help="the training job's")
    parser.add_argument(
        "--modes",
        default="plain,conditional,stream",
        help="comma-separated, run in turn: plain (GET each time), conditional "
        "(If-None-Match, 304 when unchanged), stream (server-sent events)",
    )
    parser.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)  # a public job id (job_…)
    args = parser.parse_args(argv)
    args.duration = min(args.duration, 600.0)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - {"plain", "conditional", "stream"}:
        parser.error("--modes: plain, conditional, stream")
    if args.client:
        return run_client(args)

    server = None
    with tempfile.TemporaryDirectory(prefix="das-load-") as tmp:
        try:
            if args.url:
                if not args.key:
                    parser.error("--url needs --key")
                url, key = args.url.rstrip("/"), args.key
            else:
                server, url, key = start_embedded(Path(tmp) / "data", Path(tmp) / "serve.log")
            job_id = start_training_job(url, key, args.max_steps)
            results = {}
            for mode in args.modes:
                results[mode] = _run_mode(args, url, key, job_id, mode)
                if server is not None and results[mode]["rows"]["all"].get("error_kinds"):
                    log = (Path(tmp) / "serve.log").read_text(errors="replace").splitlines()
                    print("\n".join(line for line in log if "ERROR" in line or "WARNING" in line))
            if len(args.modes) > 1:
                print("\nside by side (p99 ms of the figure that matters for each mode):")
                for mode, result in results.items():
                    rows = result["rows"]
                    key_row = rows.get("stream delivery") if mode == "stream" else rows["all"]
                    print(
                        f"  {mode:<12} p99 {key_row.get('p99_ms', 'n/a'):>8}  p50 "
                        f"{key_row.get('p50_ms', 'n/a'):>8}  errors {rows['all']['errors']}"
                    )
            if args.json:
                args.json.write_text(
                    json.dumps(
                        {
                            "clients": args.clients,
                            "duration_s": args.duration,
                            "interval_s": args.interval,
                            "cpus": os.cpu_count(),
                            "modes": results,
                        },
                        indent=2,
                    )
                )
            import httpx

            httpx.post(
                f"{url}/v1/jobs/{job_id}/cancel",
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
        finally:
            if server is not None and server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
