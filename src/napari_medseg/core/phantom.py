"""Synthetic abdominal CT phantoms with exact ground truth.

``generate_phantom`` builds a CT-like volume in Hounsfield units together with an organ
label map, a list of lesions (centre, size, contrast, host organ) and a per-slice class.
It is the training and test data for every model the plugin ships, so it aims for variety
(every seed is a different "patient") and for the look of a real abdominal CT rather than
for anatomical exactness.

Geometry
--------
Arrays are (z, y, x) = (plane, row, column). Rows run anterior -> posterior and columns
patient right -> left (radiological convention: patient right is image left). Planes run
cranial -> caudal. The anatomy is a continuous function of position in millimetres in a
frame centred on the field of view, so a grid with a different shape or spacing samples
the *same* patient differently: organ volumes in mm^3 agree between spacings as long as
the field of view (shape * spacing) is the same. Organ sizes are absolute (a small adult
or adolescent abdomen about 15-19 cm wide, which fits the default 205 mm field of view);
a larger field of view shows the same body with more air around it, a smaller one shows a
central crop. Along z the body fills ``body_z_fraction`` of the slices; the anatomy is
anchored to the middle of that range.

Every structure is an implicit function that separates into a sum of products of a
function of z and a function of (y, x) (deformed, sheared, bent ellipsoids; tubes whose
centre and radius follow z). On a grid this is one small matrix product per structure,
evaluated only inside the structure's bounding box; at scattered points (used to place
lesions) it is evaluated directly, so the label map and the lesion placement agree.

Labels (``LABEL_NAMES``) are computed on the output grid before blur and noise, so they
are exact ground truth for the image: 0 background (air, CT table), 1 other body tissue
(skin, fat, muscle, bowel, stomach, gallbladder, IVC, psoas, discs, spinal canal, ribs),
2 liver, 3 spleen, 4 left kidney, 5 right kidney, 6 vertebral bone, 7 aorta (and the
common iliac arteries below the bifurcation), 8 lesion (overrides its host organ).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .errors import MedsegInputError
from .memory import require_memory
from .progress import Job, Progress, run_to_completion
from .volume import Volume

__all__ = [
    "LABEL_NAMES",
    "SLICE_CLASSES",
    "LESION_LABEL",
    "Lesion",
    "Phantom",
    "generate_phantom",
    "phantom_job",
]

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "body",
    2: "liver",
    3: "spleen",
    4: "kidney_left",
    5: "kidney_right",
    6: "spine",
    7: "aorta",
    8: "lesion",
}
SLICE_CLASSES: tuple[str, ...] = ("no_body", "normal", "lesion")
LESION_LABEL = 8

HU_RANGE = (-1024.0, 3071.0)
MAX_AXIS = 1024
MAX_VOXELS = 2**28  # 1024 x 512 x 512: about 1 GiB of float32
#: peak memory of generating a phantom: a fixed part and a part per voxel (measured: 0.41 GB
#: at 64 × 512 × 512, 4.4 GB at 1024 × 512 × 512; 25 bytes a voxel from the small one
#: alone refused the largest with 5 GB free)
PEAK_FIXED_BYTES = 150e6
PEAK_BYTES_PER_VOXEL = 16.5
MAX_LESIONS = 50
#: the 5 mm tissue-texture lattice spans the whole field of view (uint64 hashes, then
#: float32): a few voxels at 100 mm spacing asked for 28 GiB
MAX_TEXTURE_BYTES = 2**30
TEXTURE_CELL_MM = 5.0
#: the widest blur (standard deviation, voxels along an axis) a phantom may ask for
MAX_BLUR_VOXELS = 50
#: mm from the body's middle beyond which the body's and the aorta's linear trends along z
#: level off (an abdomen, not a whole body; every training and evaluation phantom lies
#: within it: at most 130 mm from the middle)
TREND_REACH_MM = 150.0
_BOWEL_CELL_MM = (8.0, 13.0)  # the bowel pattern's lattice cell, drawn per phantom
LESION_HOSTS = ("liver", "spleen", "kidney_left", "kidney_right")


# --------------------------------------------------------------------------------------
# Public result types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """One lesion: an ellipsoid inside a host organ.

    ``center_zyx`` is in voxel indices of the phantom grid (always the centre of a voxel
    that carries the lesion label); ``radius_mm`` is the equivalent-sphere radius
    (cube root of the product of the semi-axes); ``radii_mm_zyx`` are the semi-axes along
    the principal axes given by ``axes_zyx`` (rows are unit vectors in (z, y, x));
    ``contrast_hu`` is the lesion HU minus the mean HU of the host organ.
    """

    center_zyx: tuple[float, float, float]
    radius_mm: float
    radii_mm_zyx: tuple[float, float, float]
    contrast_hu: float
    organ: str
    label: int = LESION_LABEL
    axes_zyx: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    @property
    def kind(self) -> str:
        return "hypodense" if math.copysign(1.0, self.contrast_hu) < 0 else "hyperdense"


@dataclass(frozen=True, eq=False)
class Phantom:
    """A generated CT volume with its exact ground truth.

    ``labels`` (uint8, same shape as the volume) uses ``LABEL_NAMES``; ``slice_classes``
    (int64, one per plane) uses ``SLICE_CLASSES``: 0 no body voxel, 2 any lesion voxel,
    1 otherwise.
    """

    volume: Volume
    labels: np.ndarray
    lesions: tuple[Lesion, ...]
    slice_classes: np.ndarray
    phase: str = "portal"
    noise_hu: float = 0.0
    blur_sigma_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    hu_means: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    #: exact masks of structures that ``labels`` folds into "body", on request
    #: (``generate_phantom(extra_structures=...)``): ground truth for teaching a model a
    #: structure it does not know
    structure_masks: Mapping[str, np.ndarray] = field(default_factory=dict)

    def lesion_table(self) -> list[dict[str, Any]]:
        """One row per lesion: z, y, x (voxel indices), radius_mm, organ, contrast_hu."""
        return [
            {
                "z": float(les.center_zyx[0]),
                "y": float(les.center_zyx[1]),
                "x": float(les.center_zyx[2]),
                "radius_mm": float(les.radius_mm),
                "organ": les.organ,
                "contrast_hu": float(les.contrast_hu),
            }
            for les in self.lesions
        ]

    def slice_class_names(self) -> list[str]:
        return [SLICE_CLASSES[int(c)] for c in self.slice_classes]


# --------------------------------------------------------------------------------------
# Tissue classes (finer than labels: they decide the HU)
# --------------------------------------------------------------------------------------

_TISSUE_NAMES = (
    "air",
    "table_shell",
    "table_core",
    "skin",
    "fat",
    "muscle",
    "visceral",
    "paraspinal",
    "psoas",
    "liver",
    "spleen",
    "kl_cortex",
    "kl_medulla",
    "kr_cortex",
    "kr_medulla",
    "sinus",
    "pelvis",
    "perirenal",
    "aorta",
    "ivc",
    "cancellous",
    "cortical",
    "posterior",
    "disc",
    "canal",
    "rib",
    "rib_marrow",
    "gallbladder",
    "stomach_wall",
    "stomach_fluid",
    "stomach_gas",
    "lesion",
)
(
    T_AIR,
    T_TABLE_SHELL,
    T_TABLE_CORE,
    T_SKIN,
    T_FAT,
    T_MUSCLE,
    T_VISCERAL,
    T_PARASPINAL,
    T_PSOAS,
    T_LIVER,
    T_SPLEEN,
    T_KL_CORTEX,
    T_KL_MEDULLA,
    T_KR_CORTEX,
    T_KR_MEDULLA,
    T_SINUS,
    T_PELVIS,
    T_PERIRENAL,
    T_AORTA,
    T_IVC,
    T_CANCELLOUS,
    T_CORTICAL,
    T_POSTERIOR,
    T_DISC,
    T_CANAL,
    T_RIB,
    T_RIB_MARROW,
    T_GALLBLADDER,
    T_STOMACH_WALL,
    T_STOMACH_FLUID,
    T_STOMACH_GAS,
    T_LESION,
) = range(len(_TISSUE_NAMES))
N_TISSUE = len(_TISSUE_NAMES)

_TISSUE_LABEL = np.ones(N_TISSUE, dtype=np.uint8)
_TISSUE_LABEL[[T_AIR, T_TABLE_SHELL, T_TABLE_CORE]] = 0
_TISSUE_LABEL[T_LIVER] = 2
_TISSUE_LABEL[T_SPLEEN] = 3
_TISSUE_LABEL[[T_KL_CORTEX, T_KL_MEDULLA]] = 4
_TISSUE_LABEL[[T_KR_CORTEX, T_KR_MEDULLA]] = 5
_TISSUE_LABEL[[T_CANCELLOUS, T_CORTICAL, T_POSTERIOR]] = 6
_TISSUE_LABEL[T_AORTA] = 7
_TISSUE_LABEL[T_LESION] = LESION_LABEL
#: structures labelled "body" whose own masks a phantom can return (``extra_structures``)
EXTRA_STRUCTURES: dict[str, tuple[int, ...]] = {
    "gallbladder": (T_GALLBLADDER,),
    "stomach": (T_STOMACH_WALL, T_STOMACH_FLUID, T_STOMACH_GAS),
}

_HOST_TISSUES = {
    "liver": (T_LIVER,),
    "spleen": (T_SPLEEN,),
    "kidney_left": (T_KL_CORTEX, T_KL_MEDULLA),
    "kidney_right": (T_KR_CORTEX, T_KR_MEDULLA),
}
# host mean HU is the parenchyma (cortex for kidneys)
_HOST_MEAN_TISSUE = {
    "liver": T_LIVER,
    "spleen": T_SPLEEN,
    "kidney_left": T_KL_CORTEX,
    "kidney_right": T_KR_CORTEX,
}


# --------------------------------------------------------------------------------------
# Separable implicit structures
# --------------------------------------------------------------------------------------


class _Sep:
    """Implicit shape F(z, y, x) = sum_j f_j(z) g_j(y, x); the level set F <= L - 1.

    ``f(dz)`` maps a 1D array of z offsets to an (n, m) array, ``g(dy, dx)`` maps
    broadcastable in-plane offsets to a list of m arrays (or scalars). Offsets are taken
    from ``center`` so float32 arithmetic stays accurate. ``zmask(z)`` (absolute z) can
    switch the shape off in some planes. ``bbox`` bounds the largest level used.
    """

    __slots__ = ("center", "bbox", "f", "g", "zmask")

    def __init__(
        self,
        center: Sequence[float],
        bbox: np.ndarray,
        f: Callable[[np.ndarray], np.ndarray],
        g: Callable[[np.ndarray, np.ndarray], list],
        zmask: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.center = tuple(float(c) for c in center)
        self.bbox = np.asarray(bbox, dtype=float)
        self.f = f
        self.g = g
        self.zmask = zmask

    def at_points(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        fz = self.f(z - self.center[0])
        gs = self.g(y - self.center[1], x - self.center[2])
        out = np.zeros(z.shape, dtype=np.float64)
        for j, gj in enumerate(gs):
            out += fz[:, j] * gj
        if self.zmask is not None:
            out[~self.zmask(z)] = np.inf
        return out


def _fourier_modes(rng: np.random.Generator, n: int, lam: tuple[float, float], amp: float):
    """n random plane waves (k_zyx in rad/mm, phase, amplitude) with total amplitude amp."""
    modes = []
    weights = rng.uniform(0.5, 1.0, size=n)
    weights = weights / weights.sum() * amp
    for j in range(n):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d) + 1e-12
        k = d * (2 * np.pi / rng.uniform(*lam))
        modes.append((k, rng.uniform(0, 2 * np.pi), float(weights[j])))
    return modes


def _ellipsoid(
    center: Sequence[float],
    semi_uvw: Sequence[float],
    alpha: float = 0.0,
    shear_xy: Sequence[float] = (0.0, 0.0),
    bend: float = 0.0,
    modes: Sequence = (),
    level_max: float = 1.0,
    zmask: Callable | None = None,
) -> _Sep:
    """A deformed ellipsoid.

    ``semi_uvw``: semi-axes along u (in-plane, at angle ``alpha`` from +x towards +y), v
    (in-plane, perpendicular) and z. ``shear_xy``: in-plane shift of the centre per mm of
    z (tilts the long axis). ``bend``: v is replaced by v - bend * u**2, which makes the
    +v side concave (a bean or crescent). ``modes``: plane waves added to the quadratic
    form (low-frequency bumps of the surface).
    """
    cz, cy, cx = (float(c) for c in center)
    au, av, aw = (float(s) for s in semi_uvw)
    ca, sa = math.cos(alpha), math.sin(alpha)
    sx, sy = (float(s) for s in shear_xy)
    su = ca * sx + sa * sy
    sv = -sa * sx + ca * sy
    c2 = su * su / au**2 + sv * sv / av**2 + 1.0 / aw**2
    kz = np.array([m[0][0] for m in modes], dtype=float)
    kyx = [(m[0][1], m[0][2], m[1], m[2]) for m in modes]

    def f(dz: np.ndarray) -> np.ndarray:
        cols = [dz * dz, dz, np.ones_like(dz)]
        if len(kz):
            ph = np.multiply.outer(dz, kz)
            return np.concatenate([np.stack(cols, axis=-1), np.cos(ph), np.sin(ph)], axis=-1)
        return np.stack(cols, axis=-1)

    def g(dy: np.ndarray, dx: np.ndarray) -> list:
        u0 = ca * dx + sa * dy
        v0 = -sa * dx + ca * dy - bend * u0 * u0
        out = [c2, -2.0 * (su * u0 / au**2 + sv * v0 / av**2), u0 * u0 / au**2 + v0 * v0 / av**2 - 1.0]
        cos_terms, sin_terms = [], []
        for ky, kx, phi, amp in kyx:
            b = ky * dy + kx * dx + phi
            cos_terms.append(amp * np.cos(b))
            sin_terms.append(-amp * np.sin(b))
        return out + cos_terms + sin_terms

    m = math.sqrt(level_max + sum(mm[2] for mm in modes))
    hz = aw * m
    umax = au * m + abs(su) * hz
    vmax = av * m + abs(sv) * hz + abs(bend) * umax * umax
    rxy = math.hypot(umax, vmax)
    bbox = np.array([[cz - hz, cz + hz], [cy - rxy, cy + rxy], [cx - rxy, cx + rxy]])
    return _Sep((cz, cy, cx), bbox, f, g, zmask)


def _trend_z(dz: Any) -> Any:
    """``dz`` (mm from the body's middle) limited to ±TREND_REACH_MM."""
    return np.clip(dz, -TREND_REACH_MM, TREND_REACH_MM)


def _tube(
    cx: Callable[[np.ndarray], np.ndarray],
    cy: Callable[[np.ndarray], np.ndarray],
    rx: Callable[[np.ndarray], np.ndarray],
    ry: Callable[[np.ndarray], np.ndarray],
    zrange: tuple[float, float],
    level_max: float = 1.0,
    zmask: Callable | None = None,
) -> _Sep:
    """An elliptic tube whose centre (cx, cy) and radii (rx, ry) are functions of z."""
    z0, z1 = float(zrange[0]), float(zrange[1])
    zs = np.linspace(z0, z1, 257)
    cxs, cys = cx(zs), cy(zs)
    rxs, rys = np.broadcast_to(rx(zs), zs.shape), np.broadcast_to(ry(zs), zs.shape)
    cz0 = 0.5 * (z0 + z1)
    cx0, cy0 = float(np.mean(cxs)), float(np.mean(cys))
    m = math.sqrt(level_max)

    def f(dz: np.ndarray) -> np.ndarray:
        z = dz + cz0
        ex = cx(z) - cx0
        ey = cy(z) - cy0
        irx = 1.0 / np.broadcast_to(rx(z), z.shape) ** 2
        iry = 1.0 / np.broadcast_to(ry(z), z.shape) ** 2
        const = ex * ex * irx + ey * ey * iry - 1.0
        const = np.where((z >= z0) & (z <= z1), const, 1e6)
        return np.stack([irx, -2 * ex * irx, iry, -2 * ey * iry, const], axis=-1)

    def g(dy: np.ndarray, dx: np.ndarray) -> list:
        return [dx * dx, dx, dy * dy, dy, 1.0]

    bbox = np.array(
        [
            [z0, z1],
            [float(np.min(cys - rys * m)), float(np.max(cys + rys * m))],
            [float(np.min(cxs - rxs * m)), float(np.max(cxs + rxs * m))],
        ]
    )
    return _Sep((cz0, cy0, cx0), bbox, f, g, zmask)


# --------------------------------------------------------------------------------------
# Domains: a grid chunk (for the image) or scattered points (for lesion placement)
# --------------------------------------------------------------------------------------


class _Grid:
    """A block of consecutive planes of the output grid."""

    def __init__(self, zc: np.ndarray, yc: np.ndarray, xc: np.ndarray, cache: dict):
        self.zc, self.yc, self.xc = zc, yc, xc
        self.shape = (len(zc), len(yc), len(xc))
        self.zz = zc[:, None, None]
        self.yy = yc[None, :, None]
        self.xx = xc[None, None, :]
        self.cache = cache  # in-plane work shared by all blocks of one grid

    def zeros(self, dtype) -> np.ndarray:
        return np.zeros(self.shape, dtype=dtype)

    def coords(self, sl):
        return self.zz[sl[0]], self.yy[:, sl[1]], self.xx[:, :, sl[2]]

    def inplane(self, key: str, fn: Callable):
        if key not in self.cache:
            self.cache[key] = fn(self.yy, self.xx)
        return self.cache[key]

    def eval(self, sep: _Sep):
        (z0, z1), (y0, y1), (x0, x1) = sep.bbox
        kz0 = int(np.searchsorted(self.zc, z0, "left"))
        kz1 = int(np.searchsorted(self.zc, z1, "right"))
        if kz1 <= kz0:
            return None, None
        key = ("sep", id(sep))
        ent = self.cache.get(key)
        if ent is None:
            iy0 = int(np.searchsorted(self.yc, y0, "left"))
            iy1 = int(np.searchsorted(self.yc, y1, "right"))
            ix0 = int(np.searchsorted(self.xc, x0, "left"))
            ix1 = int(np.searchsorted(self.xc, x1, "right"))
            if iy1 <= iy0 or ix1 <= ix0:
                ent = False
            else:
                dy = (self.yc[iy0:iy1] - sep.center[1])[:, None]
                dx = (self.xc[ix0:ix1] - sep.center[2])[None, :]
                shp = (iy1 - iy0, ix1 - ix0)
                gs = sep.g(dy, dx)
                G = np.empty((len(gs), shp[0] * shp[1]), dtype=np.float32)
                for j, gj in enumerate(gs):
                    G[j] = np.broadcast_to(np.asarray(gj, dtype=np.float32), shp).ravel()
                ent = (iy0, iy1, ix0, ix1, G)
            self.cache[key] = ent
        if ent is False:
            return None, None
        iy0, iy1, ix0, ix1, G = ent
        zs = self.zc[kz0:kz1]
        fz = sep.f(zs - sep.center[0]).astype(np.float32)
        F = (fz @ G).reshape(kz1 - kz0, iy1 - iy0, ix1 - ix0)
        if sep.zmask is not None:
            F[~sep.zmask(zs)] = np.inf
        return (slice(kz0, kz1), slice(iy0, iy1), slice(ix0, ix1)), F


class _Points:
    """Scattered points (1D arrays of z, y, x in mm)."""

    def __init__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray):
        self.z, self.y, self.x = (np.asarray(a, dtype=float).ravel() for a in (z, y, x))
        self.shape = self.z.shape
        self.zz, self.yy, self.xx = self.z, self.y, self.x

    def zeros(self, dtype) -> np.ndarray:
        return np.zeros(self.shape, dtype=dtype)

    def coords(self, sl):
        return self.z, self.y, self.x

    def inplane(self, key: str, fn: Callable):
        return fn(self.y, self.x)

    def eval(self, sep: _Sep):
        (z0, z1), (y0, y1), (x0, x1) = sep.bbox
        inb = (
            (self.z >= z0) & (self.z <= z1) & (self.y >= y0) & (self.y <= y1)
            & (self.x >= x0) & (self.x <= x1)
        )
        F = np.full(self.shape, np.inf)
        if inb.any():
            F[inb] = sep.at_points(self.z[inb], self.y[inb], self.x[inb])
        return (slice(None),), F


# --------------------------------------------------------------------------------------
# Smooth value noise (hash based, so it is a fixed function of position in mm)
# --------------------------------------------------------------------------------------

_U64 = np.uint64


def _hash_uniform(key: int, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Uniform [-1, 1) values, a deterministic function of (key, i, j, k)."""
    i = np.asarray(i, dtype=np.int64).view(np.uint64)
    j = np.asarray(j, dtype=np.int64).view(np.uint64)
    k = np.asarray(k, dtype=np.int64).view(np.uint64)
    h = (i * _U64(0x9E3779B97F4A7C15)) ^ (j * _U64(0xC2B2AE3D27D4EB4F)) ^ (k * _U64(0x165667B19E3779F9))
    h = h ^ _U64(key & 0xFFFFFFFFFFFFFFFF)
    h = h ^ (h >> _U64(30))
    h = h * _U64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> _U64(27))
    h = h * _U64(0x94D049BB133111EB)
    h = h ^ (h >> _U64(31))
    return (h >> _U64(11)).astype(np.float64) * (2.0 / 2.0**53) - 1.0


def _bspline_matrix(coords: np.ndarray, cell: float) -> tuple[np.ndarray, int]:
    """Cubic B-spline weights from lattice nodes (spacing cell mm) to coords (mm)."""
    t = np.asarray(coords, dtype=float) / cell
    base = np.floor(t).astype(np.int64)
    f = t - base
    w = np.stack(
        [
            (1 - f) ** 3 / 6,
            (3 * f**3 - 6 * f**2 + 4) / 6,
            (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6,
            f**3 / 6,
        ],
        axis=1,
    )
    lo = int(base.min()) - 1
    hi = int(base.max()) + 2
    W = np.zeros((len(t), hi - lo + 1))
    rows = np.arange(len(t))
    for j in range(4):
        W[rows, base - 1 + j - lo] = w[:, j]
    return W, lo


class _ValueNoise:
    """Smooth zero-mean, roughly unit-variance noise with feature size ~ cell mm."""

    _NORM = 1.0 / (math.sqrt(1.0 / 3.0) * (151.0 / 315.0) ** 1.5)

    def __init__(self, key: int, cell: float, zc: np.ndarray, yc: np.ndarray, xc: np.ndarray):
        self.Wz, lz = _bspline_matrix(zc, cell)
        Wy, ly = _bspline_matrix(yc, cell)
        Wx, lx = _bspline_matrix(xc, cell)
        iz = np.arange(self.Wz.shape[1]) + lz
        iy = np.arange(Wy.shape[1]) + ly
        ix = np.arange(Wx.shape[1]) + lx
        V = _hash_uniform(key, iz[:, None, None], iy[None, :, None], ix[None, None, :])
        # contract x and y once: (cz, ny, nx), small because cz is coarse
        V = V.astype(np.float32) * np.float32(self._NORM)
        tmp = (V.reshape(-1, V.shape[2]) @ Wx.T.astype(np.float32)).reshape(V.shape[0], V.shape[1], -1)
        self.T = np.einsum("yc,zcx->zyx", Wy.astype(np.float32), tmp, optimize=True)
        self.Wz = self.Wz.astype(np.float32)

    def block(self, k0: int, k1: int) -> np.ndarray:
        W = self.Wz[k0:k1]
        nz_cols = np.flatnonzero(W.any(axis=0))
        c0, c1 = int(nz_cols[0]), int(nz_cols[-1]) + 1
        T = self.T[c0:c1]
        out = W[:, c0:c1] @ T.reshape(c1 - c0, -1)
        return out.reshape(k1 - k0, T.shape[1], T.shape[2])


# --------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class _Anatomy:
    """One random patient: body outline, organs, spine, vessels; HU per tissue."""

    def __init__(
        self,
        rng: np.random.Generator,
        zc: np.ndarray,
        spacing: tuple[float, float, float],
        body_z_fraction: float | None,
        contrast_scale: float,
    ):
        u = rng.uniform
        S = self.S = u(0.88, 1.06)
        sz = spacing[0]
        nz = len(zc)

        # ---- body z range (whole slices) and anatomical reference level
        r_none, f_draw, side = u(), u(0.72, 0.95), u()
        split_draw = u(0.2, 0.8)
        if body_z_fraction is None:
            f = 1.0 if r_none < 0.2 else f_draw
        else:
            f = float(body_z_fraction)
        split = 0.0 if side < 0.25 else 1.0 if side < 0.5 else split_draw
        n_body = int(np.clip(round(f * nz), 1, nz))
        n_before = int(round(split * (nz - n_body)))
        self.zb0 = float(zc[n_before] - sz / 2)
        self.zb1 = float(zc[n_before + n_body - 1] + sz / 2)
        # the body is rounded off only at an end that lies inside the field of view
        self.cap_top = n_before > 0
        self.cap_bottom = n_before + n_body < nz
        body_len = self.zb1 - self.zb0
        self.cap_len = min(8.0, 0.1 * body_len)
        zr = self.z_ref = 0.5 * (self.zb0 + self.zb1) + u(-8, 8) * S

        # ---- body outline
        a = self.a = 84.0 * S * u(0.95, 1.05)
        b = self.b = 63.0 * S * u(0.93, 1.05)
        x0 = self.x0 = u(-3, 3)
        y0 = self.y0 = u(-4, 2)
        self.p_post = u(2.2, 2.9)
        self.harm = [(k, u(0.0, 0.03 if k == 2 else 0.018), u(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
        self.s_amp, self.s_lam, self.s_phi = u(0.01, 0.04), u(150, 400), u(0, 2 * np.pi)
        self.s_trend = u(-0.0002, 0.0006)
        self.t_fat = u(3.0, 16.0)
        self.fat_ant = u(0.0, 0.5)  # extra anterior fat
        self.fat_lat = u(0.0, 0.4)
        self.t_mus = u(4.0, 8.0)
        self.skin = u(1.0, 2.0)

        # ---- CT table under the patient
        self.has_table = u() < 0.75
        self.table_gap = u(0.5, 3.0)
        self.table_thick = u(8.0, 14.0)
        self.table_curv = u(0.0, 0.0008)
        self.table_half = a * u(1.05, 1.3)
        s_max = 1.0 + self.s_amp + abs(self.s_trend) * body_len
        self.table_top = y0 + b * s_max * (1 + sum(h[1] for h in self.harm)) + self.table_gap

        # ---- spine
        t_fat_post = self.t_fat * (1 - 0.5)
        vbx, vby = 13.0 * S * u(0.92, 1.08), 10.5 * S * u(0.92, 1.08)
        y_vb0 = y0 + b - 48.0 * S - t_fat_post + u(-3, 3)
        lord_amp, lord_lam, lord_phi = u(0, 4), u(250, 500), u(0, 2 * np.pi)
        x_sp = x0 + u(-2, 2)
        self.y_vb0 = y_vb0

        def y_vb(z):
            return y_vb0 + lord_amp * np.cos(2 * np.pi * (z - zr) / lord_lam + lord_phi)

        period = 20.0 * S * u(0.93, 1.07)
        disc_frac = u(0.2, 0.28)
        vphase0 = u()
        self.period, self.disc_frac, self.vphase0 = period, disc_frac, vphase0
        self.endplate = min(1.8 / period, 0.1)
        rcx, rcy = 7.0 * S * u(0.9, 1.1), 5.5 * S * u(0.9, 1.1)
        zfull = (self.zb0 - 1.0, self.zb1 + 1.0)

        def vphase(z):
            return np.mod((z - zr) / period + vphase0, 1.0)

        self._vphase = vphase
        sp = {}
        sp["body"] = _tube(
            lambda z: np.full_like(z, x_sp), y_vb, lambda z: vbx, lambda z: vby, zfull
        )
        canal_y = lambda z: y_vb(z) + vby + 1.0 * S + rcy  # noqa: E731
        sp["canal"] = _tube(
            lambda z: np.full_like(z, x_sp), canal_y, lambda z: rcx, lambda z: rcy, zfull
        )
        self._canal_y, self._rcy = canal_y, rcy
        ring_x, ring_y = rcx + 4.5 * S, rcy + 4.0 * S
        sp["ring"] = _tube(
            lambda z: np.full_like(z, x_sp), lambda z: canal_y(z) + 0.3 * rcy,
            lambda z: ring_x, lambda z: ring_y, zfull,
        )
        sp_len = 8.5 * S * u(0.9, 1.1)
        sp["spinous"] = _tube(
            lambda z: np.full_like(z, x_sp), lambda z: canal_y(z) + rcy + 2.0 * S + sp_len,
            lambda z: 2.6 * S, lambda z: sp_len, zfull,
            zmask=lambda z: (vphase(z) > 0.3) & (vphase(z) < 0.95),
        )
        tp_len = 9.0 * S * u(0.85, 1.15)
        for side_sign, name in ((-1, "tp_r"), (1, "tp_l")):
            sp[name] = _tube(
                lambda z, s=side_sign: np.full_like(z, x_sp + s * (rcx + 2.5 * S + tp_len)),
                lambda z: canal_y(z) - 1.5 * S,
                lambda z: tp_len, lambda z: 2.8 * S, zfull,
                zmask=lambda z: (vphase(z) > 0.35) & (vphase(z) < 0.7),
            )
        self.spine = sp
        self.vb_shell = (1.0 - 1.6 / min(vbx, vby)) ** 2  # inner level of the cortical shell

        # paraspinal muscles
        self.paraspinal = [
            _tube(
                lambda z, s=s: np.full_like(z, x_sp + s * 15.0 * S),
                lambda z: canal_y(z) + 11.0 * S,
                lambda z: 12.5 * S, lambda z: 11.5 * S, zfull,
            )
            for s in (-1.0, 1.0)
        ]

        # psoas: grows caudally from about the renal level
        ps_start = zr - 18.0 * S + u(-5, 5)
        ps_rate = u(0.12, 0.2)

        def ps_r(z):
            return S * np.clip(2.0 + ps_rate * (z - ps_start), 2.0, 13.0)

        self.psoas = [
            _tube(
                lambda z, s=s: x_sp + s * (vbx + 0.8 * ps_r(z) + 1.0),
                lambda z: y_vb(z) + 2.0 * S,
                ps_r, lambda z: 0.85 * ps_r(z), (ps_start, zfull[1]),
            )
            for s in (-1.0, 1.0)
        ]

        # ---- vessels: aorta (+ common iliacs), IVC
        ao_r = 7.5 * S * u(0.85, 1.15)
        ao_x = x_sp + vbx * 0.45 + u(0, 4)
        z_bif = zr + u(45, 62) * S
        wob_a, wob_l, wob_p = u(0, 3), u(120, 300), u(0, 2 * np.pi)

        def ao_cx(z):
            return ao_x + wob_a * np.sin(2 * np.pi * (z - zr) / wob_l + wob_p)

        def ao_cy(z):
            return y_vb(z) - vby - ao_r - 1.5

        self.aorta = [
            _tube(ao_cx, ao_cy, lambda z: ao_r * (1 - 0.0008 * _trend_z(z - zr)),
                  lambda z: ao_r * (1 - 0.0008 * _trend_z(z - zr)), (zfull[0], z_bif + 2.0))
        ]
        il_r = 0.68 * ao_r
        for s in (-1.0, 1.0):
            self.aorta.append(
                _tube(
                    lambda z, s=s: ao_cx(z_bif) + s * (0.3 * ao_r + 0.45 * np.maximum(z - z_bif, 0)),
                    lambda z: ao_cy(z_bif) - 0.15 * np.maximum(z - z_bif, 0),
                    lambda z: il_r, lambda z: il_r, (z_bif, max(zfull[1], z_bif + 1)),
                )
            )
        ivc_x = x_sp - vbx * 0.55 - 5.0 * S + u(-2, 2)
        ivc_rx, ivc_ry = 9.0 * S * u(0.8, 1.15), 6.5 * S * u(0.8, 1.15)
        self.ivc = _tube(
            lambda z: np.full_like(z, ivc_x), lambda z: y_vb(z) - vby - ivc_ry - 2.0 + 0 * z,
            lambda z: ivc_rx, lambda z: ivc_ry, (zfull[0], z_bif + 8.0),
        )

        # ---- solid organs
        def modes(n, lam, amp):
            return _fourier_modes(rng, n, lam, amp)

        liver_r = _ellipsoid(
            (zr - 30 * S + u(-8, 8), y0 - 0.06 * b + u(-9, 7), x0 - 0.44 * a + u(-7, 5)),
            (40 * S * u(0.88, 1.12), 45 * S * u(0.88, 1.12), 44 * S * u(0.88, 1.12)),
            alpha=u(-0.3, 0.3), shear_xy=(u(0.0, 0.25), u(-0.25, 0.1)),
            modes=modes(5, (50, 140), u(0.2, 0.4)),
        )
        ll_scale = u(0.6, 1.25)
        liver_l = _ellipsoid(
            (zr - 44 * S + u(-5, 5), y0 - 0.42 * b + u(-3, 3), x0 + 0.08 * a + u(-6, 6)),
            (34 * S * ll_scale, 15 * S * u(0.85, 1.15), 25 * S * u(0.85, 1.15)),
            alpha=u(-0.25, 0.25), bend=1.0 / (2 * 65 * S) * u(0.5, 1.5),
            shear_xy=(u(-0.15, 0.15), u(-0.1, 0.1)),
            modes=modes(4, (40, 110), u(0.15, 0.3)),
        )
        self.liver = [liver_r, liver_l]

        # gallbladder under the liver, right of midline
        self.has_gb = u() < 0.7
        gb_ctr = (zr - 2 * S + u(-6, 6), y0 - 0.28 * b + u(-5, 5), x0 - 0.22 * a + u(-5, 5))
        gb_semi = (11 * S * u(0.7, 1.2), 8 * S * u(0.7, 1.2), 18 * S * u(0.7, 1.2))
        self.gallbladder = _ellipsoid(gb_ctr, gb_semi, alpha=u(0.6, 1.4),
                                      shear_xy=(u(-0.2, 0.2), u(-0.3, 0.0)),
                                      modes=modes(2, (40, 90), 0.1))

        # spleen: posterolateral left, crescent concave towards the hilum (anteromedial)
        sp_c = (zr - 34 * S + u(-6, 6), y0 + 0.40 * b + u(-4, 4), x0 + 0.56 * a + u(-4, 4))
        hil = np.array([-(sp_c[2] - x0) / a, -(sp_c[1] - y0) / b])
        hil /= np.linalg.norm(hil)
        sp_alpha = math.atan2(hil[1], hil[0]) - np.pi / 2  # v axis points to the hilum
        self.spleen = _ellipsoid(
            sp_c, (28 * S * u(0.8, 1.2), 10 * S * u(0.8, 1.2), 27 * S * u(0.8, 1.2)),
            alpha=sp_alpha, bend=u(0.006, 0.014) / S, shear_xy=(u(-0.2, 0.1), u(-0.35, -0.05)),
            modes=modes(4, (35, 100), u(0.15, 0.3)),
        )

        # stomach: left upper quadrant, anterior; air-fluid level
        st_c = (zr - 40 * S + u(-6, 6), y0 - 0.22 * b + u(-5, 5), x0 + 0.28 * a + u(-5, 5))
        st_semi = (30 * S * u(0.8, 1.15), 17 * S * u(0.7, 1.2), 26 * S * u(0.8, 1.2))
        self.stomach = _ellipsoid(st_c, st_semi, alpha=u(-0.2, 0.7), bend=u(0.0, 0.012),
                                  modes=modes(4, (30, 90), u(0.15, 0.35)))
        self.stomach_wall_level = (1.0 - 3.0 / min(st_semi[:2])) ** 2
        self.stomach_gas_y = st_c[1] - st_semi[1] * u(-0.2, 0.9)
        self.stomach_has_gas = u() < 0.8

        # kidneys: either side of the spine, right one lower; hilum anteromedial
        self.kidneys = {}
        self.kidney_sinus = {}
        self.kidney_pelvis = {}
        zl = zr + u(-4, 6) * S
        zrgt = zl + u(4, 14) * S
        for name, s, zk in (("kidney_left", 1.0, zl), ("kidney_right", -1.0, zrgt)):
            kc = (zk, y_vb0 + 4 * S + u(-3, 3), x_sp + s * 37.0 * S * u(0.92, 1.08))
            hil = np.array([-s, -u(0.6, 1.4)])
            hil /= np.linalg.norm(hil)
            alpha = math.atan2(hil[1], hil[0]) - np.pi / 2 + u(-0.25, 0.25)
            semi = (13.5 * S * u(0.85, 1.15), 9.5 * S * u(0.85, 1.15), 28 * S * u(0.85, 1.15))
            shear = (-s * u(0.05, 0.2), u(-0.1, 0.1))  # upper pole more medial
            kid = _ellipsoid(kc, semi, alpha=alpha, shear_xy=shear, bend=u(0.01, 0.03) / S,
                             modes=modes(3, (30, 80), u(0.05, 0.15)), level_max=1.9)
            self.kidneys[name] = kid
            hc = (kc[0] + u(-3, 3), kc[1] + hil[1] * semi[1] * 0.65, kc[2] + hil[0] * semi[1] * 0.65)
            self.kidney_sinus[name] = _ellipsoid(
                hc, (semi[0] * 0.45, semi[1] * 0.55, semi[2] * 0.45), alpha=alpha, shear_xy=shear
            )
            self.kidney_pelvis[name] = _ellipsoid(
                hc, (semi[0] * 0.2, semi[1] * 0.3, semi[2] * 0.18), alpha=alpha, shear_xy=shear
            )
        self.medulla_level = u(0.5, 0.65)
        self.perirenal_level = u(1.4, 1.9)

        # ribs: in the wall, cranial part only, oblique (descending anteriorly)
        self.rib_period = 19.0 * S * u(0.9, 1.1)
        self.rib_phase = u()
        self.rib_zend = zr + u(-15, 10) * S
        self.rib_slope = u(1.8, 3.0)  # periods descended from back to front
        self.rib_duty = u(0.25, 0.35)
        self.rib_half_thick = 2.6 * S * u(0.85, 1.15)

        # ---- phase and HU table
        ph = u()
        self.phase = "arterial" if ph < 0.2 else "portal" if ph < 0.75 else "unenhanced"
        self._build_hu(rng, contrast_scale)
        self.bowel_cell = u(*_BOWEL_CELL_MM)
        self.bowel_thr = u(-0.7, 0.5)
        self.gas_thr = u(0.9, 1.8)
        self.bias_key = int(rng.integers(0, 2**62))
        self.tex_key = int(rng.integers(0, 2**62))
        self.bowel_key = int(rng.integers(0, 2**62))

    # ------------------------------------------------------------------ HU per tissue
    def _build_hu(self, rng: np.random.Generator, cs: float) -> None:
        u = rng.uniform
        mean = np.zeros(N_TISSUE)
        tex = np.zeros(N_TISSUE)
        phase = self.phase

        def organ(v):  # contrast_scale acts on organ enhancement around soft tissue (40 HU)
            return 40.0 + cs * (v - 40.0)

        mean[T_AIR] = -1000.0
        mean[T_TABLE_SHELL], mean[T_TABLE_CORE] = u(80, 250), u(-900, -700)
        mean[T_SKIN] = u(20, 45)
        mean[T_FAT] = u(-115, -90)
        mean[T_MUSCLE] = u(40, 52)
        mean[T_PARASPINAL] = mean[T_MUSCLE] + u(-4, 4)
        mean[T_PSOAS] = mean[T_MUSCLE] + u(-4, 4)
        mean[T_VISCERAL] = u(-120, -80)  # mesenteric fat; soft tissue mixed in below
        self.visceral_soft = u(20, 40)
        self.lumen_hu = u(0, 25)
        mean[T_LIVER] = organ(u(50, 70))
        mean[T_SPLEEN] = organ(u(40, 60))
        if phase == "arterial":
            cortex, medulla = u(180, 220), u(80, 130)
            aorta, ivc = u(220, 300), u(60, 100)
        elif phase == "portal":
            cortex = u(140, 220)
            medulla = cortex - u(0, 25)
            aorta, ivc = u(150, 220), u(110, 160)
        else:
            cortex = u(30, 42)
            medulla = cortex - u(0, 5)
            aorta, ivc = u(35, 50), u(35, 48)
        mean[T_KL_CORTEX] = mean[T_KR_CORTEX] = organ(cortex)
        mean[T_KL_MEDULLA] = mean[T_KR_MEDULLA] = organ(medulla)
        mean[T_SINUS] = u(-100, -70)
        mean[T_PELVIS] = u(0, 20)
        mean[T_PERIRENAL] = u(-115, -90)
        mean[T_AORTA] = organ(aorta)
        mean[T_IVC] = organ(ivc)
        mean[T_CANCELLOUS] = u(150, 300)
        mean[T_CORTICAL] = u(600, 1000)
        mean[T_POSTERIOR] = u(350, 650)
        mean[T_DISC] = u(70, 100)
        mean[T_CANAL] = u(10, 30)
        mean[T_RIB] = u(400, 750)
        mean[T_RIB_MARROW] = u(150, 280)
        mean[T_GALLBLADDER] = u(0, 20)
        mean[T_STOMACH_WALL] = u(35, 55) if phase == "unenhanced" else u(60, 100)
        mean[T_STOMACH_FLUID] = u(0, 30)
        mean[T_STOMACH_GAS] = u(-1000, -950)
        tex[:] = 3.0
        tex[T_AIR] = 0.0
        tex[[T_TABLE_SHELL, T_TABLE_CORE]] = 2.0
        tex[T_FAT] = 6.0
        tex[[T_MUSCLE, T_PARASPINAL, T_PSOAS]] = 4.0
        tex[T_LIVER] = u(1.5, 3.0)
        tex[T_SPLEEN] = u(1.5, 3.5)
        tex[[T_KL_CORTEX, T_KR_CORTEX, T_KL_MEDULLA, T_KR_MEDULLA]] = 5.0 if phase != "unenhanced" else 2.5
        tex[T_CANCELLOUS] = 25.0
        tex[T_CORTICAL] = 80.0
        tex[T_POSTERIOR] = 60.0
        tex[T_RIB] = 60.0
        tex[T_RIB_MARROW] = 20.0
        tex[[T_GALLBLADDER, T_STOMACH_FLUID, T_CANAL, T_PELVIS]] = 2.0
        tex[T_STOMACH_GAS] = 5.0
        self.mean_hu = mean
        self.tex_hu = tex

    # ------------------------------------------------------------------ body outline
    def _inplane_body(self, yy: np.ndarray, xx: np.ndarray) -> dict:
        dx = xx - self.x0
        dy = yy - self.y0
        dx, dy = np.broadcast_arrays(dx, dy)
        r = np.hypot(dx, dy)
        xa = np.abs(dx) / self.a
        yb = np.abs(dy) / self.b
        p = np.where(dy > 0, self.p_post, 2.0)
        rho0 = (xa**p + yb**p) ** (1.0 / p)
        theta = np.arctan2(dy / self.b, dx / self.a)
        h = np.ones_like(r)
        for k, amp, phi in self.harm:
            h = h + amp * np.cos(k * theta + phi)
        rho = rho0 / h
        with np.errstate(invalid="ignore", divide="ignore"):
            ux = np.where(r > 0, dx / np.maximum(r, 1e-9), 0.0)
            uy = np.where(r > 0, dy / np.maximum(r, 1e-9), 0.0)
        t_fat = self.t_fat * (
            1.0 - 0.5 * np.maximum(uy, 0) + self.fat_ant * np.maximum(-uy, 0) + self.fat_lat * np.abs(ux)
        )
        t_mus = self.t_mus * (1.0 + 0.3 * np.abs(ux))
        # angle from the posterior midline, 0 (back) .. pi (front), for the ribs
        ang = np.arccos(np.clip(uy, -1.0, 1.0))
        return {"rho": rho, "r": r, "uy": uy, "t_fat": t_fat, "t_mus": t_mus, "ang": ang}

    def body_scale(self, z: np.ndarray) -> np.ndarray:
        """Cross-section scale along z; 0 outside the body."""
        s = 1.0 + self.s_amp * np.sin(2 * np.pi * (z - self.z_ref) / self.s_lam + self.s_phi)
        # the trend levels off beyond TREND_REACH_MM: unbounded, a 2.5 m field of view
        # grew the body past the image at one end and shrank it to nothing at the other
        s = s + self.s_trend * _trend_z(z - self.z_ref)
        d_top, d_bottom = z - self.zb0, self.zb1 - z
        if self.cap_len > 0 and (self.cap_top or self.cap_bottom):
            d = np.minimum(d_top if self.cap_top else np.inf, d_bottom if self.cap_bottom else np.inf)
            t = np.clip(d / self.cap_len, 0.0, 1.0)
            s = s * (0.55 + 0.45 * np.sqrt(1.0 - (1.0 - t) ** 2))
        return np.where((d_top >= 0) & (d_bottom >= 0), s, 0.0)

    # ------------------------------------------------------------------ tissue map
    def classify(self, dom) -> np.ndarray:
        """Tissue class per point of the domain (grid block or scattered points)."""
        t = dom.zeros(np.uint8)
        bp = dom.inplane("body", self._inplane_body)
        s = self.body_scale(dom.zz)
        rho = bp["rho"]
        body = (rho <= s) & (s > 0)
        if not body.any():
            self._table(dom, t, body)
            return t
        depth = bp["r"] * (s / np.maximum(rho, 1e-9) - 1.0)
        wall = bp["t_fat"] + bp["t_mus"]
        t[body] = T_VISCERAL
        t[body & (depth < wall)] = T_MUSCLE
        t[body & (depth < bp["t_fat"])] = T_FAT
        t[body & (depth < self.skin)] = T_SKIN
        cavity = body & (depth >= wall)
        self._table(dom, t, body)

        def paint(sep, cls, region, level=1.0, only=None):
            sl, F = dom.eval(sep)
            if F is None:
                return None, None
            m = (F <= level - 1.0) & region[sl]
            sub = t[sl]
            if only is not None:
                m &= np.isin(sub, only)
            sub[m] = cls
            return sl, F

        for sep in self.paraspinal:
            paint(sep, T_PARASPINAL, body)
        sl, F = paint(self.stomach, T_STOMACH_WALL, cavity)
        if F is not None:
            sub = t[sl]
            inner = (F <= self.stomach_wall_level - 1.0) & cavity[sl]
            sub[inner] = T_STOMACH_FLUID
            if self.stomach_has_gas:
                _, yy, _ = dom.coords(sl)
                sub[inner & (yy < self.stomach_gas_y)] = T_STOMACH_GAS
        for sep in self.liver:
            paint(sep, T_LIVER, cavity)
        if self.has_gb:
            paint(self.gallbladder, T_GALLBLADDER, cavity)
        paint(self.spleen, T_SPLEEN, cavity)
        for sep in self.psoas:
            paint(sep, T_PSOAS, cavity)
        paint(self.ivc, T_IVC, cavity)
        for name, cortex, medulla in (
            ("kidney_left", T_KL_CORTEX, T_KL_MEDULLA),
            ("kidney_right", T_KR_CORTEX, T_KR_MEDULLA),
        ):
            kid = self.kidneys[name]
            sl, F = dom.eval(kid)
            if F is not None:
                sub = t[sl]
                cav = cavity[sl]
                sub[(F <= self.perirenal_level - 1.0) & cav & (sub == T_VISCERAL)] = T_PERIRENAL
                sub[(F <= 0.0) & cav] = cortex
                sub[(F <= self.medulla_level - 1.0) & cav] = medulla
                paint(self.kidney_sinus[name], T_SINUS, cavity, only=(cortex, medulla))
                paint(self.kidney_pelvis[name], T_PELVIS, cavity, only=(T_SINUS,))
        for sep in self.aorta:
            paint(sep, T_AORTA, cavity)
        self._ribs(dom, t, body, depth, bp)
        # spine last: bone wins
        sp = self.spine
        for key in ("tp_r", "tp_l", "spinous"):
            paint(sp[key], T_POSTERIOR, body)
        sl, F = dom.eval(sp["ring"])
        if F is not None:  # neural arch: pedicles, laminae; open anteriorly (vertebral body)
            zz, yy, _ = dom.coords(sl)
            t[sl][(F <= 0.0) & body[sl] & (yy >= self._canal_y(zz) - 0.2 * self._rcy)] = T_POSTERIOR
        paint(sp["canal"], T_CANAL, body)
        sl, F = dom.eval(sp["body"])
        if F is not None:
            sub = t[sl]
            zz, _, _ = dom.coords(sl)
            vb = (F <= 0.0) & body[sl]
            ph = self._vphase(zz)
            disc = ph < self.disc_frac
            endplate = (ph < self.disc_frac + self.endplate) | (ph > 1.0 - self.endplate)
            inner = F <= self.vb_shell - 1.0
            sub[vb] = T_CORTICAL
            sub[vb & inner & ~endplate] = T_CANCELLOUS
            sub[vb & disc] = T_DISC
        return t

    def _table(self, dom, t, body) -> None:
        if not self.has_table:
            return
        yy, xx = dom.yy, dom.xx
        dx = xx - self.x0
        top = self.table_top - self.table_curv * dx * dx
        dy = yy - top
        inside = (dy >= 0) & (dy <= self.table_thick) & (np.abs(dx) <= self.table_half)
        if not np.any(inside):
            return
        shell = inside & ((dy < 2.0) | (dy > self.table_thick - 2.0))
        inside = np.broadcast_to(inside, t.shape) & ~body
        shell = np.broadcast_to(shell, t.shape) & ~body
        t[inside] = T_TABLE_CORE
        t[shell] = T_TABLE_SHELL

    def _ribs(self, dom, t, body, depth, bp) -> None:
        zz = dom.zz
        z_hi = self.rib_zend + 25.0 * self.S
        if np.all(zz > z_hi):
            return
        ang = bp["ang"]
        band = (depth >= bp["t_fat"]) & (depth <= bp["t_fat"] + bp["t_mus"] + 6.0 * self.S)
        band &= body & (ang > 0.5) & (ang < 2.3)
        if not band.any():
            return
        # z where the rib lies descends from back (ang 0.5) to front (ang 2.3); each rib
        # cross-section is an ellipse in (phase along z, depth) coordinates
        zshift = self.rib_slope * self.rib_period * (ang - 0.5) / 1.8
        ph = np.mod((zz - self.z_ref - zshift) / self.rib_period + self.rib_phase, 1.0)
        half = 0.5 * self.rib_duty
        dc = bp["t_fat"] + 0.55 * bp["t_mus"] + 1.0 * self.S
        q = ((ph - half) / half) ** 2 + ((depth - dc) / self.rib_half_thick) ** 2
        # lower ribs end further down at the back than at the front
        zend = self.rib_zend + 25.0 * self.S * (1.0 - (ang - 0.5) / 1.8)
        rib = band & (q <= 1.0) & (zz <= zend)
        t[rib] = T_RIB
        t[rib & (q <= 0.3)] = T_RIB_MARROW


# --------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(phi), np.sin(phi) * np.sin(theta), np.sin(phi) * np.cos(theta)], axis=1)


_SPHERE = np.concatenate([_fibonacci_sphere(48), 0.5 * _fibonacci_sphere(12), np.zeros((1, 3))])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q  # rows: principal axes (orthonormal)


def _place_lesions(
    rng: np.random.Generator,
    anat: _Anatomy,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing: tuple[float, float, float],
    n_lesions: int | None,
    radius_range: tuple[float, float],
    contrast_scale: float,
    body_z_fraction: float | None = None,
    drawn_count: list[int] | None = None,
) -> list[dict]:
    """Choose lesion ellipsoids (mm, patient frame) that fit inside their host organ
    (``body_z_fraction``: only to name it when the body's slab is too thin).
    ``drawn_count`` receives how many were drawn (a random number may not all fit)."""
    drawn_count = [] if drawn_count is None else drawn_count
    count = int(rng.integers(1, 7)) if n_lesions is None else int(n_lesions)
    lo_r, hi_r = radius_range
    sp = np.asarray(spacing, dtype=float)
    lo_c = np.array([c[0] for c in coords])
    n_c = np.array([len(c) for c in coords])
    fov_lo = lo_c - sp / 2
    fov_hi = lo_c + (n_c - 0.5) * sp
    organ_boxes = {
        "liver": np.stack([anat.liver[0].bbox, anat.liver[1].bbox]).transpose(1, 2, 0),
        "spleen": anat.spleen.bbox[..., None],
        "kidney_left": anat.kidneys["kidney_left"].bbox[..., None],
        "kidney_right": anat.kidneys["kidney_right"].bbox[..., None],
    }
    placed: list[dict] = []
    drawn_count[:] = [count]
    for _ in range(count):
        r = float(np.exp(rng.uniform(math.log(lo_r), math.log(hi_r))))
        host = str(rng.choice(LESION_HOSTS, p=[0.68, 0.14, 0.09, 0.09]))
        hypo = rng.uniform() < 0.68
        mag = rng.uniform(10, 60) if hypo else rng.uniform(10, 40)
        if rng.uniform() < 0.2:
            mag = rng.uniform(10, 15)  # faint
        contrast = (-mag if hypo else mag) * contrast_scale
        ratios = np.exp(rng.uniform(-0.2, 0.2, size=3))
        ratios /= np.prod(ratios) ** (1 / 3)
        rot = _random_rotation(rng)
        tex_amp = float(rng.uniform(0.5, 2.0))
        hosts = [host] + [h for h in LESION_HOSTS if h != host]
        done = None
        radius = r
        while True:
            semi = radius * ratios
            for h in hosts:
                done = _try_place(rng, anat, h, organ_boxes[h], semi, rot, placed, fov_lo, fov_hi,
                                  lo_c, sp, n_c)
                if done is not None:
                    break
            if done is not None or radius <= lo_r:
                break
            radius = max(radius * 0.75, lo_r)  # too big for the organs here: shrink, not below min
        if done is None:
            if n_lesions is None:
                break
            # the body's slab (all slices, or body_z_fraction of them): a lesion must lie
            # inside it, its diameter (up to exp(0.2) longer along one axis) centred on a slice
            thickness = float(anat.zb1 - anat.zb0)
            needed = 2 * lo_r * math.exp(0.2) + float(sp[0])
            # only when none fits: once one did, the slab was thick enough and the organs
            # were full (a one-slice volume's "needed" always exceeds its thickness)
            if not placed and thickness < needed:  # more rows or columns never help
                cure = ("a larger body_z_fraction, more or thicker slices"
                        if body_z_fraction is not None and body_z_fraction < 1
                        else "more or thicker slices")
                # the body's slices, not all of them: 48 × 2.5 mm read as 120 mm, and the
                # 107.5 said looked wrong
                body_slices = int(round(thickness / float(sp[0])))
                raise MedsegInputError(
                    f"could not fit {count} lesions (placed {len(placed)}): the body spans "
                    f"{thickness:g} mm along z ({body_slices} of the {int(n_c[0])} slices × "
                    f"{float(sp[0]):g} mm hold it), less than the smallest "
                    f"lesion needs (about {needed:.1f} mm); give {cure}, a "
                    "smaller lesion_radius_mm minimum, or no lesions (n_lesions 0)")
            raise MedsegInputError(
                f"could not fit {count} lesions into the organs inside this field of view "
                f"(placed {len(placed)}); use a larger field of view (shape x spacing), "
                # a lesion is shrunk to fit down to the minimum, so the maximum never helps
                "a smaller lesion_radius_mm minimum or fewer lesions"
            )
        center_mm, h = done
        placed.append(
            {
                "center_mm": center_mm,
                "semi": radius * ratios,
                "rot": rot,
                "radius": radius,
                "organ": h,
                "contrast": float(contrast),
                "tex_amp": tex_amp,
            }
        )
    return placed


def _try_place(rng, anat, host, boxes, semi, rot, placed, fov_lo, fov_hi, lo_c, sp, n_c):
    extent = float(np.max(semi))
    # candidate region: host bbox intersected with the field of view (shrunk by the extent
    # when the field of view allows it, so the whole lesion is imaged)
    lo = np.max(np.stack([boxes[:, 0, :].min(axis=1), fov_lo + extent]), axis=0)
    hi = np.min(np.stack([boxes[:, 1, :].max(axis=1), fov_hi - extent]), axis=0)
    bad = hi < lo
    if bad.any():  # tiny field of view: only ask for the centre to be inside
        lo = np.where(bad, np.maximum(boxes[:, 0, :].min(axis=1), fov_lo), lo)
        hi = np.where(bad, np.minimum(boxes[:, 1, :].max(axis=1), fov_hi), hi)
        if np.any(hi < lo):
            return None
    host_t = np.array(_HOST_TISSUES[host])
    offsets = (_SPHERE * semi) @ rot  # (k, 3) in (z, y, x)
    # the eight batches of candidates are drawn and their centres classified at once (one
    # pass over the anatomy, not eight: a crowded organ took seconds per lesion); the
    # generator is then wound back to where the batches drawn one by one left it, so a
    # seed gives the phantom it always gave
    state = rng.bit_generator.state
    batches = rng.uniform(lo, hi, size=(_BATCHES, 128, 3))
    # snap to voxel centres so the centre voxel carries the lesion label
    idx = np.clip(np.round((batches - lo_c) / sp), 0, n_c - 1)
    batches = lo_c + idx * sp
    flat = batches.reshape(-1, 3)
    # cheap test first: is the centre in the host organ?
    centre_in_host = np.isin(anat.classify(_Points(flat[:, 0], flat[:, 1], flat[:, 2])),
                             host_t).reshape(_BATCHES, 128)
    for batch in range(_BATCHES):
        cand, in_host = batches[batch], centre_in_host[batch]
        if placed:
            ok = np.ones(len(cand), dtype=bool)
            for p in placed:
                d = np.linalg.norm(cand - p["center_mm"], axis=1)
                ok &= d > extent + float(np.max(p["semi"])) + 1.5
            cand, in_host = cand[ok], in_host[ok]
        cand = cand[in_host][:24]
        if not len(cand):
            continue
        pts = cand[:, None, :] + offsets[None, :, :]
        tis = anat.classify(_Points(pts[..., 0], pts[..., 1], pts[..., 2])).reshape(pts.shape[:2])
        good = np.isin(tis, host_t).all(axis=1)
        if good.any():
            rng.bit_generator.state = state
            rng.uniform(lo, hi, size=((batch + 1) * 128, 3))  # the batches drawn until here
            return cand[int(np.argmax(good))], host
    return None


_BATCHES = 8  # candidate batches per lesion, host organ and size


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_float(v: Any, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    try:
        if isinstance(v, (bool, np.bool_, str, bytes)):  # True is not 1.0 HU, nor "15"
            raise TypeError(v)
        fv = float(v)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"{name} must be a number, got {v!r}") from exc
    if not math.isfinite(fv) or fv > hi or fv < lo or (lo_open and fv == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise MedsegInputError(f"{name} must be in {bound}, got {v!r}")
    return fv


def _validate(shape, spacing, seed, n_lesions, lesion_radius_mm, noise_hu, blur_sigma_mm,
              contrast_scale, body_z_fraction, nonuniformity_hu):
    try:
        shp = tuple(shape)
    except TypeError as exc:
        raise MedsegInputError(f"shape must be three positive integers (z, y, x), got {shape!r}") from exc
    if len(shp) != 3 or not all(_is_int(s) and s > 0 for s in shp):
        raise MedsegInputError(f"shape must be three positive integers (z, y, x), got {shape!r}")
    shp = tuple(int(s) for s in shp)
    if max(shp) > MAX_AXIS:
        raise MedsegInputError(f"shape {shp} is too large: at most {MAX_AXIS} voxels per axis")
    if math.prod(shp) > MAX_VOXELS:
        # in words a user can act on ("at most 268435456 voxels" was hard to read)
        raise MedsegInputError(
            f"shape {shp} is too large: {math.prod(shp) / 1e6:.0f} million voxels, at most "
            f"{MAX_VOXELS / 1e6:.0f} million in all (1024 × 512 × 512); take fewer slices or "
            "a smaller grid")
    try:
        if isinstance(spacing, (str, bytes)):  # "123" is not (1, 2, 3)
            raise TypeError(spacing)
        spc = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"spacing must be three positive numbers in mm, got {spacing!r}") from exc
    if len(spc) != 3 or not all(math.isfinite(s) and s > 0 for s in spc):
        raise MedsegInputError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    if max(spc) > 100.0:
        raise MedsegInputError(f"spacing {spc} is absurd: at most 100 mm per axis")
    if min(spc) < 0.01:  # the blur kernels grow as 1 / spacing: 1e-9 mm took 24 GB
        raise MedsegInputError(f"spacing {spc} is too fine: at least 0.01 mm per axis")
    fov = tuple(n * d for n, d in zip(shp, spc))
    texture_bytes = 12 * math.prod(math.ceil(f / TEXTURE_CELL_MM) + 4 for f in fov)
    # each noise field (texture, bowel, bias) keeps a float32 table of its z lattice
    # planes by every (y, x) voxel: 64 slices of 256² at 100 mm took 742 MiB for a 16 MiB
    # image, and the check above passed 20 GiB of them
    texture_bytes += 4 * shp[1] * shp[2] * sum(
        math.ceil(fov[0] / cell) + 4 for cell in (TEXTURE_CELL_MM, _BOWEL_CELL_MM[0], 70.0))
    if texture_bytes > MAX_TEXTURE_BYTES:
        raise MedsegInputError(
            f"the field of view, {tuple(round(f) for f in fov)} mm (z, y, x), is too large: "
            f"its {TEXTURE_CELL_MM:g} mm tissue texture would take about "
            f"{texture_bytes / 2**30:.0f} GiB; use fewer voxels or a finer spacing (an "
            "abdomen is about 400 mm across)")
    if not _is_int(seed) or seed < 0:
        raise MedsegInputError(f"seed must be a non-negative integer, got {seed!r}")
    if n_lesions is not None and (not _is_int(n_lesions) or not 0 <= n_lesions <= MAX_LESIONS):
        raise MedsegInputError(f"n_lesions must be None or an integer in [0, {MAX_LESIONS}], got {n_lesions!r}")
    try:
        if isinstance(lesion_radius_mm, (str, bytes)):  # "25" is not (2, 5)
            raise TypeError(lesion_radius_mm)
        lr = tuple(float(v) for v in lesion_radius_mm)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(f"lesion_radius_mm must be (min, max) in mm, got {lesion_radius_mm!r}") from exc
    if len(lr) != 2 or not all(math.isfinite(v) for v in lr) or not 0 < lr[0] <= lr[1] <= 50.0:
        raise MedsegInputError(
            f"lesion_radius_mm must be (min, max) with 0 < min <= max <= 50 mm, got {lesion_radius_mm!r}"
        )
    nh = None if noise_hu is None else _check_float(noise_hu, "noise_hu", 0.0, 500.0)
    if blur_sigma_mm is None:
        bs = None
    else:
        if isinstance(blur_sigma_mm, numbers.Real):
            vals = (blur_sigma_mm,) * 3
        else:
            try:
                vals = tuple(blur_sigma_mm)
            except TypeError as exc:
                raise MedsegInputError(f"blur_sigma_mm must be a number or (z, y, x), got {blur_sigma_mm!r}") from exc
            if len(vals) != 3:
                raise MedsegInputError(f"blur_sigma_mm must be a number or (z, y, x), got {blur_sigma_mm!r}")
        bs = tuple(_check_float(v, "blur_sigma_mm", 0.0, 20.0) for v in vals)
    too_wide = [f"{b:g} mm is {b / d:.0f} voxels along {ax}"
                for b, d, ax in zip(bs or (), spc, "zyx") if b / d > MAX_BLUR_VOXELS]
    if too_wide:  # the blur's cost grows with its width in voxels
        raise MedsegInputError(f"blur_sigma_mm {', '.join(too_wide)}; at most "
                               f"{MAX_BLUR_VOXELS} voxels")
    cs = _check_float(contrast_scale, "contrast_scale", 0.0, 10.0)
    bz = None if body_z_fraction is None else _check_float(body_z_fraction, "body_z_fraction", 0.0, 1.0, lo_open=True)
    nu = None if nonuniformity_hu is None else _check_float(nonuniformity_hu, "nonuniformity_hu", 0.0, 200.0)
    return shp, spc, int(seed), n_lesions, lr, nh, bs, cs, bz, nu


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


def generate_phantom(*args: Any, **kwargs: Any) -> Phantom:
    """Generate a synthetic abdominal CT phantom with exact labels (the arguments are
    :func:`phantom_job`'s, which this runs to the end).

    Parameters
    ----------
    shape, spacing
        Grid (z, y, x) in voxels and mm. The organs are defined in mm, so the same seed at
        another spacing over the same field of view gives the same organs; the lesions are
        placed on the voxel grid and usually differ (another grid or slice count draws
        other candidate centres from the same stream).
    seed
        Non-negative integer; the same arguments and seed give the same labels and
        lesions, and the same image bit for bit at the same thread count on the same
        kind of CPU (float32 sums split across threads, or done by another CPU's code
        path of the maths library, round differently: under 0.001 HU).
    n_lesions
        None: 1 to 6, drawn from the seed (fewer if the field of view holds too little
        organ). An int: exactly that many (0 allowed); raises MedsegInputError if they do
        not fit in the organs inside the field of view.
    lesion_radius_mm
        (min, max) equivalent-sphere radius; drawn log-uniformly so small lesions are
        common. A lesion too big for any organ in view is shrunk, never below min.
    noise_hu
        Standard deviation of the (slightly in-plane correlated) Gaussian noise in HU.
        None: drawn in [8, 25]. 0: no noise.
    blur_sigma_mm
        Gaussian blur in mm, a number or (z, y, x). None: 0.4-0.9 mm in-plane and at
        least 0.3 x the slice spacing along z. 0: no blur.
    contrast_scale
        Scales organ enhancement (around 40 HU) and lesion contrast: < 1 gives a flatter,
        harder image, for domain-shift tests.
    body_z_fraction
        Fraction of slices that contain the body. None: 1.0 for about a fifth of seeds,
        else 0.72-0.95 with the empty slices at one or both ends.
    nonuniformity_hu
        Amplitude of a smooth additive intensity nonuniformity inside the body (cupping
        plus low-frequency drift). None: drawn in [0, 10]. 0: none.
    extra_structures
        Names from :data:`EXTRA_STRUCTURES` ("gallbladder", "stomach") whose exact masks
        to return in ``Phantom.structure_masks``; ``labels`` is unchanged (they stay
        "body"). The image does not depend on this argument.
    """
    return run_to_completion(phantom_job(*args, **kwargs))


def phantom_job(
    shape: Sequence[int] = (64, 256, 256),
    spacing: Sequence[float] = (2.5, 0.8, 0.8),
    seed: int = 0,
    *,
    n_lesions: int | None = None,
    lesion_radius_mm: Sequence[float] = (2.0, 15.0),
    noise_hu: float | None = None,
    blur_sigma_mm: float | Sequence[float] | None = None,
    contrast_scale: float = 1.0,
    body_z_fraction: float | None = None,
    nonuniformity_hu: float | None = None,
    extra_structures: Sequence[str] = (),
) -> Job[Phantom]:
    """:func:`generate_phantom` as a long job (core.progress): yields a :class:`Progress`
    after each slab of slices it draws and before the blur and the noise, so a widget can
    show progress and cancel between them (a 200×512×512 phantom takes ~15 s here).
    Returns the same :class:`Phantom` as :func:`generate_phantom` with the same arguments
    (described there)."""
    try:
        if not isinstance(extra_structures, str):  # an iterator is used up by one pass
            extra_structures = tuple(extra_structures)
        unknown = sorted(set(extra_structures) - set(EXTRA_STRUCTURES))
    except TypeError:  # None, a number, a list of lists
        unknown = [extra_structures]
    if isinstance(extra_structures, str) or unknown:
        raise MedsegInputError(
            f"extra_structures must be a list of {', '.join(EXTRA_STRUCTURES)}; got {extra_structures!r}")
    (shape, spacing, seed, n_lesions, lesion_radius_mm, noise_hu, blur_sigma_mm, contrast_scale,
     body_z_fraction, nonuniformity_hu) = _validate(
        shape, spacing, seed, n_lesions, lesion_radius_mm, noise_hu, blur_sigma_mm,
        contrast_scale, body_z_fraction, nonuniformity_hu)
    nz, ny, nx = shape
    # refused before allocating: the largest phantom took 4.4 GB, and a machine swapping
    # to a halt takes the user's open work with it
    require_memory(PEAK_FIXED_BYTES + PEAK_BYTES_PER_VOXEL * nz * ny * nx,
                   f"a {nz} × {ny} × {nx} phantom",
                   "take fewer slices or a smaller grid, or close other programs")
    sz, sy, sx = spacing
    zc = (np.arange(nz) - (nz - 1) / 2.0) * sz
    yc = (np.arange(ny) - (ny - 1) / 2.0) * sy
    xc = (np.arange(nx) - (nx - 1) / 2.0) * sx

    ss = np.random.SeedSequence(seed)
    rng_anat, rng_les, rng_img, rng_noise = (np.random.default_rng(s) for s in ss.spawn(4))

    anat = _Anatomy(rng_anat, zc, spacing, body_z_fraction, contrast_scale)

    # imaging parameters: always drawn, so explicit values do not shift other draws
    noise_draw = rng_img.uniform(8.0, 25.0)
    blur_draw = rng_img.uniform(0.4, 0.9)
    nonu_draw = rng_img.uniform(0.0, 10.0)
    corr_draw = rng_img.uniform(0.4, 0.8)
    noise = noise_draw if noise_hu is None else noise_hu
    if blur_sigma_mm is None:
        blur = (max(blur_draw, 0.3 * sz), blur_draw, blur_draw)
    else:
        blur = blur_sigma_mm
    nonu = nonu_draw if nonuniformity_hu is None else nonuniformity_hu

    drawn: list[int] = []
    lesions = _place_lesions(rng_les, anat, (zc, yc, xc), spacing, n_lesions, lesion_radius_mm,
                             contrast_scale, body_z_fraction, drawn)

    # ---- render block by block
    hu = np.empty(shape, dtype=np.float32)
    labels = np.empty(shape, dtype=np.uint8)
    masks = {name: np.zeros(shape, dtype=bool) for name in dict.fromkeys(extra_structures)}
    cache: dict = {}
    tex_field = _ValueNoise(anat.tex_key, TEXTURE_CELL_MM, zc, yc, xc)
    bowel_field = _ValueNoise(anat.bowel_key, anat.bowel_cell, zc, yc, xc)
    bias_field = _ValueNoise(anat.bias_key, 70.0, zc, yc, xc) if nonu > 0 else None
    mean_lut = anat.mean_hu.astype(np.float32)
    tex_lut = anat.tex_hu.astype(np.float32)
    les_boxes = []
    for les in lesions:
        ext = float(np.max(les["semi"])) + 1e-6
        c = les["center_mm"]
        lo = np.ceil((c - ext - np.array([zc[0], yc[0], xc[0]])) / spacing - 1e-9).astype(int)
        hi = np.floor((c + ext - np.array([zc[0], yc[0], xc[0]])) / spacing + 1e-9).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, shape)
        les_boxes.append((lo, hi))

    block = max(1, min(nz, 2_000_000 // (ny * nx)))
    for k0 in range(0, nz, block):
        k1 = min(nz, k0 + block)
        dom = _Grid(zc[k0:k1], yc, xc, cache)
        t = anat.classify(dom)
        tex = tex_field.block(k0, k1)
        h = mean_lut[t]
        h += tex_lut[t] * tex
        vis = t == T_VISCERAL
        if vis.any():
            nb = bowel_field.block(k0, k1)[vis]
            tv = tex[vis]
            soft_w = _sigmoid((nb - anat.bowel_thr) / 0.12)
            val = h[vis] + (anat.visceral_soft + 4.0 * tv - h[vis]) * soft_w
            lumen_w = _sigmoid((nb - anat.bowel_thr - 1.0) / 0.1)
            gas_w = lumen_w * _sigmoid((tv - anat.gas_thr) / 0.12)
            val = val * (1 - lumen_w) + (anat.lumen_hu + 2.0 * tv) * lumen_w
            val = val * (1 - gas_w) + (-960.0 + 10.0 * tv) * gas_w
            h[vis] = val
        # lesions override their host (label and HU)
        for les, (lo, hi) in zip(lesions, les_boxes):
            a0, a1 = max(lo[0], k0), min(hi[0], k1)
            if a1 <= a0 or hi[1] <= lo[1] or hi[2] <= lo[2]:
                continue
            sl = (slice(a0 - k0, a1 - k0), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
            d = np.stack(
                np.broadcast_arrays(
                    zc[a0:a1, None, None] - les["center_mm"][0],
                    yc[None, lo[1]:hi[1], None] - les["center_mm"][1],
                    xc[None, None, lo[2]:hi[2]] - les["center_mm"][2],
                ),
                axis=-1,
            )
            loc = d @ les["rot"].T  # coordinates along the principal axes
            q = np.sum((loc / les["semi"]) ** 2, axis=-1)
            sub_t = t[sl]
            m = (q <= 1.0) & np.isin(sub_t, _HOST_TISSUES[les["organ"]])
            base = anat.mean_hu[_HOST_MEAN_TISSUE[les["organ"]]]
            sub_h = h[sl]
            sub_h[m] = base + les["contrast"] + les["tex_amp"] * tex[sl][m] * 2.0
            sub_t[m] = T_LESION
        if bias_field is not None:
            body = _TISSUE_LABEL[t] > 0
            if body.any():
                bp = dom.inplane("body", anat._inplane_body)
                cup = np.broadcast_to(0.5 - np.minimum(bp["rho"], 1.0) ** 2, t.shape)
                field_ = 0.6 * bias_field.block(k0, k1) + 0.8 * cup
                h[body] += np.float32(nonu) * field_[body]
        hu[k0:k1] = h
        labels[k0:k1] = _TISSUE_LABEL[t]
        for name, mask in masks.items():
            mask[k0:k1] = np.isin(t, EXTRA_STRUCTURES[name])
        yield Progress(k1, nz + 2, f"drawing slices {k1}/{nz}")

    # ---- imaging effects
    sig_vox = [b / s for b, s in zip(blur, spacing)]
    if any(sv > 0.05 for sv in sig_vox):
        yield Progress(nz, nz + 2, "blurring")
        hu = ndimage.gaussian_filter(hu, sigma=[sv if sv > 0.05 else 0.0 for sv in sig_vox],
                                     mode="nearest", truncate=3.0)
    if noise > 0:
        yield Progress(nz + 1, nz + 2, "adding noise")
        n = rng_noise.standard_normal(size=shape, dtype=np.float32)
        corr = corr_draw  # in-plane correlation (pixels): CT noise has texture
        n = ndimage.gaussian_filter1d(n, corr, axis=1, mode="wrap", truncate=3.0)
        n = ndimage.gaussian_filter1d(n, corr, axis=2, mode="wrap", truncate=3.0)
        delta = np.zeros(13, dtype=np.float64)
        delta[6] = 1.0
        k = ndimage.gaussian_filter1d(delta, corr, truncate=3.0)
        std = float(np.sum(k * k))  # two 1D passes: variance factor sum(k^2)^2
        n *= np.float32(noise / std)
        hu += n
    np.clip(hu, HU_RANGE[0], HU_RANGE[1], out=hu)

    # ---- ground truth summaries
    has_body = labels.reshape(nz, -1).max(axis=1) > 0
    has_lesion = (labels == LESION_LABEL).reshape(nz, -1).any(axis=1)
    slice_classes = np.where(has_lesion, 2, np.where(has_body, 1, 0)).astype(np.int64)

    origin_zyx = np.array([zc[0], yc[0], xc[0]])
    out_lesions = []
    for les in lesions:
        idx = (les["center_mm"] - origin_zyx) / np.asarray(spacing)
        out_lesions.append(
            Lesion(
                center_zyx=tuple(float(round(v, 6)) for v in idx),
                radius_mm=float(np.prod(les["semi"]) ** (1 / 3)),
                radii_mm_zyx=tuple(float(v) for v in les["semi"]),
                contrast_hu=float(les["contrast"]),
                organ=les["organ"],
                axes_zyx=tuple(tuple(float(v) for v in row) for row in les["rot"]),
            )
        )

    m = anat.mean_hu
    hu_means = {
        "air": m[T_AIR], "subcutaneous_fat": m[T_FAT], "muscle": m[T_MUSCLE],
        "visceral_fat": m[T_VISCERAL], "visceral_soft_tissue": anat.visceral_soft,
        "liver": m[T_LIVER], "spleen": m[T_SPLEEN], "kidney_cortex": m[T_KL_CORTEX],
        "kidney_medulla": m[T_KL_MEDULLA], "aorta": m[T_AORTA], "ivc": m[T_IVC],
        "cancellous_bone": m[T_CANCELLOUS], "cortical_bone": m[T_CORTICAL],
        "posterior_elements": m[T_POSTERIOR], "disc": m[T_DISC], "spinal_canal": m[T_CANAL],
        "rib": m[T_RIB], "gallbladder": m[T_GALLBLADDER],
    }
    volume = Volume(
        array=hu,
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        modality="CT",
        metadata={
            "source_format": "phantom",
            "phantom_seed": seed,
            # with the seed, what reproduces it (the widget and the sample differ in noise)
            "phantom_settings": {
                "n_lesions": "random" if n_lesions is None else int(n_lesions),
                "lesions_drawn": int(drawn[0]) if drawn else 0,
                "lesion_radius_mm": [float(v) for v in lesion_radius_mm],
                "noise_hu": float(noise),
                "blur_sigma_mm": [float(b) for b in blur],
                "nonuniformity_hu": float(nonu),
                "contrast_scale": float(contrast_scale),
                "body_z_fraction": None if body_z_fraction is None else float(body_z_fraction),
            },
            "series_description": f"synthetic abdominal CT phantom ({anat.phase} phase)",
            "body_part": "ABDOMEN",
            "slice_thickness_mm": float(sz),
            "rescale_type": "HU",
        },
    )
    return Phantom(
        volume=volume,
        labels=labels,
        lesions=tuple(out_lesions),
        slice_classes=slice_classes,
        phase=anat.phase,
        noise_hu=float(noise),
        blur_sigma_mm=tuple(float(b) for b in blur),
        hu_means={k: float(v) for k, v in hu_means.items()},
        seed=seed,
        structure_masks=masks,
    )


# help() and IDEs show generate_phantom's real arguments (they are phantom_job's)
generate_phantom.__signature__ = inspect.signature(phantom_job).replace(  # type: ignore[attr-defined]
    return_annotation="Phantom")
