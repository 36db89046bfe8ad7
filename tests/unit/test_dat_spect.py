"""DaT-SPECT phantoms (dicomnode.phantoms.dat_spect) and their quantification
(dicomnode.pipelines.dat_quant): truth, DICOM validity, loading, accuracy, robustness."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.phantoms.dat_spect import (
    REGION_KEYS,
    DatTruth,
    build_dat_study,
    gaussian_blur,
    make_dat_volume,
    phantom_rng,
    write_dat_study,
)
from dicomnode.pipelines.dat_quant import (
    PUTAMEN_SBR_CUTOFF,
    DatQuantResult,
    QuantificationError,
    load_volume,
    quantify,
)

# Tuning used seeds 1-3 and 777; 12345 is the held-out evaluation seed. This one is
# neither, so the sample below is a small independent check of the same targets.
SAMPLE_SEED = 20240611
SAMPLE_SIZE = 20
RATIOS = (*REGION_KEYS, "putamen_caudate_ratio")


def _round_trip(datasets: list[Dataset]) -> list[Dataset]:
    out = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        out.append(pydicom.dcmread(buffer))
    return out


def _rel_errors(result: DatQuantResult, truth: DatTruth) -> dict[str, float]:
    errors = {k: abs(result.sbr[k] - truth.sbr[k]) / truth.sbr[k] for k in REGION_KEYS}
    errors["putamen_caudate_ratio"] = (
        abs(result.putamen_caudate_ratio - truth.putamen_caudate_ratio)
        / truth.putamen_caudate_ratio
    )
    return errors


@pytest.fixture(scope="module")
def sample() -> list[tuple[DatTruth, DatQuantResult]]:
    out = []
    for index in range(SAMPLE_SIZE):
        volume, spacing, truth = make_dat_volume(phantom_rng(SAMPLE_SEED, index))
        out.append((truth, quantify(volume, spacing)))
    return out


# --- the phantom --------------------------------------------------------------------------


def test_phantom_shape_spacing_and_counts() -> None:
    volume, spacing, truth = make_dat_volume(phantom_rng(5, 0))
    assert volume.dtype == np.float32
    assert volume.shape == truth.shape
    assert 48 <= volume.shape[0] <= 96 and volume.shape[1] == volume.shape[2] in (64, 128)
    assert all(3.3 <= s <= 4.4 for s in spacing)
    assert np.all(volume >= 0) and np.all(volume == np.rint(volume))  # Poisson counts
    assert 20 < truth.reference_mean_counts < 200


def test_truth_image_sbr_is_below_tissue_ratio_and_ratios_follow_definitions() -> None:
    _, _, truth = make_dat_volume(phantom_rng(5, 1), condition="pd", worse_side="right")
    assert set(truth.sbr) == set(REGION_KEYS) == set(truth.tissue_sbr)
    for key in REGION_KEYS:
        assert 0 < truth.sbr[key] < truth.tissue_sbr[key]  # partial volume loses contrast
    put = (truth.sbr["putamen_left"] + truth.sbr["putamen_right"]) / 2
    cau = (truth.sbr["caudate_left"] + truth.sbr["caudate_right"]) / 2
    assert truth.putamen_caudate_ratio == pytest.approx(put / cau)
    left, right = truth.sbr["putamen_left"], truth.sbr["putamen_right"]
    assert truth.asymmetry_index_putamen == pytest.approx(
        abs(left - right) / ((left + right) / 2) * 100
    )
    assert right < left and truth.worse_side == "right" and truth.call == "reduced"
    json.dumps(truth.__dict__)  # JSON-serialisable as it is


def test_healthy_and_pd_populations_are_separated_in_image_sbr(
    sample: list[tuple[DatTruth, DatQuantResult]],
) -> None:
    lower = {
        call: [
            min(t.sbr["putamen_left"], t.sbr["putamen_right"]) for t, _ in sample if t.call == call
        ]
        for call in ("normal", "reduced")
    }
    assert max(lower["reduced"]) < PUTAMEN_SBR_CUTOFF < min(lower["normal"])
    assert all(t.condition == "healthy" for t, _ in sample if t.call == "normal")


def test_pinning_the_pose_keeps_the_same_subject() -> None:
    _, _, a = make_dat_volume(phantom_rng(7, 0))
    _, _, b = make_dat_volume(phantom_rng(7, 0), rotation_deg=(0.0, 0.0, 0.0))
    assert b.rotation_deg == (0.0, 0.0, 0.0) != a.rotation_deg
    assert a.condition == b.condition and a.anatomy_scale == b.anatomy_scale
    assert a.tissue_sbr["caudate_left"] == b.tissue_sbr["caudate_left"]


def test_gaussian_blur_keeps_counts_and_has_the_requested_width() -> None:
    point = np.zeros((41, 41, 41))
    point[20, 20, 20] = 1.0
    blurred = gaussian_blur(point, (3.0, 3.0, 3.0))
    assert blurred.sum() == pytest.approx(1.0, rel=1e-6)
    profile = blurred[20, 20, :]
    half = profile >= profile.max() / 2
    assert int(half.sum()) == 7  # FWHM 2.355 * 3 = 7.1 voxels


# --- DICOM ---------------------------------------------------------------------------------


def test_same_seed_writes_identical_bytes_and_truth(tmp_path: Path) -> None:
    first = write_dat_study(tmp_path / "a", n=2, seed=11)
    second = write_dat_study(tmp_path / "b", n=2, seed=11)
    other = write_dat_study(tmp_path / "c", n=1, seed=12)
    assert [p.relative_to(tmp_path / "a") for p in first] == [
        p.relative_to(tmp_path / "b") for p in second
    ]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
        assert (a.parent / "truth.json").read_text() == (b.parent / "truth.json").read_text()
    assert first[0].read_bytes() != other[0].read_bytes()
    truth = json.loads((first[0].parent / "truth.json").read_text())
    assert truth["seed"] == 11 and set(truth["sbr"]) == set(REGION_KEYS)


def test_multiframe_object_carries_the_nm_tomo_attributes() -> None:
    (ds,), truth = build_dat_study(3, 4)
    ds = _round_trip([ds])[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.20"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    assert ds.Modality == "NM" and ds.BodyPartExamined == "BRAIN"
    assert ds.NumberOfFrames == ds.NumberOfSlices == truth.shape[0]
    assert ds.FrameIncrementPointer == 0x00540080
    assert list(ds.SliceVector) == list(range(1, truth.shape[0] + 1))
    pharm = ds.RadiopharmaceuticalInformationSequence[0]
    assert pharm.RadiopharmaceuticalCodeSequence[0].CodeValue == "429296007"
    assert pharm.RadionuclideCodeSequence[0].CodeValue == "21572004"
    detector = ds.DetectorInformationSequence[0]
    assert [float(v) for v in detector.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert str(ds.PatientName).startswith("PHANTOM^DAT^")
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0


@pytest.mark.peers
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("layout", ["multiframe", "slices"])
def test_written_objects_pass_dciodvfy(tmp_path: Path, layout: str) -> None:
    paths = write_dat_study(tmp_path, n=1, seed=21, layout=layout)  # type: ignore[arg-type]
    run = subprocess.run(
        ["dciodvfy", str(paths[len(paths) // 2])], capture_output=True, text=True, timeout=60
    )
    lines = (run.stdout + run.stderr).splitlines()
    assert not [line for line in lines if line.startswith("Error")], lines


def test_multiframe_and_slices_load_to_the_same_volume() -> None:
    volume, spacing, _ = make_dat_volume(phantom_rng(8, 2))
    multi, _ = build_dat_study(8, 2, layout="multiframe")
    slices, _ = build_dat_study(8, 2, layout="slices")
    a, spacing_a = load_volume(_round_trip(multi))
    shuffled = _round_trip(slices)
    np.random.default_rng(0).shuffle(shuffled)  # type: ignore[arg-type]
    b, spacing_b = load_volume(shuffled)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.rint(volume))
    assert spacing_a == pytest.approx(spacing) and spacing_b == pytest.approx(spacing)


def test_load_volume_undoes_a_flipped_orientation_and_applies_rescale() -> None:
    (ds,), _ = build_dat_study(8, 3)
    reference, _ = load_volume([ds])
    flipped = _round_trip([ds])[0]
    # Rows running right-to-left flip the slice normal (row x column) to inferior too, so
    # the same anatomy is stored mirrored in x and with the frames in reverse order.
    pixels = flipped.pixel_array[::-1, :, ::-1]
    detector = flipped.DetectorInformationSequence[0]
    x0, y0, z0 = (float(v) for v in detector.ImagePositionPatient)
    detector.ImagePositionPatient = [str(-x0), str(y0), str(-z0)]
    detector.ImageOrientationPatient = ["-1", "0", "0", "0", "1", "0"]
    flipped.PixelData = (pixels // 2).astype(np.uint16).tobytes()
    flipped.RescaleSlope = "2"
    loaded, _ = load_volume([flipped])
    np.testing.assert_array_equal(loaded, (reference // 2) * 2)


def test_load_volume_rejects_uneven_or_mixed_slices() -> None:
    slices, _ = build_dat_study(8, 2, layout="slices")
    with pytest.raises(QuantificationError, match="evenly spaced"):
        load_volume(slices[:10] + slices[11:])
    with pytest.raises(QuantificationError):
        load_volume([])


# --- the quantification ------------------------------------------------------------------------


def test_sample_meets_the_accuracy_and_agreement_targets(
    sample: list[tuple[DatTruth, DatQuantResult]],
) -> None:
    errors = [_rel_errors(result, truth) for truth, result in sample]
    medians = {key: float(np.median([e[key] for e in errors])) for key in RATIOS}
    assert all(m <= 0.05 for m in medians.values()), medians
    agreement = np.mean([truth.call == result.call for truth, result in sample])
    assert agreement >= 0.95
    assert {truth.call for truth, _ in sample} == {"normal", "reduced"}


def test_result_reports_qc_and_a_slab_with_regions(
    sample: list[tuple[DatTruth, DatQuantResult]],
) -> None:
    _, result = sample[0]
    assert result.cutoff == {"putamen_sbr_lower": PUTAMEN_SBR_CUTOFF}
    assert result.qc["striata_found"] is True
    assert float(result.qc["template_fit_r2"]) > 0.8
    assert result.slab.ndim == 2 and result.slab.max() > 0
    assert set(result.regions_2d) == {
        "caudate_left",
        "caudate_right",
        "putamen_left",
        "putamen_right",
    }
    # Radiological display: the patient's left is on the image's right (higher columns).
    left_cols = np.argwhere(result.regions_2d["putamen_left"])[:, 1].mean()
    right_cols = np.argwhere(result.regions_2d["putamen_right"])[:, 1].mean()
    assert left_cols > result.slab.shape[1] / 2 > right_cols


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_reduced_putamen_is_reported_on_the_patients_side(side: str) -> None:
    other = "right" if side == "left" else "left"
    datasets, truth = build_dat_study(9, 0, condition="pd", worse_side=side)
    volume, spacing = load_volume(_round_trip(datasets))
    result = quantify(volume, spacing)
    assert truth.sbr[f"putamen_{side}"] < truth.sbr[f"putamen_{other}"]
    assert result.sbr[f"putamen_{side}"] < result.sbr[f"putamen_{other}"]
    assert result.call == "reduced"


def test_quantification_is_robust_to_head_rotation_and_shift() -> None:
    """The same subject straight and at the extremes of the phantoms' pose range."""
    straight = make_dat_volume(phantom_rng(10, 1), rotation_deg=(0, 0, 0), shift_mm=(0, 0, 0))
    rotation, shift = (10.0, -12.0, 5.0), (15.0, -15.0, 10.0)
    turned = make_dat_volume(phantom_rng(10, 1), rotation_deg=rotation, shift_mm=shift)
    a = quantify(straight[0], straight[1])
    b = quantify(turned[0], turned[1])
    assert abs(float(b.qc["pose_yaw_deg"]) - rotation[0]) < 4.0
    assert abs(float(b.qc["pose_pitch_deg"]) - rotation[1]) < 4.0
    for key in REGION_KEYS:
        assert b.sbr[key] == pytest.approx(turned[2].sbr[key], rel=0.1)
        assert b.sbr[key] == pytest.approx(a.sbr[key], rel=0.1)
    assert a.call == b.call == turned[2].call


def test_noise_only_and_empty_volumes_are_refused() -> None:
    rng = np.random.default_rng(0)
    noise = rng.poisson(50.0, size=(64, 64, 64)).astype(np.float32)
    with pytest.raises(QuantificationError):
        quantify(noise, (4.0, 4.0, 4.0))
    with pytest.raises(QuantificationError, match="no counts"):
        quantify(np.zeros((64, 64, 64), np.float32), (4.0, 4.0, 4.0))


def test_a_brain_without_striatal_uptake_is_refused() -> None:
    z, y, x = np.mgrid[:64, :64, :64].astype(np.float64)
    brain = (((x - 32) / 17) ** 2 + ((y - 34) / 21) ** 2 + ((z - 32) / 15) ** 2 <= 1.0) * 60.0
    volume = np.random.default_rng(1).poisson(gaussian_blur(brain, (1.0, 1.0, 1.0)) + 1.0)
    with pytest.raises(QuantificationError, match="no striatal uptake"):
        quantify(volume.astype(np.float32), (4.0, 4.0, 4.0))


def test_too_few_slices_or_a_small_field_of_view_are_refused() -> None:
    volume, spacing, _ = make_dat_volume(phantom_rng(5, 0))
    with pytest.raises(QuantificationError, match="too few slices"):
        quantify(volume[:8], spacing)
    with pytest.raises(QuantificationError, match="field of view"):
        quantify(volume[:, 40:60, 40:60], spacing)
