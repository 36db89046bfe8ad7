"""The embedded configuration's routes, tested both ways on real files and phantoms.

Real files (pydicom's and pydicom-data's) show what real headers carry; phantoms are
what the bundled models were built for. Each case names every route it must take, so a
route that starts to match something it should not fails here too.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.config import DEFAULT_CONFIG, Settings, load_settings
from dicomnode.ingest.ledger import SeriesRow
from dicomnode.phantoms.brain_mr import write_brain_mr_study
from dicomnode.phantoms.chest_xray import write_chest_xray_study
from dicomnode.phantoms.dat_spect import write_dat_study
from dicomnode.phantoms.head_ct import write_head_ct_study
from dicomnode.routing.router import Router, routing_keywords
from dicomnode.routing.rules import header_values
from tests.peers import PYDICOM_DATA, PYDICOM_FILES


@cache
def _settings() -> Settings:
    return load_settings(DEFAULT_CONFIG)


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=True)


def routes_taken(ds: Dataset) -> set[str]:
    """Every route (series- and study-level) a series like ``ds`` takes by default."""
    settings = _settings()
    router = Router(settings.routes)
    row = SeriesRow(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), ds.get("Modality"),
                    "ORTHANC", header_values(ds, routing_keywords(settings.routes)), 1, None,
                    None, 0.0, "complete", 0)
    _, series_jobs = router.route_series(row)
    _, study_jobs = router.route_study(row.study_uid, [row])
    return {j.route for j in series_jobs} | {j.route for j in study_jobs}


REAL = {
    # CR chest PA stored MONOCHROME1, uncompressed and JPEG 2000
    "RG1_UNCI.dcm": {"pneumonia-cxr"},
    "RG1_J2KR.dcm": {"pneumonia-cxr"},
    # CR of an extremity
    "RG3_UNCR.dcm": set(),
    # axial head CT (J2K): both head-CT analyses
    "J2K_pixelrep_mismatch.dcm": {"metastasis-ct", "brain-tumour"},
    # CT without body part, CT of the pancreas, CT of the neck
    "CT_small.dcm": set(),
    "explicit_VR-UN.dcm": set(),
    "bad_sequence.dcm": set(),
    # enhanced (multi-frame) MR of the head: the brain models take single-frame slices
    "emri_small.dcm": set(),
    # MR without body part; an abdominal MR with contrast
    "MR_small.dcm": set(),
    "MR-SIEMENS-DICOM-WithOverlays.dcm": set(),
    # the NM whole-body bone scan, stored as secondary capture: not DaT
    "JPEG2000_UNC.dcm": set(),
    "JPEG-lossy.dcm": set(),
}


@pytest.mark.parametrize(("name", "expected"), sorted(REAL.items()))
def test_real_files_take_exactly_their_routes(name: str, expected: set[str]) -> None:
    path = PYDICOM_DATA / name if (PYDICOM_DATA / name).exists() else PYDICOM_FILES / name
    assert path.exists(), f"test file {name} is missing"
    assert routes_taken(_read(path)) == expected


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    root = tmp_path_factory.mktemp("phantoms")
    out: dict[str, Dataset] = {}
    out["dat"] = _read(write_dat_study(root / "dat", n=1, seed=5)[0])
    out["chest"] = _read(write_chest_xray_study(root / "cxr", n=1, seed=5, size=256)[0])
    out["head-ct"] = _read(write_head_ct_study(root / "ct", n=1, seed=5, matrix=64,
                                               n_slices=12)[0])
    files = write_brain_mr_study(root / "mr", n=1, seed=5, matrix=64, n_slices=12,
                                 sequences=("T1C", "T2"), with_ct=True)
    for f in files:
        ds = _read(f)
        key = "brain-ct" if ds.Modality == "CT" else f"mr-{ds.SeriesDescription}"
        out.setdefault(key, ds)
    return out


@pytest.mark.parametrize(("kind", "expected"), [
    ("dat", {"dat-spect"}),
    ("chest", {"pneumonia-cxr"}),
    ("head-ct", {"metastasis-ct", "brain-tumour"}),
    ("brain-ct", {"metastasis-ct", "brain-tumour"}),
    ("mr-T1 post contrast", {"brain-tumour", "tumour-volume"}),
    # the route takes the whole brain MR study; the pipeline reports on its T1C series
    ("mr-T2 TSE axial", {"brain-tumour"}),
])
def test_phantoms_take_exactly_their_routes(phantoms: dict[str, Dataset], kind: str,
                                            expected: set[str]) -> None:
    assert kind in phantoms, sorted(phantoms)
    assert routes_taken(phantoms[kind]) == expected


def test_a_lateral_chest_or_a_sagittal_head_is_not_taken() -> None:
    ds = _read(PYDICOM_DATA / "RG1_UNCI.dcm")
    ds.ViewPosition = "LL"
    assert routes_taken(ds) == set()
    ct = _read(PYDICOM_FILES / "J2K_pixelrep_mismatch.dcm")
    ct.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    assert routes_taken(ct) == set()
    ct.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ct.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert routes_taken(ct) == set()
