"""The FastAPI application: ``create_app(settings)``; ``uvicorn app.main:app`` uses the
environment's settings."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.conditional_reads import ConditionalJobReads, KeyCache
from app.job_watch import JobWatcher
from app.problems import PROBLEM_JSON, install_problem_handlers, problem_response
from app.ratelimit import make_rate_limiter
from app.routes import (
    artifacts,
    corpora,
    deletes,
    domains,
    fork,
    health,
    importance_summary,
    job_details,
    jobs,
    keys,
    lineages,
    metrics,
    webhooks,
)
from app.ui import routes as ui
from service_core.db import make_engine, make_read_session_factory, make_session_factory
from service_core.settings import Settings, get_settings

UPLOAD_PATHS = re.compile(r"^/v1/(corpora|lineages/[^/]+/domains)/?$")


class BodyLimit:
    """Caps the body of every request that is not a streamed upload (those enforce their
    own, larger, limit while streaming): 413 problem+json past ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or UPLOAD_PATHS.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        if not declared and headers.get(b"transfer-encoding") is None:
            await self.app(scope, receive, send)
            return
        # Read the (small) body up to the limit, then hand it on.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(
            413,
            "payload_too_large",
            f"the request body exceeds {self.limit} bytes",
            instance=scope["path"],
        )
        await response(scope, receive, send)


def _problem_openapi(app: FastAPI) -> Callable[[], dict]:
    """OpenAPI whose error responses are all problem+json."""

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            webhooks=app.webhooks.routes,
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = {
            "type": "object",
            "required": ["type", "title", "status", "detail", "code"],
            "description": "RFC 9457 problem details; quota answers add `limit` and `value`, "
            "a too small corpus `tokens`, `chunks` and `required_chunks`",
            "properties": {
                "type": {"type": "string", "description": "`urn:das-service:problem:<code>`"},
                "title": {"type": "string", "description": "the HTTP status phrase"},
                "status": {"type": "integer", "description": "the HTTP status code"},
                "detail": {"type": "string", "description": "what went wrong, for people"},
                "code": {"type": "string", "description": "what went wrong, for programs"},
                "instance": {"type": "string", "description": "the request path"},
                "errors": {
                    "type": "array",
                    "items": {"type": "object"},
                    "description": "`[{field, message}]`, or `[{line, message}]` for a corpus",
                },
            },
        }
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for item in schema.get("webhooks", {}).values():  # what the service sends
            for op in item.values():
                op["responses"] = {
                    "200": {"description": "any 2xx answer: delivered; else retried"}
                }
        problem = {
            "description": "an error (RFC 9457 problem details)",
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                responses = op.setdefault("responses", {})
                codes = ["404", "422", "500", "503"] if path.startswith("/v1") else ["500"]
                if path.startswith("/v1"):
                    codes.insert(0, "401")
                if method in ("post", "put"):  # a body to parse, a write to rate-limit
                    codes += ["400", "409", "413", "415", "429"]
                    if path.startswith("/v1"):
                        codes.append("403")  # a quota
                if path == "/readyz":
                    codes.append("503")
                if path.endswith(("/checkpoint", "/importance")):
                    codes += ["409", "410", "416"]
                    responses["206"] = {
                        "description": "the requested byte range of the archive",
                        "content": {"application/x-tar": {}},
                    }
                    responses["304"] = {"description": "not modified (If-None-Match)"}
                for code in codes:
                    responses[code] = dict(problem)
        if any(p.startswith("/v1") for p in schema.get("paths", {})):
            components_root = schema["components"]
            components_root["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API key"}
            }
            for path, item in schema["paths"].items():
                if path.startswith("/v1"):
                    for op in item.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    return openapi


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Callable[[Iterable[int]], list[int]] | None = None,
    broker_ping: Callable[[], None] | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="DAS service",
        version="0.1.0",
        description="Continual domain-adaptive pre-training (DAS) as a service. "
        "All /v1 routes need `Authorization: Bearer <api key>` (or the session cookie of "
        "the web dashboard at /ui, whose writes also send `X-CSRF-Token`); every error is "
        "application/problem+json (RFC 9457).",
    )
    engine = make_engine(settings)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.read_session_factory = make_read_session_factory(engine)
    app.state.job_watcher = JobWatcher(
        app.state.read_session_factory, poll_seconds=settings.stream_poll_seconds, settings=settings
    )
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    if enqueue is None or broker_ping is None:
        from service_core.queue import Dispatcher

        dispatcher = Dispatcher(settings)
        enqueue = enqueue or dispatcher
        broker_ping = broker_ping or dispatcher.ping
    app.state.enqueue = enqueue
    app.state.broker_ping = broker_ping
    app.state.rate_limiter = make_rate_limiter(
        settings.rate_limit_per_minute, settings.rate_limit_burst, settings.celery_broker_url
    )
    install_problem_handlers(app)
    for router in (health.router, lineages.router, domains.router, metrics.router):
        app.include_router(router)
    for router in (corpora.router, jobs.router):
        app.include_router(router)
    # lifecycle routes (artifacts, deletion, fork, job lists and reports, API keys, webhooks)
    for module in (artifacts, deletes, fork, job_details, keys, importance_summary, webhooks):
        app.include_router(module.router)
    app.webhooks.include_router(webhooks.events)  # documented under `webhooks`, not served
    # the dashboard (docs/ui.md): its pages, and the login that sets the session cookie
    app.include_router(ui.router)
    app.mount("/ui/static", StaticFiles(directory=ui.STATIC), name="ui-static")
    app.add_middleware(BodyLimit, limit=settings.max_json_bytes)
    app.add_middleware(ConditionalJobReads)  # outermost: a 304 skips everything else
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "If-None-Match",
                "Last-Event-ID",
            ],
            expose_headers=["ETag"],
        )
    app.openapi = _problem_openapi(app)  # type: ignore[method-assign]
    return app


def __getattr__(name: str) -> FastAPI:  # ``uvicorn app.main:app`` builds it lazily
    if name == "app":
        return create_app()
    raise AttributeError(name)
