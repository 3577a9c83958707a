"""``/ui``: the dashboard's pages and its login.

The pages are static (HTML, CSS and JavaScript modules in app/ui/static, no build step, no
external host) and read the ordinary /v1 API. ``POST /ui/login`` exchanges an API key for
an HttpOnly, SameSite=Strict session cookie, so the key never sits in the page's storage
or in a URL; app.auth accepts that cookie like the Bearer header.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from app.auth import authenticate, verify_api_key
from app.problems import Problem
from app.ui.sessions import (
    COOKIE,
    CSRF_HEADER,
    LIFETIME_S,
    BrowserSession,
    close_session,
    csrf_ok,
    open_session,
    read_session,
)
from das_engine.config import STRATEGIES

STATIC = Path(str(files("app.ui") / "static"))
router = APIRouter(prefix="/ui", include_in_schema=False)

# the pages load nothing from another origin and cannot be framed
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/")
def ui_page() -> FileResponse:
    """The single page; its script routes on the URL's fragment (#/lineages/...)."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def _session_body(browser: BrowserSession) -> dict:
    return {
        "owner": browser.owner,
        "csrf_token": browser.csrf,
        "csrf_header": CSRF_HEADER,
        "expires_at": datetime.fromtimestamp(browser.expires, UTC).isoformat(),
        "strategies": list(STRATEGIES),
    }


@router.post("/login")
async def login(request: Request) -> JSONResponse:
    """``{"api_key": "das_..."}`` (JSON only: a form on another site cannot send it) -> the
    session cookie, and the CSRF token the page sends with its writes."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise Problem(415, "unsupported_media_type", 'send {"api_key": "..."} as JSON')
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise Problem(400, "bad_request", "the body is not JSON") from None
    key = body.get("api_key") if isinstance(body, dict) else None
    if not isinstance(key, str) or not key.strip():
        raise Problem(
            422,
            "validation_error",
            "api_key is required",
            errors=[{"field": "api_key", "message": "a non-empty string"}],
        )
    with request.app.state.read_session_factory() as session:
        row = verify_api_key(session, key.strip())
        if row is None:
            raise Problem(
                401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
            )
        key_id, owner = row.id, row.owner
    token, browser = open_session(request.app.state.settings.data_dir, key_id, owner)
    response = JSONResponse(_session_body(browser))
    response.set_cookie(
        COOKIE,
        token,
        max_age=LIFETIME_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def _current(request: Request) -> tuple[str, BrowserSession] | None:
    token = request.cookies.get(COOKIE)
    browser = read_session(request.app.state.settings.data_dir, token) if token else None
    return (token, browser) if token and browser else None


@router.get("/session")
def whoami(request: Request) -> JSONResponse:
    """The page's session (owner, CSRF token), or 401: then the page shows the login."""
    authenticate(request)  # a revoked key's session is closed here
    found = _current(request)
    if found is None:
        raise Problem(401, "unauthorized", "no session; log in")
    response = JSONResponse(_session_body(found[1]))
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/logout", status_code=204)
def logout(request: Request) -> Response:
    """Close the session on the server and clear the cookie. Needs the CSRF header while
    the session is live (so another site cannot log the user out)."""
    found = _current(request)
    if found is not None:
        token, browser = found
        if not csrf_ok(browser, request.headers.get(CSRF_HEADER)):
            raise Problem(403, "csrf_failed", f"logout needs the {CSRF_HEADER} header")
        close_session(request.app.state.settings.data_dir, token)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response
