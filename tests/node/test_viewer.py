"""The radiologist's view: what the OHIF Viewer shows of what is in the PACS.

Real peers only: Orthanc with its DICOMweb plugin as the PACS, the prebuilt OHIF
Viewer v3 served by `node.viewer.ViewerServer`, and Debian's chromium driven by
Playwright. A missing OHIF build, plugin or browser fails the test with the
command that fixes it (CI must not go green by skipping).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from model.synth import SERIES_DESCRIPTION, write_series
from node.report import RESEARCH_USE_TEXT, SR_SERIES_DESCRIPTION, SYNTHETIC_TEXT
from node.result_image import RESULT_IMAGE_SERIES_DESCRIPTION
from node.viewer import OHIF_VERSION, ViewerServer, find_ohif_dist
from tests.browser import (
    VIEWPORT_PANE,
    error_toasts,
    launch_chromium,
    new_page,
    open_series_by_description,
    open_study,
    page_text,
    save_screenshot,
    wait_for_rendered_image,
)
from tests.peers import NODE_AE, NodeProcess, OrthancProcess, free_port, storescu, wait_until

SLICES = 104  # selection wants a 3D series (>= 100 slices)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, tiny_checkpoint):
    """Orthanc (DICOMweb on) holding a synthetic sagittal T1, routed to a real node that sent back its results.

    As a hospital runs it: the scanner stores to PACS, a PACS routing rule forwards the
    study to the node (`/modalities/node/store`), the node classifies it and stores the SR
    and the result image in the same study. Yields (orthanc, series, the node's row).
    """
    if find_ohif_dist() is None:
        pytest.fail(f"OHIF Viewer build missing: run `make ohif` (npm @ohif/app@{OHIF_VERSION}) "
                    "or set MIGRAINE_OHIF_DIST", pytrace=False)
    root = tmp_path_factory.mktemp("viewer")
    node_port = free_port()
    orthanc = OrthancProcess.create(root / "orthanc", {"node": (NODE_AE, node_port)}, dicomweb=True).start()
    node = None
    try:
        series = write_series(root / "mr", slices=SLICES, rows=128, columns=128, spacing=1.5, seed=11)
        sent = storescu(root / "mr", orthanc.dicom_port, called=orthanc.aet)
        assert sent.returncode == 0, sent.stderr
        (root / "node").mkdir()
        node = NodeProcess.write_config(
            root / "node", port=node_port, workers=1, checkpoint=tiny_checkpoint, idle_seconds=1,
            destinations=[{"name": "pacs", "ae_title": orthanc.aet, "port": orthanc.dicom_port,
                           "objects": ["sr", "image"]}]).start()
        study = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": series.study_instance_uid}})
        orthanc.post("/modalities/node/store", {"Resources": study, "Synchronous": True})

        def delivered():
            row = next((r for r in node.jobs() if r["series_instance_uid"] == series.series_instance_uid), None)
            if row and row["state"] in ("failed", "skipped"):
                raise AssertionError(f"job failed: {row['reason']}\n{node.log_text()[-3000:]}")
            return row if row and row["state"] == "delivered" else None

        row = wait_until(delivered, timeout=180, interval=0.5, what="the node's result delivered to Orthanc")
        yield orthanc, series, row
    finally:
        if node is not None:
            node.stop()
        orthanc.stop(kill=True)


@pytest.fixture(scope="module")
def viewer(pacs):
    orthanc, _, _ = pacs
    with ViewerServer(orthanc.http_port) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


def _record(page, tmp_path: Path, name: str) -> tuple[Path, str]:  # noqa: ANN001
    """Screenshot and page text into tmp_path (and $MIGRAINE_TEST_SCREENSHOTS, for docs/), whatever the outcome."""
    shot = save_screenshot(page, tmp_path / f"{name}.png")
    text = page_text(page)
    (tmp_path / f"{name}.txt").write_text(text)
    if os.environ.get("MIGRAINE_TEST_SCREENSHOTS"):
        target = Path(os.environ["MIGRAINE_TEST_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / f"ohif-{name}.png")
    return shot, text


def test_mr_series_renders_in_ohif(pacs, viewer, browser, tmp_path):
    _, series, _ = pacs
    page, errors = new_page(browser)
    try:
        open_study(page, viewer.study_url(series.study_instance_uid))
        open_series_by_description(page, SERIES_DESCRIPTION)
        wait_for_rendered_image(page)
        overlay = page.locator(VIEWPORT_PANE).first
        # OHIF's overlay names the displayed series and counts its images: all slices arrived.
        overlay.get_by_text(SERIES_DESCRIPTION, exact=True).wait_for()
        overlay.get_by_text(re.compile(rf"\(\d+/{SLICES}\)")).wait_for()
    finally:
        shot, text = _record(page, tmp_path, "mr")
        page.context.close()
    assert not errors.errors, f"{errors.report()}\nscreenshot: {shot}\npage text:\n{text}"
    assert not errors.failed_requests, errors.report()


def _annotation_lines(page) -> list[str]:  # noqa: ANN001
    """The text OHIF drew next to the SR's region: SVG <tspan>s, one per line."""
    return [t.strip() for t in page.locator(f"{VIEWPORT_PANE} svg g[data-annotation-uid] text tspan").all_text_contents()]


def _clipped_lines(page) -> list[str]:  # noqa: ANN001
    """Annotation lines that do not lie wholly inside the viewport (cut off for the reader)."""
    return page.evaluate(
        """(pane) => {
            const box = document.querySelector(pane).getBoundingClientRect();
            const out = [];
            for (const t of document.querySelectorAll(pane + ' svg g[data-annotation-uid] text tspan')) {
                const r = t.getBoundingClientRect();
                if (r.left < box.left || r.right > box.right || r.top < box.top || r.bottom > box.bottom)
                    out.push(t.textContent);
            }
            return out;
        }""",
        VIEWPORT_PANE,
    )


def test_sr_is_readable_in_ohif(pacs, viewer, browser, tmp_path):
    """The radiologist double-clicks the SR: the probability, the label and the statements are on screen."""
    _, series, row = pacs
    label = "NSAID responder" if row["label"] == "responder" else "NSAID non-responder"
    probability = f"Probability: {100 * row['probability']:.2f} %"
    expected = [f"AI prediction: {label}", RESEARCH_USE_TEXT, SYNTHETIC_TEXT, probability, "Decision threshold: "]

    page, errors = new_page(browser)
    lines: list[str] = []
    clipped: list[str] = []
    toasts: list[str] = []
    try:
        open_study(page, viewer.study_url(series.study_instance_uid))
        # As a radiologist does: the study opens on its first series, then they double-click the SR.
        # Switching while OHIF still loads that first stack trips an OHIF race (its destroyed stack
        # viewport's image-load error handler throws), which is not what this test is about.
        wait_for_rendered_image(page)
        page.wait_for_load_state("networkidle")
        open_series_by_description(page, SR_SERIES_DESCRIPTION)
        deadline = time.monotonic() + 60
        while not (shown := any(probability in line for line in _annotation_lines(page))):
            if errors.errors or error_toasts(page) or time.monotonic() > deadline:
                break
            page.wait_for_timeout(250)
        wait_for_rendered_image(page)  # the region is drawn on the referenced image
        lines = _annotation_lines(page)
        clipped = _clipped_lines(page)
        toasts = error_toasts(page)
    finally:
        shot, text = _record(page, tmp_path, "sr")
        page.context.close()
    details = f"{errors.report()}\nerror toasts: {toasts}\nlines: {lines}\nscreenshot: {shot}\npage text:\n{text}"
    assert shown, f"the probability is not on screen\n{details}"
    assert not errors.errors and not toasts, details
    for wanted in expected:
        assert any(wanted in line for line in lines), (wanted, details)
    assert not clipped, f"cut off at the viewport's edge: {clipped}\n{details}"
    assert "responder" in text and "Research use only" in text  # visible page text, not only the DOM


def test_result_image_is_readable_in_ohif(pacs, viewer, browser, tmp_path):
    """For viewers without SR support: the Secondary Capture with the result burned in displays in OHIF."""
    _, series, row = pacs
    assert row["image_sop_instance_uid"]
    page, errors = new_page(browser)
    try:
        open_study(page, viewer.study_url(series.study_instance_uid))
        wait_for_rendered_image(page)  # the first series shown, as for the SR above
        page.wait_for_load_state("networkidle")
        open_series_by_description(page, RESULT_IMAGE_SERIES_DESCRIPTION)
        wait_for_rendered_image(page)
        page.locator(VIEWPORT_PANE).first.get_by_text(RESULT_IMAGE_SERIES_DESCRIPTION, exact=True).wait_for()
        toasts = error_toasts(page)
    finally:
        shot, text = _record(page, tmp_path, "result-image")
        page.context.close()
    assert not errors.errors and not toasts, f"{errors.report()}\n{toasts}\nscreenshot: {shot}"
    assert not errors.failed_requests, errors.report()


def test_viewer_server_refuses_writes_and_escapes(viewer):
    """The proxy is read-only and cannot be walked out of the OHIF folder or into Orthanc's REST API."""
    import http.client

    def status(method: str, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
        try:
            conn.request(method, path, body=b"" if method == "POST" else None)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    assert status("POST", "/dicom-web/studies") == 405
    assert status("DELETE", "/dicom-web/studies") == 405
    assert status("GET", "/dicom-web/../system") == 400
    assert status("GET", "/dicom-web/%2e%2e/system") == 400
    assert status("GET", "/dicom-web/studies%2F..%2F..%2Fsystem") == 400  # encoded separators

    conn = http.client.HTTPConnection("127.0.0.1", viewer.port, timeout=10)
    try:  # DNS rebinding: a page served as evil.example that resolves to 127.0.0.1
        conn.request("GET", "/dicom-web/studies", headers={"Host": f"evil.example:{viewer.port}"})
        response = conn.getresponse()
        response.read()
        assert response.status == 421
    finally:
        conn.close()
    assert status("GET", "/../pyproject.toml") == 400
    assert status("GET", "/missing.js") == 404
    assert status("GET", "/viewer") == 200  # a client-side route: index.html
    assert status("GET", "/app-config.js") == 200
    assert status("GET", "/dicom-web/studies") == 200
