"""Why did the model say that? Grad-CAM for the classifier, uncertainty for the segmenter.

Both are generators (docs/architecture.md, Long jobs) returning maps on the INPUT grid (same shape as the
volume), so they sit on the image as layers:

- :func:`gradcam_volume`: Grad-CAM (Selvaraju et al. 2017) of the slice classifier, per
  slice, for the predicted class or a chosen one: ReLU(Σ_c w_c A_c), where A is the last
  conv block's activation map and w_c the spatial mean of ∂score/∂A_c. Each slice's map
  is scaled to [0, 1] by its own maximum (a map says *where*, not *how much*).
- :func:`segmentation_uncertainty`: Monte-Carlo dropout (the segmenter's decoder dropout
  kept on, ``samples`` passes) → per-voxel predictive entropy / log(C) in [0, 1], and a
  per-slice summary (mean entropy over the voxels predicted as a structure) ranking the
  slices to correct first.

The detector's explanation is its own centre heatmap (``DetectionResult.heatmap``) and
the score of each point.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedsegInputError
from .inference import (
    ModelGridSlices,
    body_view,
    ThreadGovernor,
    check_model_args,
    labels_from_logits,
    positive_int,
    resize_yx,
    slice_context,
)
from .models.classifier import SliceClassifier
from .models.segmenter import RecurrentSegmenter
from .progress import Job, Progress
from .rng import PrivateRNG

#: class-activation map methods of :func:`gradcam_volume`
CAM_METHODS = ("gradcam", "hirescam")
#: a slice's map adding up to less than this (in logits, on the feature grid) shows no
#: evidence: all 0, not scaled to 1
NO_EVIDENCE_LOGIT = 1e-5


@dataclass(frozen=True)
class GradCamResult:
    maps: np.ndarray  # (z, y, x) float32 in [0, 1]; 0 on missing slices
    target: np.ndarray  # (z,) class index explained per slice (−1: missing)
    class_names: tuple[str, ...]
    probabilities: np.ndarray  # (z, n_classes)


@dataclass(frozen=True)
class UncertaintyResult:
    entropy: np.ndarray  # (z, y, x) float32 in [0, 1] (÷ log C); 0 on missing slices
    per_slice: np.ndarray  # (z,) mean entropy over voxels predicted as a structure; NaN if none
    labels: np.ndarray  # (z, y, x) uint8 argmax of the mean probabilities
    samples: int

    def most_uncertain(self, k: int = 5, exclude: Any = ()) -> list[int]:
        """The ``k`` slices with the highest per-slice uncertainty, most uncertain first."""
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise MedsegInputError(f"k must be a whole number ≥ 0, got {k!r}")
        exclude = np.asarray(list(exclude) if not isinstance(exclude, np.ndarray) else exclude)
        if exclude.dtype == bool:  # a per-slice mask (volume.missing): its True slices,
            exclude = np.flatnonzero(exclude)  # not the indices 0 and 1
        excluded = {int(z) for z in exclude}
        order = [int(z) for z in np.argsort(-np.nan_to_num(self.per_slice, nan=-1.0))
                 if np.isfinite(self.per_slice[z]) and int(z) not in excluded]
        return order[: int(k)]


def gradcam_volume(volume: Any, model: SliceClassifier, card: Mapping[str, Any], *,
                   target: int | str | None = None, method: str = "gradcam", batch: int = 4,
                   threads: int | None = None) -> Job[GradCamResult]:
    """Grad-CAM maps for every acquired slice (a generator).

    ``target``: None → each slice's predicted class; a class index or name → that class
    on every slice. ``method``: "gradcam" (channel weights = the spatial mean of the
    gradient) or "hirescam" (gradient × activation at each position, Draelos & Carin
    2020: what the score's first-order change is made of, position by position).
    """
    classes = check_model_args(volume, model, card, SliceClassifier, "Grad-CAM")
    if method not in CAM_METHODS:
        raise MedsegInputError(f"method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    _check_class_count(model, classes)
    if target is not None:
        if isinstance(target, str):
            if target not in classes:
                raise MedsegInputError(f"unknown class {target!r}; the model has {', '.join(classes)}")
            target = classes.index(target)
        elif isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)):
            raise MedsegInputError(f"target must be a class name or index, got {target!r}")
        elif not 0 <= int(target) < len(classes):
            raise MedsegInputError(f"class index {target} outside 0–{len(classes) - 1}")
    batch = positive_int(batch, "batch")
    # the window Classify shows the model (a wide field's air cut away): the same classes
    # and probabilities as Classify's; the maps are placed back on the whole slice
    seen, window = body_view(volume, card)
    ys, xs = window if window is not None else (slice(None), slice(None))
    slices = ModelGridSlices(seen, card, slice_context(model))
    nz, ny, nx = seen.shape
    maps = np.zeros(volume.shape, dtype=np.float32)
    targets = np.full(nz, -1, dtype=np.int64)
    probs = np.full((nz, len(classes)), np.nan, dtype=np.float32)
    acquired = ~volume.missing
    runs = [(a, min(a + batch, nz)) for a in range(0, nz, batch)]
    # a private copy in eval mode: the caller's model (maybe being trained, or explained
    # by another job) is never switched, even between this job's steps; made outside any
    # inference mode of the caller's, whose tensors autograd cannot save
    with torch.inference_mode(False):
        explainer = copy.deepcopy(model).eval()
    with ThreadGovernor(threads) as governor:
        yield Progress(0, len(runs), "Grad-CAM")
        for step, (a, b) in enumerate(runs, start=1):
            zs = [z for z in range(a, b) if acquired[z]]
            if zs:
                x = slices[zs[0]: zs[-1] + 1][[z - zs[0] for z in zs]]
                with torch.no_grad():  # gradients are taken at the features only
                    feats = explainer.features(x)
                # inference_mode(False): a caller's torch.inference_mode() would otherwise
                # leave no graph to take the gradient on (enable_grad does not lift it)
                with torch.inference_mode(False), torch.enable_grad():
                    feats = feats.clone().requires_grad_(True)
                    logits = explainer.classify_features(feats)
                    chosen = logits.argmax(1) if target is None else torch.full(
                        (len(zs),), int(target), dtype=torch.long)
                    score = logits.gather(1, chosen[:, None]).sum()
                    (grad,) = torch.autograd.grad(score, feats)
                weights = grad.mean(dim=(2, 3), keepdim=True) if method == "gradcam" else grad
                cam = F.relu((weights * feats.detach()).sum(1, keepdim=True))
                # Grad-CAM's map sums to (about) the logit it explains: a map adding up to
                # less than NO_EVIDENCE_LOGIT is float rounding, not a finding (scaled to
                # its own peak, 1e-8 of noise was drawn as full-strength evidence)
                no_evidence = cam.flatten(1).sum(1) < NO_EVIDENCE_LOGIT
                cam[no_evidence] = 0.0
                cam = resize_yx(_on_model_grid(cam, slices.grid, getattr(model, "min_size", None)),
                                (ny, nx))[:, 0]
                # never measured (a gap plane, a mask): no evidence, and not the peak
                cam[torch.from_numpy(np.isnan(np.asarray(seen.array[zs])))] = 0.0
                peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
                maps[zs, ys, xs] = (cam / peak).numpy()
                targets[zs] = chosen.numpy()
                probs[zs] = torch.softmax(logits.detach(), 1).numpy()
            governor.update()
            yield Progress(step, len(runs), f"Grad-CAM: slices {a}–{b - 1}")
    return GradCamResult(maps, targets, tuple(classes), probs)


def _on_model_grid(cam: torch.Tensor, grid: tuple[int, int],
                   min_size: int | None = None) -> torch.Tensor:
    """(N, 1, hf, wf) feature-grid maps → (N, 1, h, w) on the model grid, each feature
    cell over the pixels it pooled: floor pooling drops the last rows and columns when a
    side is not a multiple of the stride, and stretching the map over the whole grid
    would shift it by up to a few pixels at the far edge. ``min_size``: the classifier's
    (its features' stride is half of it, and it pads a side below it evenly on both
    ends: that padding is cut off again; the stride guessed from the sizes was 2, not 4,
    on a 5-pixel side)."""
    (h, w), (hf, wf) = grid, cam.shape[-2:]
    if min_size:
        sy = sx = max(1, int(min_size) // 2)
        oy, ox = max(0, min_size - h) // 2, max(0, min_size - w) // 2
    else:
        sy, sx = (max(1, 2 ** round(math.log2(n / nf))) for n, nf in ((h, hf), (w, wf)))
        oy = ox = 0
    cam = resize_yx(cam, (hf * sy, wf * sx))[..., oy:oy + h, ox:ox + w]
    return F.pad(cam, (0, w - cam.shape[-1], 0, h - cam.shape[-2]), mode="replicate")


def _check_class_count(model: torch.nn.Module, classes: list[str]) -> None:
    n = getattr(model, "n_classes", len(classes))
    if n != len(classes):
        raise MedsegInputError(f"the model has {n} outputs but its card names {len(classes)} classes")


def randomised_copy(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with every layer re-initialised (seeded): the
    model-randomisation check (Adebayo et al. 2018) compares an explanation with the same
    explanation of this copy; one that does not change explains the image, not the model."""
    rnd = copy.deepcopy(model)
    with PrivateRNG(seed).active():
        for module in rnd.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return rnd


def _dropout_on(model: torch.nn.Module) -> list[torch.nn.Module]:
    drops = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in drops:
        m.train()
    return drops


#: slices turned from mean probabilities into entropy and labels at a time
_POSTPROCESS_SLAB = 8


def segmentation_uncertainty(volume: Any, model: RecurrentSegmenter, card: Mapping[str, Any], *,
                             samples: int = 8, chunk: int = 8, seed: int = 0,
                             threads: int | None = None) -> Job[UncertaintyResult]:
    """MC-dropout predictive entropy per voxel and per slice (a generator).

    Needs a model with dropout (the bundled segmenter has 0.1 in its decoder): the volume
    streams in chunks like inference, and each chunk's encoded features are decoded
    ``samples`` times. The same ``seed`` and ``chunk`` give the same result (dropout
    masks are drawn per chunk, so another chunk size draws other masks).
    """
    classes = check_model_args(volume, model, card, RecurrentSegmenter, "uncertainty")
    samples = positive_int(samples, "samples")
    if samples < 2:
        raise MedsegInputError("uncertainty needs at least 2 samples")
    if not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        raise MedsegInputError("this segmenter has no dropout, so MC-dropout cannot sample it")
    _check_class_count(model, classes)
    n_classes = len(classes)
    if n_classes < 2:
        raise MedsegInputError("uncertainty needs a segmenter with at least 2 classes")
    # scaled by the classes the model learnt: a grown model's unused_N slots (never
    # trained, probability near 0) lowered every value by log 9 / log 11 (8 %), and v1's
    # map read as less uncertain than v0's with the same predictions
    learnt = max(2, sum(1 for i, c in enumerate(classes) if str(c) != f"unused_{i}"))
    chunk = positive_int(chunk, "chunk")
    nz, ny, nx = volume.shape
    if volume.missing.all():  # nothing acquired: no model runs (as segment_volume), the
        yield Progress(1, 1, "no acquired slice")  # result empty
        return UncertaintyResult(np.zeros((nz, ny, nx), np.float32),
                                 np.full(nz, np.nan, np.float32),
                                 np.zeros((nz, ny, nx), np.uint8), samples)
    slices = ModelGridSlices(volume, card)
    # a private copy with dropout on: the caller's model (maybe in use by another job)
    # is never switched to sampling, even if this job fails or is abandoned
    sampler = copy.deepcopy(model).eval()
    _dropout_on(sampler)

    def mean_probabilities(*features) -> torch.Tensor:
        # dropout is in the decoder only: the encoder and both GRUs ran once per chunk,
        # and the decoder samples their features (every sample ran the whole network
        # over the whole volume, and the volume's class probabilities were all kept:
        # 36 bytes a model-grid voxel)
        total = None
        for _ in range(samples):
            p = torch.softmax(sampler.decode(*features), 1)
            total = p if total is None else total.add_(p)
        return total.div_(samples)

    # dropout draws from torch's global generator: this job's seeded state is swapped in
    # around each chunk only (core.rng)
    torch_rng = PrivateRNG(seed)
    total = RecurrentSegmenter.n_steps(nz, chunk)
    entropy = np.empty((nz, ny, nx), dtype=np.float32)
    labels = np.empty((nz, ny, nx), dtype=np.uint8)
    step = 0
    with ThreadGovernor(threads) as governor:
        yield Progress(0, total, "uncertainty")
        chunks = torch_rng.run(sampler.iter_chunks(slices, chunk, decode=mean_probabilities))
        while True:
            with torch.no_grad():
                item = next(chunks, None)
            if item is None:
                break
            if item.logits is not None:
                # slab by slab: log, product and resize temporaries of a whole chunk
                for a in range(0, item.stop - item.start, _POSTPROCESS_SLAB):
                    part = item.logits[a:a + _POSTPROCESS_SLAB]
                    z0 = item.start + a
                    log_part = part.clamp_min(1e-12).log()
                    ent = -(part * log_part).sum(1, keepdim=True) / math.log(learnt)
                    entropy[z0:z0 + len(part)] = resize_yx(ent, (ny, nx))[:, 0].clamp(0, 1).numpy()
                    labels[z0:z0 + len(part)] = labels_from_logits(log_part, (ny, nx)).numpy()
            step += 1
            governor.update()
            yield Progress(step, total, f"uncertainty ({samples} samples)")
    entropy[volume.missing] = 0.0
    labels[volume.missing] = 0
    unmeasured = np.isnan(volume.array)  # a turned series' gap planes, a masked patch
    entropy[unmeasured] = 0.0
    labels[unmeasured] = 0
    per_slice = np.full(nz, np.nan, dtype=np.float32)
    for z in np.flatnonzero(~volume.missing):
        fg = labels[z] > 0
        if fg.any():
            per_slice[z] = float(entropy[z][fg].mean())
    return UncertaintyResult(entropy, per_slice, labels, samples)
