"""End to end, one per learned analysis, on the embedded default routes: a phantom study
in with storescu, the SRs and heatmap SCs out in the same study in Orthanc, checked by
dciodvfy, rendered by dsr2html and dcmj2pnm."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from dicomnode.config import DEFAULT_CONFIG
from dicomnode.phantoms.brain_mr import write_brain_mr_study
from dicomnode.phantoms.chest_xray import write_chest_xray_study
from dicomnode.phantoms.dat_spect import write_dat_study
from dicomnode.phantoms.head_ct import write_head_ct_study
from tests.peers import (
    Orthanc,
    ai_results,
    free_port,
    node_config,
    orthanc_running,
    require_tool,
    start_node,
    storescu,
    wait_for,
)

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

Writer = Callable[[Path], list[Path]]

# analysis -> (phantom writer, result series descriptions expected across its studies,
#              words the rendered SRs must carry)
CASES: dict[str, tuple[Writer, set[str], tuple[str, ...]]] = {
    "pneumonia": (
        lambda d: write_chest_xray_study(d, n=1, seed=61, pneumonia_fraction=1.0, size=512),
        {"AI pneumonia report", "AI pneumonia heatmap"},
        ("Pneumonia", "Probability", "screening")),
    "metastasis": (
        lambda d: write_head_ct_study(d, n=1, seed=62, metastasis_fraction=1.0, matrix=256,
                                      n_slices=24),
        {"AI brain metastasis report", "AI metastasis heatmaps",
         "AI brain tumour report CT", "AI brain tumour heatmap CT"},
        ("Metastatic malignant neoplasm to brain", "f1-optimal")),
    "brain-tumour": (
        lambda d: write_brain_mr_study(d, n=1, seed=63, class_weights=(0, 0, 1), matrix=128,
                                       with_ct=True),
        {"AI brain tumour report MR", "AI brain tumour heatmap MR",
         "AI brain tumour report CT", "AI brain tumour heatmap CT",
         "AI brain tumour report CT+MR fusion", "AI brain tumour heatmap CT+MR fusion",
         "AI brain metastasis report", "AI metastasis heatmaps",
         "AI tumour segmentation", "AI tumour volume report"},
        ("Malignant neoplasm of brain", "RESEARCH OUTPUT")),
    "dat": (
        lambda d: write_dat_study(d, n=1, seed=64),
        {"AI DaT-SPECT binding ratios", "AI DaT-SPECT classifier",
         "AI DaT-SPECT striatal regions"},
        ("Specific binding ratio", "AGREEMENT")),
}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    with orthanc_running(tmp_path / "orthanc") as orthanc:
        yield orthanc


def _default_routes() -> list[dict[str, Any]]:
    routes: list[dict[str, Any]] = yaml.safe_load(DEFAULT_CONFIG.read_text())["routes"]
    return routes


@pytest.mark.parametrize("analysis", sorted(CASES))
def test_phantom_in_results_out_in_the_same_study(tmp_path: Path, pacs: Orthanc,
                                                  analysis: str) -> None:
    dciodvfy, dsr2html, dcmj2pnm = (require_tool(t) for t in ("dciodvfy", "dsr2html",
                                                               "dcmj2pnm"))
    writer, expected, words = CASES[analysis]
    files = writer(tmp_path / "phantoms")
    studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
               for f in files}
    config = node_config(tmp_path / "var", free_port(), routes=_default_routes(),
                         destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                                "port": pacs.dicom_port}},
                         extra={"jobs": {"workers": 1, "timeout_s": 300, "max_attempts": 1}})
    node = start_node(tmp_path / "node", config)
    try:
        storescu(node.port, files)

        def seen() -> set[str]:
            return {str(r.get("SeriesDescription")) for s in studies for r in ai_results(pacs, s)}

        def settled() -> bool:
            status = node.status()
            assert status["failed_jobs"] == [], status["failed_jobs"]
            jobs = status["counts"]["jobs"]
            outbox = status["counts"]["outbox"]
            return (expected <= seen() and not jobs.get("pending") and not jobs.get("running")
                    and not outbox.get("pending") and not outbox.get("sending"))

        wait_for(settled, 420, f"{analysis}: results {sorted(expected)} confirmed in the PACS")
        assert node.status()["failed_jobs"] == []
    finally:
        node.stop()
    assert seen() == expected
    rendered = ""
    for study in studies:
        for r in ai_results(pacs, study):
            path = tmp_path / f"{r['id']}.dcm"
            path.write_bytes(pacs.instance_file(r["id"]))
            verify = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            errors = [line for line in (verify.stdout + verify.stderr).splitlines()
                      if line.startswith("Error")]
            assert errors == [], (r["SeriesDescription"], errors)
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study
            if ds.SOPClassUID == SR_CLASS:
                html = subprocess.run([dsr2html, str(path)], capture_output=True, text=True,
                                      check=True).stdout
                assert "not for diagnostic use" in html.lower() or \
                    "not for clinical use" in html.lower(), r["SeriesDescription"]
                rendered += html
            elif ds.SOPClassUID == SEG_CLASS:
                assert ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
            else:
                assert ds.SOPClassUID == SC_CLASS
                png = tmp_path / f"{r['id']}.png"
                subprocess.run([dcmj2pnm, "+on", str(path), str(png)], check=True)
                assert png.stat().st_size > 1000
    for word in words:
        assert word in rendered, word
