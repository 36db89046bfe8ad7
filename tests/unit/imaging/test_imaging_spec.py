"""The preprocessing spec: data round trips, validation that names the step, one apply_spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicomnode.imaging import (
    PixelDataError,
    PreprocessSpec,
    SpecError,
    apply_spec,
    sort_datasets,
    step_from_dict,
    step_names,
)
from dicomnode.imaging.spec import Resize, WindowStep

Reader = Callable[[str], Dataset]

CHEST_XRAY: list[dict[str, Any]] = [
    {"name": "modality_lut"},
    {"name": "robust_minmax", "low_percentile": 0.5, "high_percentile": 99.5},
    {"name": "resize", "size": [384, 384], "interpolation": "area"},
    {"name": "clahe", "clip_limit": 2.0, "tile_grid": [8, 8]},
    {"name": "repeat_channels", "count": 3},
    {"name": "normalise", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
]

HEAD_CT: list[dict[str, Any]] = [
    {"name": "hounsfield"},
    {"name": "window", "preset": "brain"},
    {"name": "resize", "size": [256, 256], "interpolation": "linear"},
    {"name": "zscore"},
]

MR_STACK: list[dict[str, Any]] = [
    {"name": "modality_lut"},
    {"name": "voi"},
    {"name": "resize", "size": [32, 48], "keep_aspect": True},
    {"name": "zscore"},
]


def test_registry_lists_the_steps() -> None:
    assert {
        "modality_lut",
        "hounsfield",
        "window",
        "multi_window",
        "voi",
        "minmax",
        "robust_minmax",
        "clahe",
        "resize",
        "crop",
        "pad_or_crop",
        "zscore",
        "normalise",
        "repeat_channels",
    } <= set(step_names())


@pytest.mark.parametrize("steps", [CHEST_XRAY, HEAD_CT, MR_STACK], ids=["cxr", "ct", "mr"])
def test_spec_round_trips_through_yaml_and_json(steps: list[dict[str, Any]]) -> None:
    spec = PreprocessSpec.from_dict({"version": 1, "steps": steps})
    from_yaml = PreprocessSpec.from_yaml(spec.to_yaml())
    from_json = PreprocessSpec.from_json(spec.to_json())
    assert from_yaml == spec == from_json
    assert from_yaml.fingerprint == spec.fingerprint == from_json.fingerprint
    assert spec.fingerprint.startswith("sha256:") and len(spec.fingerprint) == 71


def test_defaults_and_presets_are_spelled_out_in_the_stored_form() -> None:
    spec = PreprocessSpec.from_dict(HEAD_CT)
    stored = spec.to_dict()
    assert stored["steps"][1] == {
        "name": "window",
        "center": 40.0,
        "width": 80.0,
        "function": "LINEAR_EXACT",
    }
    assert stored["steps"][0] == {"name": "hounsfield", "clip": [-1024.0, 3071.0]}
    written_out = PreprocessSpec.from_dict(stored)
    assert written_out.fingerprint == spec.fingerprint


def test_require_fingerprint() -> None:
    spec = PreprocessSpec.from_dict(HEAD_CT)
    spec.require_fingerprint(PreprocessSpec.from_yaml(spec.to_yaml()).fingerprint)
    with pytest.raises(SpecError, match="does not match"):
        spec.require_fingerprint("sha256:" + "0" * 64)


def test_fingerprint_changes_with_any_parameter() -> None:
    base = PreprocessSpec.from_dict(HEAD_CT)
    changed = PreprocessSpec.from_dict(
        [*HEAD_CT[:2], {"name": "resize", "size": [256, 255]}, HEAD_CT[3]]
    )
    assert base.fingerprint != changed.fingerprint


def test_yaml_round_trip_gives_identical_tensors(pydicom_file: Reader) -> None:
    spec = PreprocessSpec.from_dict(HEAD_CT)
    again = PreprocessSpec.from_yaml(spec.to_yaml())
    ds = pydicom_file("CT_small.dcm")
    first, second = apply_spec(spec, ds), apply_spec(again, ds)
    assert first.dtype == np.float32 and first.shape == (1, 1, 256, 256)
    np.testing.assert_array_equal(first, second)


def test_head_ct_tensor(pydicom_file: Reader) -> None:
    tensor = apply_spec(PreprocessSpec.from_dict(HEAD_CT), [pydicom_file("CT_small.dcm")])
    assert tensor.mean() == pytest.approx(0, abs=1e-4)
    assert tensor.std() == pytest.approx(1, abs=1e-3)


def test_chest_xray_tensor(rg1: Dataset) -> None:
    tensor = apply_spec(PreprocessSpec.from_dict(CHEST_XRAY), rg1)
    assert tensor.shape == (1, 3, 384, 384) and tensor.dtype == np.float32
    np.testing.assert_allclose(
        tensor[0, 0] * 0.229 + 0.485, tensor[0, 1] * 0.224 + 0.456, atol=1e-6
    )


@pytest.mark.filterwarnings("ignore:The pixel data is 8320 bytes long")
@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_compressed_and_uncompressed_variants_give_identical_tensors(
    pydicom_file: Reader, variant: str
) -> None:
    spec = PreprocessSpec.from_dict(MR_STACK)
    reference = apply_spec(spec, pydicom_file("MR_small.dcm"))
    np.testing.assert_array_equal(apply_spec(spec, pydicom_file(variant)), reference)


def test_multi_frame_compressed_variants_identical(data_store_file: Reader) -> None:
    spec = PreprocessSpec.from_dict([{"name": "modality_lut"}, {"name": "minmax"}])
    reference = apply_spec(spec, data_store_file("emri_small.dcm"))
    assert reference.shape == (10, 1, 64, 64)
    for variant in ("emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(apply_spec(spec, data_store_file(variant)), reference)


def test_arrays_and_datasets_meet_in_the_same_numbers(pydicom_file: Reader) -> None:
    """A loader holding HU arrays and a node holding datasets share the spec's tail."""
    ds = pydicom_file("CT_small.dcm")
    from_datasets = apply_spec(PreprocessSpec.from_dict(HEAD_CT), ds)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    from_arrays = apply_spec(PreprocessSpec.from_dict(HEAD_CT[1:]), hu)
    np.testing.assert_array_equal(from_datasets, from_arrays)


def test_array_input_shapes() -> None:
    spec = PreprocessSpec.from_dict([{"name": "minmax"}])
    assert apply_spec(spec, np.zeros((5, 6))).shape == (1, 1, 5, 6)
    assert apply_spec(spec, np.zeros((2, 5, 6))).shape == (2, 1, 5, 6)
    assert apply_spec(spec, np.zeros((2, 3, 5, 6))).shape == (2, 3, 5, 6)
    assert apply_spec(spec, [np.zeros((5, 6)), np.ones((5, 6))]).shape == (2, 1, 5, 6)


def test_multi_window_makes_one_channel_per_window(pydicom_file: Reader) -> None:
    spec = PreprocessSpec.from_dict(
        [
            {"name": "hounsfield"},
            {"name": "multi_window", "windows": ["brain", "subdural", [600, 2800]]},
        ]
    )
    assert spec.steps[1].to_dict()["windows"] == [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]]
    tensor = apply_spec(spec, pydicom_file("CT_small.dcm"))
    assert tensor.shape == (1, 3, 128, 128)
    assert tensor[0, 0].mean() > tensor[0, 2].mean()  # a narrow window saturates more


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [{"name": "modality_lut"}, {"name": "windw", "center": 1, "width": 2}],
            r"step 1: unknown step 'windw'; did you mean 'window'",
        ),
        (
            [{"name": "window", "center": 40}],
            r"step 0 'window': missing parameter\(s\) width",
        ),
        (
            [{"name": "window", "center": 40, "width": -1}],
            r"step 0 'window': window width must be > 0",
        ),
        (
            [{"name": "window", "center": 40, "width": 80, "level": 3}],
            r"step 0 'window': unknown parameter\(s\) level",
        ),
        (
            [{"name": "window", "preset": "liver"}],
            r"step 0 'window': unknown window preset 'liver'",
        ),
        ([{"name": "resize", "size": [256]}], r"step 0 'resize': size must have 2 items"),
        (
            [{"name": "resize", "size": [256, "x"]}],
            r"step 0 'resize': size\[1\] must be an integer",
        ),
        (
            [{"name": "resize", "size": [256, 256], "interpolation": "bilinear"}],
            r"step 0 'resize': interpolation must be one of",
        ),
        ([{"name": "clahe", "clip_limit": 0}], r"step 0 'clahe': clip_limit must be > 0"),
        (
            [{"name": "zscore", "per_channel": "yes"}],
            r"step 0 'zscore': per_channel must be true or false",
        ),
        ([{"center": 1}], r"step 0: missing 'name'"),
        ([], r"at least one step"),
    ],
)
def test_bad_specs_name_the_step(steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        PreprocessSpec.from_dict(steps)


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [{"name": "modality_lut"}, {"name": "clahe"}],
            r"step 1 'clahe': it needs display intensities",
        ),
        (
            [{"name": "resize", "size": [8, 8]}, {"name": "hounsfield"}],
            r"step 1 'hounsfield': a source step must be the first",
        ),
        ([{"name": "voi"}], r"step 0 'voi': needs DICOM input"),
        (
            [{"name": "modality_lut"}, {"name": "zscore"}, {"name": "window", "preset": "brain"}],
            r"step 2 'window': it cannot follow a normalisation",
        ),
    ],
)
def test_step_order_is_checked_when_the_spec_is_built(
    steps: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        PreprocessSpec.from_dict(steps)


def test_unsupported_version_is_refused() -> None:
    with pytest.raises(SpecError, match="version 2 is not supported"):
        PreprocessSpec.from_dict({"version": 2, "steps": HEAD_CT})


def test_steps_built_in_code_are_validated_and_canonical() -> None:
    assert WindowStep(40, 80) == step_from_dict({"name": "window", "center": 40.0, "width": 80.0})
    with pytest.raises(SpecError, match="step 'resize': size"):
        Resize(size=(0, 10))
    assert Resize(size=[8, 8]).size == (8, 8)  # type: ignore[arg-type]


def test_input_kind_mismatch_is_refused(pydicom_file: Reader) -> None:
    with pytest.raises(SpecError, match="needs pydicom datasets"):
        apply_spec(PreprocessSpec.from_dict(HEAD_CT), np.zeros((4, 4)))
    with pytest.raises(SpecError, match="this spec takes arrays"):
        apply_spec(PreprocessSpec.from_dict(HEAD_CT[1:]), pydicom_file("CT_small.dcm"))


def test_runtime_errors_name_the_step(pydicom_file: Reader) -> None:
    with pytest.raises(PixelDataError, match="step 0 'hounsfield': Hounsfield units need a CT"):
        apply_spec(PreprocessSpec.from_dict(HEAD_CT), pydicom_file("MR_small.dcm"))
    with pytest.raises(PixelDataError, match="step 1 'voi': the dataset has no window"):
        apply_spec(
            PreprocessSpec.from_dict([{"name": "modality_lut"}, {"name": "voi"}]),
            pydicom_file("CT_small.dcm"),
        )


def test_monochrome1_must_reach_a_display_mapping(rg1: Dataset) -> None:
    with pytest.raises(PixelDataError, match=r"'zscore'.*MONOCHROME1"):
        apply_spec(PreprocessSpec.from_dict([{"name": "modality_lut"}, {"name": "zscore"}]), rg1)
    with pytest.raises(PixelDataError, match="inverted polarity"):
        apply_spec(
            PreprocessSpec.from_dict(
                [{"name": "modality_lut"}, {"name": "resize", "size": [8, 8]}]
            ),
            rg1,
        )


def test_mixed_sizes_need_a_resize(pydicom_file: Reader) -> None:
    datasets = [pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")]
    bare = PreprocessSpec.from_dict([{"name": "modality_lut"}, {"name": "minmax"}])
    with pytest.raises(PixelDataError, match="add a resize"):
        apply_spec(bare, datasets)
    sized = PreprocessSpec.from_dict(
        [*bare.to_dict()["steps"], {"name": "resize", "size": [16, 16]}]
    )
    assert apply_spec(sized, datasets).shape == (2, 1, 16, 16)


def test_series_order_comes_from_sorting_not_from_apply_spec(
    make_series: Callable[..., list[Dataset]],
) -> None:
    series = make_series(5)
    shuffled = [series[i] for i in (3, 0, 4, 1, 2)]
    spec = PreprocessSpec.from_dict([{"name": "hounsfield", "clip": None}])
    tensor = apply_spec(spec, sort_datasets(shuffled))
    np.testing.assert_array_equal(tensor[:, 0, 0, 0], [0, 10, 20, 30, 40])
