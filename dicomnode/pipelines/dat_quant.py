"""DaTQUANT-style striatal binding ratios for 123I-ioflupane (DaTscan) SPECT.

Why this design: nuclear-medicine practice (DaTQUANT, BRASS, the EANM/SNMMI guidelines)
quantifies DaT-SPECT with *specific binding ratios* measured in anatomical volumes of
interest (VOIs) placed on a spatially normalised image, against a reference region with
no dopamine transporters (occipital cortex):

    SBR(region) = (mean counts in region - mean counts in reference) / mean counts in reference

The seed's "centre intensity" feature mixed up head position, matrix size and uptake;
SBRs in anatomically placed VOIs are independent of all three.

How the VOIs are placed
-----------------------
1. The volume (z, y, x; DICOM LPS: +x patient left, +y posterior, +z superior) is
   smoothed and the brain found by its non-specific uptake; the brain's centroid and long
   (anterior-posterior) axis give a first estimate of position, in-plane rotation and tilt.
2. A striatal *template* (caudate head + body, putamen split into anterior and posterior
   halves, lateral ventricles; the mean anatomy of a normal population, like DaTQUANT's
   normal template) is blurred to SPECT resolution and fitted to the image with a
   similarity transform (3 shifts, 3 rotations, 1 scale). At every trial pose the
   template's region intensities are solved by linear least squares, so the fit does
   not assume normal binding: a PD striatum with an empty posterior putamen is fitted
   as well as a healthy one, and the pose, not the uptake, is what the fit decides.
   The cost is the fraction of image variance, in a box around the striata, that the
   template leaves unexplained; it is minimised by Nelder-Mead (no scipy).
3. The template's caudate, putamen and occipital reference VOIs are mapped back into the
   original voxel grid (each voxel weighted by the fraction of it inside the VOI) and the
   mean counts measured there, on the unsmoothed image.

Reported values
---------------
* ``sbr``: caudate, putamen and striatum (caudate + putamen) per side.
* ``putamen_caudate_ratio``: mean putamen SBR / mean caudate SBR, sides averaged first
  (per-side ratios are in ``qc``).
* ``asymmetry_index_*``: |L - R| / ((L + R) / 2) * 100, in percent.
* ``call``: "reduced" when the lower putamen SBR is below ``PUTAMEN_SBR_CUTOFF``.

The cut-off is **phantom-calibrated, not clinical**: it sits between the healthy and
PD-like populations of ``dicomnode.phantoms.dat_spect`` (image putamen SBR about 1.9-3.4
healthy, 0.2-1.5 on the worse PD side at 8-10.5 mm FWHM). Clinical cut-offs depend on
camera, reconstruction and age and must come from a site's own normal database.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from pydicom.dataset import Dataset

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

ALGORITHM_NAME = "dicomnode-datquant"
ALGORITHM_VERSION = "1.0.0"
REGION_KEYS: tuple[str, ...] = (
    "caudate_left",
    "caudate_right",
    "putamen_left",
    "putamen_right",
    "striatum_left",
    "striatum_right",
)
PUTAMEN_SBR_CUTOFF = 1.7
"""Lower putamen SBR below which a study is called "reduced" (phantom-calibrated)."""

_SIDES: dict[str, float] = {"left": 1.0, "right": -1.0}
_TEMPLATE_FWHM_MM = 9.0
_TEMPLATE_STEP_MM = 2.0
_FIT_STEP_MM = 4.0
_FIT_BOX_MM = ((-48.0, 48.0), (-40.0, 40.0), (-30.0, 40.0))  # x, y, z in template space
_BRAIN_CENTRE_MM = np.array([0.0, 12.0, 14.0])  # brain centre relative to template origin
_MIN_SLICES = 16
_MIN_EXTENT_MM = (120.0, 140.0, 80.0)  # x, y, z
_MIN_FIT_R2 = 0.5
_MIN_STRIATAL_SBR = 0.25
_SUPERSAMPLE = 3


class QuantificationError(Exception):
    """The input cannot be quantified; the message says why, in words for the report."""


@dataclass(frozen=True)
class DatQuantResult:
    """Striatal binding of one study; see the module docstring for the definitions."""

    sbr: dict[str, float]
    putamen_caudate_ratio: float
    asymmetry_index_putamen: float
    asymmetry_index_caudate: float
    call: str
    cutoff: dict[str, float]
    qc: dict[str, float | str | bool]
    slab: NDArray[np.float32] = field(repr=False)
    regions_2d: dict[str, BoolArray] = field(repr=False)
    slab_spacing_mm: float = _TEMPLATE_STEP_MM


# --- template ----------------------------------------------------------------------------


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> FloatArray:
    y, p, r = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(y), -math.sin(y), 0.0], [math.sin(y), math.cos(y), 0.0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0.0, math.cos(p), -math.sin(p)], [0.0, math.sin(p), math.cos(p)]])
    ry = np.array([[math.cos(r), 0.0, math.sin(r)], [0, 1, 0], [-math.sin(r), 0.0, math.cos(r)]])
    return rz @ rx @ ry


def _ellipsoid(
    centre: tuple[float, float, float], axes: tuple[float, float, float], yaw_deg: float = 0.0
) -> Callable[[FloatArray], FloatArray]:
    """Local coordinates scaled to the unit sphere (so inside means |q| <= 1)."""
    rot = _rotation(yaw_deg, 0.0, 0.0)
    c, ax = np.asarray(centre), np.asarray(axes)

    def local(a: FloatArray) -> FloatArray:
        return np.asarray(((a - c) @ rot) / ax)

    return local


def _inside_ellipsoid(local: Callable[[FloatArray], FloatArray]) -> Callable[[FloatArray], BoolArray]:
    def inside(a: FloatArray) -> BoolArray:
        q = local(a)
        return np.asarray(np.einsum("...i,...i->...", q, q) <= 1.0)

    return inside


def _inside_tube(
    p0: tuple[float, float, float],
    p1: tuple[float, float, float],
    p2: tuple[float, float, float],
    r0: float,
    r2: float,
) -> Callable[[FloatArray], BoolArray]:
    t = np.linspace(0.0, 1.0, 24)[:, None]
    curve = (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)
    radius = r0 + (r2 - r0) * t[:, 0]

    def inside(a: FloatArray) -> BoolArray:
        out = np.zeros(a.shape[:-1], dtype=bool)
        for point, r in zip(curve, radius, strict=True):
            d = a - point
            out |= np.einsum("...i,...i->...", d, d) <= r * r
        return out

    return inside


@dataclass(frozen=True)
class _Region:
    inside: Callable[[FloatArray], BoolArray]
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]


def _template_regions() -> dict[str, _Region]:
    """The template's VOIs in template space (mm, LPS, origin between the striata)."""
    regions: dict[str, _Region] = {}
    for side, s in _SIDES.items():
        head = _inside_ellipsoid(_ellipsoid((s * 12.5, -12.0, 6.0), (5.5, 8.5, 9.0)))
        body = _inside_tube(
            (s * 12.5, -8.0, 12.0), (s * 15.0, 4.0, 20.0), (s * 18.0, 18.0, 22.0), 4.0, 2.5
        )

        def caudate(a: FloatArray, head: Callable[[FloatArray], BoolArray] = head,
                    body: Callable[[FloatArray], BoolArray] = body) -> BoolArray:
            return np.asarray(head(a) | body(a))

        put_local = _ellipsoid((s * 25.0, 1.0, -1.0), (5.5, 17.0, 10.0), -s * 18.0)
        put = _inside_ellipsoid(put_local)

        def put_anterior(a: FloatArray, put: Callable[[FloatArray], BoolArray] = put,
                         loc: Callable[[FloatArray], FloatArray] = put_local) -> BoolArray:
            return np.asarray(put(a) & (loc(a)[..., 1] < 0))

        def put_posterior(a: FloatArray, put: Callable[[FloatArray], BoolArray] = put,
                          loc: Callable[[FloatArray], FloatArray] = put_local) -> BoolArray:
            return np.asarray(put(a) & (loc(a)[..., 1] >= 0))

        lo_c = (min(s * 12.5, s * 18.0) - 6.0, -21.0, -3.5)
        hi_c = (max(s * 12.5, s * 18.0) + 6.0, 21.0, 25.0)
        lo_p = (s * 25.0 - 12.0, -20.0, -11.5)
        hi_p = (s * 25.0 + 12.0, 22.0, 9.5)
        regions[f"caudate_{side}"] = _Region(caudate, lo_c, hi_c)
        regions[f"putamen_{side}"] = _Region(put, lo_p, hi_p)
        regions[f"putamen_anterior_{side}"] = _Region(put_anterior, lo_p, hi_p)
        regions[f"putamen_posterior_{side}"] = _Region(put_posterior, lo_p, hi_p)
        vent = _inside_ellipsoid(_ellipsoid((s * 6.0, -2.0, 14.0), (3.5, 16.0, 8.0)))
        regions[f"ventricle_{side}"] = _Region(vent, (s * 6.0 - 4, -19.0, 5.0), (s * 6.0 + 4, 15.0, 23.0))
    regions["reference"] = _Region(
        _inside_ellipsoid(_ellipsoid((0.0, 66.0, 16.0), (28.0, 12.0, 14.0))),
        (-29.0, 53.0, 1.0),
        (29.0, 79.0, 31.0),
    )
    return regions


_FIT_COMPONENTS: tuple[tuple[str, ...], ...] = (
    ("caudate_left",),
    ("caudate_right",),
    ("putamen_anterior_left",),
    ("putamen_anterior_right",),
    ("putamen_posterior_left",),
    ("putamen_posterior_right",),
    ("ventricle_left", "ventricle_right"),
)


def _gaussian_blur(volume: FloatArray, sigma_vox: Sequence[float]) -> FloatArray:
    """Separable Gaussian, zero padded, as banded matrix products (no scipy)."""
    out = np.asarray(volume, dtype=np.float64)
    for axis, sigma in enumerate(sigma_vox):
        if sigma <= 0:
            continue
        n = out.shape[axis]
        idx = np.arange(n)
        d = idx[:, None] - idx[None, :]
        radius = int(math.ceil(4 * sigma))
        k = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= radius)
        k /= np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        out = np.moveaxis(np.tensordot(k, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out


def _grid(box: tuple[tuple[float, float], ...], step: float) -> tuple[FloatArray, ...]:
    return tuple(np.arange(lo, hi + 1e-6, step) for lo, hi in box)


@functools.lru_cache(maxsize=4)
def _fit_design(fwhm_mm: float) -> tuple[FloatArray, FloatArray]:
    """Template fit points (n, 3) and an orthonormal basis (n, k) of the blurred template.

    The template is rasterised with supersampling on a fine grid, blurred, and sampled on
    the coarser fit grid; cached because it depends on nothing but the resolution.
    """
    regions = _template_regions()
    margin = 2 * fwhm_mm
    fine_box = tuple((lo - margin, hi + margin) for lo, hi in _FIT_BOX_MM)
    xs, ys, zs = _grid(fine_box, _TEMPLATE_STEP_MM)
    offsets = (np.arange(2) + 0.5) / 2 - 0.5
    sub = _TEMPLATE_STEP_MM * offsets
    gz, gy, gx = np.meshgrid(zs, ys, xs, indexing="ij")
    points = np.stack([gx, gy, gz], axis=-1)
    sigma = fwhm_mm / (2 * math.sqrt(2 * math.log(2))) / _TEMPLATE_STEP_MM
    stride = int(round(_FIT_STEP_MM / _TEMPLATE_STEP_MM))
    inner = tuple(
        slice(int(round(margin / _TEMPLATE_STEP_MM)), -int(round(margin / _TEMPLATE_STEP_MM)), stride)
        for _ in range(3)
    )
    columns = [np.ones(points[inner].shape[:-1]).ravel()]
    for names in _FIT_COMPONENTS:
        occ = np.zeros(points.shape[:-1])
        for dz in sub:
            for dy in sub:
                for dx in sub:
                    shifted = points + np.array([dx, dy, dz])
                    hit = np.zeros(points.shape[:-1], dtype=bool)
                    for name in names:
                        hit |= regions[name].inside(shifted)
                    occ += hit
        occ /= len(sub) ** 3
        columns.append(_gaussian_blur(occ, (sigma, sigma, sigma))[inner].ravel())
    design = np.stack(columns, axis=1)
    basis, _ = np.linalg.qr(design)
    return points[inner].reshape(-1, 3), basis


# --- image access --------------------------------------------------------------------------


def _sample(volume: FloatArray, spacing: FloatArray, points: FloatArray) -> FloatArray:
    """Trilinear interpolation at patient points (x, y, z mm, voxel [0,0,0] at 0); 0 outside."""
    idx = points[..., ::-1] / spacing  # (z, y, x) fractional indices
    shape = np.asarray(volume.shape)
    base = np.floor(idx).astype(np.int64)
    frac = idx - base
    valid = np.all((idx >= 0) & (idx <= shape - 1), axis=-1)
    base = np.clip(base, 0, shape - 2)
    frac = np.clip(idx - base, 0.0, 1.0)
    flat = volume.ravel()
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    out = np.zeros(points.shape[:-1])
    for corner in range(8):
        offs = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        w = np.prod(np.where(offs == 1, frac, 1 - frac), axis=-1)
        out += w * flat[((base + offs) * strides).sum(axis=-1)]
    return np.where(valid, out, 0.0)


@dataclass(frozen=True)
class _Pose:
    """Template -> patient: p = centre + scale * R(yaw, pitch, roll) @ t."""

    centre: FloatArray
    yaw: float
    pitch: float
    roll: float
    scale: float

    @staticmethod
    def from_vector(v: FloatArray) -> _Pose:
        return _Pose(v[:3].copy(), float(v[3]), float(v[4]), float(v[5]), float(math.exp(v[6])))

    def vector(self) -> FloatArray:
        return np.array([*self.centre, self.yaw, self.pitch, self.roll, math.log(self.scale)])

    def matrix(self) -> FloatArray:
        return _rotation(self.yaw, self.pitch, self.roll)

    def to_patient(self, t: FloatArray) -> FloatArray:
        return np.asarray(self.centre + self.scale * t @ self.matrix().T)

    def to_template(self, p: FloatArray) -> FloatArray:
        return np.asarray(((p - self.centre) @ self.matrix()) / self.scale)


def _nelder_mead(
    f: Callable[[FloatArray], float], x0: FloatArray, step: FloatArray, max_evals: int, tol: float
) -> tuple[FloatArray, float]:
    """Adaptive Nelder-Mead (Gao & Han 2012); enough for a smooth 7-parameter fit."""
    n = x0.size
    alpha, beta, gamma, delta = 1.0, 1 + 2 / n, 0.75 - 1 / (2 * n), 1 - 1 / n
    simplex = np.vstack([x0, x0 + np.diag(step)])
    values = np.array([f(x) for x in simplex])
    evals = n + 1
    while evals < max_evals:
        order = np.argsort(values)
        simplex, values = simplex[order], values[order]
        if values[-1] - values[0] < tol:
            break
        centroid = simplex[:-1].mean(axis=0)
        xr = centroid + alpha * (centroid - simplex[-1])
        fr = f(xr)
        evals += 1
        if fr < values[0]:
            xe = centroid + beta * (xr - centroid)
            fe = f(xe)
            evals += 1
            simplex[-1], values[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = xr, fr
        else:
            outside = fr < values[-1]
            xc = (
                centroid + gamma * (xr - centroid)
                if outside
                else centroid - gamma * (centroid - simplex[-1])
            )
            fc = f(xc)
            evals += 1
            if fc < (fr if outside else values[-1]):
                simplex[-1], values[-1] = xc, fc
            else:
                simplex[1:] = simplex[0] + delta * (simplex[1:] - simplex[0])
                values[1:] = [f(x) for x in simplex[1:]]
                evals += n
    best = int(np.argmin(values))
    return simplex[best], float(values[best])


# --- the analysis ---------------------------------------------------------------------------


def _check_input(volume: FloatArray, spacing: FloatArray) -> None:
    if volume.ndim != 3:
        raise QuantificationError(f"expected a 3-D volume, got {volume.ndim} dimensions")
    if volume.shape[0] < _MIN_SLICES:
        raise QuantificationError(
            f"too few slices for striatal quantification ({volume.shape[0]} < {_MIN_SLICES})"
        )
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise QuantificationError("voxel spacing is missing or not positive")
    extent = np.array(volume.shape[::-1]) * spacing
    for axis, (have, need) in enumerate(zip(extent, _MIN_EXTENT_MM, strict=True)):
        if have < need:
            raise QuantificationError(
                f"field of view too small along {'xyz'[axis]}: {have:.0f} mm < {need:.0f} mm"
            )
    if not np.all(np.isfinite(volume)):
        raise QuantificationError("the volume contains non-finite values")
    if volume.max() <= 0 or volume.min() < -1e-6 * volume.max():
        raise QuantificationError("the volume has no counts or negative values")


def _brain_pose(smooth: FloatArray, spacing: FloatArray) -> _Pose:
    """First pose estimate from the brain's non-specific uptake (centroid and long axis)."""
    top = float(np.percentile(smooth, 99.9))
    level = float(np.median(smooth[smooth > 0.3 * top]))
    mask = sitk.GetImageFromArray((smooth > 0.6 * level).astype(np.uint8))
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    brain = sitk.GetArrayFromImage(labels) == 1
    if brain.sum() * float(np.prod(spacing)) < 300_000.0:  # < 300 mL: not a brain
        raise QuantificationError("no brain-shaped uptake found in the volume")
    zyx = np.argwhere(brain).astype(np.float64)
    xyz = zyx[:, ::-1] * spacing
    centroid = xyz.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((xyz - centroid).T))
    long_axis = vecs[:, -1] * (1 if vecs[1, -1] >= 0 else -1)
    pitch = math.degrees(math.asin(float(np.clip(long_axis[2], -1, 1))))
    yaw = math.degrees(math.atan2(-long_axis[0], long_axis[1]))
    # The brain volume sets the scale: the template brain is about 1.52 L.
    scale = float(np.clip((brain.sum() * np.prod(spacing) / 1.52e6) ** (1 / 3), 0.85, 1.15))
    rot = _rotation(yaw, pitch, 0.0)
    centre = centroid - scale * rot @ _BRAIN_CENTRE_MM
    return _Pose(centre, yaw, pitch, 0.0, scale)


def _fit_pose(volume: FloatArray, spacing: FloatArray, start: _Pose) -> tuple[_Pose, float]:
    points, basis = _fit_design(_TEMPLATE_FWHM_MM)

    def cost(v: FloatArray) -> float:
        y = _sample(volume, spacing, _Pose.from_vector(v).to_patient(points))
        yc = y - y.mean()
        total = float(yc @ yc)
        if total <= 0:
            return 1.0
        coef = basis.T @ y
        return float((y @ y - coef @ coef) / total)

    step = np.array([6.0, 6.0, 6.0, 6.0, 6.0, 4.0, 0.06])
    best, value = start.vector(), cost(start.vector())
    for _ in range(3):
        best, value = _nelder_mead(cost, best, step, max_evals=500, tol=1e-6)
        step = step / 2
    return _Pose.from_vector(best), 1.0 - value


def _voi_mean(volume: FloatArray, spacing: FloatArray, pose: _Pose, region: _Region) -> tuple[
    float, float
]:
    """Occupancy-weighted mean counts of a template VOI on the original voxel grid."""
    corners = np.array(
        [[x, y, z] for x in (region.lo[0], region.hi[0]) for y in (region.lo[1], region.hi[1])
         for z in (region.lo[2], region.hi[2])]
    )
    p = pose.to_patient(corners)
    lo = np.maximum(np.floor(p.min(0) / spacing) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(p.max(0) / spacing) + 2, np.array(volume.shape[::-1])).astype(int)
    if np.any(hi <= lo):
        return float("nan"), 0.0
    offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5
    axes = [
        (np.arange(lo[i], hi[i])[:, None] + offsets).ravel() * spacing[i] for i in range(3)
    ]
    gz, gy, gx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    inside = region.inside(pose.to_template(np.stack([gx, gy, gz], axis=-1)))
    n = _SUPERSAMPLE
    nz, ny, nx = hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]
    occ = inside.reshape(nz, n, ny, n, nx, n).mean(axis=(1, 3, 5))
    block = volume[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
    weight = float(occ.sum())
    if weight <= 0:
        return float("nan"), 0.0
    return float((occ * block).sum() / weight), weight * float(np.prod(spacing)) / 1000.0


def _asymmetry(left: float, right: float) -> float:
    mean = (left + right) / 2
    return 0.0 if mean == 0 else abs(left - right) / abs(mean) * 100.0


def _slab(volume: FloatArray, spacing: FloatArray, pose: _Pose, regions: dict[str, _Region]) -> tuple[
    NDArray[np.float32], dict[str, BoolArray]
]:
    """A 12 mm transaxial slab through the striata in template orientation (rows anterior
    to posterior, columns patient right to left, i.e. radiological display)."""
    xs = np.arange(-64.0, 64.0, _TEMPLATE_STEP_MM) + _TEMPLATE_STEP_MM / 2
    ys = np.arange(-64.0, 64.0, _TEMPLATE_STEP_MM) + _TEMPLATE_STEP_MM / 2 + 10.0
    zs = np.arange(-5.0, 7.0, _TEMPLATE_STEP_MM) + _TEMPLATE_STEP_MM / 2 + 2.0
    gz, gy, gx = np.meshgrid(zs, ys, xs, indexing="ij")
    t = np.stack([gx, gy, gz], axis=-1)
    slab = _sample(volume, spacing, pose.to_patient(t)).sum(axis=0).astype(np.float32)
    masks = {
        name: np.asarray(regions[name].inside(t).any(axis=0))
        for name in ("caudate_left", "caudate_right", "putamen_left", "putamen_right")
    }
    return slab, masks


def quantify(volume: NDArray[np.floating], spacing_mm: tuple[float, float, float]) -> DatQuantResult:
    """Specific binding ratios of one DaT-SPECT volume.

    ``volume`` is (z, y, x) counts with x towards patient left, y posterior and z superior
    (what :func:`load_volume` returns); ``spacing_mm`` is (z, y, x). Raises
    :class:`QuantificationError` when the study cannot be analysed rather than guessing.
    """
    vol = np.asarray(volume, dtype=np.float64)
    spacing = np.array(spacing_mm[::-1], dtype=np.float64)  # (x, y, z)
    _check_input(vol, spacing)
    sigma = 6.0 / 2.355 / spacing[::-1]
    smooth = _gaussian_blur(vol, tuple(float(s) for s in sigma))
    start = _brain_pose(smooth, spacing)
    pose, r2 = _fit_pose(vol, spacing, start)
    regions = _template_regions()
    ref_mean, ref_ml = _voi_mean(vol, spacing, pose, regions["reference"])
    if not ref_mean > 0:
        raise QuantificationError("the occipital reference region has no counts or is outside the field of view")
    means: dict[str, float] = {}
    volumes: dict[str, float] = {}
    for name in ("caudate", "putamen", "putamen_anterior", "putamen_posterior"):
        for side in _SIDES:
            key = f"{name}_{side}"
            means[key], volumes[key] = _voi_mean(vol, spacing, pose, regions[key])
    for side in _SIDES:
        c, p = f"caudate_{side}", f"putamen_{side}"
        volumes[f"striatum_{side}"] = volumes[c] + volumes[p]
        means[f"striatum_{side}"] = (means[c] * volumes[c] + means[p] * volumes[p]) / volumes[
            f"striatum_{side}"
        ]
    if not all(math.isfinite(m) for m in means.values()):
        raise QuantificationError("the striatal regions fall outside the field of view")
    sbr_all = {k: m / ref_mean - 1.0 for k, m in means.items()}
    sbr = {k: sbr_all[k] for k in REGION_KEYS}
    shift = float(np.linalg.norm(pose.centre - start.centre))
    qc: dict[str, float | str | bool] = {
        "reference_mean_counts": ref_mean,
        "reference_volume_ml": ref_ml,
        "template_fit_r2": r2,
        "pose_yaw_deg": pose.yaw,
        "pose_pitch_deg": pose.pitch,
        "pose_roll_deg": pose.roll,
        "pose_scale": pose.scale,
        "pose_refinement_mm": shift,
        "striata_found": True,
    }
    for side in _SIDES:
        for part in ("anterior", "posterior"):
            qc[f"sbr_putamen_{part}_{side}"] = sbr_all[f"putamen_{part}_{side}"]
        qc[f"putamen_caudate_ratio_{side}"] = sbr[f"putamen_{side}"] / sbr[f"caudate_{side}"]
    if r2 < _MIN_FIT_R2 or max(sbr["caudate_left"], sbr["caudate_right"], sbr["putamen_left"],
                                sbr["putamen_right"]) < _MIN_STRIATAL_SBR:
        raise QuantificationError(
            f"no striatal uptake found (template fit R^2 {r2:.2f}, "
            f"highest striatal SBR {max(sbr.values()):.2f})"
        )
    put = (sbr["putamen_left"] + sbr["putamen_right"]) / 2
    cau = (sbr["caudate_left"] + sbr["caudate_right"]) / 2
    lower_putamen = min(sbr["putamen_left"], sbr["putamen_right"])
    slab, masks = _slab(vol, spacing, pose, regions)
    return DatQuantResult(
        sbr=sbr,
        putamen_caudate_ratio=put / cau if cau != 0 else float("nan"),
        asymmetry_index_putamen=_asymmetry(sbr["putamen_left"], sbr["putamen_right"]),
        asymmetry_index_caudate=_asymmetry(sbr["caudate_left"], sbr["caudate_right"]),
        call="reduced" if lower_putamen < PUTAMEN_SBR_CUTOFF else "normal",
        cutoff={"putamen_sbr_lower": PUTAMEN_SBR_CUTOFF},
        qc=qc,
        slab=slab,
        regions_2d=masks,
    )


# --- DICOM input -------------------------------------------------------------------------------


def load_volume(datasets: Sequence[Dataset]) -> tuple[NDArray[np.float32], tuple[float, float, float]]:
    raise NotImplementedError
