"""Synthetic brain MR (T1, T1 post-contrast, T2, FLAIR) with benign or malignant tumours.

A *patient* is a seed: it fixes the head anatomy (shared with the head CT phantom), the
tumour kind, its centre and its outline. A *scan* of that patient adds everything that
changes between examinations: position and tilt, slice count and spacing, noise, bias
field and intensity scale, and the tumour's size. The tumour is painted with an exact
voxel volume on the scan's own grid, so a series of scans at chosen volumes is a growth
curve with known ground truth, and a CT of the same patient shows the same tumour for
CT/MR fusion.

Tumour mask labels: 1 necrotic core, 2 oedema, 3 enhancing (or solid) tumour; the tumour
volume is that of labels 1 and 3 together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import FileDataset

from dicomnode.phantoms.common import (
    SeriesContext,
    StudyContext,
    VolumeGeometry,
    balanced_labels,
    bbox_of,
    fill_common_modules,
    item_rng,
    make_identity,
    new_dataset,
    phantom_uid,
    save_dataset,
    save_mask,
    shift_date,
    study_datetime,
    write_truth,
)
from dicomnode.phantoms.head_ct import (
    CtStorage,
    HeadAnatomy,
    HeadPose,
    LesionSpec,
    PaintedLesion,
    Sampler,
    StarShape,
    Tissue,
    brain_depth,
    build_ct_slices,
    head_labels,
    make_head_anatomy,
    paint_lesion,
    random_pose,
    random_star,
    render_ct,
    render_labels,
    scan_geometry,
)
from dicomnode.phantoms.head_ct import _headrest as _ct_headrest

KIND = "brain-mr"
CODE = "BMR"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
LABELS = ("healthy", "benign", "malignant")
MASK_NECROSIS = 1
MASK_OEDEMA = 2
MASK_TUMOUR = 3  # enhancing rim of a malignant tumour, or the whole solid benign tumour

F32 = NDArray[np.float32]


@dataclass(frozen=True)
class MrSequence:
    """Acquisition attributes and tissue intensities of one contrast."""

    name: str
    description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    acquisition_type: str
    repetition_time_ms: float
    echo_time_ms: float
    inversion_time_ms: float | None
    flip_angle_deg: float
    echo_train_length: int
    contrast_agent: bool
    intensities: dict[int, float] = field(repr=False)


_T1_BASE: dict[int, float] = {
    Tissue.AIR: 0.0,
    Tissue.SKIN: 0.55,
    Tissue.FAT: 1.0,
    Tissue.MUSCLE: 0.42,
    Tissue.CORTICAL_BONE: 0.03,
    Tissue.DIPLOE: 0.72,
    Tissue.CSF: 0.15,
    Tissue.GREY: 0.55,
    Tissue.WHITE: 0.75,
    Tissue.DEEP_GREY: 0.6,
    Tissue.VENTRICLE: 0.13,
    Tissue.SINUS_AIR: 0.0,
    Tissue.ORBIT_FAT: 1.0,
    Tissue.GLOBE: 0.15,
    Tissue.VENOUS_SINUS: 0.3,
    Tissue.FALX: 0.3,
    Tissue.CALCIFICATION: 0.2,
    Tissue.HEADREST: 0.0,
    Tissue.ENHANCING: 0.5,
    Tissue.NECROSIS: 0.22,
    Tissue.NONENHANCING: 0.45,
    Tissue.OEDEMA: 0.5,
    Tissue.MENINGIOMA: 0.52,
    Tissue.DURAL_TAIL: 0.4,
}
_T2_BASE: dict[int, float] = {
    Tissue.AIR: 0.0,
    Tissue.SKIN: 0.5,
    Tissue.FAT: 0.75,
    Tissue.MUSCLE: 0.3,
    Tissue.CORTICAL_BONE: 0.02,
    Tissue.DIPLOE: 0.55,
    Tissue.CSF: 1.0,
    Tissue.GREY: 0.62,
    Tissue.WHITE: 0.45,
    Tissue.DEEP_GREY: 0.55,
    Tissue.VENTRICLE: 1.0,
    Tissue.SINUS_AIR: 0.0,
    Tissue.ORBIT_FAT: 0.75,
    Tissue.GLOBE: 0.95,
    Tissue.VENOUS_SINUS: 0.05,
    Tissue.FALX: 0.2,
    Tissue.CALCIFICATION: 0.1,
    Tissue.HEADREST: 0.0,
    Tissue.ENHANCING: 0.7,
    Tissue.NECROSIS: 0.92,
    Tissue.NONENHANCING: 0.75,
    Tissue.OEDEMA: 0.85,
    Tissue.MENINGIOMA: 0.6,
    Tissue.DURAL_TAIL: 0.5,
}
_FLAIR_CHANGES: dict[int, float] = {
    Tissue.CSF: 0.08,
    Tissue.VENTRICLE: 0.06,
    Tissue.GLOBE: 0.1,
    Tissue.ENHANCING: 0.75,
    Tissue.NECROSIS: 0.35,
    Tissue.NONENHANCING: 0.8,
    Tissue.OEDEMA: 0.9,
    Tissue.GREY: 0.6,
    Tissue.WHITE: 0.45,
}
_T1C_CHANGES: dict[int, float] = {
    Tissue.ENHANCING: 0.97,
    Tissue.VENOUS_SINUS: 0.85,
    Tissue.FALX: 0.6,
    Tissue.MENINGIOMA: 0.92,
    Tissue.DURAL_TAIL: 0.88,
}

SEQUENCES: dict[str, MrSequence] = {
    "T1": MrSequence(
        "T1",
        "T1 SE axial",
        ("SE",),
        ("SK",),
        (),
        "2D",
        550.0,
        12.0,
        None,
        90.0,
        1,
        False,
        dict(_T1_BASE),
    ),
    "T1C": MrSequence(
        "T1C",
        "T1 post contrast",
        ("GR", "IR"),
        ("SK", "SP", "MP"),
        (),
        "3D",
        2000.0,
        2.9,
        900.0,
        9.0,
        1,
        True,
        {**_T1_BASE, **_T1C_CHANGES},
    ),
    "T2": MrSequence(
        "T2",
        "T2 TSE axial",
        ("SE",),
        ("SK",),
        (),
        "2D",
        4500.0,
        100.0,
        None,
        150.0,
        15,
        False,
        dict(_T2_BASE),
    ),
    "FLAIR": MrSequence(
        "FLAIR",
        "T2 FLAIR axial",
        ("SE", "IR"),
        ("SK",),
        (),
        "2D",
        9000.0,
        120.0,
        2500.0,
        150.0,
        16,
        False,
        {**_T2_BASE, **_FLAIR_CHANGES},
    ),
}


# --------------------------------------------------------------------------- patients


@dataclass(frozen=True, eq=False)
class BrainPatient:
    """What stays fixed for a synthetic patient across scans and modalities."""

    patient_seed: int | None
    anatomy: HeadAnatomy
    tumour_kind: str  # "healthy", "benign" or "malignant"
    tumour_shape: StarShape | None
    oedema_shape: StarShape | None
    oedema_factor: float
    dural_tail: bool
    ct_enhancement_hu: float
    default_volume_cm3: float


def _malignant_centre(rng: np.random.Generator, a: HeadAnatomy) -> tuple[float, float, float]:
    s = a.scale
    bx, by, bz = a.brain_axes
    for _ in range(50):
        cand = rng.uniform(-1, 1, (256, 3)).astype(np.float32) * np.array([bx, by, bz], np.float32)
        cand[:, 2] = np.abs(cand[:, 2]) * 0.8 - 8.0
        x, y, z = cand[:, 0], cand[:, 1], cand[:, 2]
        _, db = brain_depth(a, x, y, z)
        lab = head_labels(a, x * s, y * s, z * s)
        ok = np.flatnonzero(
            (db < -14.0) & (db > -35.0) & (np.abs(x) > 14.0) & (lab == Tissue.WHITE)
        )
        if ok.size:
            j = int(ok[0])
            return (float(x[j] * s), float(y[j] * s), float(z[j] * s))
    raise RuntimeError("could not place a tumour")


def _meningioma_centre(rng: np.random.Generator, a: HeadAnatomy) -> tuple[float, float, float]:
    """On the inner table of the skull (convexity or parasagittal), a few mm inside."""
    while True:
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        if u[2] > 0.05:
            break
    bx, by, bz = a.brain_axes
    rho = 1.0 / math.sqrt((u[0] / bx) ** 2 + (u[1] / by) ** 2 + (u[2] / bz) ** 2)
    depth = rho + a.csf_gap - float(rng.uniform(5.0, 9.0))
    c = u * depth * a.scale
    return (float(c[0]), float(c[1]), float(c[2]))


def make_brain_patient(
    patient_seed: int | None = None,
    *,
    tumour_kind: str | None = None,
    lesion_centre: Sequence[float] | None = None,
    rng: np.random.Generator | None = None,
) -> BrainPatient:
    """A synthetic patient from ``patient_seed`` (or from ``rng`` when no seed is given).

    ``lesion_centre`` is in the head frame (mm; x left, y posterior, z superior, origin
    near the brain centre); by default the centre is drawn where such tumours arise.
    """
    if patient_seed is not None:
        prng = item_rng("brain-patient", patient_seed, 0)
    elif rng is not None:
        prng = rng
    else:
        raise ValueError("give patient_seed or rng")
    anatomy = make_head_anatomy(prng)
    kind = tumour_kind or str(prng.choice(LABELS))
    if kind not in LABELS:
        raise ValueError(f"tumour_kind must be one of {LABELS}")
    shape = oedema_shape = None
    oedema_factor, tail, default_v = 0.0, False, 0.0
    if kind != "healthy":
        if lesion_centre is not None:
            centre = (float(lesion_centre[0]), float(lesion_centre[1]), float(lesion_centre[2]))
        elif kind == "malignant":
            centre = _malignant_centre(prng, anatomy)
        else:
            centre = _meningioma_centre(prng, anatomy)
        if kind == "malignant":
            shape = random_star(prng, centre, irregularity=0.22, elongation=0.25)
            oedema_shape = random_star(prng, centre, irregularity=0.3, elongation=0.3)
            oedema_factor = float(prng.uniform(1.4, 2.0))
            default_v = float(math.exp(prng.uniform(math.log(2.0), math.log(60.0))))
        else:
            shape = random_star(prng, centre, irregularity=0.03, elongation=0.15)
            oedema_shape = random_star(prng, centre, irregularity=0.2, elongation=0.2)
            oedema_factor = float(prng.uniform(1.2, 1.5)) if prng.random() < 0.25 else 0.0
            tail = bool(prng.random() < 0.5)
            default_v = float(math.exp(prng.uniform(math.log(0.5), math.log(30.0))))
    return BrainPatient(
        patient_seed=patient_seed,
        anatomy=anatomy,
        tumour_kind=kind,
        tumour_shape=shape,
        oedema_shape=oedema_shape,
        oedema_factor=oedema_factor,
        dural_tail=tail,
        ct_enhancement_hu=float(prng.uniform(25.0, 55.0)),
        default_volume_cm3=default_v,
    )


def _necrosis_fraction(kind: str, volume_cm3: float) -> float:
    """Glioblastomas necrose centrally as they grow; small ones are solid."""
    if kind != "malignant" or volume_cm3 <= 0:
        return 0.0
    return float(np.clip(0.25 + 0.12 * math.log(volume_cm3), 0.0, 0.7))


@dataclass(frozen=True, eq=False)
class BrainTumourTruth:
    """Ground truth of one brain scan (MR or CT) of a synthetic patient."""

    label: str
    modality: str
    sequence: str | None
    patient_seed: int | None
    tumour: dict[str, Any] | None
    tumour_mask: NDArray[np.uint8]  # MASK_NECROSIS / MASK_OEDEMA / MASK_TUMOUR
    tissue_labels: NDArray[np.uint8]
    pose: HeadPose

    @property
    def volume_cm3(self) -> float:
        """Tumour volume (necrosis + enhancing/solid) measured on the mask."""
        return 0.0 if self.tumour is None else float(self.tumour["volume_cm3"])

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "modality": self.modality,
            "sequence": self.sequence,
            "patient_seed": self.patient_seed,
            "tumour": self.tumour,
            "pose": self.pose.to_json(),
            "mask_labels": {
                "necrosis": MASK_NECROSIS,
                "oedema": MASK_OEDEMA,
                "tumour": MASK_TUMOUR,
            },
        }


BrainMrTruth = BrainTumourTruth


def _resolve_patient(
    rng: np.random.Generator,
    patient: BrainPatient | None,
    patient_seed: int | None,
    label: str | None,
    lesion_centre: Sequence[float] | None,
) -> BrainPatient:
    if patient is not None:
        return patient
    return make_brain_patient(
        patient_seed,
        tumour_kind=label,
        lesion_centre=lesion_centre,
        rng=None if patient_seed is not None else rng,
    )


def _paint_tumour(
    patient: BrainPatient,
    volume_cm3: float | None,
    sampler: Sampler,
    labels: NDArray[np.uint8],
) -> tuple[NDArray[np.uint8], PaintedLesion | None, float]:
    mask = np.zeros(labels.shape, dtype=np.uint8)
    if patient.tumour_kind == "healthy" or patient.tumour_shape is None:
        return mask, None, 0.0
    v = patient.default_volume_cm3 if volume_cm3 is None else float(volume_cm3)
    if v <= 0:
        raise ValueError("tumour_volume_cm3 must be positive")
    spec = LesionSpec(
        lesion_id=1,
        kind="glioblastoma" if patient.tumour_kind == "malignant" else "meningioma",
        shape=patient.tumour_shape,
        target_volume_mm3=v * 1000.0,
        necrosis_fraction=_necrosis_fraction(patient.tumour_kind, v),
        oedema_factor=patient.oedema_factor,
        oedema_shape=patient.oedema_shape,
        enhancement_hu=patient.ct_enhancement_hu,
        dural_tail=patient.dural_tail,
    )
    ids = np.zeros(labels.shape, dtype=np.uint8)
    oedema = np.zeros(labels.shape, dtype=bool)
    painted = paint_lesion(spec, sampler, labels, ids, oedema)
    if painted is None:
        raise ValueError("the tumour lies outside the scanned volume")
    mask[oedema] = MASK_OEDEMA
    mask[ids == 1] = MASK_TUMOUR
    mask[(ids == 1) & (labels == Tissue.NECROSIS)] = MASK_NECROSIS
    return mask, painted, v


def _tumour_summary(
    patient: BrainPatient,
    painted: PaintedLesion | None,
    requested: float,
    mask: NDArray[np.uint8],
    sampler: Sampler,
) -> dict[str, Any] | None:
    if painted is None:
        return None
    vv = sampler.geometry.voxel_volume_mm3 / 1000.0
    tumour = (mask == MASK_TUMOUR) | (mask == MASK_NECROSIS)
    idx = np.nonzero(tumour)
    centre = painted.spec.shape.centre
    return {
        "kind": patient.tumour_kind,
        "requested_volume_cm3": round(requested, 6),
        "voxel_count": int(tumour.sum()),
        "volume_cm3": round(int(tumour.sum()) * vv, 6),
        "enhancing_volume_cm3": round(int((mask == MASK_TUMOUR).sum()) * vv, 6),
        "necrosis_volume_cm3": round(int((mask == MASK_NECROSIS).sum()) * vv, 6),
        "oedema_volume_cm3": round(int((mask == MASK_OEDEMA).sum()) * vv, 6),
        "centre_head_mm": [round(c, 3) for c in centre],
        "centre_mm": [round(c, 3) for c in sampler.pose.to_patient(centre)],
        "centroid_voxel_zyx": [round(float(i.mean()), 3) for i in idx],
        "bbox_voxel_zyx": list(bbox_of(tumour)),
        "dural_tail": patient.dural_tail,
    }


def _scan_setup(
    rng: np.random.Generator,
    patient: BrainPatient,
    *,
    matrix: int,
    fov_mm: float,
    n_slices: int | None,
    slice_thickness_mm: float | None,
    thickness_choices: Sequence[float],
    coverage_mm: tuple[float, float],
    count_range: tuple[int, int],
    pose: HeadPose | None,
    geometry: VolumeGeometry | None = None,
) -> tuple[HeadPose, VolumeGeometry, Sampler]:
    pose = pose or random_pose(rng)
    if geometry is not None:
        return pose, geometry, Sampler(geometry, pose)
    geometry = scan_geometry(
        rng,
        patient.anatomy,
        pose,
        matrix=matrix,
        fov_mm=fov_mm,
        n_slices=n_slices,
        slice_thickness_mm=slice_thickness_mm,
        thickness_choices=thickness_choices,
        coverage_mm=coverage_mm,
        count_range=count_range,
    )
    if patient.tumour_shape is not None:
        # Keep the tumour inside the slab: a follow-up is planned to include it.
        z_lo = geometry.origin_mm[2]
        z_hi = z_lo + (geometry.shape[0] - 1) * geometry.slice_spacing_mm
        pz = pose.to_patient(patient.tumour_shape.centre)[2]
        if not z_lo + 10 <= pz <= z_hi - 10:
            shift = float(np.clip(pz, z_lo + 10, max(z_lo + 10, z_hi - 10)) - pz)
            geometry = VolumeGeometry(
                shape=geometry.shape,
                pixel_spacing_mm=geometry.pixel_spacing_mm,
                slice_spacing_mm=geometry.slice_spacing_mm,
                slice_thickness_mm=geometry.slice_thickness_mm,
                origin_mm=(geometry.origin_mm[0], geometry.origin_mm[1], round(z_lo - shift, 4)),
            )
    return pose, geometry, Sampler(geometry, pose)


def make_mr_volume(
    rng: np.random.Generator,
    *,
    label: str | None = None,
    patient_seed: int | None = None,
    patient: BrainPatient | None = None,
    tumour_volume_cm3: float | None = None,
    lesion_centre: Sequence[float] | None = None,
    sequence: str = "T1C",
    matrix: int = 256,
    n_slices: int | None = None,
    slice_thickness_mm: float | None = None,
    noise_fraction: float | None = None,
    bias_strength: float | None = None,
    pose: HeadPose | None = None,
    geometry: VolumeGeometry | None = None,
) -> tuple[F32, VolumeGeometry, BrainTumourTruth]:
    """One axial MR volume (slice, row, column), slices inferior to superior.

    With ``patient_seed`` the anatomy, tumour kind (unless ``label`` fixes it), centre
    and outline come from that seed and ``rng`` only varies the scan, so calls with
    different ``tumour_volume_cm3`` form a growth series; the mask then holds the
    requested volume to within one voxel. ``geometry`` (with ``pose``) reuses the grid of
    another scan, e.g. for the other sequences of one examination.
    """
    if sequence not in SEQUENCES:
        raise ValueError(f"sequence must be one of {sorted(SEQUENCES)}")
    seq = SEQUENCES[sequence]
    pat = _resolve_patient(rng, patient, patient_seed, label, lesion_centre)
    pose_, geometry, sampler = _scan_setup(
        rng,
        pat,
        matrix=matrix,
        fov_mm=float(rng.uniform(220, 250)),
        n_slices=n_slices,
        slice_thickness_mm=slice_thickness_mm,
        thickness_choices=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0),
        coverage_mm=(120.0, 180.0),
        count_range=(20, 150),
        pose=pose,
        geometry=geometry,
    )
    labels = render_labels(pat.anatomy, sampler)
    mask, painted, requested = _paint_tumour(pat, tumour_volume_cm3, sampler, labels)
    volume = render_mr(
        labels,
        geometry,
        seq,
        rng,
        noise_fraction=noise_fraction,
        bias_strength=bias_strength,
        sampler=sampler,
    )
    truth = BrainTumourTruth(
        label=pat.tumour_kind,
        modality="MR",
        sequence=sequence,
        patient_seed=pat.patient_seed,
        tumour=_tumour_summary(pat, painted, requested, mask, sampler),
        tumour_mask=mask,
        tissue_labels=labels,
        pose=pose_,
    )
    return volume, geometry, truth


def render_mr(
    labels: NDArray[np.uint8],
    geometry: VolumeGeometry,
    seq: MrSequence,
    rng: np.random.Generator,
    *,
    noise_fraction: float | None,
    bias_strength: float | None,
    sampler: Sampler,
) -> F32:
    """Scanner-unit intensities: tissue table, PSF blur, bias field, scale, Rician noise."""
    table = np.zeros(32, dtype=np.float32)
    for t, v in seq.intensities.items():
        table[t] = v * float(rng.uniform(0.95, 1.05))
    img = table[labels]
    sigma = 0.4 / geometry.pixel_spacing_mm[0]
    scale = float(rng.uniform(300.0, 3000.0))
    nf = noise_fraction if noise_fraction is not None else float(rng.uniform(0.01, 0.05))
    strength = bias_strength if bias_strength is not None else float(rng.uniform(0.0, 0.25))
    coef = rng.uniform(-1, 1, 6) * strength
    z, y, x = sampler.z, sampler.y, sampler.x
    tx, ty, tz = sampler.pose.translation
    xn = ((x - tx) / 100.0)[None, :]
    yn = ((y - ty) / 100.0)[:, None]
    wm = table[Tissue.WHITE] * scale
    out = np.empty(labels.shape, dtype=np.float32)
    for k in range(labels.shape[0]):
        zn = float((z[k] - tz) / 100.0)
        bias = np.exp(
            coef[0] * xn
            + coef[1] * yn
            + coef[2] * zn
            + coef[3] * xn * xn
            + coef[4] * yn * yn
            + coef[5] * xn * yn
        ).astype(np.float32)
        sl = img[k]
        if sigma > 0.3:
            sl = cv2.GaussianBlur(sl, (0, 0), sigma)
        sl = sl * bias * scale
        n1 = rng.standard_normal(sl.shape, dtype=np.float32) * (nf * wm)
        n2 = rng.standard_normal(sl.shape, dtype=np.float32) * (nf * wm)
        out[k] = np.sqrt((sl + n1) ** 2 + n2 * n2)
    return out


def make_ct_volume_for_patient(
    rng: np.random.Generator,
    *,
    label: str | None = None,
    patient_seed: int | None = None,
    patient: BrainPatient | None = None,
    tumour_volume_cm3: float | None = None,
    lesion_centre: Sequence[float] | None = None,
    contrast: bool = True,
    matrix: int = 256,
    n_slices: int | None = None,
    slice_thickness_mm: float | None = None,
    noise_hu: float | None = None,
    pose: HeadPose | None = None,
) -> tuple[NDArray[np.int16], VolumeGeometry, BrainTumourTruth]:
    """A head CT (HU) of the same synthetic patient as :func:`make_mr_volume`, same tumour.

    The truth's pose maps head-frame points to this scan's patient coordinates; with the
    MR truth's pose it gives the exact CT-to-MR rigid transform for fusion tests.
    """
    pat = _resolve_patient(rng, patient, patient_seed, label, lesion_centre)
    pose_, geometry, sampler = _scan_setup(
        rng,
        pat,
        matrix=matrix,
        fov_mm=float(rng.uniform(200, 250)),
        n_slices=n_slices,
        slice_thickness_mm=slice_thickness_mm,
        thickness_choices=(2.5, 3.0, 4.0, 5.0),
        coverage_mm=(110.0, 170.0),
        count_range=(24, 60),
        pose=pose,
    )
    labels = render_labels(pat.anatomy, sampler)
    _ct_headrest(sampler, pat.anatomy, labels)
    mask, painted, requested = _paint_tumour(pat, tumour_volume_cm3, sampler, labels)
    noise = noise_hu if noise_hu is not None else float(rng.uniform(3, 8))
    ids = ((mask == MASK_TUMOUR) | (mask == MASK_NECROSIS)).astype(np.uint8)
    hu = render_ct(
        labels, ids, [painted] if painted else [], geometry, rng, contrast=contrast, noise_hu=noise
    )
    truth = BrainTumourTruth(
        label=pat.tumour_kind,
        modality="CT",
        sequence=None,
        patient_seed=pat.patient_seed,
        tumour=_tumour_summary(pat, painted, requested, mask, sampler),
        tumour_mask=mask,
        tissue_labels=labels,
        pose=pose_,
    )
    return hu, geometry, truth


# --------------------------------------------------------------------------- DICOM


def build_mr_slices(
    volume: F32,
    geometry: VolumeGeometry,
    seq: MrSequence,
    study: StudyContext,
    series: SeriesContext,
    *,
    uid_parts: Sequence[str | int],
    field_strength: float,
) -> list[tuple[str, FileDataset]]:
    """One MR Image Storage instance per slice: (SOPInstanceUID, dataset)."""
    sv = np.rint(np.clip(volume, 0, 65535)).astype(np.uint16)
    bits = 12 if int(sv.max()) <= 4095 else 16
    sample = sv[:, :: max(1, sv.shape[1] // 64), :: max(1, sv.shape[2] // 64)]
    positive = sample[sample > 0.05 * float(sample.max())]
    lo, hi = np.percentile(positive, [1, 99.5]) if positive.size else (0.0, 1.0)
    out: list[tuple[str, FileDataset]] = []
    for k in range(geometry.shape[0]):
        uid = phantom_uid(*uid_parts, "slice", k)
        ds = new_dataset(MR_IMAGE_STORAGE, uid)
        fill_common_modules(ds, study, series)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = study.study_date
        ds.ContentTime = study.study_time
        ds.AcquisitionDate = study.study_date
        ds.AcquisitionTime = study.study_time
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [round(v, 4) for v in geometry.slice_position(k)]
        ds.ImageOrientationPatient = list(geometry.image_orientation_patient)
        ds.SliceLocation = round(geometry.slice_position(k)[2], 4)
        ds.PixelSpacing = list(geometry.pixel_spacing_mm)
        ds.SliceThickness = geometry.slice_thickness_mm
        ds.SpacingBetweenSlices = geometry.slice_spacing_mm
        ds.ScanningSequence = list(seq.scanning_sequence)
        ds.SequenceVariant = list(seq.sequence_variant)
        ds.ScanOptions = list(seq.scan_options) if seq.scan_options else ""
        ds.MRAcquisitionType = seq.acquisition_type
        ds.SequenceName = seq.name
        ds.AngioFlag = "N"
        ds.RepetitionTime = seq.repetition_time_ms
        ds.EchoTime = seq.echo_time_ms
        if seq.inversion_time_ms is not None:
            ds.InversionTime = seq.inversion_time_ms
        ds.EchoTrainLength = seq.echo_train_length
        ds.FlipAngle = seq.flip_angle_deg
        ds.NumberOfAverages = 1
        ds.ImagingFrequency = round(42.577478 * field_strength, 6)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = 1
        ds.MagneticFieldStrength = field_strength
        ds.PercentSampling = 100
        ds.PercentPhaseFieldOfView = 100
        ds.PixelBandwidth = 200
        ds.ContrastBolusAgent = "GADOLINIUM" if seq.contrast_agent else ""
        if seq.contrast_agent:
            ds.ContrastBolusRoute = "IV"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        ds.WindowCenter = round(float(lo + hi) / 2, 1)
        ds.WindowWidth = round(max(float(hi - lo), 1.0), 1)
        ds.PixelData = sv[k].astype("<u2").tobytes()
        out.append((uid, ds))
    return out


def _study_context(
    ident: Any, seed: int, i: int, t: int, date: str, time: str, desc: str, tag: str
) -> StudyContext:
    return StudyContext(
        identity=ident,
        study_instance_uid=phantom_uid(KIND, seed, i, t, tag, "study"),
        study_date=date,
        study_time=time,
        accession_number=f"PHBMR{seed % 10000:04d}{i:04d}{t:02d}{tag[:1].upper()}",
        study_id=f"{i + 1}{t:02d}",
        study_description=desc,
    )


def _write_mr_series(
    out_dir: Path,
    volume: F32,
    geometry: VolumeGeometry,
    truth: BrainTumourTruth,
    seq: MrSequence,
    study: StudyContext,
    *,
    seed: int,
    i: int,
    t: int,
    series_number: int,
    frame_uid: str,
    field_strength: float,
    written: list[Path],
) -> tuple[str, dict[str, Any]]:
    ident = study.identity
    series = SeriesContext(
        series_instance_uid=phantom_uid(KIND, seed, i, t, seq.name, "series"),
        modality="MR",
        series_number=series_number,
        series_description=seq.description,
        body_part_examined="BRAIN",
        model_name="phantom-brain-mr",
        frame_of_reference_uid=frame_uid,
    )
    folder = Path(ident.patient_id) / f"ST{t:02d}_MR" / seq.name
    instances: dict[str, Any] = {}
    for k, (uid, ds) in enumerate(
        build_mr_slices(
            volume,
            geometry,
            seq,
            study,
            series,
            uid_parts=(KIND, seed, i, t, seq.name),
            field_strength=field_strength,
        )
    ):
        rel = folder / f"IM{k + 1:04d}.dcm"
        written.append(save_dataset(ds, out_dir / rel))
        instances[uid] = {
            "file": rel.as_posix(),
            "slice_index": k,
            "label": int(bool((truth.tumour_mask[k] & 1).any())),
        }
    spacing = (
        geometry.pixel_spacing_mm[1],
        geometry.pixel_spacing_mm[0],
        geometry.slice_spacing_mm,
    )
    mask_rel = Path("masks") / f"{ident.patient_id}_ST{t:02d}_{seq.name}_tumour.nii.gz"
    save_mask(
        truth.tumour_mask, out_dir / mask_rel, spacing_xyz=spacing, origin_xyz=geometry.origin_mm
    )
    return series.series_instance_uid, {
        "modality": "MR",
        **truth.to_json(),
        "geometry": geometry.to_json(),
        "tumour_mask_file": mask_rel.as_posix(),
        "instances": instances,
    }


def _write_ct_study(
    out_dir: Path,
    patient: BrainPatient,
    volume_cm3: float | None,
    ident: Any,
    date: str,
    time: str,
    *,
    seed: int,
    i: int,
    t: int,
    matrix: int,
    written: list[Path],
) -> tuple[str, dict[str, Any]]:
    hu, geometry, truth = make_ct_volume_for_patient(
        item_rng(KIND, seed, i, "ct", t),
        patient=patient,
        tumour_volume_cm3=volume_cm3,
        matrix=matrix,
    )
    study = _study_context(ident, seed, i, t, date, time, "CT HEAD W CONTRAST", "ct")
    series = SeriesContext(
        series_instance_uid=phantom_uid(KIND, seed, i, t, "ct", "series"),
        modality="CT",
        series_number=2,
        series_description="Head CT with contrast",
        body_part_examined="HEAD",
        model_name="phantom-head-ct",
        frame_of_reference_uid=phantom_uid(KIND, seed, i, t, "ct", "frame"),
    )
    folder = Path(ident.patient_id) / f"ST{t:02d}_CT"
    instances: dict[str, Any] = {}
    for k, (uid, ds) in enumerate(
        build_ct_slices(
            hu,
            geometry,
            study,
            series,
            CtStorage(0),
            uid_parts=(KIND, seed, i, t, "ct"),
            contrast=True,
            kvp=120.0,
        )
    ):
        rel = folder / f"IM{k + 1:04d}.dcm"
        written.append(save_dataset(ds, out_dir / rel))
        instances[uid] = {
            "file": rel.as_posix(),
            "slice_index": k,
            "label": int(bool((truth.tumour_mask[k] & 1).any())),
        }
    spacing = (
        geometry.pixel_spacing_mm[1],
        geometry.pixel_spacing_mm[0],
        geometry.slice_spacing_mm,
    )
    mask_rel = Path("masks") / f"{ident.patient_id}_ST{t:02d}_CT_tumour.nii.gz"
    save_mask(
        truth.tumour_mask, out_dir / mask_rel, spacing_xyz=spacing, origin_xyz=geometry.origin_mm
    )
    return study.study_instance_uid, {
        "patient_id": ident.patient_id,
        "label": truth.label,
        "study_date": date,
        "series": {
            series.series_instance_uid: {
                "modality": "CT",
                **truth.to_json(),
                "geometry": geometry.to_json(),
                "tumour_mask_file": mask_rel.as_posix(),
                "instances": instances,
            }
        },
    }


def _write_patient_studies(
    out_dir: Path,
    *,
    seed: int,
    i: int,
    patient: BrainPatient,
    volumes_cm3: Sequence[float | None],
    offsets_days: Sequence[int],
    sequences: Sequence[str],
    matrix: int,
    n_slices: int | None,
    slice_thickness_mm: float | None,
    with_ct: bool,
    written: list[Path],
    studies: dict[str, Any],
) -> list[dict[str, Any]]:
    meta = item_rng(KIND, seed, i, "meta")
    ident = make_identity(CODE, seed, i, meta)
    base_date, time = study_datetime(meta)
    field_strength = float(meta.choice([1.5, 3.0]))
    timeline: list[dict[str, Any]] = []
    for t, (v, off) in enumerate(zip(volumes_cm3, offsets_days, strict=True)):
        date = shift_date(base_date, off)
        study = _study_context(ident, seed, i, t, date, time, "MR BRAIN W/WO CONTRAST", "mr")
        frame_uid = phantom_uid(KIND, seed, i, t, "frame")
        scan_rng = item_rng(KIND, seed, i, "scan", t)
        pose = random_pose(scan_rng)
        geometry_seed = int(scan_rng.integers(0, 2**31))
        series_map: dict[str, Any] = {}
        label = patient.tumour_kind
        volume_measured = 0.0
        shared: VolumeGeometry | None = None
        for s_no, name in enumerate(sequences, start=1):
            # All sequences of a study share pose and grid (one frame of reference).
            vol, geometry, truth = make_mr_volume(
                np.random.default_rng([geometry_seed, s_no]),
                patient=patient,
                tumour_volume_cm3=v,
                sequence=name,
                matrix=matrix,
                n_slices=n_slices,
                slice_thickness_mm=slice_thickness_mm,
                pose=pose,
                geometry=shared,
            )
            shared = geometry
            uid, entry = _write_mr_series(
                out_dir,
                vol,
                geometry,
                truth,
                SEQUENCES[name],
                study,
                seed=seed,
                i=i,
                t=t,
                series_number=s_no,
                frame_uid=frame_uid,
                field_strength=field_strength,
                written=written,
            )
            series_map[uid] = entry
            volume_measured = truth.volume_cm3
        studies[study.study_instance_uid] = {
            "patient_id": ident.patient_id,
            "label": label,
            "study_date": date,
            "series": series_map,
        }
        entry_t: dict[str, Any] = {
            "timepoint": t,
            "study_date": date,
            "study_instance_uid": study.study_instance_uid,
            "requested_volume_cm3": v,
            "volume_cm3": volume_measured,
        }
        if with_ct:
            ct_uid, ct_entry = _write_ct_study(
                out_dir,
                patient,
                v,
                ident,
                shift_date(date, 2),
                time,
                seed=seed,
                i=i,
                t=t,
                matrix=matrix,
                written=written,
            )
            studies[ct_uid] = ct_entry
            entry_t["ct_study_instance_uid"] = ct_uid
        timeline.append(entry_t)
    return timeline


def write_brain_mr_study(
    out_dir: Path,
    *,
    n: int,
    seed: int,
    class_weights: Sequence[float] | None = None,
    sequences: str | Sequence[str] = ("T1C",),
    matrix: int = 256,
    n_slices: int | None = None,
    slice_thickness_mm: float | None = None,
    with_ct: bool = False,
) -> list[Path]:
    """Write ``n`` brain MR studies (one patient each) plus truth.json.

    Classes (healthy, benign, malignant) are balanced by ``class_weights`` (equal by
    default). Each study has one series per sequence on a shared grid; ``with_ct`` adds a
    contrast CT study of the same patient (same tumour) two days later, for fusion.
    """
    out_dir = Path(out_dir)
    seqs = [sequences] if isinstance(sequences, str) else list(sequences)
    labels = balanced_labels(item_rng(KIND, seed, 0, "labels", n), n, LABELS, class_weights)
    written: list[Path] = []
    studies: dict[str, Any] = {}
    for i in range(n):
        patient = make_brain_patient(rng=item_rng(KIND, seed, i, "patient"), tumour_kind=labels[i])
        _write_patient_studies(
            out_dir,
            seed=seed,
            i=i,
            patient=patient,
            volumes_cm3=[None],
            offsets_days=[0],
            sequences=seqs,
            matrix=matrix,
            n_slices=n_slices,
            slice_thickness_mm=slice_thickness_mm,
            with_ct=with_ct,
            written=written,
            studies=studies,
        )
    write_truth(out_dir, KIND, seed, studies, n=n, labels=list(LABELS))
    return written


def write_brain_mr_growth_study(
    out_dir: Path,
    *,
    seed: int,
    volumes_cm3: Sequence[float],
    interval_days: int | Sequence[int] = 90,
    tumour_kind: str = "malignant",
    lesion_centre: Sequence[float] | None = None,
    sequences: str | Sequence[str] = ("T1C",),
    matrix: int = 256,
    n_slices: int | None = None,
    slice_thickness_mm: float | None = None,
    with_ct: bool = False,
) -> list[Path]:
    """One synthetic patient scanned at each of ``volumes_cm3`` (a longitudinal series).

    The patient is ``seed`` (same seed, same anatomy and tumour); ``interval_days`` is the
    gap between consecutive studies (one value, or one per gap). truth.json gains a
    ``timeline`` with the requested and mask-measured volume of every timepoint.
    """
    out_dir = Path(out_dir)
    if not volumes_cm3:
        raise ValueError("volumes_cm3 must not be empty")
    gaps = (
        [interval_days] * (len(volumes_cm3) - 1)
        if isinstance(interval_days, int)
        else list(interval_days)
    )
    if len(gaps) != len(volumes_cm3) - 1 or any(g < 0 for g in gaps):
        raise ValueError(
            "interval_days needs one non-negative gap per consecutive pair of timepoints"
        )
    offsets = [0, *np.cumsum(gaps).astype(int).tolist()]
    seqs = [sequences] if isinstance(sequences, str) else list(sequences)
    patient = make_brain_patient(seed, tumour_kind=tumour_kind, lesion_centre=lesion_centre)
    written: list[Path] = []
    studies: dict[str, Any] = {}
    timeline = _write_patient_studies(
        out_dir,
        seed=seed,
        i=0,
        patient=patient,
        volumes_cm3=list(volumes_cm3),
        offsets_days=offsets,
        sequences=seqs,
        matrix=matrix,
        n_slices=n_slices,
        slice_thickness_mm=slice_thickness_mm,
        with_ct=with_ct,
        written=written,
        studies=studies,
    )
    write_truth(
        out_dir, KIND, seed, studies, n=1, labels=list(LABELS), timeline=timeline, patient_seed=seed
    )
    return written
