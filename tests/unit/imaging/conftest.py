"""Real test files (pydicom, pydicom-data) and synthetic series builders for imaging tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

_SITE = Path(pydicom.__file__).resolve().parent.parent
PYDICOM_FILES = _SITE / "pydicom" / "data" / "test_files"
DATA_STORE = _SITE / "data_store" / "data"


def _path(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.exists():
        pytest.skip(f"test file {name} is not installed")
    return path


@pytest.fixture(scope="session")
def pydicom_file() -> Callable[[str], Dataset]:
    """Read one of pydicom's own test files by name (never via get_testdata_files)."""

    def read(name: str) -> Dataset:
        return pydicom.dcmread(_path(PYDICOM_FILES, name))

    return read


@pytest.fixture(scope="session")
def data_store_file() -> Callable[[str], Dataset]:
    """Read one of pydicom-data's files by name."""

    def read(name: str) -> Dataset:
        return pydicom.dcmread(_path(DATA_STORE, name))

    return read


@pytest.fixture(scope="session")
def rg1(data_store_file: Callable[[str], Dataset]) -> Dataset:
    """A real chest CR stored MONOCHROME1, 15 bits unsigned."""
    ds = data_store_file("RG1_UNCI.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    return ds


def with_pixels(
    template: Dataset,
    pixels: np.ndarray,
    *,
    bits_stored: int,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
) -> Dataset:
    """A copy of ``template`` whose pixel data is ``pixels`` stored with the given encoding."""
    ds = copy.deepcopy(template)
    bits_allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in ds:
            del ds[keyword]
    dtype = f"<{'i' if signed else 'u'}{bits_allocated // 8}"
    ds.PixelData = pixels.astype(dtype).tobytes()
    return ds


@pytest.fixture(scope="session")
def make_dataset() -> Callable[..., Dataset]:
    """Build a minimal single-frame image dataset (uncompressed, little endian)."""

    def make(
        pixels: np.ndarray,
        *,
        modality: str = "CT",
        bits_stored: int = 16,
        signed: bool = True,
        photometric: str = "MONOCHROME2",
        slope: float | None = 1.0,
        intercept: float | None = -1024.0,
    ) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        if slope is not None and intercept is not None:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
        return with_pixels(
            ds, pixels, bits_stored=bits_stored, signed=signed, photometric=photometric
        )

    return make


@pytest.fixture(scope="session")
def make_series(make_dataset: Callable[..., Dataset]) -> Callable[..., list[Dataset]]:
    """A synthetic CT series in which slice k has every pixel equal to 10*k (HU).

    Positions step ``spacing`` mm along the normal of ``orientation`` starting at
    ``origin``; ``skip`` drops slice indices (to make gaps). Returned in slice order.
    """

    def make(
        count: int = 6,
        *,
        spacing: float = 2.5,
        orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
        origin: Sequence[float] = (-10.0, 20.0, 30.0),
        pixel_spacing: tuple[float, float] = (0.8, 0.6),
        shape: tuple[int, int] = (4, 5),
        skip: Sequence[int] = (),
    ) -> list[Dataset]:
        row = np.asarray(orientation[:3], dtype=float)
        column = np.asarray(orientation[3:], dtype=float)
        normal = np.cross(row, column)
        series_uid = generate_uid()
        out: list[Dataset] = []
        for k in range(count):
            if k in skip:
                continue
            pixels = np.full(shape, 10 * k + 1024, dtype=np.int16)
            ds = make_dataset(pixels)
            ds.SeriesInstanceUID = series_uid
            ds.InstanceNumber = k + 1
            position = np.asarray(origin, dtype=float) + k * spacing * normal
            ds.ImagePositionPatient = [round(float(v), 6) for v in position]
            ds.ImageOrientationPatient = [float(v) for v in orientation]
            ds.PixelSpacing = list(pixel_spacing)
            ds.SliceThickness = spacing
            out.append(ds)
        return out

    return make


@pytest.fixture(scope="session")
def recode() -> Callable[..., Dataset]:
    """`with_pixels` as a fixture: re-store a dataset's image with another encoding."""
    return with_pixels
