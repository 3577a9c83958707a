"""The dashboard end to end in a real browser: Debian's headless Chromium driven by
Playwright against ``das-service serve`` (the API and a real worker) on 127.0.0.1.

Log in, create a lineage, upload two small domains (the upload and the job progress bars
reach 100%), the job's loss curve and event log, the forgetting heatmap (one cell per stage
x domain), a fork side by side, the importance view, a checkpoint download, logout; at
1280x800 and at a 390 px phone width. A screenshot of each page is saved in
``$DAS_UI_SCREENSHOTS`` (docs/ui/ holds the committed ones: ``DAS_UI_SCREENSHOTS=docs/ui``)
or else in the test's temporary folder.

Needs /usr/bin/chromium (``apt-get install chromium``) and the ``playwright`` package,
whose own browser download is never used. Without them the test is skipped, except under
``DAS_REQUIRE_SERVICES=1`` (CI), where it fails.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import TINY_HP, corpus_text, serve_embedded

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM = Path(os.environ.get("DAS_CHROMIUM", "/usr/bin/chromium"))  # Debian's package
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HP = {**TINY_HP, "max_steps": 8, "checkpoint_every": 4}
TRAIN_TIMEOUT_MS = 300_000


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    why = _browser_missing()
    if why:
        if os.environ.get("DAS_REQUIRE_SERVICES"):
            pytest.fail(f"DAS_REQUIRE_SERVICES is set but {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # noqa: ANN201
    data = tmp_path_factory.mktemp("ui-e2e")
    with serve_embedded(data, max_upload_bytes=4 << 20, event_every_steps=1) as s:
        yield s


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:  # noqa: ANN001
    folder = Path(os.environ.get("DAS_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots in {folder}")
    return folder


def _snap(page, shots: Path, name: str) -> None:  # noqa: ANN001
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def _fits_width(page) -> bool:  # noqa: ANN001
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def _wait_progress(page, testid: str, timeout: int = TRAIN_TIMEOUT_MS) -> None:  # noqa: ANN001
    # A selector, not wait_for_function: the page's CSP (script-src 'self') forbids the
    # string evaluation that Playwright's predicates need in recent Chromium builds.
    page.wait_for_selector(f'[data-testid="{testid}"][aria-valuenow="100"]', timeout=timeout)


def _upload_domain(page, name: str) -> None:  # noqa: ANN001
    page.fill("#domain-name", name)
    page.set_input_files(
        "#domain-file",
        files=[{"name": f"{name}.txt", "mimeType": "text/plain", "buffer": corpus_text(name)}],
    )
    page.click("#add-domain button[type=submit]")
    _wait_progress(page, "upload-progress", 60_000)


def _stage_succeeded(page, position: int) -> None:  # noqa: ANN001
    page.wait_for_selector(f'[data-testid="stage-{position}"].succeeded', timeout=TRAIN_TIMEOUT_MS)


def test_dashboard_end_to_end(browser, served, shots, tmp_path):  # noqa: ANN001
    context = browser.new_context(
        viewport={"width": 1280, "height": 800}, accept_downloads=True, reduced_motion="reduce"
    )
    page = context.new_page()
    failures: list[str] = []
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda exc: failures.append(str(exc)))
    page.on(
        "requestfailed",
        # an EventSource closed by the page, and a download, end as "aborted" requests
        lambda r: (
            None
            if "/events" in r.url or r.url.endswith("/checkpoint")
            else failures.append(f"{r.url}: {r.failure}")
        ),
    )
    try:
        _walk_through(page, served, shots, tmp_path)
        phone = browser.new_context(
            viewport={"width": 390, "height": 844}, is_mobile=True, reduced_motion="reduce"
        )
        try:
            _phone_width(phone.new_page(), served, shots)
        finally:
            phone.close()
    finally:
        context.close()
    assert failures == [], failures
    assert any(u.endswith("/events?stream=true") for u in requested)  # live: EventSource


def _walk_through(page, served, shots: Path, tmp_path: Path) -> None:  # noqa: ANN001
    # -- login: a wrong key is refused, the right one (typed, Enter) opens the lineages --
    page.goto(f"{served.url}/ui/")
    page.wait_for_selector("#login:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "api-key"  # focus starts there
    for _ in range(8):  # back through the header: the skip link is the first stop
        page.keyboard.press("Shift+Tab")
        if page.evaluate("document.activeElement.textContent") == "Skip to content":
            break
    else:
        raise AssertionError("the skip link cannot be reached by keyboard")
    page.keyboard.press("Enter")  # to the main region; its next stop is the key field
    assert page.evaluate("document.activeElement.id") == "main"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.url.endswith("/ui/")  # the skip link left the router's fragment alone
    _snap(page, shots, "login")
    page.keyboard.type("das_not-a-key")
    page.keyboard.press("Enter")
    page.wait_for_selector("#login-error:has-text('invalid API key')")
    page.fill("#api-key", served.key)
    page.keyboard.press("Enter")
    page.wait_for_selector("h1:has-text('Lineages')")
    assert page.evaluate("document.cookie") == ""  # HttpOnly: the page cannot read it
    storage = page.evaluate("JSON.stringify([localStorage, sessionStorage])")
    assert served.key not in storage and served.key not in page.url

    # -- create a lineage through the form -------------------------------------------
    page.fill("#lineage-name", "news → law ✓")
    page.select_option("#lineage-base", "tiny-roberta")
    page.select_option("#lineage-strategy", "das")
    page.fill("#lineage-hp", json.dumps(HP))
    general = corpus_text("bio", seed=7)  # the general corpus: forgetting of general text
    page.set_input_files(
        "#lineage-general",
        files=[{"name": "general.txt", "mimeType": "text/plain", "buffer": general}],
    )
    page.click("#create-lineage button[type=submit]")
    page.wait_for_selector("h1:has-text('news → law ✓')")
    lineage_url = page.url

    # -- first domain: the upload bar, then the job page's bar reach 100% ------------
    _upload_domain(page, "news")
    page.wait_for_selector('[data-testid="stage-1"]')
    _snap(page, shots, "lineage-training")
    page.click('[data-testid="stage-1"] a:has-text("Job details")')
    page.wait_for_selector("h1:has-text('Stage 1: news')")
    _wait_progress(page, "job-progress")
    page.wait_for_selector('[data-testid="job-status"]:has-text("succeeded")')
    page.locator('[data-testid="loss-curve"] circle.point').nth(1).wait_for()  # >= 2 points
    assert page.locator('[data-testid="events"] tbody tr').count() >= 3
    _snap(page, shots, "job")

    # -- second domain, from the lineage page ------------------------------------------
    page.goto(lineage_url)
    _stage_succeeded(page, 1)
    _upload_domain(page, "law")
    _stage_succeeded(page, 2)
    _snap(page, shots, "lineage")

    # -- download a checkpoint (the link sends the session cookie) --------------------
    with page.expect_download() as info:
        page.click('[data-testid="checkpoint-2"]')
    archive = tmp_path / "checkpoint.tar"
    info.value.save_as(archive)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("/config.json") for n in names), names
    assert any(n.endswith(".safetensors") for n in names), names

    # -- forgetting: a 2 x 2 heatmap; a fork after stage 1 side by side ---------------
    page.click("a:has-text('Forgetting')")
    heatmap = '[data-testid="main-heatmap"]'
    page.wait_for_selector(heatmap)
    assert page.locator(f"{heatmap} rect.cell").count() == 4
    assert page.locator(f"{heatmap} rect.cell.empty").count() == 0
    assert page.locator('[data-testid="domain-curves"] polyline').count() == 3  # + general
    summary_text = page.inner_text('[data-testid="forgetting-summary"]')
    assert "General loss" in summary_text and "–" not in summary_text.split("General loss")[1]
    _snap(page, shots, "forgetting")
    page.goto(lineage_url)
    page.wait_for_selector("#fork-name")
    page.fill("#fork-name", "fork after news")
    page.select_option("#fork-stage", "1")
    page.click("form:has(#fork-name) button[type=submit]")
    page.wait_for_selector("h1:has-text('fork after news')")
    page.goto(lineage_url)
    page.click("a:has-text('Forgetting')")
    page.wait_for_selector(heatmap)
    page.select_option("#sibling", label="fork after news (das, fork)")
    page.wait_for_selector('[data-testid="sibling-heatmap"]')
    assert page.locator('[data-testid="sibling-heatmap"] rect.cell').count() == 1
    _snap(page, shots, "forgetting-side-by-side")

    # -- importance: layers x unit kinds, as the API summarises them ------------------
    page.goto(lineage_url)
    page.click("a:has-text('Importance')")
    page.wait_for_selector('[data-testid="importance-share"]')
    summary = httpx.get(
        page.url.split("/ui/")[0] + _api_path(page, "importance"),
        headers={"Authorization": f"Bearer {served.key}"},
    ).json()
    accumulated = summary["stages"][-1]["snapshots"]["accumulated"]
    cells = max(k["layers"] for k in accumulated.values()) * len(accumulated)  # layer x kind
    assert page.locator('[data-testid="importance-share"] rect.cell').count() == cells
    _snap(page, shots, "importance")

    # -- cancel: a third domain's job, from its timeline card ---------------------------
    page.goto(lineage_url)
    _upload_domain(page, "bio")
    page.once("dialog", lambda dialog: dialog.accept())  # "Cancel the job of stage 3?"
    page.click('[data-testid="cancel-3"]')
    page.wait_for_selector('[data-testid="stage-3"].cancelled', timeout=TRAIN_TIMEOUT_MS)
    _snap(page, shots, "lineage-cancelled")

    # -- the lineages list, then logout: the cookie no longer works -------------------
    page.click("header a:has-text('Lineages')")
    page.wait_for_selector('[data-testid="lineages"] tbody tr >> nth=1')
    _snap(page, shots, "lineages")
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    status = page.evaluate("fetch('/v1/lineages').then(r => r.status)")
    assert status == 401


def _api_path(page, what: str) -> str:  # noqa: ANN001
    """/v1/lineages/<id>/<what> of the lineage the page shows (its id as the page has it)."""
    fragment = page.url.split("#", 1)[1]  # /lineage/<id>/<view>
    lineage = fragment.split("/")[2]
    return f"/v1/lineages/{lineage}/{what}"


def _phone_width(page, served, shots: Path) -> None:  # noqa: ANN001
    """At 390 px the pages reflow: nothing wider than the screen but the charts' own
    scrolling boxes."""
    page.goto(f"{served.url}/ui/")
    page.fill("#api-key", served.key)
    page.keyboard.press("Enter")
    page.wait_for_selector('[data-testid="lineages"]')
    assert _fits_width(page)
    _snap(page, shots, "phone-lineages")
    page.click('[data-testid="lineages"] tbody tr >> nth=0 >> a')
    page.wait_for_selector('[data-testid="timeline"]')
    assert _fits_width(page)
    _snap(page, shots, "phone-lineage")
    page.click("a:has-text('Forgetting')")
    page.wait_for_selector('[data-testid="main-heatmap"]')
    assert _fits_width(page)
    _snap(page, shots, "phone-forgetting")
