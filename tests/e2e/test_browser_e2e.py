"""In a real browser (Debian's headless Chromium over the DevTools protocol):

* the node's status page, against a running node, finds a study by its accession number
  and shows its timeline through to the PACS confirming the results;
* Orthanc with Debian's web viewer plugin shows the node's heatmap Secondary Capture:
  the screenshot is not black and carries the heatmap's own colours.

One chest radiograph phantom goes through the embedded default pneumonia route; Orthanc
is the PACS the results go to.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import yaml

from dicomnode.config import DEFAULT_CONFIG
from dicomnode.phantoms.chest_xray import write_chest_xray_study
from tests.browser import chromium_page
from tests.peers import (
    PYDICOM_FILES,
    NodeProcess,
    Orthanc,
    ai_results,
    free_port,
    in_ci,
    node_config,
    port_open,
    require_tool,
    start_node,
    start_orthanc,
    storescu,
    wait_for,
)

WEBVIEWER = Path("/usr/share/orthanc/plugins/libOrthancWebViewer.so")
TOKEN = "browser-test-token-" + "x" * 16
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class Sent:
    node: NodeProcess
    web_port: int
    orthanc: Orthanc
    study_uid: str
    accession: str
    results: list[dict[str, Any]]


def _require_webviewer() -> None:
    if not WEBVIEWER.exists():
        message = f"{WEBVIEWER} is missing (Debian package orthanc-webviewer; scripts/test.sh)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sent]:
    require_tool("chromium")
    _require_webviewer()
    tmp = tmp_path_factory.mktemp("browser")
    orthanc = start_orthanc(tmp / "orthanc", extra={"Plugins": [str(WEBVIEWER)]})
    node: NodeProcess | None = None
    try:
        routes = [r for r in yaml.safe_load(DEFAULT_CONFIG.read_text())["routes"]
                  if r["name"] == "pneumonia-cxr"]
        web_port = free_port()
        config = node_config(
            tmp / "var", free_port(), routes=routes,
            destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                   "port": orthanc.dicom_port}},
            extra={"web": {"port": web_port,
                           "tokens": [{"name": "browser", "token": TOKEN,
                                       "role": "viewer"}]}})
        node = start_node(tmp / "node", config)
        wait_for(lambda: port_open(web_port), 30, "the node's web server")
        files = write_chest_xray_study(tmp / "phantoms", n=1, seed=61, pneumonia_fraction=1.0,
                                       size=512)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        storescu(node.port, files)
        study_uid = str(header.StudyInstanceUID)

        def delivered() -> list[dict[str, Any]] | None:
            status = node.status()  # type: ignore[union-attr]
            assert status["failed_jobs"] == [], status["failed_jobs"]
            outbox = status["counts"]["outbox"]
            found = ai_results(orthanc, study_uid)
            if outbox.get("sent") and not outbox.get("pending") and not outbox.get("sending") \
                    and len(found) >= outbox["sent"]:
                return found
            return None

        results = wait_for(delivered, 240, "the pneumonia results in Orthanc")
        yield Sent(node, web_port, orthanc, study_uid, str(header.AccessionNumber), results)
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_status_page_finds_the_study_timeline(sent: Sent, tmp_path: Path) -> None:
    with chromium_page() as page:
        page.navigate(f"http://127.0.0.1:{sent.web_port}/#token={TOKEN}")
        page.wait_for("document.body.dataset.ready === '1'", 30, "the status page")
        # the token left the address bar; the page searches as a person would
        assert "token" not in page.evaluate("location.href")
        page.evaluate(f"""(() => {{
            document.getElementById('search-field').value = 'accession';
            document.getElementById('search-input').value = {sent.accession!r};
            document.getElementById('search-form').requestSubmit(); }})()""")
        link = "document.querySelector('#search-result a.study-link')"
        page.wait_for(f"{link} !== null", 30, "the search result")
        assert page.evaluate(f"{link}.textContent") == sent.study_uid
        page.evaluate(f"{link}.click()")
        steps = page.wait_for(
            """(() => { const items = document.querySelectorAll('#timeline li');
                if (items.length < 6) return null;
                return Array.from(items).map(li => [li.dataset.step, li.dataset.status,
                                                    li.textContent]); })()""",
            30, "the study's timeline")
        page.screenshot(tmp_path / "status-page.png")
    by_step = {step: (status, text) for step, status, text in steps}
    assert [s for s, _, _ in steps] == ["received", "complete", "routed", "analysed", "sent",
                                        "confirmed"]
    assert all(status == "done" for status, _ in by_step.values()), by_step
    assert "pneumonia-cxr" in by_step["routed"][1]
    assert "pneumonia" in by_step["analysed"][1] and "pneumonia-cxr" in by_step["analysed"][1]
    assert f"all {len(sent.results)} result object(s) confirmed" in by_step["confirmed"][1]
    # a viewer's page names the patient only by the node's hash
    assert not any("PH-CXR" in text for _, _, text in steps)


def _hue_histogram(rgb: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.float64], float]:
    """Hue histogram (18 bins) of the saturated, not-dark pixels, and their share."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    colourful = (hsv[..., 1] > 60) & (hsv[..., 2] > 60)
    hist = np.bincount(hsv[..., 0][colourful].ravel() // 10, minlength=18)[:18]
    total = max(1, int(hist.sum()))
    return hist.astype(np.float64) / total, float(colourful.mean())


def test_orthanc_web_viewer_shows_the_heatmap(sent: Sent, tmp_path: Path) -> None:
    heatmaps = [r for r in sent.results if r.get("SOPClassUID") == SC_CLASS]
    assert heatmaps, [r.get("SeriesDescription") for r in sent.results]
    instance = heatmaps[0]["id"]
    series = sent.orthanc.get(f"/instances/{instance}")["ParentSeries"]
    source = pydicom.dcmread(io.BytesIO(sent.orthanc.instance_file(instance)))
    assert source.PhotometricInterpretation == "RGB"
    expected, expected_share = _hue_histogram(np.asarray(source.pixel_array, dtype=np.uint8))
    assert expected_share > 0.01  # the SC itself carries a heatmap
    auth = base64.b64encode(f"{sent.orthanc.user}:{sent.orthanc.password}".encode()).decode()
    with chromium_page(1280, 1000) as page:
        page.set_headers({"Authorization": f"Basic {auth}"})
        page.navigate(f"http://127.0.0.1:{sent.orthanc.http_port}/web-viewer/app/viewer.html"
                      f"?series={series}")
        page.wait_for(_CANVAS_PAINTED, 60, "the web viewer to draw the image")
        shot = page.screenshot(tmp_path / "orthanc-webviewer.png")
    image = cv2.cvtColor(cv2.imread(str(shot), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert image.mean() > 10, "the viewer's screenshot is black"
    seen, share = _hue_histogram(image)
    assert share > 0.005, f"only {share:.4f} of the screenshot is heatmap-coloured"
    # the hues on screen are the heatmap's own (not grey, not red and blue swapped)
    overlap = float(np.minimum(seen, expected).sum())
    assert overlap > 0.6, (overlap, seen.round(3), expected.round(3))


# a 2D canvas of the viewer with a non-black pixel in its central region
_CANVAS_PAINTED = """(() => {
  for (const c of document.querySelectorAll('canvas')) {
    if (c.width < 64 || c.height < 64) continue;
    const ctx = c.getContext('2d');
    if (!ctx) continue;
    const d = ctx.getImageData(c.width / 4, c.height / 4, c.width / 2, c.height / 2).data;
    for (let i = 0; i < d.length; i += 4 * 97) if (d[i] + d[i + 1] + d[i + 2] > 60) return true;
  }
  return false;
})()"""


def test_peer_strings_are_shown_as_text_not_run(sent: Sent, tmp_path: Path) -> None:
    """A series description from a peer that is HTML and script stays text on the page."""
    hostile = "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=2</script>"
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    ds.SeriesDescription = hostile[:64]
    path = tmp_path / "hostile.dcm"
    ds.save_as(path, enforce_file_format=True)
    storescu(sent.node.port, [path])
    with chromium_page() as page:
        page.navigate(f"http://127.0.0.1:{sent.web_port}/#token={TOKEN}")
        page.wait_for("document.body.dataset.ready === '1'", 30, "the status page")
        page.evaluate(f"location.hash = 'study={ds.StudyInstanceUID}'")
        page.wait_for("document.getElementById('timeline') !== null", 30, "the timeline")
        assert page.evaluate("window.pwned === undefined")
        assert page.evaluate("document.querySelectorAll('main img, main script').length") == 0
        assert hostile[:64] in page.evaluate("document.querySelector('main').textContent")


def test_rule_tester_explains_a_received_series(sent: Sent) -> None:
    with chromium_page() as page:
        page.navigate(f"http://127.0.0.1:{sent.web_port}/#token={TOKEN}")
        page.wait_for("document.body.dataset.ready === '1'", 30, "the status page")
        page.evaluate("location.hash = 'routes'")
        page.wait_for("document.getElementById('tester-series') !== null", 30, "the tester")
        chosen = page.evaluate("""(() => {
            const pick = document.getElementById('tester-series');
            const option = Array.from(pick.options).find(o => o.text.startsWith('DX'));
            pick.value = option.value;
            document.getElementById('tester-form').requestSubmit();
            return option.value; })()""")
        verdict = page.wait_for(
            """(() => { const v = document.querySelector(
                '#tester-result [data-route="pneumonia-cxr"]');
                return v && [v.textContent, v.closest('tr').textContent]; })()""",
            30, "the rule tester's verdict")
    assert chosen
    assert verdict[0] == "match"
    assert "BodyPartExamined" in verdict[1] and "ViewPosition" in verdict[1]
