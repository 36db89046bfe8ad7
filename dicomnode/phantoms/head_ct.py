"""Synthetic head CT (and the head anatomy shared with the brain MR phantom).

A head is an analytic model in its own frame (mm; x to the patient's left, y posterior,
z superior, origin near the centre of the brain): nested shells for brain, CSF, skull and
scalp, a skull base with orbits and sinuses, ventricles, deep grey nuclei and a cortex
folded by a smooth random field. A scan samples that model on a voxel grid through a
rigid pose, so one patient's anatomy can be imaged any number of times (CT, MR,
follow-ups) at any position, tilt, slice count and thickness and stay the same patient.

Lesions are star-shaped regions around a centre. They are painted onto the tissue labels
after the anatomy, only where tissue can host them (a metastasis never grows into bone),
and their voxel masks are exactly the painted voxels, so masks and images cannot
disagree. A lesion may instead be given a target volume, in which case the threshold of
its shape is chosen on the actual grid so that the mask holds exactly that volume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
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
    sample_value_noise,
    save_dataset,
    save_mask,
    study_datetime,
    value_noise_grid,
    write_truth,
)

KIND = "head-ct"
CODE = "HCT"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LABELS = ("normal", "metastasis")
CT_LESION_KINDS = ("ring", "solid", "hypodense")
#: Below this diameter a metastasis drawn as "ring" or "hypodense" is painted "solid" (an
#: enhancing nodule) when "solid" is among the allowed kinds. Both kinds are lesions with a
#: necrotic or cystic centre: a ring of enhancement round it, or (hypodense, non-enhancing)
#: the centre with too thin a rim to see. Small metastases on contrast CT are solid
#: enhancing nodules; a sub-centimetre lesion that does not enhance is not a CT finding
#: (MRI finds those). Until metastasis-ct 0.5.0 only "ring" was turned, so a hypodense
#: lesion could be 3 mm: 10-20 HU below white matter, 1-3 px at the model's 128 px, the
#: size and darkness of a sulcus; patients with only such lesions were labelled positive
#: from a mask the image barely shows. Turning the kind consumes no random draw, so no
#: other lesion, and no other phantom, changes.
NECROTIC_MIN_DIAMETER_MM = 8.0

F32 = NDArray[np.float32]
Box = tuple[slice, slice, slice]


class Tissue(IntEnum):
    """Voxel classes of the head model; lesion classes start at 20."""

    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    CORTICAL_BONE = 4
    DIPLOE = 5
    CSF = 6
    GREY = 7
    WHITE = 8
    DEEP_GREY = 9
    VENTRICLE = 10
    SINUS_AIR = 11
    ORBIT_FAT = 12
    GLOBE = 13
    VENOUS_SINUS = 14
    FALX = 15
    CALCIFICATION = 16
    HEADREST = 17
    ENHANCING = 20
    NECROSIS = 21
    NONENHANCING = 22
    OEDEMA = 23
    MENINGIOMA = 24
    DURAL_TAIL = 25


N_TISSUES = 26
BRAIN_TISSUES = (Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY)
INTRACRANIAL = (
    Tissue.CSF,
    Tissue.GREY,
    Tissue.WHITE,
    Tissue.DEEP_GREY,
    Tissue.VENTRICLE,
    Tissue.VENOUS_SINUS,
    Tissue.FALX,
)

_NOISE_ORIGIN = -130.0  # head-frame mm of lattice index 0 (canonical units)
_NOISE_CELL = 5.0


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True, eq=False)
class HeadAnatomy:
    """One synthetic patient's head; everything a scan needs to image it."""

    scale: float
    brain_axes: tuple[float, float, float]
    csf_gap: float
    skull_thickness: float
    scalp_thickness: float
    floor_z: tuple[float, float, float]  # anterior, middle, posterior cranial fossa
    ventricle_scale: float
    pineal_calcified: bool
    choroid_calcified: bool
    gyri: NDArray[np.float32] = field(repr=False)
    gyri2: NDArray[np.float32] = field(repr=False)
    bone: NDArray[np.float32] = field(repr=False)


def make_head_anatomy(rng: np.random.Generator) -> HeadAnatomy:
    """Draw a head: size, brain shape, atrophy (CSF gap, ventricles), skull, folding."""
    n = int(260 / _NOISE_CELL) + 2
    return HeadAnatomy(
        scale=float(rng.uniform(0.9, 1.1)),
        brain_axes=(
            66.0 * float(rng.uniform(0.95, 1.05)),
            84.0 * float(rng.uniform(0.95, 1.05)),
            58.0 * float(rng.uniform(0.95, 1.05)),
        ),
        csf_gap=float(rng.uniform(1.5, 4.0)),
        skull_thickness=float(rng.uniform(5.0, 8.0)),
        scalp_thickness=float(rng.uniform(4.0, 7.0)),
        floor_z=(
            -28.0 + float(rng.normal(0, 2)),
            -46.0 + float(rng.normal(0, 2)),
            -56.0 + float(rng.normal(0, 2)),
        ),
        ventricle_scale=float(rng.uniform(0.75, 1.5)),
        pineal_calcified=bool(rng.random() < 0.5),
        choroid_calcified=bool(rng.random() < 0.4),
        gyri=value_noise_grid(rng, (n, n, n)),
        gyri2=value_noise_grid(rng, (n, n, n)),
        bone=value_noise_grid(rng, (n, n, n)),
    )


def _noise(grid: NDArray[np.float32], x: F32, y: F32, z: F32, cell: float = _NOISE_CELL) -> F32:
    return sample_value_noise(
        grid, ((z - _NOISE_ORIGIN) / cell, (y - _NOISE_ORIGIN) / cell, (x - _NOISE_ORIGIN) / cell)
    )


def _folding(a: HeadAnatomy, x: F32, y: F32, z: F32) -> F32:
    """Two offset lattices averaged: hides the lattice creases of linear value noise."""
    h = _NOISE_CELL / 2
    return (0.7 * (_noise(a.gyri, x, y, z) + _noise(a.gyri2, x + h, y + h, z + h))).astype(
        np.float32
    )


def _sig(x: F32) -> F32:
    return np.asarray(0.5 + 0.5 * np.tanh(0.5 * x), dtype=np.float32)


def _in_ellipsoid(
    x: F32, y: F32, z: F32, c: Sequence[float], ax: Sequence[float]
) -> NDArray[np.bool_]:
    q = ((x - c[0]) / ax[0]) ** 2 + ((y - c[1]) / ax[1]) ** 2 + ((z - c[2]) / ax[2]) ** 2
    return np.asarray(q < 1.0, dtype=bool)


def brain_depth(a: HeadAnatomy, x: F32, y: F32, z: F32) -> tuple[F32, F32]:
    """(signed ray distance to the brain ellipsoid, same with the cranial floor), canonical mm.

    Negative inside. The ray distance (along the line to the centre) is not Euclidean but
    is close for a near-spherical shape and costs a handful of operations per voxel.
    """
    bx, by, bz = a.brain_axes
    r = np.sqrt((x / bx) ** 2 + (y / by) ** 2 + (z / bz) ** 2)
    norm = np.sqrt(x * x + y * y + z * z)
    d = np.where(r > 1e-3, norm - norm / np.maximum(r, 1e-3), -min(a.brain_axes)).astype(np.float32)
    fa, fm, fp = a.floor_z
    zf = fa + (fm - fa) * _sig((y + 25.0) / 4.0) + (fp - fm) * _sig((y - 15.0) / 4.0)
    return d, np.maximum(d, zf - z).astype(np.float32)


def head_labels(a: HeadAnatomy, hx: F32, hy: F32, hz: F32) -> NDArray[np.uint8]:
    """Tissue class of each head-frame point (mm, any array shape)."""
    shape = hx.shape
    s = a.scale
    x = (hx / s).ravel().astype(np.float32)
    y = (hy / s).ravel().astype(np.float32)
    z = (hz / s).ravel().astype(np.float32)
    out = np.zeros(x.shape, dtype=np.uint8)
    g, tsk, tsc = a.csf_gap, a.skull_thickness, a.scalp_thickness
    d, db = brain_depth(a, x, y, z)

    face = _in_ellipsoid(x, y, z, (0.0, -42.0, -55.0), (58.0, 52.0, 40.0))
    neck = ((x / 52.0) ** 2 + ((y - 10.0) / 58.0) ** 2 < 1.0) & (z < -40.0)
    inside = (d < g + tsk + tsc) | face | neck
    idx = np.flatnonzero(inside)
    x, y, z, d, db = x[idx], y[idx], z[idx], d[idx], db[idx]
    lab = np.full(idx.shape, Tissue.MUSCLE, dtype=np.uint8)

    sc = d - (g + tsk)
    scalp = sc >= 0.0
    lab[scalp] = Tissue.FAT
    lab[scalp & ((sc > tsc - 1.5) | (sc < 1.0))] = Tissue.SKIN

    near_bone = (d < g + tsk + 0.5) & (db > g - 0.5)
    bi = np.flatnonzero(near_bone)
    t_local = tsk * (1.0 + 0.22 * _noise(a.bone, x[bi], y[bi], z[bi], 9.0))
    shell = (d[bi] >= g) & (d[bi] < g + t_local)
    base = (d[bi] < g) & (db[bi] >= g) & (db[bi] < g + 8.0)
    depth_in_bone = np.where(
        shell, np.minimum(d[bi] - g, g + t_local - d[bi]), np.minimum(db[bi] - g, g + 8.0 - db[bi])
    )
    is_bone = shell | base
    lab[bi[is_bone]] = np.where(
        depth_in_bone[is_bone] < 1.7, Tissue.CORTICAL_BONE, Tissue.DIPLOE
    ).astype(np.uint8)
    lab[bi[(d[bi] >= g + t_local) & (d[bi] < g + tsk + 0.5)]] = Tissue.FAT

    # Skull base and face: orbits, globes, sinuses, petrous ridges, cervical spine, airway.
    low = np.flatnonzero(z < -15.0)
    lx, ly, lz = x[low], y[low], z[low]
    notbrain = db[low] > 1.0
    for sx in (-1.0, 1.0):
        lab[
            low[_in_ellipsoid(lx, ly, lz, (sx * 30.0, -64.0, -40.0), (15.0, 21.0, 13.0)) & notbrain]
        ] = Tissue.ORBIT_FAT
        rot_x = 0.77 * (lx - sx * 28.0) + sx * 0.64 * (ly - 8.0)
        rot_y = -sx * 0.64 * (lx - sx * 28.0) + 0.77 * (ly - 8.0)
        petrous = (rot_x / 7.0) ** 2 + (rot_y / 24.0) ** 2 + ((lz + 50.0) / 6.0) ** 2 < 1.0
        lab[low[petrous & notbrain]] = Tissue.CORTICAL_BONE
        lab[low[_in_ellipsoid(lx, ly, lz, (sx * 24.0, -55.0, -68.0), (13.0, 14.0, 14.0))]] = (
            Tissue.SINUS_AIR
        )
    lab[low[_in_ellipsoid(lx, ly, lz, (0.0, -62.0, -56.0), (9.0, 22.0, 16.0))]] = Tissue.SINUS_AIR
    lab[low[_in_ellipsoid(lx, ly, lz, (0.0, -22.0, -56.0), (11.0, 10.0, 9.0)) & notbrain]] = (
        Tissue.SINUS_AIR
    )
    neck_pts = low[lz < -45.0]
    nx, ny = x[neck_pts], y[neck_pts]
    rv = np.sqrt(nx**2 + (ny - 18.0) ** 2)
    lab[neck_pts[rv < 13.0]] = Tissue.DIPLOE
    lab[neck_pts[(rv >= 11.0) & (rv < 13.0)]] = Tissue.CORTICAL_BONE
    lab[neck_pts[(nx / 9.0) ** 2 + ((ny + 22.0) / 7.0) ** 2 < 1.0]] = Tissue.SINUS_AIR
    ay_outer = a.brain_axes[1] + g + tsk / 2
    frontal = _in_ellipsoid(x, y, z, (0.0, -ay_outer, -2.0), (13.0, 0.3 * tsk, 9.0)) & (
        lab == Tissue.DIPLOE
    )
    lab[frontal] = Tissue.SINUS_AIR

    # Intracranial contents.
    ic = np.flatnonzero(db < g)
    cx, cy, cz, cd, cdb = x[ic], y[ic], z[ic], d[ic], db[ic]
    lic = np.full(ic.shape, Tissue.CSF, dtype=np.uint8)
    br = np.flatnonzero(cdb < 0.0)
    bx_, by_, bz_, bdb = cx[br], cy[br], cz[br], cdb[br]
    fold = _folding(a, bx_, by_, bz_)
    cerebellum = (by_ > 12.0) & (bz_ < -28.0)
    wm_depth = 3.5 + 9.0 * np.clip(0.5 + 0.5 * fold, 0.0, 1.0) + 6.0 * cerebellum
    lbr = np.where(bdb < -wm_depth, Tissue.WHITE, Tissue.GREY).astype(np.uint8)
    sulcus = (fold > 0.55) & (bdb > -(1.0 + 10.0 * (fold - 0.55)))
    lbr[sulcus] = Tissue.CSF
    lbr[_in_ellipsoid(bx_, by_, bz_, (0.0, 16.0, -42.0), (12.0, 13.0, 22.0))] = Tissue.WHITE
    fissure = (np.abs(bx_) < 1.4) & ((bz_ > 12.0) | (np.abs(by_) > 50.0))
    lbr[fissure] = Tissue.CSF
    lbr[fissure & (np.abs(bx_) < 0.5)] = Tissue.FALX
    for sx in (-1.0, 1.0):
        syl = _in_ellipsoid(
            bx_, by_, bz_, (sx * (a.brain_axes[0] - 14.0), -8.0, -12.0), (4.0, 24.0, 6.0)
        )
        lbr[syl] = Tissue.CSF
        for c, ax in (
            ((sx * 11.0, 6.0, 2.0), (9.0, 13.0, 9.0)),
            ((sx * 23.0, -8.0, 2.0), (7.0, 14.0, 9.0)),
            ((sx * 13.0, -20.0, 10.0), (5.0, 8.0, 8.0)),
        ):
            lbr[_in_ellipsoid(bx_, by_, bz_, c, ax)] = Tissue.DEEP_GREY
    vs = a.ventricle_scale
    vents = [
        ((0.0, 2.0, -2.0), (1.0 + 0.8 * vs, 13.0, 8.0)),
        ((0.0, 36.0, -44.0), (6.0, 3.5, 6.0)),
    ]
    for sx in (-1.0, 1.0):
        vents += [
            ((sx * (6.0 + 2.0 * vs), 2.0, 14.0), (4.0 * vs, 26.0, 5.5 * vs)),
            ((sx * 9.0, -24.0, 10.0), (4.5 * vs, 11.0, 8.0)),
            ((sx * 17.0, 32.0, 6.0), (4.0 * vs, 12.0, 5.0 * vs)),
            ((sx * (a.brain_axes[0] - 32.0), -5.0, -18.0), (3.0 * vs, 12.0, 3.0 * vs)),
        ]
    for c, ax in vents:
        lbr[_in_ellipsoid(bx_, by_, bz_, c, ax)] = Tissue.VENTRICLE
    if a.pineal_calcified:
        lbr[_in_ellipsoid(bx_, by_, bz_, (0.0, 20.0, 2.0), (2.5, 2.5, 2.5))] = Tissue.CALCIFICATION
    if a.choroid_calcified:
        for sx in (-1.0, 1.0):
            lbr[_in_ellipsoid(bx_, by_, bz_, (sx * 17.0, 26.0, 8.0), (3.0, 3.0, 3.0))] = (
                Tissue.CALCIFICATION
            )
    lic[br] = lbr
    sss_depth = g - cd
    sss = (
        (sss_depth >= 0.0)
        & (sss_depth < 7.0)
        & (np.abs(cx) < 0.65 * (7.0 - sss_depth))
        & ((cz > -5.0) | (cy > 30.0))
    )
    lic[sss] = Tissue.VENOUS_SINUS
    lab[ic] = lic

    for sx in (-1.0, 1.0):
        lab[_in_ellipsoid(x, y, z, (sx * 30.0, -74.0, -40.0), (11.5, 11.5, 11.5))] = Tissue.GLOBE
    out[idx] = lab
    # Globes may poke through the face envelope; they are eyes, not air.
    gx, gy, gz = (hx / s).ravel(), (hy / s).ravel(), (hz / s).ravel()
    cand = np.flatnonzero((gz < -25.0) & (gz > -55.0) & (gy < -55.0) & ~inside)
    for sx in (-1.0, 1.0):
        hit = _in_ellipsoid(
            gx[cand], gy[cand], gz[cand], (sx * 30.0, -74.0, -40.0), (11.5, 11.5, 11.5)
        )
        out[cand[hit]] = Tissue.GLOBE
    return out.reshape(shape)


# --------------------------------------------------------------------------- pose and sampling


@dataclass(frozen=True)
class HeadPose:
    """Rigid placement of the head in the scanner: p_patient = R @ p_head + t (mm)."""

    rotation: tuple[tuple[float, float, float], ...]
    translation: tuple[float, float, float]
    angles_deg: tuple[float, float, float]  # pitch (about x), roll (about y), yaw (about z)

    def to_patient(self, p: Sequence[float]) -> tuple[float, float, float]:
        r = np.asarray(self.rotation)
        q = r @ np.asarray(p, dtype=float) + np.asarray(self.translation)
        return (float(q[0]), float(q[1]), float(q[2]))

    def to_json(self) -> dict[str, Any]:
        return {
            "rotation": [list(row) for row in self.rotation],
            "translation_mm": list(self.translation),
            "angles_deg": list(self.angles_deg),
        }


def _rows3(m: NDArray[np.floating[Any]]) -> tuple[tuple[float, float, float], ...]:
    return tuple((float(row[0]), float(row[1]), float(row[2])) for row in m)


def make_pose(pitch: float, roll: float, yaw: float, translation: Sequence[float]) -> HeadPose:
    a, b, c = (math.radians(v) for v in (pitch, roll, yaw))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    return HeadPose(
        rotation=_rows3(r),
        translation=(float(translation[0]), float(translation[1]), float(translation[2])),
        angles_deg=(pitch, roll, yaw),
    )


def random_pose(rng: np.random.Generator, *, tilt_scale: float = 1.0) -> HeadPose:
    """Head position and tilt as a technologist leaves it: a few mm and degrees off."""
    return make_pose(
        float(np.clip(rng.normal(0, 6), -12, 12)) * tilt_scale,
        float(np.clip(rng.normal(0, 2.5), -5, 5)) * tilt_scale,
        float(np.clip(rng.normal(0, 3), -7, 7)) * tilt_scale,
        (float(rng.uniform(-8, 8)), float(rng.uniform(-5, 15)), 0.0),
    )


def head_top_mm(a: HeadAnatomy) -> float:
    """Head-frame z of the vertex skin surface."""
    return (a.brain_axes[2] + a.csf_gap + a.skull_thickness + a.scalp_thickness) * a.scale


def scan_geometry(
    rng: np.random.Generator,
    anatomy: HeadAnatomy,
    pose: HeadPose,
    *,
    matrix: int,
    fov_mm: float,
    n_slices: int | None,
    slice_thickness_mm: float | None,
    thickness_choices: Sequence[float],
    coverage_mm: tuple[float, float],
    count_range: tuple[int, int],
) -> VolumeGeometry:
    """Axial grid: slices chosen to cover from the skull base to the vertex, as scanned."""
    thick = (
        slice_thickness_mm
        if slice_thickness_mm is not None
        else float(rng.choice(list(thickness_choices)))
    )
    if n_slices is None:
        cov = float(rng.uniform(*coverage_mm))
        n_slices = int(np.clip(round(cov / thick), *count_range))
    if n_slices < 1 or thick <= 0 or matrix < 16:
        raise ValueError("need n_slices >= 1, slice thickness > 0 and matrix >= 16")
    sp = fov_mm / matrix
    tz = pose.translation[2]
    top = tz + head_top_mm(anatomy) + float(rng.uniform(-4, 8))
    z0 = top - (n_slices - 1) * thick
    half = (matrix - 1) / 2 * sp
    return VolumeGeometry(
        shape=(n_slices, matrix, matrix),
        pixel_spacing_mm=(round(sp, 6), round(sp, 6)),
        slice_spacing_mm=thick,
        slice_thickness_mm=thick,
        origin_mm=(round(-half, 4), round(-half, 4), round(z0, 4)),
    )


class Sampler:
    """Head-frame coordinates of voxel boxes of one scan."""

    def __init__(self, geometry: VolumeGeometry, pose: HeadPose) -> None:
        self.geometry = geometry
        self.pose = pose
        self.z, self.y, self.x = geometry.axis_coordinates()
        self._r = np.asarray(pose.rotation, dtype=np.float32)
        self._t = np.asarray(pose.translation, dtype=np.float32)

    def coords(self, box: Box) -> tuple[F32, F32, F32]:
        dz = (self.z[box[0]] - self._t[2])[:, None, None]
        dy = (self.y[box[1]] - self._t[1])[None, :, None]
        dx = (self.x[box[2]] - self._t[0])[None, None, :]
        r = self._r
        hx = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz).astype(np.float32)
        hy = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz).astype(np.float32)
        hz = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz).astype(np.float32)
        return hx, hy, hz

    def box_around(self, centre_head: Sequence[float], radius_mm: float) -> Box | None:
        """Voxel box containing a head-frame sphere, or None if it misses the volume."""
        p = self.pose.to_patient(centre_head)
        k, r, c = self.geometry.voxel_of(p)
        g = self.geometry
        rk = radius_mm / g.slice_spacing_mm + 1
        rr = radius_mm / g.pixel_spacing_mm[0] + 1
        rc = radius_mm / g.pixel_spacing_mm[1] + 1
        out = []
        for centre, rad, n in ((k, rk, g.shape[0]), (r, rr, g.shape[1]), (c, rc, g.shape[2])):
            lo, hi = max(0, math.floor(centre - rad)), min(n, math.ceil(centre + rad) + 1)
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return (out[0], out[1], out[2])

    def slabs(self, max_voxels: int = 700_000) -> list[Box]:
        nz, ny, nx = self.geometry.shape
        step = max(1, max_voxels // (ny * nx))
        return [
            (slice(k, min(nz, k + step)), slice(0, ny), slice(0, nx)) for k in range(0, nz, step)
        ]


def render_labels(anatomy: HeadAnatomy, sampler: Sampler) -> NDArray[np.uint8]:
    """Tissue labels of a whole scan, computed slab by slab to bound memory."""
    out = np.zeros(sampler.geometry.shape, dtype=np.uint8)
    for box in sampler.slabs():
        out[box] = head_labels(anatomy, *sampler.coords(box))
    return out


# --------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class StarShape:
    """A star-shaped region: normalised distance g(p) = |A(p - c)| / rho(direction).

    Low-order cosine harmonics of the direction make the outline irregular (lobulated
    metastases, ragged glioblastoma) while keeping one connected region whose size is a
    single threshold on g, which is what lets a lesion grow self-similarly over time.
    """

    centre: tuple[float, float, float]
    stretch: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]
    directions: tuple[tuple[float, float, float], ...]
    amplitudes: tuple[float, ...]
    frequencies: tuple[float, ...]
    phases: tuple[float, ...]

    @property
    def max_extent(self) -> float:
        """Upper bound of |p - c| per unit of g."""
        return max(self.stretch) * math.exp(sum(abs(a) for a in self.amplitudes))

    def distance(self, hx: F32, hy: F32, hz: F32) -> F32:
        r = np.asarray(self.rotation, dtype=np.float32)
        px, py, pz = hx - self.centre[0], hy - self.centre[1], hz - self.centre[2]
        qx = (r[0, 0] * px + r[1, 0] * py + r[2, 0] * pz) / self.stretch[0]
        qy = (r[0, 1] * px + r[1, 1] * py + r[2, 1] * pz) / self.stretch[1]
        qz = (r[0, 2] * px + r[1, 2] * py + r[2, 2] * pz) / self.stretch[2]
        norm = np.sqrt(qx * qx + qy * qy + qz * qz) + np.float32(1e-6)
        log_rho = np.zeros_like(norm)
        for (dx, dy, dz), amp, freq, ph in zip(
            self.directions, self.amplitudes, self.frequencies, self.phases, strict=True
        ):
            log_rho += amp * np.cos(math.pi * freq * (qx * dx + qy * dy + qz * dz) / norm + ph)
        return np.asarray(norm / np.exp(log_rho), dtype=np.float32)


def random_star(
    rng: np.random.Generator,
    centre: Sequence[float],
    *,
    irregularity: float,
    elongation: float = 0.2,
    harmonics: int = 6,
) -> StarShape:
    """A random lesion outline: ``irregularity`` 0 is an ellipsoid, 0.25 is ragged."""
    st = np.exp(rng.uniform(-elongation, elongation, 3))
    st = st / np.prod(st) ** (1 / 3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    dirs = rng.standard_normal((harmonics, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return StarShape(
        centre=(float(centre[0]), float(centre[1]), float(centre[2])),
        stretch=(float(st[0]), float(st[1]), float(st[2])),
        rotation=_rows3(q),
        directions=_rows3(dirs),
        amplitudes=tuple(float(v) for v in rng.uniform(0.3, 1.0, harmonics) * irregularity),
        frequencies=tuple(float(v) for v in rng.uniform(1.0, 3.0, harmonics)),
        phases=tuple(float(v) for v in rng.uniform(0, 2 * math.pi, harmonics)),
    )


@dataclass(frozen=True)
class LesionSpec:
    """What to paint: a shape, a size (radius or exact volume) and internal structure.

    kind: "ring", "solid", "hypodense" (metastases), "glioblastoma" or "meningioma".
    ``hypodensity_hu`` > 0 renders a hypodense lesion that many HU below white matter
    (0 keeps the tissue table's fixed value).
    """

    lesion_id: int
    kind: str
    shape: StarShape
    radius_mm: float | None = None
    target_volume_mm3: float | None = None
    rim_mm: float = 2.0
    necrosis_fraction: float = 0.0
    oedema_factor: float = 0.0
    oedema_shape: StarShape | None = None
    enhancement_hu: float = 0.0
    dural_tail: bool = False
    hypodensity_hu: float = 0.0


@dataclass(frozen=True)
class PaintedLesion:
    """What was painted: the effective threshold and the voxel counts by compartment."""

    spec: LesionSpec
    threshold: float
    core_voxels: int
    necrosis_voxels: int
    oedema_voxels: int


def paint_lesion(
    spec: LesionSpec,
    sampler: Sampler,
    labels: NDArray[np.uint8],
    lesion_ids: NDArray[np.uint8],
    oedema: NDArray[np.bool_],
) -> PaintedLesion | None:
    """Paint one lesion into the label volume; None if it lies outside the scan."""
    host = list(INTRACRANIAL) if spec.kind == "meningioma" else [Tissue.CSF, *BRAIN_TISSUES]
    vv = sampler.geometry.voxel_volume_mm3
    if spec.target_volume_mm3 is not None:
        target = max(1, round(spec.target_volume_mm3 / vv))
        guess = (3 * spec.target_volume_mm3 / (4 * math.pi)) ** (1 / 3)
    else:
        target = 0
        guess = float(spec.radius_mm or 1.0)
    ext = 1.5 * guess * spec.shape.max_extent * max(1.0, spec.oedema_factor) + 3.0
    for _attempt in range(6):
        box = sampler.box_around(spec.shape.centre, ext)
        if box is None:
            return None
        hx, hy, hz = sampler.coords(box)
        g = spec.shape.distance(hx, hy, hz)
        lab = labels[box]
        allowed = np.isin(lab, host) & (lesion_ids[box] == 0)
        vals = g[allowed]
        if vals.size == 0:
            return None
        if target:
            if (
                vals.size < target
                or np.partition(vals, target - 1)[target - 1] > 0.9 * ext / spec.shape.max_extent
            ):
                ext *= 1.6
                continue
            thr = float(np.partition(vals, target - 1)[target - 1])
        else:
            thr = float(spec.radius_mm or 1.0)
        break
    else:
        raise ValueError(f"lesion {spec.lesion_id} cannot hold {spec.target_volume_mm3} mm3 here")
    core = allowed & (g <= thr)
    if not core.any():
        flat = np.where(allowed, g, np.inf).ravel()
        core.ravel()[int(np.argmin(flat))] = True
    new_lab = lab.copy()
    necrosis = np.zeros_like(core)
    if spec.kind == "ring":
        necrosis = core & (g <= thr - spec.rim_mm)
        new_lab[core] = Tissue.ENHANCING
    elif spec.kind == "glioblastoma":
        necrosis = core & (g <= thr * spec.necrosis_fraction)
        new_lab[core] = Tissue.ENHANCING
    elif spec.kind == "solid":
        new_lab[core] = Tissue.ENHANCING
    elif spec.kind == "hypodense":
        new_lab[core] = Tissue.NONENHANCING
    elif spec.kind == "meningioma":
        new_lab[core] = Tissue.MENINGIOMA
    else:
        raise ValueError(f"unknown lesion kind {spec.kind!r}")
    new_lab[necrosis] = Tissue.NECROSIS
    ids = lesion_ids[box]
    ids[core] = spec.lesion_id
    oed = np.zeros_like(core)
    if spec.oedema_factor > 0:
        og = (spec.oedema_shape or spec.shape).distance(hx, hy, hz)
        oed = (
            (og <= thr * spec.oedema_factor)
            & np.isin(lab, (Tissue.WHITE, Tissue.DEEP_GREY))
            & ~core
            & (ids == 0)
        )
        new_lab[oed] = Tissue.OEDEMA
        oedema[box] |= oed
    if spec.dural_tail:
        d_ratio = g / max(thr, 1e-3)
        tail = (lab == Tissue.CSF) & (d_ratio <= 1.8) & ~core
        new_lab[tail & _near(labels, box, Tissue.DIPLOE, Tissue.CORTICAL_BONE)] = Tissue.DURAL_TAIL
    labels[box] = new_lab
    return PaintedLesion(spec, thr, int(core.sum()), int(necrosis.sum()), int(oed.sum()))


def _near(labels: NDArray[np.uint8], box: Box, *tissues: Tissue) -> NDArray[np.bool_]:
    """Voxels of ``box`` within one in-plane voxel of the given tissues."""
    hit = np.isin(labels[box], tissues).astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    grown = np.stack([cv2.dilate(s, k) for s in hit]) if hit.size else hit
    return grown.astype(bool)


def lesion_voxel_summary(
    painted: PaintedLesion,
    lesion_ids: NDArray[np.uint8],
    oedema: NDArray[np.bool_],
    sampler: Sampler,
) -> dict[str, Any]:
    """JSON-ready ground truth of one painted lesion, measured from the mask itself."""
    spec = painted.spec
    box = sampler.box_around(
        spec.shape.centre,
        painted.threshold * spec.shape.max_extent * max(1.0, spec.oedema_factor) * 1.2 + 4.0,
    )
    geom = sampler.geometry
    assert box is not None
    sub = lesion_ids[box] == spec.lesion_id
    offs = (box[0].start, box[1].start, box[2].start)
    idx = np.nonzero(sub)
    centre_vox = [float(i.mean()) + o for i, o in zip(idx, offs, strict=True)]
    bb = bbox_of(sub)
    bbox = [v + offs[i % 3] for i, v in enumerate(bb)]
    count = int(sub.sum())
    return {
        "lesion_id": spec.lesion_id,
        "kind": spec.kind,
        "centre_head_mm": [round(v, 3) for v in spec.shape.centre],
        "centre_mm": [round(v, 3) for v in sampler.pose.to_patient(spec.shape.centre)],
        "centroid_voxel_zyx": [round(v, 3) for v in centre_vox],
        "bbox_voxel_zyx": bbox,
        "voxel_count": count,
        "volume_cm3": round(count * geom.voxel_volume_mm3 / 1000.0, 6),
        "necrosis_voxel_count": painted.necrosis_voxels,
        "oedema_voxel_count": painted.oedema_voxels,
        "shape_threshold_mm": round(painted.threshold, 4),
    }


# --------------------------------------------------------------------------- CT rendering

CT_HU: dict[int, float] = {
    Tissue.AIR: -1000.0,
    Tissue.SKIN: 45.0,
    Tissue.FAT: -95.0,
    Tissue.MUSCLE: 50.0,
    Tissue.CORTICAL_BONE: 1650.0,
    Tissue.DIPLOE: 820.0,
    Tissue.CSF: 6.0,
    Tissue.GREY: 40.0,
    Tissue.WHITE: 29.0,
    Tissue.DEEP_GREY: 37.0,
    Tissue.VENTRICLE: 5.0,
    Tissue.SINUS_AIR: -960.0,
    Tissue.ORBIT_FAT: -90.0,
    Tissue.GLOBE: 12.0,
    Tissue.VENOUS_SINUS: 55.0,
    Tissue.FALX: 60.0,
    Tissue.CALCIFICATION: 380.0,
    Tissue.HEADREST: 250.0,
    Tissue.ENHANCING: 45.0,
    Tissue.NECROSIS: 18.0,
    Tissue.NONENHANCING: 20.0,
    Tissue.OEDEMA: 18.0,
    Tissue.MENINGIOMA: 50.0,
    Tissue.DURAL_TAIL: 45.0,
}

CT_HU_CONTRAST_OVERRIDES: dict[int, float] = {
    Tissue.VENOUS_SINUS: 170.0,
    Tissue.FALX: 80.0,
    Tissue.MENINGIOMA: 95.0,
    Tissue.DURAL_TAIL: 100.0,
}


def _ct_table(rng: np.random.Generator, contrast: bool) -> NDArray[np.float32]:
    table = np.zeros(N_TISSUES, dtype=np.float32)
    for t, v in CT_HU.items():
        table[t] = v
    if contrast:
        for t, v in CT_HU_CONTRAST_OVERRIDES.items():
            table[t] = v
    table[Tissue.CORTICAL_BONE] = float(rng.uniform(1400, 1900))
    table[Tissue.DIPLOE] = float(rng.uniform(650, 1000))
    table[Tissue.GREY] = float(rng.uniform(37, 44))
    table[Tissue.WHITE] = table[Tissue.GREY] - float(rng.uniform(8, 12))
    table[Tissue.DEEP_GREY] = table[Tissue.GREY] - 3.0
    table[Tissue.CSF] = float(rng.uniform(2, 10))
    table[Tissue.VENTRICLE] = table[Tissue.CSF] - 1.0
    table[Tissue.OEDEMA] = table[Tissue.WHITE] - float(rng.uniform(8, 14))
    offset = float(rng.normal(0, 1.5))
    table[
        [Tissue.SKIN, Tissue.MUSCLE, Tissue.CSF, Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY]
    ] += offset
    return table


def _headrest(sampler: Sampler, anatomy: HeadAnatomy, labels: NDArray[np.uint8]) -> None:
    """Curved head holder and table behind the head (scanner-fixed, not head-fixed)."""
    y, x = sampler.y, sampler.x
    tx, ty, _ = sampler.pose.translation
    back = (
        ty
        + (
            anatomy.brain_axes[1]
            + anatomy.csf_gap
            + anatomy.skull_thickness
            + anatomy.scalp_thickness
        )
        * anatomy.scale
        + 6.0
    )
    yy, xx = np.meshgrid(y, x, indexing="ij")
    curve = back + (xx - tx) ** 2 / 260.0
    shell = (yy > curve) & (yy < curve + 3.5) & (np.abs(xx - tx) < 95.0)
    table = (yy > back + 30.0) & (yy < back + 37.0)
    plane = shell | table
    for k in range(labels.shape[0]):
        sl = labels[k]
        sl[plane & (sl == Tissue.AIR)] = Tissue.HEADREST


def render_ct(
    labels: NDArray[np.uint8],
    lesion_ids: NDArray[np.uint8],
    painted: Sequence[PaintedLesion],
    geometry: VolumeGeometry,
    rng: np.random.Generator,
    *,
    contrast: bool,
    noise_hu: float,
) -> NDArray[np.int16]:
    """HU volume from labels: tissue table, per-lesion enhancement, blur, noise, FOV circle."""
    table = _ct_table(rng, contrast)
    hu = table[labels]
    brain_ref = 0.5 * (table[Tissue.GREY] + table[Tissue.WHITE])
    for p in painted:
        sel = (lesion_ids == p.spec.lesion_id) & (labels == Tissue.ENHANCING)
        enh = p.spec.enhancement_hu if contrast else 0.12 * p.spec.enhancement_hu
        hu[sel] = brain_ref + enh
        if p.spec.kind == "hypodense" and p.spec.hypodensity_hu > 0:
            low = (lesion_ids == p.spec.lesion_id) & (labels == Tissue.NONENHANCING)
            hu[low] = table[Tissue.WHITE] - p.spec.hypodensity_hu
        if p.spec.kind in ("ring", "glioblastoma"):
            nec = (lesion_ids == p.spec.lesion_id) & (labels == Tissue.NECROSIS)
            hu[nec] = table[Tissue.NECROSIS] + float(rng.uniform(-4, 6))
    sp = geometry.pixel_spacing_mm[0]
    sigma = 0.45 / sp
    nz, ny, nx = labels.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    outside = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > (min(ny, nx) / 2) ** 2
    out = np.empty(labels.shape, dtype=np.int16)
    for k in range(nz):
        sl = cv2.GaussianBlur(hu[k], (0, 0), sigma) if sigma > 0.3 else hu[k]
        grain = cv2.GaussianBlur(rng.standard_normal((ny, nx), dtype=np.float32), (0, 0), 0.7)
        sl = sl + grain * (noise_hu / 0.4)
        sl[outside] = -1024.0
        out[k] = np.clip(np.rint(sl), -1024, 3071).astype(np.int16)
    return out


# --------------------------------------------------------------------------- head CT phantom


@dataclass(frozen=True, eq=False)
class HeadCtTruth:
    """Ground truth of one head CT: label, lesions, and voxel masks aligned with the volume."""

    label: str
    contrast: bool
    noise_hu: float
    lesions: tuple[dict[str, Any], ...]
    lesion_mask: NDArray[np.uint8]  # lesion id per voxel (enhancing, necrotic or hypodense)
    oedema_mask: NDArray[np.bool_]
    tissue_labels: NDArray[np.uint8]  # Tissue per voxel
    pose: HeadPose

    @property
    def slice_labels(self) -> tuple[bool, ...]:
        """Whether each slice contains lesion voxels (for slice-level training)."""
        return tuple(
            bool(v)
            for v in np.asarray(self.lesion_mask.reshape(self.lesion_mask.shape[0], -1).any(axis=1))
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "contrast": self.contrast,
            "noise_hu": round(self.noise_hu, 3),
            "lesions": list(self.lesions),
            "pose": self.pose.to_json(),
            "slice_labels": [int(v) for v in self.slice_labels],
        }


def _place_metastases(
    rng: np.random.Generator,
    anatomy: HeadAnatomy,
    n: int,
    diameters: Sequence[float],
    pose: HeadPose,
    z_range: tuple[float, float],
) -> list[tuple[float, float, float]]:
    """Centres at the grey-white junction (where metastases seed), not overlapping,
    inside the scanned slab (patient z within ``z_range``)."""
    centres: list[tuple[float, float, float]] = []
    rz = np.asarray(pose.rotation[2], dtype=np.float32)
    s = anatomy.scale
    bx, by, bz = anatomy.brain_axes
    for i in range(n):
        for _ in range(40):
            cand = rng.uniform(-1, 1, (256, 3)).astype(np.float32) * np.array(
                [bx, by, bz], np.float32
            )
            cand[:, 2] = np.abs(cand[:, 2]) * 0.9 - 10.0
            x, y, z = cand[:, 0], cand[:, 1], cand[:, 2]
            _, db = brain_depth(anatomy, x, y, z)
            lab = head_labels(anatomy, x * s, y * s, z * s)
            pz = (rz[0] * x + rz[1] * y + rz[2] * z) * s + pose.translation[2]
            margin = diameters[i] / 2 + 1.0
            ok = (
                (db < -3.0 - diameters[i] / 4)
                & (db > -28.0)
                & np.isin(lab, (Tissue.GREY, Tissue.WHITE))
            )
            ok &= (pz > z_range[0] + margin) & (pz < z_range[1] - margin)
            for j in np.flatnonzero(ok):
                c = (float(x[j] * s), float(y[j] * s), float(z[j] * s))
                if all(math.dist(c, o) > (diameters[i] + 12.0) for o in centres):
                    centres.append(c)
                    break
            else:
                continue
            break
        else:
            raise RuntimeError("could not place a metastasis")
    return centres


def hypodensity_from(spec: LesionSpec) -> float:
    """How far below white matter a hypodense metastasis is rendered: 10-20 HU.

    Hypodense (non-enhancing, cystic or necrotic) metastases on CT are typically 10-20 HU
    below white matter; the fixed 20 HU of the tissue table put them only 5-16 HU below
    (white matter 25-36 HU), under 3-8 HU noise, so most were invisible at 128 px. The
    value is mapped from the lesion's enhancement draw (uniform 50-120 HU, unused for a
    hypodense lesion), so no random stream, and no other phantom, changes.
    """
    return 10.0 + 10.0 * min(max((spec.enhancement_hu - 50.0) / 70.0, 0.0), 1.0)


def make_head_ct(
    rng: np.random.Generator,
    *,
    label: str | None = None,
    p_metastasis: float = 0.5,
    n_lesions: int | None = None,
    max_lesions: int = 5,
    lesion_kinds: Sequence[str] | None = None,
    diameter_range_mm: tuple[float, float] = (3.0, 30.0),
    matrix: int = 256,
    n_slices: int | None = None,
    slice_thickness_mm: float | None = None,
    contrast: bool = True,
    noise_hu: float | None = None,
    anatomy: HeadAnatomy | None = None,
    pose: HeadPose | None = None,
) -> tuple[NDArray[np.int16], VolumeGeometry, HeadCtTruth]:
    """One head CT in HU, (slice, row, column) with slices inferior to superior.

    Metastases (label "metastasis"): ``n_lesions`` (default 1..``max_lesions``, mostly
    1-3) of ``lesion_kinds`` ("ring", "solid", "hypodense"), diameters log-uniform in
    ``diameter_range_mm``; enhancing ones are +50..+120 HU over brain with contrast.
    """
    if label is None:
        label = "metastasis" if rng.random() < p_metastasis else "normal"
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}")
    kinds = tuple(lesion_kinds or CT_LESION_KINDS)
    if any(k not in CT_LESION_KINDS for k in kinds):
        raise ValueError(f"lesion kinds must be among {CT_LESION_KINDS}")
    anatomy = anatomy or make_head_anatomy(rng)
    pose = pose or random_pose(rng)
    geometry = scan_geometry(
        rng,
        anatomy,
        pose,
        matrix=matrix,
        fov_mm=float(rng.uniform(200, 250)),
        n_slices=n_slices,
        slice_thickness_mm=slice_thickness_mm,
        thickness_choices=(2.5, 3.0, 4.0, 5.0),
        coverage_mm=(110.0, 170.0),
        count_range=(24, 60),
    )
    noise = noise_hu if noise_hu is not None else float(rng.uniform(3, 8))
    sampler = Sampler(geometry, pose)
    labels = render_labels(anatomy, sampler)
    _headrest(sampler, anatomy, labels)
    lesion_ids = np.zeros(geometry.shape, dtype=np.uint8)
    oedema = np.zeros(geometry.shape, dtype=bool)
    painted: list[PaintedLesion] = []
    if label == "metastasis":
        count = (
            n_lesions
            if n_lesions is not None
            else int(min(max_lesions, 1 + rng.choice(5, p=[0.45, 0.25, 0.15, 0.1, 0.05])))
        )
        if count < 1:
            raise ValueError("a metastasis study needs at least one lesion")
        lo, hi = diameter_range_mm
        diam = [float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(count)]
        z_range = (geometry.origin_mm[2], geometry.point_of((geometry.shape[0] - 1, 0, 0))[2])
        centres = _place_metastases(rng, anatomy, count, diam, pose, z_range)
        for i, (dmm, c) in enumerate(zip(diam, centres, strict=True), start=1):
            kind = str(rng.choice(kinds))
            if kind in ("ring", "hypodense") and dmm < NECROTIC_MIN_DIAMETER_MM:
                kind = "solid" if "solid" in kinds else kind
            p_oed = 0.25 + 0.65 * (dmm - lo) / max(hi - lo, 1e-6)
            spec = LesionSpec(
                lesion_id=i,
                kind=kind,
                shape=random_star(rng, c, irregularity=0.08, elongation=0.15),
                radius_mm=dmm / 2,
                rim_mm=float(rng.uniform(1.5, 3.0)),
                oedema_factor=float(rng.uniform(1.6, 3.0)) if rng.random() < p_oed else 0.0,
                oedema_shape=random_star(rng, c, irregularity=0.25, elongation=0.3),
                enhancement_hu=float(rng.uniform(50, 120)),
            )
            if kind == "hypodense":
                spec = dataclasses.replace(spec, hypodensity_hu=hypodensity_from(spec))
            p = paint_lesion(spec, sampler, labels, lesion_ids, oedema)
            if p is not None:
                painted.append(p)
    hu = render_ct(labels, lesion_ids, painted, geometry, rng, contrast=contrast, noise_hu=noise)
    lesions = tuple(
        {
            **lesion_voxel_summary(p, lesion_ids, oedema, sampler),
            "diameter_mm": round(2 * float(p.spec.radius_mm or 0.0), 3),
            "enhancement_hu": round(p.spec.enhancement_hu, 2)
            if p.spec.kind != "hypodense"
            else 0.0,
            **({"hypodensity_hu": round(p.spec.hypodensity_hu, 2)}
               if p.spec.kind == "hypodense" else {}),
        }
        for p in painted
    )
    truth = HeadCtTruth(
        label=label if painted or label == "normal" else "normal",
        contrast=contrast,
        noise_hu=noise,
        lesions=lesions,
        lesion_mask=lesion_ids,
        oedema_mask=oedema,
        tissue_labels=labels,
        pose=pose,
    )
    return hu, geometry, truth


def head_ct_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of study ``index`` in a set made with ``seed`` (as the writer uses)."""
    return item_rng(KIND, seed, index, "volume")


# --------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class CtStorage:
    """Pixel encoding: RescaleIntercept -1024 and slope 1 always; signed or unsigned words."""

    pixel_representation: int  # 0: uint16 (BitsStored 12), 1: int16 (BitsStored 16)

    @property
    def bits_stored(self) -> int:
        return 12 if self.pixel_representation == 0 else 16


def build_ct_slices(
    hu: NDArray[np.int16],
    geometry: VolumeGeometry,
    study: StudyContext,
    series: SeriesContext,
    storage: CtStorage,
    *,
    uid_parts: Sequence[str | int],
    contrast: bool,
    kvp: float,
    convolution_kernel: str = "H30s",
) -> list[tuple[str, FileDataset]]:
    """One CT Image Storage instance per slice: (SOPInstanceUID, dataset)."""
    out: list[tuple[str, FileDataset]] = []
    nz = geometry.shape[0]
    wc, ww = [40, 600], [80, 2800]
    for k in range(nz):
        uid = phantom_uid(*uid_parts, "slice", k)
        ds = new_dataset(CT_IMAGE_STORAGE, uid)
        fill_common_modules(ds, study, series)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
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
        ds.KVP = kvp
        ds.XRayTubeCurrent = 250
        ds.ExposureTime = 1000
        ds.ConvolutionKernel = convolution_kernel
        ds.GantryDetectorTilt = 0
        ds.RotationDirection = "CW"
        ds.DataCollectionDiameter = 500
        ds.ReconstructionDiameter = round(geometry.pixel_spacing_mm[1] * geometry.shape[2], 3)
        ds.ContrastBolusAgent = "IODINATED CONTRAST" if contrast else ""
        if contrast:
            ds.ContrastBolusRoute = "IV"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[2]
        ds.BitsAllocated = 16
        ds.BitsStored = storage.bits_stored
        ds.HighBit = storage.bits_stored - 1
        ds.PixelRepresentation = storage.pixel_representation
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = wc
        ds.WindowWidth = ww
        ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"]
        sv = hu[k].astype(np.int32) + 1024
        if storage.pixel_representation == 0:
            ds.PixelData = np.clip(sv, 0, 4095).astype("<u2").tobytes()
        else:
            ds.PixelData = sv.astype("<i2").tobytes()
        out.append((uid, ds))
    return out


def write_head_ct_study(
    out_dir: Path,
    *,
    n: int,
    seed: int,
    metastasis_fraction: float = 0.5,
    matrix: int = 512,
    contrast: bool = True,
    pixel_representation: int | None = None,
    n_slices: int | None = None,
    slice_thickness_mm: float | None = None,
    max_lesions: int = 5,
) -> list[Path]:
    """Write ``n`` head CT studies (one patient, one axial series each) plus truth.json.

    Labels are balanced to ``metastasis_fraction``; masks are written as NIfTI in the
    DICOM frame. ``pixel_representation`` None alternates uint16/int16 storage by draw.
    """
    out_dir = Path(out_dir)
    labels = balanced_labels(
        item_rng(KIND, seed, 0, "labels", n),
        n,
        LABELS,
        (1 - metastasis_fraction, metastasis_fraction),
    )
    written: list[Path] = []
    studies: dict[str, Any] = {}
    for i in range(n):
        meta = item_rng(KIND, seed, i, "meta")
        ident = make_identity(CODE, seed, i, meta)
        date, time = study_datetime(meta)
        hu, geometry, truth = make_head_ct(
            head_ct_rng(seed, i),
            label=labels[i],
            matrix=matrix,
            contrast=contrast,
            n_slices=n_slices,
            slice_thickness_mm=slice_thickness_mm,
            max_lesions=max_lesions,
        )
        pr = pixel_representation if pixel_representation is not None else int(meta.integers(0, 2))
        desc = "Head CT with contrast" if contrast else "Head CT without contrast"
        study = StudyContext(
            identity=ident,
            study_instance_uid=phantom_uid(KIND, seed, i, "study"),
            study_date=date,
            study_time=time,
            accession_number=f"PHHCT{seed % 100000:05d}{i:05d}",
            study_id=f"{i + 1}",
            study_description=("CT HEAD W CONTRAST" if contrast else "CT HEAD WO CONTRAST"),
        )
        series = SeriesContext(
            series_instance_uid=phantom_uid(KIND, seed, i, "series"),
            modality="CT",
            series_number=2,
            series_description=desc,
            body_part_examined="HEAD",
            model_name="phantom-head-ct",
            frame_of_reference_uid=phantom_uid(KIND, seed, i, "frame"),
        )
        slices = build_ct_slices(
            hu,
            geometry,
            study,
            series,
            CtStorage(pr),
            uid_parts=(KIND, seed, i),
            contrast=contrast,
            kvp=float(meta.choice([100.0, 120.0])),
        )
        folder = Path(ident.patient_id) / "CT"
        instances: dict[str, Any] = {}
        slice_labels = truth.slice_labels
        for k, (uid, ds) in enumerate(slices):
            rel = folder / f"IM{k + 1:04d}.dcm"
            written.append(save_dataset(ds, out_dir / rel))
            present = sorted({int(v) for v in np.unique(truth.lesion_mask[k]) if v})
            instances[uid] = {
                "file": rel.as_posix(),
                "slice_index": k,
                "label": int(slice_labels[k]),
                "lesion_ids": present,
            }
        spacing = (
            geometry.pixel_spacing_mm[1],
            geometry.pixel_spacing_mm[0],
            geometry.slice_spacing_mm,
        )
        mask_rel = Path("masks") / f"{ident.patient_id}_lesions.nii.gz"
        oed_rel = Path("masks") / f"{ident.patient_id}_oedema.nii.gz"
        save_mask(
            truth.lesion_mask,
            out_dir / mask_rel,
            spacing_xyz=spacing,
            origin_xyz=geometry.origin_mm,
        )
        save_mask(
            truth.oedema_mask, out_dir / oed_rel, spacing_xyz=spacing, origin_xyz=geometry.origin_mm
        )
        studies[study.study_instance_uid] = {
            "patient_id": ident.patient_id,
            "label": truth.label,
            "series": {
                series.series_instance_uid: {
                    "modality": "CT",
                    **truth.to_json(),
                    "geometry": geometry.to_json(),
                    "pixel_representation": pr,
                    "lesion_mask_file": mask_rel.as_posix(),
                    "oedema_mask_file": oed_rel.as_posix(),
                    "instances": instances,
                }
            },
        }
    write_truth(out_dir, KIND, seed, studies, n=n, labels=list(LABELS))
    return written
