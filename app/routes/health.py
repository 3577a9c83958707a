"""Liveness, readiness and the base models this server can load."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.auth import Principal, authenticate
from app.base_files import model_files_problem
from app.problems import problem_response
from app.schemas import BaseModelOut, Health, Page

router = APIRouter()

_BASES_TTL_S = 60.0
_bases_lock = threading.Lock()
_bases_cache: dict[str, tuple[float, list[BaseModelOut]]] = {}


@router.get("/healthz", response_model=Health, tags=["health"], summary="The process is up")
def healthz() -> Health:
    """Liveness: 200 while the process runs (no dependency is checked)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    tags=["health"],
    summary="The database and the broker are reachable",
)
def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 when the database and the broker answer, else a 503 problem whose `checks`
    say which is down.
    """
    checks: dict[str, str] = {}
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"unreachable ({type(exc).__name__})"
    try:
        request.app.state.broker_ping()
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"unreachable ({type(exc).__name__})"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse(Health(status="ok", checks=checks).model_dump())
    return problem_response(
        503, "not_ready", "; ".join(f"{k}: {v}" for k, v in checks.items()), checks=checks
    )


@router.get(
    "/v1/base-models",
    response_model=Page[BaseModelOut],
    tags=["base models"],
    summary="Base models this server can load without a hub",
)
def base_models(request: Request, _: Principal = Depends(authenticate)) -> Page[BaseModelOut]:
    """The base models this server can load without a model hub: the built-in `tiny-roberta`, `all-
    minilm-l6-v2` when installed, and each loadable folder of `DAS_MODELS_DIR`. Pass an `id` as
    a lineage's `base_model`.
    """
    from das_engine.bases import list_offline_bases

    models_dir = request.app.state.settings.models_dir
    key = str(models_dir)
    with _bases_lock:
        cached = _bases_cache.get(key)
        if cached is None or time.monotonic() - cached[0] > _BASES_TTL_S:
            bases = [
                BaseModelOut(
                    id=b.id,
                    architecture=b.architecture,
                    objective=b.objective,
                    parameters=b.parameters,
                )
                for b in list_offline_bases(models_dir)
                if b.path is None or model_files_problem(Path(b.path)) is None
            ]
            cached = (time.monotonic(), bases)
            _bases_cache[key] = cached
    return Page[BaseModelOut](data=cached[1], has_more=False, next_after=None)
