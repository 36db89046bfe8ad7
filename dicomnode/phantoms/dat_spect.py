"""Synthetic 123I-ioflupane (DaTscan) SPECT studies with ground truth, written as real DICOM.

Why phantoms: the only data the project had for DaT-SPECT was 37 subjects, too few to
train or even to test a learned model. A phantom whose every number is known lets the
quantification (``dicomnode.pipelines.dat_quant``) be measured against truth, on as many
studies as we like, in any acquisition geometry.

The model
---------
Activity is built in an *anatomical frame* (millimetres, DICOM LPS axes: +x patient left,
+y posterior, +z superior; the origin is a point between the two striata) and then placed
in the scanner with a similarity transform ``p = c + s * R @ a`` (anatomical scale ``s``,
in-plane rotation "yaw" about z, tilt "pitch" about x, "roll" about y, and a shift).

* Head (scalp, skull, soft tissue): an ellipsoid shell at 0.3 x the brain background.
* Brain: an ellipsoid of uniform non-specific uptake 1.0 (the reference level), with
  the lateral ventricles (CSF, 0.45) medial to the caudate heads.
* Striata, per side: caudate = head (ellipsoid) + body (a tapering tube curving back
  and up along the ventricle); putamen = an elongated ellipsoid angled ~18 degrees so
  that its posterior end is lateral. Together they form the healthy "comma".
* Specific binding is added on top of the background. Healthy subjects vary by an
  individual factor (age, biology) and +-3 % left/right. PD-like subjects lose binding
  in the putamen first (to 12-45 % of normal on the worse side, the other side less),
  with a posterior-to-anterior gradient (posterior putamen lowest), and milder caudate
  loss; one side is worse.
* Each subject's anatomy varies (global scale 0.92-1.08, structure positions +-~2 mm,
  sizes +-10 %, putamen angle +-4 degrees, brain shape), so a fixed template never fits
  exactly, as with real patients.
* Imaging: isotropic Gaussian resolution of 8-10.5 mm FWHM (collimator, scatter and
  reconstruction filter together, applied as a separable Gaussian), expected counts
  of 600-1800 counts/mL in the brain background, then Poisson noise. Voxels are
  3.3-4.4 mm, the matrix is 64 or 128, and there are 48-96 slices.

Ground truth
------------
Two kinds of number are recorded in :class:`DatTruth`:

``tissue_sbr``
    The concentration ratios used to build the phantom:
    (mean concentration in the region - background) / background. This is the
    *biological* binding; an image-based method cannot recover it without partial-volume
    correction, because blurring an 11 mm wide putamen with a 9 mm FWHM kernel spreads most
    of its counts outside it.

``sbr`` (the acceptance target)
    The *image-domain* specific binding ratio, which is what DaTQUANT, BRASS and the EANM
    guidelines report: (mean counts in the region - mean counts in the reference region)
    / mean counts in the reference region, where the means are taken over the **true**
    region masks (occupancy-weighted: each voxel counts by the fraction of it inside the
    structure, found by 3x3x3 supersampling) on the **noise-free** blurred volume, and the
    reference region is an ellipsoidal posterior-brain (occipital) volume well away from
    the striata and the brain surface. It is what a perfect image-based method with
    perfectly placed anatomical VOIs would measure; the remaining error of a real method
    is then VOI placement and noise, which is what we want to measure. Striatum = caudate
    and putamen together. The derived ratios follow the same definitions as the
    quantification: ``putamen_caudate_ratio`` = mean putamen SBR / mean caudate SBR
    (the two sides averaged first), ``asymmetry_index_*`` = |L - R| / ((L + R) / 2) * 100.

The ``call`` is the clinical label the phantom was built with: ``healthy`` subjects are
"normal" and ``pd`` subjects "reduced". The populations are separated on the worse
putamen (at most 45 % of normal binding in PD, at least ~75 % in healthy subjects; the
better PD side keeps up to 70 %), as clinical DaT loss at symptom onset is already
40-60 % in the posterior putamen. Borderline ("scans without evidence of dopaminergic
deficit", early unilateral disease) are deliberately not simulated.

DICOM
-----
``write_dat_study`` writes each phantom as its own synthetic patient and study, either as
one NM Image Storage object with the slices as frames (``RECON TOMO``, the way gamma
camera workstations export reconstructions) or as one single-frame NM object per slice.
Every UID comes from ``generate_uid`` with entropy from the seed, the phantom index and
the object's role, and dates are derived from the seed, so the same seed writes the same
bytes. Patients are obviously synthetic (``PHANTOM^DAT^0007``, ID ``PHANTOM-DAT-<seed>-
<index>``). Slices are transaxial (ImageOrientationPatient 1\0\0\0\1\0, in the Detector
Information Sequence as NM requires), frames run inferior to superior along the slice
normal from the first frame's ImagePositionPatient, and pixels are unsigned 16-bit counts
(no rescale needed). The radiopharmaceutical is coded as SCT 429296007 "Ioflupane I^123^" (DICOM
CID 25) and the radionuclide as SCT 21572004 "^123^Iodine" (CID 18).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

FloatArray = NDArray[np.float64]

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
REGION_KEYS: tuple[str, ...] = (
    "caudate_left",
    "caudate_right",
    "putamen_left",
    "putamen_right",
    "striatum_left",
    "striatum_right",
)
CONDITIONS: tuple[str, ...] = ("healthy", "pd")
SIDES: dict[str, float] = {"left": 1.0, "right": -1.0}

# Relative uptake levels (brain background = 1).
_HEAD_LEVEL = 0.3
_VENTRICLE_LEVEL = 0.45
# Specific binding (concentration ratio - 1) of a typical healthy subject.
_CAUDATE_BINDING = 9.0
_PUTAMEN_BINDING = 5.5
_SUPERSAMPLE = 3
_ENTROPY_ROOT = "dicomnode-phantom-dat-spect-v1"


@dataclass(frozen=True)
class DatTruth:
    """Ground truth of one phantom (see the module docstring for the definitions)."""

    condition: str
    call: str
    sbr: dict[str, float]
    putamen_caudate_ratio: float
    asymmetry_index_putamen: float
    asymmetry_index_caudate: float
    tissue_sbr: dict[str, float]
    worse_side: str | None
    putamen_gradient: dict[str, float]
    reference_mean_counts: float
    background_counts_per_ml: float
    fwhm_mm: float
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    anatomy_scale: float
    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    striatal_origin_mm: tuple[float, float, float]
    noise: bool


# --- geometry -------------------------------------------------------------------------


def rotation_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> FloatArray:
    """Rz(yaw) @ Rx(pitch) @ Ry(roll): yaw turns the head in the axial plane, pitch nods."""
    y, p, r = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(y), -math.sin(y), 0.0], [math.sin(y), math.cos(y), 0.0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0.0, math.cos(p), -math.sin(p)], [0.0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(r), 0.0, math.sin(r)], [0, 1, 0], [-math.sin(r), 0.0, math.cos(r)]])
    return np.asarray(rz @ rx @ ry)


def _rz(deg: float) -> FloatArray:
    return rotation_matrix(deg, 0.0, 0.0)


def _times3(v: FloatArray, m: FloatArray) -> FloatArray:
    """``v @ m`` for points (..., 3) and a 3x3 matrix without BLAS, whose threads cost far
    more than these thin products on a busy machine."""
    return np.asarray(v[..., :1] * m[0] + v[..., 1:2] * m[1] + v[..., 2:] * m[2])


@dataclass(frozen=True)
class _Ellipsoid:
    centre: tuple[float, float, float]
    axes: tuple[float, float, float]
    yaw_deg: float = 0.0

    def local(self, a: FloatArray) -> FloatArray:
        """Points (..., 3) in the ellipsoid's own frame, scaled so the surface is radius 1."""
        d = a - np.asarray(self.centre)
        if self.yaw_deg:
            d = _times3(d, _rz(self.yaw_deg))
        return np.asarray(d / np.asarray(self.axes))

    def inside(self, a: FloatArray) -> NDArray[np.bool_]:
        q = self.local(a)
        return np.asarray(np.einsum("...i,...i->...", q, q) <= 1.0)

    def soft(self, a: FloatArray, voxel_mm: float) -> FloatArray:
        """Approximate occupancy: a one-voxel linear ramp across the surface."""
        q = self.local(a)
        r = np.sqrt(np.einsum("...i,...i->...", q, q)) + 1e-9
        dist = (r - 1.0) * np.linalg.norm(q * np.asarray(self.axes), axis=-1) / r
        return np.asarray(np.clip(0.5 - dist / voxel_mm, 0.0, 1.0))


@dataclass(frozen=True)
class _Tube:
    """A tube of tapering radius along a quadratic Bezier curve (the caudate body)."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    p2: tuple[float, float, float]
    r0: float
    r2: float

    def inside(self, a: FloatArray) -> NDArray[np.bool_]:
        t = np.linspace(0.0, 1.0, 24)[:, None]
        p0, p1, p2 = (np.asarray(p) for p in (self.p0, self.p1, self.p2))
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        radius = self.r0 + (self.r2 - self.r0) * t[:, 0]
        flat = a.reshape(-1, 3)
        near = np.all(
            (flat >= curve.min(0) - radius.max()) & (flat <= curve.max(0) + radius.max()), axis=1
        )
        pts = flat[near]
        # |a - c|^2 - r^2 for every curve point c at once
        cross = pts[:, :1] * curve[:, 0] + pts[:, 1:2] * curve[:, 1] + pts[:, 2:] * curve[:, 2]
        offset = np.einsum("ij,ij->i", curve, curve) - radius**2
        margin = (offset - 2.0 * cross).min(axis=1) + np.einsum("ij,ij->i", pts, pts)
        out = np.zeros(flat.shape[0], dtype=bool)
        out[near] = margin <= 0.0
        return out.reshape(a.shape[:-1])


@dataclass(frozen=True)
class _Anatomy:
    """One subject's anatomy in the anatomical frame (mm)."""

    head: _Ellipsoid
    brain: _Ellipsoid
    ventricles: tuple[_Ellipsoid, _Ellipsoid]
    caudate_head: dict[str, _Ellipsoid]
    caudate_body: dict[str, _Tube]
    putamen: dict[str, _Ellipsoid]
    reference: _Ellipsoid


def _jitter(rng: np.random.Generator, v: tuple[float, ...], sd: float) -> tuple[float, ...]:
    return tuple(float(x + np.clip(rng.normal(0.0, sd), -2 * sd, 2 * sd)) for x in v)


def _scaled(rng: np.random.Generator, v: tuple[float, ...], spread: float) -> tuple[float, ...]:
    return tuple(float(x * rng.uniform(1 - spread, 1 + spread)) for x in v)


def _anatomy(rng: np.random.Generator | None) -> _Anatomy:
    """Mean anatomy when ``rng`` is None, else one subject drawn around it."""

    def pos(v: tuple[float, float, float], sd: float) -> tuple[float, float, float]:
        out = v if rng is None else _jitter(rng, v, sd)
        return (out[0], out[1], out[2])

    def size(v: tuple[float, float, float], spread: float) -> tuple[float, float, float]:
        out = v if rng is None else _scaled(rng, v, spread)
        return (out[0], out[1], out[2])

    def angle(v: float, spread: float) -> float:
        return v if rng is None else float(v + rng.uniform(-spread, spread))

    brain_centre = pos((0.0, 12.0, 14.0), 1.5)
    brain_axes = size((68.0, 86.0, 62.0), 0.05)
    head_axes = (brain_axes[0] + 12.0, brain_axes[1] + 12.0, brain_axes[2] + 12.0)
    caudate_head: dict[str, _Ellipsoid] = {}
    caudate_body: dict[str, _Tube] = {}
    putamen: dict[str, _Ellipsoid] = {}
    ventricles = []
    for side, sgn in SIDES.items():
        caudate_head[side] = _Ellipsoid(
            pos((sgn * 12.5, -12.0, 6.0), 1.2), size((5.5, 8.5, 9.0), 0.1)
        )
        dx, dy, dz = (0.0, 0.0, 0.0) if rng is None else _jitter(rng, (0.0, 0.0, 0.0), 1.2)
        caudate_body[side] = _Tube(
            (sgn * 12.5 + dx, -8.0 + dy, 12.0 + dz),
            (sgn * 15.0 + dx, 4.0 + dy, 20.0 + dz),
            (sgn * 18.0 + dx, 18.0 + dy, 22.0 + dz),
            4.0,
            2.5,
        )
        putamen[side] = _Ellipsoid(
            pos((sgn * 25.0, 1.0, -1.0), 1.2),
            size((5.5, 17.0, 10.0), 0.1),
            -sgn * angle(18.0, 4.0),
        )
        ventricles.append(_Ellipsoid((sgn * 6.0, -2.0, 14.0), (3.5, 16.0, 8.0)))
    return _Anatomy(
        head=_Ellipsoid(brain_centre, head_axes),
        brain=_Ellipsoid(brain_centre, brain_axes),
        ventricles=(ventricles[0], ventricles[1]),
        caudate_head=caudate_head,
        caudate_body=caudate_body,
        putamen=putamen,
        reference=_Ellipsoid((0.0, 66.0, 16.0), (28.0, 12.0, 14.0)),
    )


# --- sampling on the voxel grid -------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Anatomical frame -> patient coordinates, and the voxel grid."""

    shape: tuple[int, int, int]
    voxel_mm: float
    rotation: FloatArray
    scale: float
    origin_mm: FloatArray  # patient position of the anatomical origin

    def first_voxel_mm(self) -> FloatArray:
        """Patient (x, y, z) of voxel [0, 0, 0]; the field of view is centred on 0."""
        nz, ny, nx = self.shape
        return -0.5 * self.voxel_mm * np.array([nx - 1, ny - 1, nz - 1], dtype=float)

    def to_anatomy(self, p: FloatArray) -> FloatArray:
        return _times3(p - self.origin_mm, self.rotation) / self.scale

    def voxel_box(
        self, lo: Sequence[float], hi: Sequence[float], margin_mm: float
    ) -> tuple[slice, slice, slice]:
        """Voxel index slices (z, y, x) covering an anatomical box plus a margin."""
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        p = self.origin_mm + self.scale * corners @ self.rotation.T
        idx_lo = np.floor((p.min(0) - margin_mm - self.first_voxel_mm()) / self.voxel_mm)
        idx_hi = np.ceil((p.max(0) + margin_mm - self.first_voxel_mm()) / self.voxel_mm) + 1
        nz, ny, nx = self.shape
        sx = slice(int(max(idx_lo[0], 0)), int(min(idx_hi[0], nx)))
        sy = slice(int(max(idx_lo[1], 0)), int(min(idx_hi[1], ny)))
        sz = slice(int(max(idx_lo[2], 0)), int(min(idx_hi[2], nz)))
        return sz, sy, sx

    def points(self, box: tuple[slice, slice, slice], sub: int) -> FloatArray:
        """Anatomical coordinates of sub**3 sample points per voxel, shape (z, y, x, n, 3)."""
        sz, sy, sx = box
        first = self.first_voxel_mm()
        offsets = (np.arange(sub) + 0.5) / sub - 0.5
        xs = first[0] + self.voxel_mm * (np.arange(sx.start, sx.stop)[:, None] + offsets)
        ys = first[1] + self.voxel_mm * (np.arange(sy.start, sy.stop)[:, None] + offsets)
        zs = first[2] + self.voxel_mm * (np.arange(sz.start, sz.stop)[:, None] + offsets)
        gz, gy, gx = np.meshgrid(zs.ravel(), ys.ravel(), xs.ravel(), indexing="ij")
        p = np.stack([gx, gy, gz], axis=-1)
        nz, ny, nx = zs.shape[0], ys.shape[0], xs.shape[0]
        p = p.reshape(nz, sub, ny, sub, nx, sub, 3).transpose(0, 2, 4, 1, 3, 5, 6)
        return self.to_anatomy(p.reshape(nz, ny, nx, sub**3, 3))


def _occupancy(
    placement: _Placement,
    inside: Callable[[FloatArray], NDArray[np.bool_]],
    lo: Sequence[float],
    hi: Sequence[float],
    value: Callable[[FloatArray], FloatArray] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Fraction of each voxel inside a structure, and the mean of ``value`` over that part.

    Returns full-size arrays: occupancy, and occupancy-weighted value sum / n (so that the
    activity contributed by the structure is just the second array).
    """
    occ = np.zeros(placement.shape)
    act = np.zeros(placement.shape)
    box = placement.voxel_box(lo, hi, margin_mm=placement.voxel_mm)
    a = placement.points(box, _SUPERSAMPLE)
    mask = inside(a)
    occ[box] = mask.mean(axis=-1)
    act[box] = (mask * (value(a) if value is not None else 1.0)).mean(axis=-1)
    return occ, act


def _ellipsoid_bounds(e: _Ellipsoid) -> tuple[list[float], list[float]]:
    r = max(e.axes)
    return [c - r for c in e.centre], [c + r for c in e.centre]


def _tube_bounds(t: _Tube) -> tuple[list[float], list[float]]:
    pts = np.array([t.p0, t.p1, t.p2])
    r = max(t.r0, t.r2)
    return list(pts.min(0) - r), list(pts.max(0) + r)


def gaussian_blur(volume: FloatArray, sigma_vox: Sequence[float]) -> FloatArray:
    """Separable Gaussian with zero padding (matrix products, no scipy).

    Each axis is convolved by multiplying with a banded Toeplitz matrix; kernel weights are
    normalised over the infinite grid, so counts that blur past the array edge are lost,
    as they would be outside a scanner's field of view.
    """
    out = np.asarray(volume, dtype=np.float64)
    for axis, sigma in enumerate(sigma_vox):
        n = out.shape[axis]
        idx = np.arange(n)
        d = idx[:, None] - idx[None, :]
        radius = math.ceil(4 * sigma)
        k = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= radius)
        k /= np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        out = np.moveaxis(np.tensordot(k, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out


# --- binding model --------------------------------------------------------------------


@dataclass(frozen=True)
class _Binding:
    caudate: dict[str, float]  # specific binding (concentration ratio - 1)
    putamen: dict[str, float]  # volume mean
    gradient: dict[str, float]  # posterior loss fraction g: posterior end = (1 - g) * anterior


def _binding(
    rng: np.random.Generator, condition: str, worse_side: str | None
) -> tuple[_Binding, str | None]:
    """Specific binding per structure; draws the same numbers whatever the condition."""
    individual = rng.uniform(0.8, 1.15)
    asym = {side: float(1 + np.clip(rng.normal(0, 0.03), -0.06, 0.06)) for side in SIDES}
    healthy_gradient = {s: float(rng.uniform(0.0, 0.15)) for s in SIDES}
    drawn_worse = "left" if rng.random() < 0.5 else "right"
    put_worse = float(rng.uniform(0.12, 0.45))
    put_gap = float(rng.uniform(0.1, 0.35))
    cau_worse = float(rng.uniform(0.5, 0.9))
    cau_gap = float(rng.uniform(0.0, 0.2))
    pd_gradient = float(rng.uniform(0.4, 0.9))

    caudate = {s: _CAUDATE_BINDING * individual * asym[s] for s in SIDES}
    putamen = {s: _PUTAMEN_BINDING * individual * asym[s] for s in SIDES}
    if condition == "healthy":
        return _Binding(caudate, putamen, healthy_gradient), None
    worse = worse_side or drawn_worse
    better = "right" if worse == "left" else "left"
    put_frac = {worse: put_worse, better: min(0.7, put_worse + put_gap)}
    cau_frac = {worse: cau_worse, better: min(1.0, cau_worse + cau_gap)}
    return (
        _Binding(
            caudate={s: caudate[s] * cau_frac[s] for s in SIDES},
            putamen={s: putamen[s] * put_frac[s] for s in SIDES},
            # The anterior putamen never exceeds normal binding.
            gradient={s: min(pd_gradient, 2 * (1 - put_frac[s])) for s in SIDES},
        ),
        worse,
    )


# --- the phantom ------------------------------------------------------------------------


def _ratios(sbr: dict[str, float]) -> tuple[float, float, float]:
    """Putamen/caudate ratio and asymmetry indices, defined as in the quantification."""
    put = (sbr["putamen_left"] + sbr["putamen_right"]) / 2
    cau = (sbr["caudate_left"] + sbr["caudate_right"]) / 2
    return (
        put / cau,
        asymmetry_index(sbr["putamen_left"], sbr["putamen_right"]),
        (asymmetry_index(sbr["caudate_left"], sbr["caudate_right"])),
    )


def asymmetry_index(left: float, right: float) -> float:
    """|L - R| / mean(L, R) in percent (0 when both are 0)."""
    mean = (left + right) / 2
    return 0.0 if mean == 0 else abs(left - right) / abs(mean) * 100.0


def make_dat_volume(
    rng: np.random.Generator,
    *,
    condition: str | None = None,
    worse_side: str | None = None,
    matrix: int | None = None,
    voxel_mm: float | None = None,
    n_slices: int | None = None,
    fwhm_mm: float | None = None,
    rotation_deg: tuple[float, float, float] | None = None,
    shift_mm: tuple[float, float, float] | None = None,
    noise: bool = True,
) -> tuple[NDArray[np.float32], tuple[float, float, float], DatTruth]:
    """One DaT-SPECT volume (z, y, x counts; x towards patient left, y posterior, z superior).

    Every draw comes from ``rng``; keyword arguments pin a parameter instead of drawing it
    (tests use them to force a geometry or the side of the disease). The array's first
    voxel is at the patient position ``-(shape - 1) / 2 * spacing`` (x, y, z order).
    """
    # Every draw happens whatever is pinned, in a fixed order, so that pinning one
    # parameter (say, the rotation) leaves the rest of the subject unchanged.
    drawn_condition = "healthy" if rng.random() < 0.5 else "pd"
    drawn_matrix = 128 if rng.random() < 0.7 else 64
    voxel_fraction = float(rng.random())
    slice_fraction = float(rng.random())
    drawn_fwhm = float(rng.uniform(8.0, 10.5))
    drawn_rot = (
        float(rng.uniform(-10, 10)),
        float(rng.uniform(-12, 12)),
        float(rng.uniform(-5, 5)),
    )
    drawn_shift = (
        float(rng.uniform(-15, 15)),
        float(rng.uniform(-15, 15)),
        float(rng.uniform(-10, 10)),
    )
    scale = float(rng.uniform(0.92, 1.08))
    counts_per_ml = float(rng.uniform(600, 1800))
    anatomy = _anatomy(rng)

    condition = condition or drawn_condition
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, not {condition!r}")
    if worse_side is not None and worse_side not in SIDES:
        raise ValueError(f"worse_side must be 'left' or 'right', not {worse_side!r}")
    binding, worse = _binding(rng, condition, worse_side)
    matrix = matrix if matrix is not None else drawn_matrix
    low = 3.9 if matrix == 64 else 3.3
    voxel = voxel_mm if voxel_mm is not None else round(low + (4.4 - low) * voxel_fraction, 3)
    min_slices = max(48, math.ceil(150 / voxel))
    n_z = n_slices if n_slices is not None else min_slices + int(slice_fraction * (97 - min_slices))
    fwhm = fwhm_mm if fwhm_mm is not None else drawn_fwhm
    rot = rotation_deg if rotation_deg is not None else drawn_rot
    shift = shift_mm if shift_mm is not None else drawn_shift

    rotation = rotation_matrix(*rot)
    brain_centre = np.asarray(anatomy.brain.centre)
    origin = np.asarray(shift) - scale * rotation @ brain_centre
    placement = _Placement((n_z, matrix, matrix), voxel, rotation, scale, origin)

    activity = np.zeros(placement.shape)
    lo, hi = _ellipsoid_bounds(anatomy.head)
    box = placement.voxel_box(lo, hi, margin_mm=voxel)
    a = placement.points(box, 1)[..., 0, :]
    vox_anat = voxel / scale
    activity[box] = _HEAD_LEVEL * anatomy.head.soft(a, vox_anat) + (
        1 - _HEAD_LEVEL
    ) * anatomy.brain.soft(a, vox_anat)
    for ventricle in anatomy.ventricles:
        v_box = placement.voxel_box(*_ellipsoid_bounds(ventricle), margin_mm=voxel)
        v_occ = ventricle.soft(placement.points(v_box, 1)[..., 0, :], vox_anat)
        activity[v_box] -= (1 - _VENTRICLE_LEVEL) * np.minimum(v_occ, activity[v_box])

    occupancy: dict[str, FloatArray] = {}
    tissue: dict[str, float] = {}
    specific = np.zeros(placement.shape)
    striatal_occ = np.zeros(placement.shape)
    for side in SIDES:
        ch, cb, pu = anatomy.caudate_head[side], anatomy.caudate_body[side], anatomy.putamen[side]

        def caudate_inside(p: FloatArray, ch: _Ellipsoid = ch, cb: _Tube = cb) -> NDArray[np.bool_]:
            return np.asarray(ch.inside(p) | cb.inside(p))

        lo_h, hi_h = _ellipsoid_bounds(ch)
        lo_b, hi_b = _tube_bounds(cb)
        c_lo = np.minimum(lo_h, lo_b).tolist()
        c_hi = np.maximum(hi_h, hi_b).tolist()
        occ_c, _ = _occupancy(placement, caudate_inside, c_lo, c_hi)
        g = binding.gradient[side]

        def putamen_profile(p: FloatArray, pu: _Ellipsoid = pu, g: float = g) -> FloatArray:
            u = np.clip(pu.local(p)[..., 1], -1.0, 1.0)  # -1 anterior, +1 posterior
            return np.asarray((1 - g * (u + 1) / 2) / (1 - g / 2))

        p_lo, p_hi = _ellipsoid_bounds(pu)
        occ_p, prof_p = _occupancy(placement, pu.inside, p_lo, p_hi, putamen_profile)
        # Where the structures' voxels overlap, the caudate keeps the shared part.
        kept = np.minimum(occ_p, 1 - occ_c)
        prof_p = prof_p * np.divide(kept, occ_p, out=np.zeros_like(kept), where=occ_p > 0)
        occ_p = kept
        specific += binding.caudate[side] * occ_c + binding.putamen[side] * prof_p
        striatal_occ += occ_c + occ_p
        occupancy[f"caudate_{side}"] = occ_c
        occupancy[f"putamen_{side}"] = occ_p
        occupancy[f"striatum_{side}"] = occ_c + occ_p
        tissue[f"caudate_{side}"] = binding.caudate[side]
        tissue[f"putamen_{side}"] = float(binding.putamen[side] * prof_p.sum() / occ_p.sum())
        tissue[f"striatum_{side}"] = float(
            (binding.caudate[side] * occ_c.sum() + binding.putamen[side] * prof_p.sum())
            / (occ_c.sum() + occ_p.sum())
        )
    # Striata displace the ventricle and brain background they overlap.
    activity = activity * (1 - np.clip(striatal_occ, 0, 1)) + striatal_occ + specific

    ref_lo, ref_hi = _ellipsoid_bounds(anatomy.reference)
    occ_ref, _ = _occupancy(placement, anatomy.reference.inside, ref_lo, ref_hi)

    sigma_vox = fwhm / (2 * math.sqrt(2 * math.log(2))) / voxel
    lo, hi = _ellipsoid_bounds(anatomy.head)
    blur_box = placement.voxel_box(lo, hi, margin_mm=voxel + 4 * sigma_vox * voxel)
    expected = np.zeros(placement.shape)
    counts_per_voxel = counts_per_ml * voxel**3 / 1000.0
    expected[blur_box] = gaussian_blur(activity[blur_box], (sigma_vox,) * 3) * counts_per_voxel

    ref_mean = float((occ_ref * expected).sum() / occ_ref.sum())
    sbr = {
        key: float((occupancy[key] * expected).sum() / occupancy[key].sum() / ref_mean - 1)
        for key in REGION_KEYS
    }
    pc, ai_p, ai_c = _ratios(sbr)
    if noise:
        volume = np.minimum(rng.poisson(expected), 65535).astype(np.float32)
    else:
        volume = expected.astype(np.float32)
    truth = DatTruth(
        condition=condition,
        call="normal" if condition == "healthy" else "reduced",
        sbr=sbr,
        putamen_caudate_ratio=pc,
        asymmetry_index_putamen=ai_p,
        asymmetry_index_caudate=ai_c,
        tissue_sbr=tissue,
        worse_side=worse,
        putamen_gradient={s: float(v) for s, v in binding.gradient.items()},
        reference_mean_counts=ref_mean,
        background_counts_per_ml=counts_per_ml,
        fwhm_mm=fwhm,
        spacing_mm=(voxel, voxel, voxel),
        shape=(n_z, matrix, matrix),
        anatomy_scale=scale,
        rotation_deg=rot,
        shift_mm=shift,
        striatal_origin_mm=(float(origin[0]), float(origin[1]), float(origin[2])),
        noise=noise,
    )
    return volume, (voxel, voxel, voxel), truth


# --- DICOM ------------------------------------------------------------------------------

Layout = Literal["multiframe", "slices"]
_BASE_DATE = _dt.date(2024, 1, 8)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _uid(seed: int, index: int, *role: str) -> str:
    return str(generate_uid(entropy_srcs=[_ENTROPY_ROOT, str(seed), str(index), *role]))


def _ds_str(value: float) -> str:
    """A DS value (at most 16 characters) exact for the phantom's 0.001 mm geometry."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _study_datasets(
    volume: NDArray[np.float32],
    spacing_mm: tuple[float, float, float],
    *,
    seed: int,
    index: int,
    layout: Layout,
) -> list[Dataset]:
    """The DICOM objects of one phantom study (one NM object, or one per slice)."""
    if layout not in ("multiframe", "slices"):
        raise ValueError(f"layout must be 'multiframe' or 'slices', not {layout!r}")
    counts = np.clip(np.rint(volume), 0, 65535).astype(np.uint16)
    n_z, rows, cols = counts.shape
    dz, dy, dx = spacing_mm
    first = -0.5 * np.array([dx * (cols - 1), dy * (rows - 1), dz * (n_z - 1)])
    study_date = _BASE_DATE + _dt.timedelta(days=(seed * 7919 + index * 13) % 700)
    birth = _dt.date(1940 + (seed + index * 7) % 35, 1 + (index * 5) % 12, 1 + (seed + index) % 28)
    age = (
        study_date.year
        - birth.year
        - ((study_date.month, study_date.day) < (birth.month, birth.day))
    )

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = NM_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime(
        "%Y%m%d"
    )
    ds.StudyTime = "100000"
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "100500"
    ds.AccessionNumber = f"PHDAT{seed % 100000:05d}{index:04d}"
    ds.Modality = "NM"
    ds.Manufacturer = "dicomnode"
    ds.InstitutionName = "Synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "DaTscan"
    ds.SeriesDescription = "DaTSCAN SPECT Brain"
    ds.ManufacturerModelName = "dat_spect phantom"
    ds.PatientName = f"PHANTOM^DAT^{index:04d}"
    ds.PatientID = f"PHANTOM-DAT-{seed}-{index:04d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = "F" if (seed + index) % 2 else "M"
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "BRAIN"
    ds.SliceThickness = _ds_str(dz)
    ds.SpacingBetweenSlices = _ds_str(dz)
    ds.SoftwareVersions = "dicomnode phantoms dat_spect v1"
    ds.ProtocolName = "DaTscan SPECT"
    ds.StudyInstanceUID = _uid(seed, index, "study")
    ds.SeriesInstanceUID = _uid(seed, index, layout, "series")
    ds.StudyID = f"DAT{index:04d}"
    ds.SeriesNumber = 1 if layout == "multiframe" else 2
    ds.FrameOfReferenceUID = _uid(seed, index, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds_str(dy), _ds_str(dx)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.FrameIncrementPointer = 0x00540080  # SliceVector
    ds.NumberOfEnergyWindows = 1
    ds.NumberOfDetectors = 2
    ds.NumberOfRotations = 1
    ds.CountsAccumulated = int(counts.sum(dtype=np.int64))
    ds.PatientOrientation = ["L", "P"]
    ds.ConvolutionKernel = "OSEM BW0.6 o10"
    ds.ReconstructionDiameter = _ds_str(cols * dx)

    window = Dataset()
    window.EnergyWindowRangeSequence = DicomSequence([Dataset()])
    window.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit = "143.1"
    window.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit = "174.9"
    window.EnergyWindowName = "I123 159keV"
    ds.EnergyWindowInformationSequence = DicomSequence([window])

    pharm = Dataset()
    pharm.RadionuclideCodeSequence = DicomSequence([_code("21572004", "SCT", "^123^Iodine")])
    pharm.Radiopharmaceutical = "Ioflupane I-123"
    pharm.RadiopharmaceuticalCodeSequence = DicomSequence(
        [_code("429296007", "SCT", "Ioflupane I^123^")]
    )
    pharm.RadiopharmaceuticalStartTime = "063000"
    pharm.RadionuclideTotalDose = "185"
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([pharm])

    rotation = Dataset()
    rotation.StartAngle = "0"
    rotation.AngularStep = "3"
    rotation.RotationDirection = "CW"
    rotation.ScanArc = "360"
    rotation.ActualFrameDuration = 30000
    rotation.NumberOfFramesInRotation = 60
    rotation.RadialPosition = ["150", "150"]
    ds.RotationInformationSequence = DicomSequence([rotation])
    ds.TypeOfDetectorMotion = "STEP AND SHOOT"

    position = _code("102538003", "SCT", "recumbent")
    position.PatientOrientationModifierCodeSequence = DicomSequence(
        [_code("40199007", "SCT", "supine")]
    )
    ds.PatientOrientationCodeSequence = DicomSequence([position])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence(
        [_code("102540008", "SCT", "headfirst")]
    )

    def detector(z_mm: float) -> DicomSequence:
        item = Dataset()
        item.CollimatorGridName = "LEHR"
        item.CollimatorType = "PARA"
        item.FieldOfViewShape = "RECTANGLE"
        item.FieldOfViewDimensions = [540, 400]
        item.ZoomFactor = ["1", "1"]
        item.ImagePositionPatient = [_ds_str(first[0]), _ds_str(first[1]), _ds_str(z_mm)]
        item.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        return DicomSequence([item])

    objects: list[Dataset] = []
    if layout == "multiframe":
        ds.SOPInstanceUID = _uid(seed, index, layout, "instance", "1")
        ds.InstanceNumber = 1
        ds.NumberOfFrames = n_z
        ds.NumberOfSlices = n_z
        ds.SliceVector = list(range(1, n_z + 1))
        ds.DetectorInformationSequence = detector(float(first[2]))
        ds.PixelData = counts.tobytes()
        objects.append(ds)
    else:
        for k in range(n_z):
            item = Dataset()
            item.update(ds)
            z_mm = float(first[2] + k * dz)
            item.SOPInstanceUID = _uid(seed, index, layout, "instance", str(k + 1))
            item.InstanceNumber = k + 1
            item.NumberOfFrames = 1
            item.NumberOfSlices = 1
            item.SliceVector = [1]
            item.SliceLocation = _ds_str(z_mm)
            item.DetectorInformationSequence = detector(z_mm)
            item.CountsAccumulated = int(counts[k].sum(dtype=np.int64))
            item.PixelData = counts[k].tobytes()
            objects.append(item)
    for obj in objects:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = obj.SOPClassUID
        meta.MediaStorageSOPInstanceUID = obj.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        obj.file_meta = meta
    return objects


def phantom_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for phantom ``index`` of a seeded set: independent of ``n``."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def build_dat_study(
    seed: int, index: int, *, layout: Layout = "multiframe", **overrides: object
) -> tuple[list[Dataset], DatTruth]:
    """Phantom ``index`` of the set ``seed`` as DICOM datasets, with its truth.

    ``overrides`` go to :func:`make_dat_volume` (e.g. ``condition="pd"``).
    """
    volume, spacing, truth = make_dat_volume(phantom_rng(seed, index), **overrides)  # type: ignore[arg-type]
    return _study_datasets(volume, spacing, seed=seed, index=index, layout=layout), truth


def write_dat_study(
    out_dir: Path, *, n: int, seed: int, layout: Layout = "multiframe"
) -> list[Path]:
    """Write ``n`` phantom studies under ``out_dir`` and return the DICOM files written.

    Each phantom is its own synthetic patient and study in ``out_dir/phantom_NNNN/``
    (``NM.dcm``, or ``NM_SSS.dcm`` per slice) with its ground truth in ``truth.json``
    beside it. The same ``seed`` writes byte-identical files.
    """
    written: list[Path] = []
    for index in range(n):
        datasets, truth = build_dat_study(seed, index, layout=layout)
        folder = Path(out_dir) / f"phantom_{index:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, ds in enumerate(datasets):
            name = "NM.dcm" if layout == "multiframe" else f"NM_{k + 1:03d}.dcm"
            path = folder / name
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
        record = {"seed": seed, "index": index, "layout": layout, **asdict(truth)}
        (folder / "truth.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return written
