"""Synthetic frontal chest radiographs, normal or with pneumonic consolidation.

The image is built as a projection: a soft-tissue path length through the body minus the
air path through the lungs, plus bone, vessels and (for pneumonia) consolidation that
replaces lung air. Working in attenuation rather than painting grey levels means an
opacity behind the heart or below the dome is as faint as it would be on a real film, and
one display mapping turns all of it into a plausible processed radiograph.

Nuisance factors (size, position, rotation, exposure, processing, noise, AP/PA, breast
shadows) are drawn independently of the label, so a classifier cannot learn them as a
shortcut. The DICOM writer then stores the same pixels in the ways CR and DX devices do
(MONOCHROME1/2, 10-15 stored bits, with or without rescale) so that readers are tested
against all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnode.phantoms.common import (
    PatientIdentity,
    SeriesContext,
    StudyContext,
    balanced_labels,
    bbox_of,
    fill_common_modules,
    item_rng,
    make_identity,
    new_dataset,
    phantom_uid,
    save_dataset,
    save_mask,
    study_datetime,
    write_truth,
)

KIND = "chest-xray"
CODE = "CXR"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
LABELS = ("normal", "pneumonia")
BITS_STORED_CHOICES = (10, 12, 14, 15)

_WORK_MAX = 512  # anatomy is drawn at most this large, then resampled to the output size

FloatImage = NDArray[np.float32]


@dataclass(frozen=True)
class ChestXrayGeometry:
    """How the synthetic patient sits in the detector field (the nuisance draws)."""

    rows: int
    columns: int
    pixel_spacing_mm: float  # ImagerPixelSpacing, both directions
    view_position: str  # "PA" or "AP"
    patient_scale: float
    rotation_deg: float
    shift_mm: tuple[float, float]  # (x, y) of the thorax centre from the field centre

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "view_position": self.view_position,
            "patient_scale": self.patient_scale,
            "rotation_deg": self.rotation_deg,
            "shift_mm": list(self.shift_mm),
        }


@dataclass(frozen=True)
class Consolidation:
    """One opacity; pixel coordinates refer to the generated (and stored) image."""

    lesion_id: int
    kind: str  # "patchy", "lobar" or "round"
    side: str  # patient side: "right" (image left) or "left"
    zone: str  # "upper", "middle" or "lower"
    density: float  # fraction of the local lung air replaced at the opacity's peak
    air_bronchogram: bool
    area_px: int
    centre_rc: tuple[float, float]
    bbox_rc: tuple[int, int, int, int]  # row0, col0, row1, col1 (half-open)

    def to_json(self) -> dict[str, Any]:
        return {
            "lesion_id": self.lesion_id,
            "kind": self.kind,
            "side": self.side,
            "zone": self.zone,
            "density": self.density,
            "air_bronchogram": self.air_bronchogram,
            "area_px": self.area_px,
            "centre_rc": list(self.centre_rc),
            "bbox_rc": list(self.bbox_rc),
        }


@dataclass(frozen=True, eq=False)
class ChestXrayTruth:
    """Ground truth: label, opacities, and masks aligned with the image pixels."""

    label: str
    consolidations: tuple[Consolidation, ...]
    lesion_mask: NDArray[np.uint8]  # consolidation id per pixel, 0 = none
    lung_mask: NDArray[np.bool_]  # visible lung fields (heart shadow excluded)
    has_breast_shadows: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "consolidations": [c.to_json() for c in self.consolidations],
            "has_breast_shadows": self.has_breast_shadows,
        }


def _sig(x: FloatImage) -> FloatImage:
    """A ramp with the logistic's slope at 0: a fraction of the cost of tanh."""
    ramp = np.clip(np.asarray(x, dtype=np.float32) * np.float32(0.25) + np.float32(0.5), 0.0, 1.0)
    return np.asarray(ramp, dtype=np.float32)


def _blur(img: FloatImage, sigma_px: float) -> FloatImage:
    if sigma_px < 0.3:
        return img
    return np.asarray(
        cv2.GaussianBlur(img, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT), dtype=np.float32
    )


def _resolve_size(size: int | tuple[int, int]) -> tuple[int, int]:
    rows, cols = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if rows < 32 or cols < 32:
        raise ValueError("size must be at least 32 pixels")
    return rows, cols


class _Frame:
    """Working-resolution pixel grid and its body-frame coordinates (mm).

    Body frame: u across the patient (positive towards the patient's left, i.e. image
    right), v down the patient; origin near the middle of the thorax.
    """

    def __init__(self, shape: tuple[int, int], spacing: float, geom: ChestXrayGeometry) -> None:
        h, w = shape
        self.shape = shape
        self.spacing = spacing
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        x = (xx + 0.5 - w / 2) * spacing
        y = (yy + 0.5 - h / 2) * spacing
        th = math.radians(geom.rotation_deg)
        c, s = math.cos(th), math.sin(th)
        dx, dy = geom.shift_mm
        k = geom.patient_scale
        self.u = ((c * (x - dx) + s * (y - dy)) / k).astype(np.float32)
        self.v = ((-s * (x - dx) + c * (y - dy)) / k).astype(np.float32)
        self._cos, self._sin, self._k, self._dx, self._dy = c, s, k, dx, dy

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        """Body-frame mm to (x, y) pixel coordinates (for drawing lines)."""
        c, s, k = self._cos, self._sin, self._k
        x = c * u * k - s * v * k + self._dx
        y = s * u * k + c * v * k + self._dy
        h, w = self.shape
        return x / self.spacing + w / 2 - 0.5, y / self.spacing + h / 2 - 0.5

    def mm_to_px(self, mm: float) -> float:
        return mm * self._k / self.spacing


@dataclass(frozen=True)
class _Anatomy:
    """Per-patient anatomical parameters (mm, body frame)."""

    chest_half_width: float
    apex_v: float
    dome_top: tuple[float, float]  # (right, left)
    dome_depth: float
    heart_centre: tuple[float, float]
    heart_axes: tuple[float, float]
    heart_angle_deg: float
    rib_spacing: float
    rib_first: tuple[float, float]
    clavicle_lateral_v: float
    air_fraction: float
    stomach_bubble: bool
    breast_shadows: bool


def _draw_anatomy(rng: np.random.Generator, view: str) -> _Anatomy:
    ap = view == "AP"
    insp = float(rng.uniform(0.9, 1.05)) * (0.93 if ap else 1.0)
    heart = float(rng.uniform(0.88, 1.15)) * (1.12 if ap else 1.0)
    dome_r = 100.0 * insp + float(rng.normal(0, 6))
    return _Anatomy(
        chest_half_width=150.0 * float(rng.uniform(0.9, 1.1)),
        apex_v=-152.0 + float(rng.normal(0, 5)),
        dome_top=(dome_r, dome_r + float(rng.uniform(5, 22))),
        dome_depth=float(rng.uniform(35, 55)),
        heart_centre=(18.0 + float(rng.normal(0, 5)), 64.0 * insp + float(rng.normal(0, 5))),
        heart_axes=(82.0 * heart, 52.0 * heart),
        heart_angle_deg=-26.0 + float(rng.normal(0, 5)),
        rib_spacing=23.0 * insp + float(rng.normal(0, 1)),
        rib_first=(-150.0 + float(rng.normal(0, 3)), -148.0 + float(rng.normal(0, 3))),
        clavicle_lateral_v=(-150.0 if ap else -166.0) + float(rng.normal(0, 5)),
        air_fraction=float(rng.uniform(0.56, 0.68)),
        stomach_bubble=bool(rng.random() < 0.6),
        breast_shadows=bool(rng.random() < 0.3),
    )


def _half_width(v: FloatImage, chest: float) -> FloatImage:
    neck, shoulder = 52.0, chest + 42.0
    return (
        neck
        + (shoulder - neck) * _sig((v + 178.0) / 7.0)
        - (shoulder - chest) * _sig((v + 125.0) / 16.0)
    ).astype(np.float32)


def _lung_fields(f: _Frame, a: _Anatomy, w: FloatImage) -> tuple[FloatImage, FloatImage]:
    """Binary right and left lung regions (before heart overlap)."""
    u, v = f.u, f.v
    out: list[FloatImage] = []
    for side, idx in ((-1.0, 0), (1.0, 1)):
        x = side * u
        medial = 19.0 + 5.0 * (side > 0) + 16.0 * _sig((v + 10.0) / 16.0)
        lateral = (w - 14.0) * (0.8 + 0.2 * _sig((v + 70.0) / 25.0))
        apex = a.apex_v + ((x - 58.0) / 42.0) ** 2 * 38.0
        dome = a.dome_top[idx] + a.dome_depth * ((x - 68.0) / 78.0) ** 2
        region = (x > medial) & (x < lateral) & (v > apex) & (v < dome)
        out.append(region.astype(np.float32))
    return out[0], out[1]


def _ellipse_q(
    u: FloatImage, v: FloatImage, cu: float, cv: float, au: float, av: float, angle_deg: float = 0.0
) -> FloatImage:
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    du, dv = u - cu, v - cv
    p = (c * du + s * dv) / au
    q = (-s * du + c * dv) / av
    return (p * p + q * q).astype(np.float32)


def _draw_tree(
    canvas: FloatImage,
    f: _Frame,
    rng: np.random.Generator,
    root: tuple[float, float],
    direction_deg: float,
    length: float,
    width: float,
    depth: int,
    spread: float = 28.0,
) -> None:
    """Branching vessel/bronchus tree drawn as anti-aliased lines (body-frame mm)."""
    stack = [(root, direction_deg, length, width, depth)]
    while stack:
        (u0, v0), ang, ln, wd, d = stack.pop()
        t = math.radians(ang)
        u1, v1 = u0 + ln * math.cos(t), v0 + ln * math.sin(t)
        p0, p1 = f.to_pixel(u0, v0), f.to_pixel(u1, v1)
        thickness = max(1, round(f.mm_to_px(wd)))
        cv2.line(
            canvas,
            (round(p0[0] * 16), round(p0[1] * 16)),
            (round(p1[0] * 16), round(p1[1] * 16)),
            float(min(1.0, 0.35 + wd / 4.0)),
            thickness,
            cv2.LINE_AA,
            4,
        )
        if d > 0:
            for sgn in (-1.0, 1.0):
                stack.append(
                    (
                        (u1, v1),
                        ang + sgn * spread + float(rng.normal(0, 8)),
                        ln * float(rng.uniform(0.6, 0.8)),
                        wd * 0.7,
                        d - 1,
                    )
                )


def _smooth_noise_2d(rng: np.random.Generator, f: _Frame, scale_mm: float) -> FloatImage:
    """Roughly unit-variance smooth noise with features of about ``scale_mm``."""
    h, w = f.shape
    cell = max(1.0, f.mm_to_px(scale_mm))
    grid = rng.standard_normal((int(h / cell) + 2, int(w / cell) + 2)).astype(np.float32)
    big = np.asarray(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), dtype=np.float32)
    big = _blur(big, cell / 2.0)
    return (big / max(float(big.std()), 1e-6)).astype(np.float32)


def _consolidation_field(
    rng: np.random.Generator,
    f: _Frame,
    a: _Anatomy,
    lung_side: FloatImage,
    side_idx: int,
    kind: str,
) -> tuple[FloatImage, str]:
    """Membership field in [0, 1] of one opacity, and its zone name."""
    u, v = f.u, f.v
    sign = -1.0 if side_idx == 0 else 1.0
    ys, xs = np.nonzero(lung_side > 0.5)
    pick = int(rng.integers(0, ys.size))
    cu, cv = float(u[ys[pick], xs[pick]]), float(v[ys[pick], xs[pick]])
    noise = _smooth_noise_2d(rng, f, float(rng.uniform(7, 14)))
    if kind == "lobar":
        zone = str(
            rng.choice(["upper", "middle", "lower"] if side_idx == 0 else ["upper", "lower"])
        )
        fissure = -18.0 + float(rng.normal(0, 8))
        if zone == "upper":
            sharp = (
                1.5 if side_idx == 0 else 14.0
            )  # the horizontal fissure only exists on the right
            p = _sig((fissure - v + (0.0 if side_idx == 0 else 15.0 * noise)) / sharp)
        elif zone == "middle":
            p = _sig((v - fissure) / 1.5) * _sig((75.0 - v) / 12.0) * _sig((95.0 - sign * u) / 14.0)
        else:
            p = _sig((v - (25.0 + float(rng.normal(0, 12))) + 18.0 * noise) / 10.0)
        p = p * (0.55 + 0.45 * _sig(2.5 * noise))
        field = p / max(float(p.max()), 1e-6)
    elif kind == "round":
        r = float(rng.uniform(14, 38))
        q = _ellipse_q(
            u, v, cu, cv, r, r * float(rng.uniform(0.8, 1.2)), float(rng.uniform(0, 180))
        )
        field = _sig(np.asarray((1.0 - np.sqrt(q)) * r / float(rng.uniform(3, 7)), np.float32))
        zone = _zone_of(cv)
    else:
        acc = np.zeros_like(u)
        spread = float(rng.uniform(15, 45))
        for _ in range(int(rng.integers(4, 10))):
            bu, bv = cu + float(rng.normal(0, spread)), cv + float(rng.normal(0, spread))
            sg = float(rng.uniform(7, 22))
            acc += np.exp(-((u - bu) ** 2 + (v - bv) ** 2) / (2 * sg * sg)).astype(np.float32)
        acc *= 0.6 + 0.4 * _sig(3.0 * noise)
        field = np.clip((acc - 0.15) / 0.7, 0.0, 1.0).astype(np.float32)
        zone = _zone_of(cv)
    return (field * lung_side).astype(np.float32), zone


def _zone_of(v: float) -> str:
    return "upper" if v < -60 else ("middle" if v < 30 else "lower")


def make_chest_xray(
    rng: np.random.Generator,
    *,
    label: str | None = None,
    size: int | tuple[int, int] = 256,
    view_position: str | None = None,
    n_consolidations: int | None = None,
    p_pneumonia: float = 0.5,
    noise: float | None = None,
) -> tuple[FloatImage, ChestXrayGeometry, ChestXrayTruth]:
    """One frontal chest radiograph as a MONOCHROME2-sense float image in [0, 1].

    ``label`` "normal" or "pneumonia" (None draws it with ``p_pneumonia``);
    ``n_consolidations`` fixes the number of opacities for pneumonia (default 1-3);
    ``noise`` fixes the quantum-noise level (default drawn from 0.004-0.02).
    """
    if label is None:
        label = "pneumonia" if rng.random() < p_pneumonia else "normal"
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if view_position is None:
        view_position = "PA" if rng.random() < 0.7 else "AP"
    if view_position not in ("PA", "AP"):
        raise ValueError("view_position must be 'PA' or 'AP'")
    rows, cols = _resolve_size(size)
    fov = float(rng.uniform(380, 440))
    spacing_out = fov / max(rows, cols)
    geom = ChestXrayGeometry(
        rows=rows,
        columns=cols,
        pixel_spacing_mm=round(spacing_out, 6),
        view_position=view_position,
        patient_scale=float(rng.uniform(0.86, 1.12)),
        rotation_deg=float(np.clip(rng.normal(0, 2.5), -6, 6)),
        shift_mm=(float(rng.uniform(-18, 18)), float(rng.uniform(-22, 22))),
    )
    scale = min(1.0, _WORK_MAX / max(rows, cols))
    wh, ww = max(32, round(rows * scale)), max(32, round(cols * scale))
    f = _Frame((wh, ww), fov / max(wh, ww), geom)
    a = _draw_anatomy(rng, view_position)
    u, v = f.u, f.v
    px = 1.0 / f.mm_to_px(1.0)  # mm per working pixel, in body-frame units

    w = _half_width(v, a.chest_half_width)
    depth = 0.5 + 0.5 * _sig((v + 172.0) / 9.0)
    body = depth * np.sqrt(np.clip(1.0 - (u / w) ** 2, 0.0, 1.0))
    body = _blur(body.astype(np.float32), 1.0 / px)

    right, left = _lung_fields(f, a, w)
    heart_q = _ellipse_q(
        u, v, a.heart_centre[0], a.heart_centre[1], *a.heart_axes, a.heart_angle_deg
    )
    heart = np.clip((1.0 - heart_q) * 5.0, 0.0, 1.0)
    knob = np.clip((1.0 - _ellipse_q(u, v, 21.0, -58.0, 16.0, 15.0)) * 4.0, 0.0, 1.0)
    occl = np.clip(heart + knob, 0.0, 1.0)
    sharp_r, sharp_l = _blur(right, 1.5 / px), _blur(left, 1.5 / px)
    thick = 0.55 + 0.45 * _blur(right + left, 22.0 / px)
    air = (sharp_r + sharp_l) * thick * (1.0 - 0.82 * occl)
    visible_r = (right > 0.5) & (occl < 0.5)
    visible_l = (left > 0.5) & (occl < 0.5)

    dens = body - a.air_fraction * air * depth

    # Bones: ribs are drawn with the nearest-rib trick (one pass per family, not per rib).
    x = np.abs(u)
    is_left = u > 0
    first = np.where(is_left, a.rib_first[1], a.rib_first[0]).astype(np.float32)
    t_post = v - (-0.18 * x + 0.0032 * x * x)
    jitter = rng.normal(0.0, 2.0, size=(2, 12)).astype(np.float32)
    widths = rng.uniform(0.85, 1.15, size=(2, 12)).astype(np.float32)
    idx = np.clip(np.round((t_post - first) / a.rib_spacing), 0, 11).astype(np.intp)
    side_i = is_left.astype(np.intp)
    dv = t_post - (first + idx * a.rib_spacing + jitter[side_i, idx])
    half = (4.2 + 0.02 * x) * widths[side_i, idx]
    band = 1.0 / (1.0 + (dv / half) ** 8)
    edge = np.exp(-(((np.abs(dv) - half) / 1.0) ** 2))
    reach = _sig((x - 16.0) / 2.5) * _sig((w - 4.0 - x) / 3.0)
    dens += (0.05 * band + 0.035 * edge) * reach
    lat = w - 12.0
    t_ant = v - 0.42 * (lat - x)
    first_a = first + 38.0
    idx_a = np.clip(np.round((t_ant - first_a) / (a.rib_spacing * 1.15)), 0, 6)
    dva = t_ant - (first_a + idx_a * a.rib_spacing * 1.15)
    dens += 0.03 / (1.0 + (dva / 5.5) ** 6) * _sig((x - 45.0) / 6.0) * _sig((lat - x) / 4.0)
    x_med, x_lat = 16.0, a.chest_half_width + 25.0
    tcl = np.clip((x - x_med) / (x_lat - x_med), 0.0, 1.0)
    v_cl = -128.0 + (a.clavicle_lateral_v + 128.0) * tcl + 7.0 * np.sin(2 * np.pi * tcl)
    dens += (
        0.17 / (1.0 + ((v - v_cl) / 6.5) ** 6) * _sig((x - x_med) / 2.0) * _sig((x_lat - x) / 3.0)
    )
    hum = np.clip(
        (1.0 - _ellipse_q(x, v, a.chest_half_width + 28.0, -148.0, 26.0, 26.0)) * 3.0, 0.0, 1.0
    )
    arm_d = np.abs(x - a.chest_half_width - 34.0 - 0.15 * (v + 148.0))
    below = _sig((v + 148.0) / 3.0)
    shaft = _sig((12.0 - arm_d) / 1.5) * below
    arm = np.sqrt(np.clip(1.0 - (arm_d / 42.0) ** 2, 0.0, 1.0)) * _sig((v + 160.0) / 8.0)
    dens += (
        np.maximum(0.0, 0.5 * arm - body)
        + 0.25 * np.maximum(hum, shaft)
        + 0.12 * _sig((v + 40.0) / 45.0) * _sig((w - x) / 10.0)
    )
    spine = _sig((21.0 - x) / 1.5) * (0.75 + 0.25 * (np.cos(2 * np.pi * v / 26.0) > -0.55))
    dens += 0.07 * spine

    trachea = _sig((8.5 - np.abs(u - 0.04 * (v + 40.0))) / 1.2) * _sig((-38.0 - v) / 4.0)
    dens -= 0.11 * trachea
    hila = np.exp(-(((x - 42.0) / 14.0) ** 2 + ((v + 2.0) / 24.0) ** 2))
    dens += 0.07 * hila
    vessels = np.zeros((wh, ww), dtype=np.float32)
    for side in (-1.0, 1.0):
        for ang in (-95.0, -60.0, -25.0, 10.0, 40.0, 70.0, 95.0):
            a_deg = ang if side > 0 else 180.0 - ang
            _draw_tree(
                vessels,
                f,
                rng,
                (side * 40.0, -2.0),
                a_deg + float(rng.normal(0, 8)),
                float(rng.uniform(35, 55)),
                2.6,
                4,
            )
    vessels = _blur(vessels, 0.9 / px)
    dens += 0.05 * vessels * (sharp_r + sharp_l) * (0.4 + 0.6 * thick)

    if a.stomach_bubble:
        bub = _ellipse_q(u, v, 70.0, a.dome_top[1] + 32.0, 30.0, 17.0)
        dens -= 0.16 * np.clip((1.0 - bub) * 3.0, 0.0, 1.0)
    if a.breast_shadows:
        for side in (-1.0, 1.0):
            bq = _ellipse_q(u, v, side * 92.0, 112.0, 82.0, 62.0)
            dens += 0.1 * np.clip((1.0 - bq) * 2.0, 0.0, 1.0) * _sig((v - 70.0) / 6.0)

    # Consolidations: replace lung air by fluid, so they are only as dense as the air they fill.
    consolidation_fields: list[tuple[FloatImage, str, str, str, float, bool]] = []
    if label == "pneumonia":
        n_c = (
            n_consolidations
            if n_consolidations is not None
            else int(rng.choice([1, 1, 1, 2, 2, 3]))
        )
        if n_c < 1:
            raise ValueError("pneumonia needs at least one consolidation")
        vis = (visible_r.astype(np.float32), visible_l.astype(np.float32))
        for _ in range(n_c):
            side_idx = 0 if rng.random() < 0.55 else 1
            kind = str(rng.choice(["patchy", "patchy", "lobar", "round"]))
            field, zone = _consolidation_field(
                rng, f, a, _blur(vis[side_idx], 1.5 / px), side_idx, kind
            )
            fill = float(rng.uniform(0.35, 0.9))
            bronch = kind != "round" and rng.random() < 0.35
            opacity = a.air_fraction * air * depth * fill * field
            if bronch:
                tree = np.zeros((wh, ww), dtype=np.float32)
                sgn = -1.0 if side_idx == 0 else 1.0
                ys, xs = np.nonzero(field > 0.5)
                j = int(rng.integers(0, ys.size))
                tu, tv = float(u[ys[j], xs[j]]), float(v[ys[j], xs[j]])
                ang = math.degrees(math.atan2(tv + 2.0, tu - sgn * 40.0))
                _draw_tree(
                    tree,
                    f,
                    rng,
                    (sgn * 40.0 + 0.5 * (tu - sgn * 40.0), 0.5 * (tv - 2.0)),
                    ang,
                    30.0,
                    2.5,
                    3,
                    24.0,
                )
                opacity *= 1.0 - 0.75 * _blur(tree, 0.4 / px)
            dens += opacity
            consolidation_fields.append(
                (field, kind, "right" if side_idx == 0 else "left", zone, fill, bronch)
            )

    # Display: film-like compression, vendor-like edge enhancement, gamma.
    g = float(rng.uniform(1.0, 2.2))
    img = (1.0 - np.exp(-g * np.clip(dens, 0.0, None))) / (1.0 - math.exp(-g * 1.3))
    img = img + float(rng.uniform(-0.04, 0.04))
    alpha = float(rng.uniform(0.0, 0.5))
    img = img + alpha * (img - _blur(img.astype(np.float32), 6.0 / px))
    img = np.clip(img, 0.0, 1.0) ** float(rng.uniform(0.8, 1.25))
    img = img.astype(np.float32)
    if (wh, ww) != (rows, cols):
        img = np.asarray(
            cv2.resize(img, (cols, rows), interpolation=cv2.INTER_CUBIC), dtype=np.float32
        )
    sigma_n = noise if noise is not None else float(rng.uniform(0.004, 0.02))
    grain = rng.standard_normal((rows, cols), dtype=np.float32)
    grain = _blur(grain, 0.6) * 1.7
    img = np.clip(img + sigma_n * (0.6 + img) * grain, 0.0, 1.0).astype(np.float32)

    def up(m: FloatImage) -> FloatImage:
        if (wh, ww) == (rows, cols):
            return m
        return np.asarray(
            cv2.resize(m, (cols, rows), interpolation=cv2.INTER_LINEAR), dtype=np.float32
        )

    lung_mask = up((visible_r | visible_l).astype(np.float32)) >= 0.5
    lesion_mask = np.zeros((rows, cols), dtype=np.uint8)
    consolidations: list[Consolidation] = []
    for i, (field, kind, side_name, zone, fill, bronch) in enumerate(consolidation_fields, 1):
        m = (up(field) >= 0.35) & lung_mask
        lesion_mask[m] = i
        box = bbox_of(m)
        if not box:
            continue
        ys, xs = np.nonzero(m)
        consolidations.append(
            Consolidation(
                lesion_id=i,
                kind=kind,
                side=side_name,
                zone=zone,
                density=round(fill, 4),
                air_bronchogram=bronch,
                area_px=int(m.sum()),
                centre_rc=(round(float(ys.mean()), 2), round(float(xs.mean()), 2)),
                bbox_rc=(box[0], box[1], box[2], box[3]),
            )
        )
    truth = ChestXrayTruth(
        label=label,
        consolidations=tuple(consolidations),
        lesion_mask=lesion_mask,
        lung_mask=lung_mask,
        has_breast_shadows=a.breast_shadows,
    )
    return img, geom, truth


def chest_xray_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image ``index`` in a set made with ``seed`` (as the writer uses)."""
    return item_rng(KIND, seed, index, "image")


def make_chest_xray_batch(
    seed: int,
    n: int,
    *,
    size: int | tuple[int, int] = 256,
    pneumonia_fraction: float = 0.5,
    start: int = 0,
) -> tuple[NDArray[np.float32], NDArray[np.uint8], NDArray[np.uint8]]:
    """Images (n, rows, cols), labels (n,) with 1 = pneumonia, lesion masks (n, rows, cols).

    Items ``start .. start+n-1`` of the set made with ``seed``: disjoint ranges give
    disjoint training and validation sets from one seed.
    """
    rows, cols = _resolve_size(size)
    labels = balanced_labels(
        item_rng(KIND, seed, start, "labels", n),
        n,
        LABELS,
        (1 - pneumonia_fraction, pneumonia_fraction),
    )
    images = np.empty((n, rows, cols), dtype=np.float32)
    masks = np.empty((n, rows, cols), dtype=np.uint8)
    out_labels = np.empty(n, dtype=np.uint8)
    for i in range(n):
        img, _, truth = make_chest_xray(
            chest_xray_rng(seed, start + i), label=labels[i], size=(rows, cols)
        )
        images[i], masks[i], out_labels[i] = img, truth.lesion_mask, int(labels[i] == "pneumonia")
    return images, out_labels, masks


# --------------------------------------------------------------------------- DICOM storage


@dataclass(frozen=True)
class CxrStorage:
    """How one image is encoded; drawn per image unless fixed by the caller."""

    sop_class: str  # "CR" or "DX"
    photometric: str  # "MONOCHROME1" or "MONOCHROME2"
    bits_stored: int
    rescale_slope: float | None  # None: no Modality LUT attributes (CR only)
    rescale_intercept: float | None
    stored_low: int  # stored value of image 0.0 in MONOCHROME2 sense
    stored_high: int  # stored value of image 1.0 in MONOCHROME2 sense

    def to_json(self) -> dict[str, Any]:
        return {
            "sop_class": self.sop_class,
            "photometric": self.photometric,
            "bits_stored": self.bits_stored,
            "rescale_slope": self.rescale_slope,
            "rescale_intercept": self.rescale_intercept,
            "stored_low": self.stored_low,
            "stored_high": self.stored_high,
        }


def _draw_storage(
    rng: np.random.Generator,
    sop_class: str | None,
    photometric: str | None,
    bits_stored: int | None,
    rescale: bool | None,
) -> CxrStorage:
    cls = sop_class or ("CR" if rng.random() < 0.5 else "DX")
    if cls not in ("CR", "DX"):
        raise ValueError("sop_class must be 'CR' or 'DX'")
    pi = photometric or ("MONOCHROME1" if rng.random() < 0.4 else "MONOCHROME2")
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    bits = bits_stored or int(rng.choice(BITS_STORED_CHOICES))
    if not 8 <= bits <= 16:
        raise ValueError("bits_stored must be within 8..16")
    with_rescale = rescale if rescale is not None else bool(rng.random() < 0.5)
    slope: float | None
    intercept: float | None
    if cls == "DX":
        if rescale is False:
            raise ValueError("DX For Presentation requires RescaleSlope/Intercept (1 and 0)")
        slope, intercept = 1.0, 0.0  # enumerated values in the DX Image Module
    elif with_rescale:
        slope = float(rng.choice([0.5, 1.0, 2.0]))
        intercept = float(rng.choice([-1024.0, 0.0, 100.0]))
    else:
        slope = intercept = None
    top = (1 << bits) - 1
    low = round(top * float(rng.uniform(0.0, 0.05)))
    high = round(top * float(rng.uniform(0.9, 1.0)))
    return CxrStorage(cls, pi, bits, slope, intercept, low, high)


def encode_chest_xray(image: FloatImage, storage: CxrStorage) -> NDArray[np.uint16]:
    """Stored pixel values: MONOCHROME2 quantisation, inverted over the full bit range for M1."""
    q = np.rint(
        storage.stored_low + np.clip(image, 0, 1) * (storage.stored_high - storage.stored_low)
    )
    stored = q.astype(np.uint16)
    if storage.photometric == "MONOCHROME1":
        stored = ((1 << storage.bits_stored) - 1 - stored).astype(np.uint16)
    return stored


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_chest_xray_dataset(
    image: FloatImage,
    geometry: ChestXrayGeometry,
    storage: CxrStorage,
    study: StudyContext,
    series: SeriesContext,
    sop_instance_uid: str,
    rng: np.random.Generator,
) -> FileDataset:
    """A complete CR or DX For Presentation instance for one image."""
    sop_class_uid = (
        CR_IMAGE_STORAGE if storage.sop_class == "CR" else DX_IMAGE_STORAGE_FOR_PRESENTATION
    )
    ds = new_dataset(sop_class_uid, sop_instance_uid)
    fill_common_modules(ds, study, series)
    stored = encode_chest_xray(image, storage)
    ds.InstanceNumber = 1
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = study.study_time
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = geometry.view_position
    ds.ImagerPixelSpacing = [geometry.pixel_spacing_mm, geometry.pixel_spacing_mm]
    ds.KVP = (
        round(float(rng.uniform(100, 125)), 1)
        if geometry.view_position == "PA"
        else round(float(rng.uniform(85, 110)), 1)
    )
    ds.DistanceSourceToDetector = 1800.0 if geometry.view_position == "PA" else 1000.0
    ds.ExposureTime = int(rng.integers(4, 30))
    ds.XRayTubeCurrent = int(rng.integers(160, 400))
    ds.Exposure = max(1, round(ds.ExposureTime * ds.XRayTubeCurrent / 1000))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = storage.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = storage.bits_stored
    ds.HighBit = storage.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if storage.rescale_slope is not None:
        ds.RescaleIntercept = storage.rescale_intercept
        ds.RescaleSlope = storage.rescale_slope
        ds.RescaleType = "US"
    m = storage.rescale_slope if storage.rescale_slope is not None else 1.0
    b = storage.rescale_intercept if storage.rescale_intercept is not None else 0.0
    sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
    body = sample[
        sample > 0.12
    ]  # the window is for the patient, not the direct-exposure background
    ends = np.percentile(body if body.size else sample, [1, 99.5])
    q = storage.stored_low + ends * (storage.stored_high - storage.stored_low)
    if storage.photometric == "MONOCHROME1":
        q = (1 << storage.bits_stored) - 1 - q
    lo, hi = sorted(float(m * v + b) for v in q)
    ds.WindowCenter = round((lo + hi) / 2, 2)
    ds.WindowWidth = round(max(hi - lo, 1.0), 2)
    ds.VOILUTFunction = "LINEAR"
    region = DicomSequence([_code("43799004", "SCT", "Chest")])
    ds.AnatomicRegionSequence = region
    if storage.sop_class == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if storage.photometric == "MONOCHROME2" else 1
        ds.PresentationLUTShape = "IDENTITY" if storage.photometric == "MONOCHROME2" else "INVERSE"
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = "COLUMN"
        ds.AcquisitionContextSequence = DicomSequence([])
        ds.PatientOrientation = ["L", "F"]
        ds.ViewCodeSequence = DicomSequence(
            [
                _code(
                    "399348003" if geometry.view_position == "AP" else "399214001",
                    "SCT",
                    "antero-posterior" if geometry.view_position == "AP" else "postero-anterior",
                )
            ]
        )
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = DicomSequence([])
    else:
        ds.PlateType = "PHANTOM"
    ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def write_chest_xray_study(
    out_dir: Path,
    *,
    n: int,
    seed: int,
    pneumonia_fraction: float = 0.5,
    size: int | tuple[int, int] | None = None,
    sop_class: str | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
    rescale: bool | None = None,
    view_position: str | None = None,
) -> list[Path]:
    """Write ``n`` single-image chest studies (one synthetic patient each) plus truth.json.

    Labels are exactly balanced to ``pneumonia_fraction`` (rounded). ``size`` None draws
    realistic detector sizes (1024-2500 rows); the storage options left as None are drawn
    per image so that a set exercises every encoding. Returns the DICOM files written.
    """
    out_dir = Path(out_dir)
    labels = balanced_labels(
        item_rng(KIND, seed, 0, "labels", n),
        n,
        LABELS,
        (1 - pneumonia_fraction, pneumonia_fraction),
    )
    written: list[Path] = []
    studies: dict[str, Any] = {}
    for i in range(n):
        meta_rng = item_rng(KIND, seed, i, "meta")
        ident: PatientIdentity = make_identity(CODE, seed, i, meta_rng)
        date, time = study_datetime(meta_rng)
        if size is None:
            r = int(meta_rng.integers(512, 1251)) * 2
            out_size: int | tuple[int, int] = (
                r,
                round(r * float(meta_rng.uniform(0.8, 1.0)) / 2) * 2,
            )
        else:
            out_size = size
        image, geometry, truth = make_chest_xray(
            chest_xray_rng(seed, i), label=labels[i], size=out_size, view_position=view_position
        )
        storage = _draw_storage(
            item_rng(KIND, seed, i, "storage"), sop_class, photometric, bits_stored, rescale
        )
        study = StudyContext(
            identity=ident,
            study_instance_uid=phantom_uid(KIND, seed, i, "study"),
            study_date=date,
            study_time=time,
            accession_number=f"PHCXR{seed % 100000:05d}{i:05d}",
            study_id=f"{i + 1}",
            study_description="XR CHEST " + geometry.view_position,
        )
        series = SeriesContext(
            series_instance_uid=phantom_uid(KIND, seed, i, "series"),
            modality=storage.sop_class,
            series_number=1,
            series_description=f"Chest {geometry.view_position}",
            body_part_examined="CHEST",
            model_name="phantom-chest-xray",
        )
        sop_uid = phantom_uid(KIND, seed, i, "image")
        ds = build_chest_xray_dataset(image, geometry, storage, study, series, sop_uid, meta_rng)
        rel = Path(ident.patient_id) / f"{storage.sop_class}_{i:04d}.dcm"
        written.append(save_dataset(ds, out_dir / rel))
        spacing = (geometry.pixel_spacing_mm, geometry.pixel_spacing_mm)
        mask_rel = Path("masks") / f"{ident.patient_id}_lesions.nii.gz"
        lung_rel = Path("masks") / f"{ident.patient_id}_lungs.nii.gz"
        save_mask(truth.lesion_mask, out_dir / mask_rel, spacing_xyz=spacing)
        save_mask(truth.lung_mask, out_dir / lung_rel, spacing_xyz=spacing)
        studies[study.study_instance_uid] = {
            "patient_id": ident.patient_id,
            "label": truth.label,
            "series": {
                series.series_instance_uid: {
                    "modality": storage.sop_class,
                    "instances": {
                        sop_uid: {
                            "file": rel.as_posix(),
                            **truth.to_json(),
                            "geometry": geometry.to_json(),
                            "storage": storage.to_json(),
                            "lesion_mask_file": mask_rel.as_posix(),
                            "lung_mask_file": lung_rel.as_posix(),
                        }
                    },
                }
            },
        }
    write_truth(out_dir, KIND, seed, studies, n=n, labels=list(LABELS))
    return written
