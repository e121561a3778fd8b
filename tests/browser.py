"""Playwright helpers: Debian's chromium, headless, looking at OHIF as a radiologist would.

Playwright cannot download its own browsers here, so it drives /usr/bin/chromium. The
network is closed, so every background service of Chrome is switched off; WebGL (which
OHIF's Cornerstone3D needs) comes from SwiftShader, there being no GPU.

Waits are on selectors, text or page state with timeouts, never sleeps: when a wait times
out the caller gets the page text and a screenshot to look at (see `PageErrors.report`).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    from playwright.sync_api import Browser, ConsoleMessage, Error, Locator, Page, sync_playwright
except ImportError as exc:  # a clear message instead of a bare collection error
    raise ImportError("playwright is not installed in this venv: pip install -e '.[test]' "
                      "(part of `make install-test`)") from exc

CHROMIUM = os.environ.get("MIGRAINE_NODE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",  # runs as root in CI containers
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",  # software WebGL: no GPU, and newer Chrome gates SwiftShader behind this
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)
VIEWPORT = {"width": 1600, "height": 1000}
DEFAULT_TIMEOUT_MS = 60_000  # software rendering on two cores: the first image can take several seconds

# OHIF's first-visit overlays, as a returning user has already dismissed them: the guided tour of
# the basic viewer (a full-page Shepherd overlay that swallows clicks) and the per-session
# "investigational use only" banner.
_RETURNING_USER = """
try {
  localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
  sessionStorage.setItem('investigationalUseDialog', 'hidden');
} catch (e) {}
"""

STUDY_BROWSER = '[data-cy="studyBrowser-panel"]'
THUMBNAIL = '[data-cy="study-browser-thumbnail"], [data-cy="study-browser-thumbnail-no-image"]'
VIEWPORT_PANE = '[data-cy="viewport-pane"]'


@contextlib.contextmanager
def launch_chromium(headless: bool = True) -> Iterator[Browser]:
    """Debian's chromium under Playwright; fails (never skips) with the fix when it is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(f"{CHROMIUM} not found: apt-get install chromium (part of `make install-test`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=headless, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageErrors:
    """What went wrong in the page: uncaught exceptions, console errors, failed requests.

    OHIF's React error boundaries catch exceptions (so no "pageerror") and log them with
    console.debug as "... Error Boundary <error>"; those are collected as `boundary_errors`.
    """

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    boundary_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    @classmethod
    def attach(cls, page: Page) -> PageErrors:
        self = cls()
        page.on("pageerror", lambda exc: self.page_errors.append(_error_text(exc)))
        page.on("console", self._on_console)
        page.on("requestfailed", lambda req: self.failed_requests.append(
            f"{req.method} {_path(req.url)}: {req.failure}"))
        page.on("response", lambda resp: resp.status >= 400 and self.failed_requests.append(
            f"{resp.request.method} {_path(resp.url)}: HTTP {resp.status}"))
        return self

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)
        elif "Error Boundary" in message.text:
            self.boundary_errors.append(message.text)

    @property
    def errors(self) -> list[str]:
        """Uncaught exceptions, console errors and errors caught by OHIF's error boundaries."""
        return self.page_errors + self.console_errors + self.boundary_errors

    def report(self) -> str:
        return "\n".join((f"page errors: {self.page_errors}", f"console errors: {self.console_errors}",
                          f"OHIF error-boundary errors: {self.boundary_errors}",
                          f"failed requests: {self.failed_requests}"))


def _error_text(exc: Error | BaseException) -> str:
    stack = getattr(exc, "stack", None)
    return f"{exc}\n{stack}" if stack and str(exc) not in ("", stack) else str(exc)


def _path(url: str) -> str:
    # Request URLs without query strings: QIDO searches may carry patient attributes.
    return url.split("?", 1)[0]


def new_page(browser: Browser) -> tuple[Page, PageErrors]:
    """A fresh browser context (no state from other tests) with error collection attached."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    context.add_init_script(_RETURNING_USER)
    page = context.new_page()
    return page, PageErrors.attach(page)


def open_study(page: Page, url: str, timeout_ms: float = DEFAULT_TIMEOUT_MS) -> Locator:
    """Open a study URL and wait until OHIF's study browser lists at least one series thumbnail."""
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    panel = page.locator(STUDY_BROWSER)
    panel.locator(THUMBNAIL).first.wait_for(state="visible", timeout=timeout_ms)
    return panel


def thumbnail(page: Page, description: str) -> Locator:
    """The study-browser thumbnail whose series description is exactly `description`."""
    label = page.locator('[data-cy="series-description-label"]',
                         has_text=re.compile(f"^\\s*{re.escape(description)}\\s*$"))
    return page.locator(STUDY_BROWSER).locator(THUMBNAIL).filter(has=label).first


def open_series_by_description(page: Page, description: str, timeout_ms: float = DEFAULT_TIMEOUT_MS) -> Locator:
    """Double-click the series thumbnail with this description, as a user loads a series into the viewport."""
    thumb = thumbnail(page, description)
    thumb.wait_for(state="visible", timeout=timeout_ms)
    thumb.dblclick(timeout=timeout_ms)
    return thumb


def wait_for_rendered_image(page: Page, timeout_ms: float = DEFAULT_TIMEOUT_MS) -> None:
    """Wait until the active viewport's canvas holds pixels that are not all one colour.

    A canvas element exists as soon as the viewport does; only a drawn image makes it non-uniform.
    """
    page.wait_for_function(
        """(selector) => {
            const canvases = document.querySelectorAll(selector + ' canvas');
            for (const canvas of canvases) {
                if (!canvas.width || !canvas.height) continue;
                let ctx;
                try { ctx = canvas.getContext('2d', {willReadFrequently: true}); } catch (e) { continue; }
                if (!ctx) continue;
                const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
                for (let i = 4; i < data.length; i += 4 * 7) {
                    if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) return true;
                }
            }
            return false;
        }""",
        arg=VIEWPORT_PANE,
        timeout=timeout_ms,
        polling=250,
    )


def wait_for_text_or_error(page: Page, errors: PageErrors, text: str | re.Pattern,
                           timeout_ms: float = DEFAULT_TIMEOUT_MS) -> bool:
    """Wait until `text` is visible (True) or the page reports an error or error toast (False).

    Returns early on an error so that a broken page fails in a second, not after the timeout;
    False as well when neither happened in time.
    """
    visible = page.get_by_text(text).filter(visible=True)
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        if visible.count():
            return True
        if errors.errors or error_toasts(page):
            return False
        page.wait_for_timeout(200)  # poll interval; also lets Playwright deliver console events
    return False


def page_text(page: Page) -> str:
    return page.inner_text("body")


def error_toasts(page: Page) -> list[str]:
    """Texts of OHIF's error notifications (sonner toasts) on screen now; they vanish after a few seconds."""
    return [text.strip() for text in page.locator('[data-sonner-toast][data-type="error"]').all_inner_texts()]


def save_screenshot(page: Page, path: Path) -> Path:
    """A full-window PNG at `path` (parents created), for people to look at when a test fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=False)
    return path
