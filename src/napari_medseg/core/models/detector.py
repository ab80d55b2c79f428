"""Lesion detector, CenterNet-style: a centre heatmap and a size map per pixel, 2.5D input.

The network sees ``in_slices`` adjacent slices as channels (default 3: z−1, z, z+1) and
predicts, for the middle slice, a lesion-centre heatmap (1 channel, logits; the sigmoid
is a centre score in [0, 1] trained towards a Gaussian around each lesion centre, 1 at the
centre: a score to rank and threshold, not a calibrated probability) and a size map (log
of the lesion diameter in mm). Run it over every slice, stack the outputs into (z, y, x) maps and call
:func:`extract_peaks` for the 3D detections.

Layout (default ``widths=(16, 32, 64)``): the same space-to-depth U-Net as the segmenter
without the recurrence: pixel_unshuffle(2) → enc /2 → enc /4 → enc /8 (dilated; each
encoder stage ``convs_per_stage`` conv → BN → activation, default 2) → dec /4
→ dec /2 → a 2×2 stride-2 transposed conv (= 1×1 conv + pixel_shuffle) to H × W with two
channels: heatmap logits and log-diameter.

``members`` > 1 makes one detector of several independently trained networks of that
layout (:meth:`LesionDetector.ensemble`): the forward pass averages their centre scores
(after the sigmoid) and their diameters, and returns them in the same
:class:`DetectorOutput` form, so inference, explanation, fine-tuning and the model card
treat it as any detector. Averaging seeds was the one lever measured to find more lesions
(docs/models.md, "Seeds and an ensemble").
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from torch import nn

from ..errors import MedsegInputError
from .classifier import ConvBNAct, check_input, check_positive_ints

TOTAL_STRIDE = 8
#: heatmap bias at init: sigmoid(−2.19) ≈ 0.1, the CenterNet prior (stable focal loss)
HEATMAP_PRIOR_BIAS = -2.19
#: size bias at init: exp(2.3) ≈ 10 mm
SIZE_PRIOR_BIAS = math.log(10.0)


class DetectorOutput(NamedTuple):
    heatmap: torch.Tensor  # (N, 1, H, W) logits of "a lesion centre is here"
    log_diameter: torch.Tensor  # (N, 1, H, W) log of the diameter in mm


class Peak(NamedTuple):
    z: int
    y: int
    x: int
    score: float
    diameter_mm: float


class LesionDetector(nn.Module):
    """2.5D lesion-centre detector: (N, in_slices, H, W) → :class:`DetectorOutput`.

    Any H, W ≥ 1 (edge-padded to a multiple of 8, cropped back).
    """

    def __init__(
        self,
        in_slices: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        dropout: float = 0.0,
        members: int = 1,
        convs_per_stage: int = 2,
    ):
        super().__init__()
        (in_slices,) = check_positive_ints([in_slices], "in_slices")
        (convs_per_stage,) = check_positive_ints([convs_per_stage], "convs_per_stage")
        if convs_per_stage < 2:
            raise MedsegInputError(f"convs_per_stage must be at least 2, got {convs_per_stage}")
        (members,) = check_positive_ints([members], "members")
        if in_slices % 2 == 0:
            raise MedsegInputError(f"in_slices must be odd (a middle slice), got {in_slices}")
        w1, w2, w3 = check_positive_ints(widths, "widths", length=3)
        if not 0.0 <= float(dropout) < 1.0:
            raise MedsegInputError(f"dropout must be in [0, 1), got {dropout}")
        self.arch_params: dict[str, Any] = {
            "in_slices": in_slices,
            "widths": [w1, w2, w3],
            "dropout": float(dropout),
        }
        if members > 1:  # absent for one network: single detectors' cards stay as they were
            self.arch_params["members"] = members
        if convs_per_stage != 2:  # absent at the default, so earlier cards stay as they were
            self.arch_params["convs_per_stage"] = convs_per_stage
        # convs past the second of a stage are appended (undilated), so a default detector's
        # state_dict keys are unchanged
        extra = convs_per_stage - 2
        self.enc1 = nn.Sequential(ConvBNAct(4 * in_slices, w1), ConvBNAct(w1, w1),
                                  *(ConvBNAct(w1, w1) for _ in range(extra)))
        self.enc2 = nn.Sequential(ConvBNAct(w1, w2, stride=2), ConvBNAct(w2, w2),
                                  *(ConvBNAct(w2, w2) for _ in range(extra)))
        self.enc3 = nn.Sequential(ConvBNAct(w2, w3, stride=2), ConvBNAct(w3, w3, dilation=2),
                                  *(ConvBNAct(w3, w3) for _ in range(extra)))
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = nn.Sequential(ConvBNAct(2 * w2, w2), nn.Dropout(dropout))
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = nn.Sequential(ConvBNAct(2 * w1, w1), nn.Dropout(dropout))
        # both heads in one 2×2 stride-2 transposed conv: channel 0 heatmap, 1 log-diameter
        self.head = nn.ConvTranspose2d(w1, 2, 2, stride=2)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([HEATMAP_PRIOR_BIAS, SIZE_PRIOR_BIAS]))
        # the layers above are the first member; the others are whole networks of their own
        self.others = nn.ModuleList(
            LesionDetector(in_slices, (w1, w2, w3), dropout, convs_per_stage=convs_per_stage)
            for _ in range(members - 1))

    @property
    def in_slices(self) -> int:
        return int(self.arch_params["in_slices"])

    @property
    def members(self) -> int:
        return 1 + len(self.others)

    @classmethod
    def ensemble(cls, nets: Sequence["LesionDetector"]) -> "LesionDetector":
        """One detector averaging ``nets`` (single networks of one layout), weights copied."""
        nets = list(nets)
        if not nets or any(not isinstance(n, cls) or n.members != 1 for n in nets):
            raise MedsegInputError("an ensemble needs one or more single-network LesionDetectors")
        params = [n.arch_params for n in nets]
        if any(p != params[0] for p in params):
            raise MedsegInputError(f"ensemble members differ in layout: {params}")
        out = cls(**params[0], members=len(nets))
        state = dict(nets[0].state_dict())
        for i, net in enumerate(nets[1:]):
            state.update({f"others.{i}.{k}": v for k, v in net.state_dict().items()})
        out.load_state_dict(state)
        return out.train(nets[0].training)

    def forward(self, x: torch.Tensor) -> DetectorOutput:
        check_input(x, self.in_slices, type(self).__name__)
        out = self._network(x)
        if not len(self.others):
            return out
        outs = [out, *(m._network(x) for m in self.others)]
        heat = torch.stack([o.heatmap for o in outs])
        # the logit of the mean score, exactly and without clamping: log(mean σ(h)) −
        # log(mean σ(−h)) (the 1/N of both means cancels), so every caller's sigmoid
        # gives the members' mean score and fine-tuning keeps its gradient everywhere
        logit = (torch.logsumexp(F.logsigmoid(heat), 0) - torch.logsumexp(F.logsigmoid(-heat), 0))
        log_d = torch.stack([o.log_diameter for o in outs])
        log_diameter = torch.logsumexp(log_d, 0) - math.log(len(outs))  # log of the mean
        return DetectorOutput(logit, log_diameter)

    def _network(self, x: torch.Tensor) -> DetectorOutput:
        """The first member's forward pass (the whole model when ``members`` is 1)."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % TOTAL_STRIDE, (-w) % TOTAL_STRIDE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        s1 = self.enc1(F.pixel_unshuffle(x, 2))
        s2 = self.enc2(s1)
        e3 = self.enc3(s2)
        d = self.dec2(torch.cat([self.up2(e3), s2], dim=1))
        d = self.dec1(torch.cat([self.up1(d), s1], dim=1))
        out = self.head(d)[..., :h, :w]
        return DetectorOutput(out[:, 0:1], out[:, 1:2])


def stack_neighbours(array_zyx: np.ndarray, start: int, stop: int, context: int = 1) -> np.ndarray:
    """2.5D inputs for slices ``start:stop``: (stop − start, 2·context + 1, y, x) float32.

    Channel k of item i is slice ``i + k − context``, clamped to the volume (the first and
    last slices repeat at the edges).
    """
    array_zyx = np.asarray(array_zyx)
    if array_zyx.ndim != 3:
        raise MedsegInputError(f"expected a (z, y, x) array, got shape {array_zyx.shape}")
    n = array_zyx.shape[0]
    if not 0 <= start < stop <= n:
        raise MedsegInputError(f"slice range {start}:{stop} is outside 0:{n}")
    z = np.arange(start, stop)[:, None] + np.arange(-context, context + 1)[None, :]
    return np.ascontiguousarray(array_zyx[np.clip(z, 0, n - 1)], dtype=np.float32)


def _per_point(values: Any, n: int, what: str) -> np.ndarray:
    """(n, 3) from one number, one number per point, or a (z, y, x) triplet per point."""
    try:
        if isinstance(values, (int, float, np.number)) or (
            isinstance(values, np.ndarray) and values.ndim == 0
        ):
            arr = np.full((n, 3), float(values))
        else:
            items = list(values)
            if n != 3 and len(items) == 3 and all(np.ndim(v) == 0 for v in items):
                items = [items] * n  # one (z, y, x) triplet for every lesion
            if len(items) != n:
                raise MedsegInputError(f"{what} needs one entry per lesion ({n}), got {len(items)}")
            arr = np.array(
                [np.broadcast_to(np.asarray(v, dtype=np.float64), (3,)) for v in items]
            ).reshape(n, 3)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(
            f"{what} must be one value or (z, y, x) per lesion, got {values!r}"
        ) from exc
    if not np.all(np.isfinite(arr)):
        raise MedsegInputError(f"{what} must be finite")
    return arr


def gaussian_heatmap_targets(
    shape_zyx: Sequence[int],
    centers_zyx: Any,
    radii_vox_zyx: Any,
    sigma_fraction: float = 0.5,
) -> np.ndarray:
    """Training target for the heatmap: one 3D Gaussian per lesion, max-combined.

    ``centers_zyx``: (n, 3) voxel coordinates; ``radii_vox_zyx``: the lesion radius in
    voxels, one number per lesion or (z, y, x) per lesion (anisotropic spacing). Each
    Gaussian has σ = ``sigma_fraction`` · radius per axis (at least 0.5 voxel) and is
    exactly 1.0 at the rounded centre voxel, so the target's positives are single voxels.
    Returns float32 in [0, 1] of ``shape_zyx``.
    """
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise MedsegInputError(f"shape_zyx must be three positive sizes, got {shape_zyx!r}")
    out = np.zeros(shape, dtype=np.float32)
    centers = np.zeros((0, 3))
    if np.size(centers_zyx):
        centers = np.asarray(centers_zyx, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(centers)):
        raise MedsegInputError("lesion centres must be finite")
    radii = _per_point(radii_vox_zyx, len(centers), "radii_vox_zyx")
    if np.any(radii <= 0):
        raise MedsegInputError("lesion radii must be positive")
    for center, sigma in zip(centers, gaussian_sigmas(radii, sigma_fraction)):
        c = np.round(center).astype(int)
        box = clipped_box(c, np.ceil(3 * sigma).astype(int), shape)
        if box is None:
            continue
        axes = [
            np.exp(-0.5 * ((np.arange(sl.start, sl.stop) - c[a]) / sigma[a]) ** 2).astype(np.float32)
            for a, sl in enumerate(box)
        ]
        blob = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
        np.maximum(out[box], blob, out=out[box])
    return out


def gaussian_sigmas(radii_vox_zyx: np.ndarray, sigma_fraction: float) -> np.ndarray:
    """The heatmap Gaussians' σ per axis: ``sigma_fraction`` · radius, at least 0.5 voxel."""
    return np.maximum(np.asarray(radii_vox_zyx, dtype=np.float64) * float(sigma_fraction), 0.5)


def clipped_box(center: np.ndarray, half: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...] | None:
    """Slices of the box ``center`` ± ``half`` (integer voxels) inside ``shape``; None if empty."""
    lo = np.maximum(center - half, 0)
    hi = np.minimum(center + half + 1, shape)
    if np.any(lo >= hi):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


#: the 26 neighbours of a voxel
_NEIGHBOURS = np.array([(dz, dy, dx) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                        if (dz, dy, dx) != (0, 0, 0)])
#: above this share of voxels at or over the threshold, one 3D maximum filter is cheaper
_DENSE_SHARE = 0.02


def at_or_above(scores: Any, threshold: float) -> np.ndarray:
    """``scores ≥ threshold`` as the float32 heatmap compares them (NumPy casts the
    threshold to float32 there: 0.7 → 0.69999999): a detection the core kept at 0.7, and
    the CLI listed, was hidden at 0.7 by the layer, which compared in float64."""
    return np.asarray(scores, dtype=np.float64) >= float(np.float32(threshold))


def _voxels_above(heat: np.ndarray, threshold: Any, slab: int = 16) -> np.ndarray:
    """(k, 3) finite voxels ≥ ``threshold``, lexicographic, found ``slab`` slices at a
    time: a whole-volume mask would add two bytes per heatmap voxel to a detection's
    peak memory (≈ 100 MB more for 400 slices of 358²)."""
    parts = []
    for a in range(0, heat.shape[0], slab):
        part = heat[a : a + slab]
        found = np.argwhere((part >= threshold) & np.isfinite(part))
        found[:, 0] += a
        parts.append(found)
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def _sparse_maxima(heat: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """(k, 3) voxels of ``coords`` (lexicographic) that equal the maximum of their 3×3×3
    neighbourhood, lexicographic; non-finite neighbours count as −inf."""
    own = heat[tuple(coords.T)]
    is_max = np.ones(len(coords), dtype=bool)
    upper = np.asarray(heat.shape) - 1
    for offset in _NEIGHBOURS:
        # clipping lands on the voxel itself or on another true neighbour: same maximum
        values = heat[tuple(np.clip(coords + offset, 0, upper).T)]
        is_max &= (own >= values) | ~np.isfinite(values)
    return coords[is_max]


def _touching_groups(coords: np.ndarray) -> np.ndarray:
    """Group index of each of ``coords`` by 26-connectivity (touching voxels: a plateau)."""
    n = len(coords)
    pairs = cKDTree(coords).query_pairs(r=1.0, p=np.inf, output_type="ndarray")
    if not len(pairs):
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _group_representatives(coords: np.ndarray, group: np.ndarray) -> np.ndarray:
    """One row of ``coords`` (lexicographic) per ``group`` index: the member nearest the
    group's centroid, the first on a tie. Vectorised: a flat heatmap from a barely
    trained detector has 10⁵ single-voxel maxima, and a loop over them took 17 s."""
    _, group = np.unique(group, return_inverse=True)
    size = np.bincount(group)
    # integer coordinates sum exactly in float64: the centroid a per-group mean gives
    centroid = np.stack([np.bincount(group, weights=coords[:, d]) for d in range(3)], axis=1)
    centroid /= size[:, None]
    distance = ((coords - centroid[group]) ** 2).sum(axis=1)
    order = np.lexsort((np.arange(len(coords)), distance, group))
    first = np.ones(len(order), dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    return coords[order[first]]


def _peak_voxels(heat: np.ndarray, threshold: Any) -> np.ndarray:
    """(k, 3) one voxel per plateau of local maxima ≥ ``threshold``: voxels equal to the
    maximum of their 3×3×3 neighbourhood (non-finite voxels and the outside of the
    array count as −inf), touching maxima grouped (26-connectivity) and each group
    represented by its member nearest the group's centroid (the first, in lexicographic
    order, on a tie).

    At a detection threshold few voxels qualify, so only those are compared with their
    neighbours and grouped on a k-d tree: a maximum filter, a cleaned copy and a label
    pass over a 200×358×358 heatmap took 1.2 s of a 3 s detect. Where many qualify (a low
    threshold, a flat heatmap) the whole-volume filter and labelling are cheaper."""
    coords = _voxels_above(heat, threshold)
    count = len(coords)
    if count == 0:
        return np.zeros((0, 3), dtype=np.int64)
    if count > _DENSE_SHARE * heat.size:
        above = (heat >= threshold) & np.isfinite(heat)
        clean = np.where(np.isfinite(heat), heat, -np.inf).astype(np.float32)
        local_max = ndimage.maximum_filter(clean, size=3, mode="constant", cval=-np.inf)
        labels, _ = ndimage.label(above & (clean == local_max),
                                  structure=np.ones((3, 3, 3), dtype=bool))
        maxima = np.argwhere(labels)
        group = labels[tuple(maxima.T)]
    else:
        maxima = _sparse_maxima(heat, coords)
        group = _touching_groups(maxima)
    return _group_representatives(maxima, group)


def extract_peaks(
    heatmap_zyx: Any,
    size_zyx: Any | None,
    spacing: Sequence[float],
    threshold: float = 0.3,
    min_distance_mm: float = 6.0,
    max_peaks: int | None = None,
    radius_fraction: float = 0.0,
) -> list[Peak]:
    """Lesion detections from a (z, y, x) centre-score map, strongest first.

    A peak is a voxel ≥ ``threshold`` that is the maximum of its 3×3×3 neighbourhood;
    a plateau of equal maxima counts once (at its voxel nearest the plateau's centroid).
    Then 3D non-maximum suppression in millimetres: going down the scores, a peak closer
    than ``min_distance_mm`` (Euclidean, with ``spacing`` (z, y, x) mm) to a stronger kept
    peak is dropped. ``size_zyx``: the diameter in mm per voxel (e.g.
    ``exp(log_diameter)``), read at each peak; None gives NaN diameters.
    ``radius_fraction`` > 0 widens the suppression around a kept peak to that fraction
    of its predicted radius when that is larger than ``min_distance_mm``: a large lesion
    often has a second, weaker peak inside it, which a fixed distance keeps as a false
    positive (the card's "nms_radius_fraction"; needs ``size_zyx``).
    Returns ``Peak(z, y, x, score, diameter_mm)`` tuples (voxel indices).
    """
    heat = np.asarray(heatmap_zyx, dtype=np.float32)
    if heat.ndim != 3:
        raise MedsegInputError(f"heatmap must be (z, y, x), got shape {heat.shape}")
    if size_zyx is not None and np.shape(size_zyx) != heat.shape:
        raise MedsegInputError(
            f"size map shape {np.shape(size_zyx)} differs from heatmap shape {heat.shape}"
        )
    radius_fraction = float(radius_fraction)
    if not (math.isfinite(radius_fraction) and radius_fraction >= 0):
        raise MedsegInputError(f"radius_fraction must be a number >= 0, got {radius_fraction!r}")
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or np.any(~np.isfinite(spacing_arr)) or np.any(spacing_arr <= 0):
        raise MedsegInputError(f"spacing must be three positive numbers (z, y, x), got {spacing!r}")
    points_arr = _peak_voxels(heat, threshold)
    if not len(points_arr):
        return []
    scores = heat[tuple(points_arr.T)]
    order = np.lexsort((points_arr[:, 2], points_arr[:, 1], points_arr[:, 0], -scores))
    points_arr, scores = points_arr[order], scores[order]
    tree = cKDTree(points_arr * spacing_arr)
    suppressed = np.zeros(len(points_arr), dtype=bool)
    kept: list[Peak] = []
    for i, (point, score) in enumerate(zip(points_arr, scores)):
        if suppressed[i]:
            continue
        z, y, x = (int(v) for v in point)
        diameter = float(size_zyx[z, y, x]) if size_zyx is not None else float("nan")
        kept.append(Peak(z, y, x, float(score), diameter))
        if max_peaks is not None and len(kept) >= max_peaks:
            break
        radius = float(min_distance_mm)
        if radius_fraction > 0 and math.isfinite(diameter):
            radius = max(radius, radius_fraction * diameter / 2)
        if radius > 0:
            for j in tree.query_ball_point(point * spacing_arr, r=radius - 1e-9):
                suppressed[j] = True
    return kept
