"""Train the three models from scratch on phantoms; losses for class imbalance.

Every trainer is a generator (docs/architecture.md, Long jobs): it yields :class:`~.progress.Progress`
(step, total, message with the running loss) and returns ``(model, card)``, where
``card`` holds everything :func:`~.models.registry.save_model` needs plus how the model
was made (command, seed, steps, seconds, loss, training seeds).

Data: phantoms generated on the fly from TRAINING seeds derived from the given seed
(:func:`training_seeds`), with varied shape, spacing (z 1–5 mm, in-plane 0.6–1.2 mm),
noise and contrast, resampled in-plane to the model's spacing with
:func:`~.resample.resample_yx` — the same function inference uses. A pool of volumes is
built first and refreshed one volume at a time while training. Training, validation
(:data:`VALIDATION_SEEDS`, for tuning thresholds) and evaluation (:data:`EVAL_SEEDS`)
seed ranges are disjoint.

Determinism: with ``steps`` (not ``seconds``) the same seed gives bit-identical weights
on the same machine and torch build (torch and numpy seeded, deterministic algorithms).

Losses (:data:`LOSSES`): cross-entropy, Dice + CE, focal, class-weighted CE, and for the
detector a focal BCE against the soft heatmap (default), the CenterNet focal loss or
plain BCE; sampling ``"balanced"`` (rare classes /
lesion slices drawn as often as the rest) or ``"uniform"``. All voxel losses honour
``ignore_index`` (255), so issue #6 can fine-tune on partial annotations.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MedsegInputError
from .inference import positive_int
from .models.classifier import SliceClassifier
from .models.detector import LesionDetector, clipped_box, gaussian_heatmap_targets, gaussian_sigmas
from .models.registry import BUNDLED_DIR, apply_normalisation, load_model
from .models.segmenter import RecurrentSegmenter
from .phantom import LABEL_NAMES, LESION_LABEL, SLICE_CLASSES, generate_phantom
from .progress import Job, Progress
from .rng import PrivateRNG
from .resample import map_index, resample_yx

MODEL_NAMES = ("classifier", "segmenter", "detector", "generator")
IGNORE_INDEX = 255
#: seeds [lo, hi): validation (threshold tuning) and held-out evaluation; training seeds
#: are >= 1_000_000 (see :func:`training_seeds`), so the three never overlap
VALIDATION_SEEDS = (800_000, 900_000)
EVAL_SEEDS = (900_000, 1_000_000)
TRAIN_SEED_BASE = 1_000_000
TRAIN_SEEDS_PER_RUN = 100_000

#: per-model defaults: in-plane spacing, normalisation, loss, sampling
DEFAULTS: dict[str, dict[str, Any]] = {
    "classifier": {
        "spacing_yx": 1.5,
        "normalisation": {"type": "window", "low": -150.0, "high": 250.0},
        "loss": "ce",
        "sampling": "balanced",
        "steps": 600,
        "lr": 2e-3,
    },
    "segmenter": {
        "spacing_yx": 1.5,
        "normalisation": {"type": "window", "low": -200.0, "high": 300.0},
        "loss": "dice_ce",
        "sampling": "balanced",
        "steps": 6000,
        "lr": 2e-3,
    },
    "detector": {
        "spacing_yx": 1.0,
        "normalisation": {"type": "window", "low": -150.0, "high": 250.0},
        "loss": "soft_focal",
        "sampling": "balanced",
        "steps": 2400,
        "lr": 2e-3,
    },
    "generator": {  # core/generation.py; runs on the volume's own grid
        "spacing_yx": 1.0,
        "normalisation": {"type": "percentile", "low_percentile": 0.5, "high_percentile": 99.5},
        "loss": "mse",
        "sampling": "uniform",
        "steps": 4000,
        "lr": 2e-3,
    },
}
LOSSES: dict[str, tuple[str, ...]] = {
    "classifier": ("ce", "weighted_ce", "focal"),
    "segmenter": ("ce", "dice_ce", "focal", "weighted_ce"),
    "detector": ("focal", "bce", "soft_focal"),
    "generator": ("mse", "l1"),
}
SAMPLINGS = ("balanced", "uniform")
# the generator draws sequences anywhere (no lesion to balance on): "balanced" was taken,
# ignored, and written into its card
SAMPLINGS_OF = {"generator": ("uniform",)}


# ======================================================================================
# Losses
# ======================================================================================


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean CE over non-ignored items; 0 (with a graph) if every item is ignored."""
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), weight=weight, ignore_index=ignore_index)


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Multi-class focal loss, mean over non-ignored items: −w_t (1 − p_t)^γ log p_t.

    With γ = 0 and no weights it equals :func:`cross_entropy`; for γ > 0 it is ≤ CE.
    """
    target = target.long()
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    safe = torch.where(valid, target, torch.zeros_like(target))
    logp = F.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - logp.exp()).clamp_min(0.0) ** gamma) * logp
    if weight is not None:
        loss = loss * weight[safe]
    return loss[valid].mean()


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    include_background: bool = False,
    eps: float = 1.0,
    present_only: bool = False,
) -> torch.Tensor:
    """1 − mean soft Dice over classes, on (N, C, …) logits and (N, …) integer targets.

    Ignored voxels are masked out of both prediction and target. A class absent from the
    target scores ``eps / (Σ p + eps)``: near 1 only when its summed probability over the
    batch is well below ``eps``, which a softmax seldom gives (a 12 × 128 × 128 batch
    predicted right everywhere with p = 0.997 still scores 0.74 with six absent classes),
    so the term keeps pushing absent classes' probabilities towards zero. The bundled
    segmenter was trained so (``dice_ce_loss``). ``present_only``: average over the
    classes the target holds (no term at all for an absent class; fine-tuning's choice).
    """
    n_classes = logits.shape[1]
    target = target.long()
    valid = (target != ignore_index).unsqueeze(1).to(logits.dtype)
    safe = torch.where(target == ignore_index, torch.zeros_like(target), target)
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(safe, n_classes).movedim(-1, 1).to(logits.dtype) * valid
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    present = onehot.sum(dims) > 0
    if not include_background:
        dice, present = dice[1:], present[1:]
    if present_only:
        if not bool(present.any()):
            return logits.sum() * 0.0
        dice = dice[present]
    return 1.0 - dice.mean()


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Soft Dice (foreground classes) + cross-entropy, both ignoring ``ignore_index``."""
    return soft_dice_loss(logits, target, ignore_index) + cross_entropy(
        logits, target, weight, ignore_index
    )


def class_weights(counts: Sequence[float], power: float = 0.5, cap: float = 20.0) -> torch.Tensor:
    """Inverse-frequency class weights ``(1/freq)^power``, mean 1, none above ``cap``
    (capping, then renormalising, lifted the capped ones above it again with over 20
    classes: a fine-tuned model's painted structures; the cap and mean 1 are met
    together by repeating the two until they agree)."""
    c = np.asarray(counts, dtype=np.float64)
    freq = np.maximum(c, 1.0) / max(c.sum(), 1.0)
    w = freq ** (-float(power))
    w = w / w.mean()
    for _ in range(len(w)):  # each pass caps at least one more class, or ends
        if w.max() <= cap * (1 + 1e-9):
            break
        capped = w >= cap
        free = ~capped
        if not free.any():
            w = np.ones_like(w)
            break
        # capped classes take the cap; the others share what is left of the mean 1
        w[capped] = cap
        w[free] *= (len(w) - cap * capped.sum()) / w[free].sum()
    return torch.tensor(w, dtype=torch.float32)


def centernet_focal_loss(
    heat_logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel focal loss, normalised by the number of centres.

    ``target``: Gaussian heatmap in [0, 1] with exactly 1.0 at centres. Pixels marked
    ``ignore`` (negative target) do not contribute.
    """
    valid = target >= 0
    t = target.clamp(0, 1)
    logp = F.logsigmoid(heat_logits)
    log1mp = F.logsigmoid(-heat_logits)
    p = logp.exp()
    pos = (t >= 1.0 - 1e-4) & valid
    pos_loss = -((1 - p) ** alpha) * logp * pos
    neg_loss = -((1 - t) ** beta) * (p**alpha) * log1mp * (valid & ~pos)
    n_pos = pos.sum().clamp_min(1).to(heat_logits.dtype)
    return (pos_loss.sum() + neg_loss.sum()) / n_pos


def soft_focal_loss(heat_logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Focal BCE against the soft Gaussian heatmap (a "quality focal loss"):
    −|t − p|^γ · [t log p + (1 − t) log(1 − p)], summed and normalised by the heatmap's
    mass (Σ t). Every voxel near a centre pulls p towards its target, where CenterNet's
    loss treats all but the centre voxel as down-weighted negatives: on a 2.5D detector
    only the lesion's middle slice then carries a positive."""
    valid = target >= 0
    t = target.clamp(0, 1)
    p = torch.sigmoid(heat_logits)
    bce = F.binary_cross_entropy_with_logits(heat_logits, t, reduction="none")
    loss = (t - p).abs().pow(gamma) * bce * valid
    if weight is not None:  # per-voxel weights; the normaliser stays the plain mass
        loss = loss * weight
    return loss.sum() / (t * valid).sum().clamp_min(1.0)


def heatmap_bce_loss(heat_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain per-pixel BCE against the Gaussian heatmap (the no-imbalance-fix baseline)."""
    valid = (target >= 0).to(heat_logits.dtype)
    loss = F.binary_cross_entropy_with_logits(heat_logits, target.clamp(0, 1), reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1)


# ======================================================================================
# Seeds, phantom sampling, pools
# ======================================================================================


def training_seeds(seed: int, n: int = TRAIN_SEEDS_PER_RUN) -> range:
    """Phantom seeds a training run with ``seed`` may use (disjoint from eval/validation)."""
    seed = _check_seed(seed)
    start = TRAIN_SEED_BASE + seed * TRAIN_SEEDS_PER_RUN
    return range(start, start + min(int(n), TRAIN_SEEDS_PER_RUN))


MAX_CROP = 1024  # pixels: a 32-slice batch of 1024² crops is already 134 MB
MAX_SEED = 2**31 - 1  # torch and numpy take it; far beyond any run anyone makes


def _check_seed(seed: Any) -> int:
    if (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
            or not 0 <= int(seed) <= MAX_SEED):
        raise MedsegInputError(f"seed must be an integer 0..{MAX_SEED}, got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class PhantomSettings:
    """How one phantom is drawn (shape, spacing, noise, contrast)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    contrast_scale: float
    noise_hu: float | None
    lesion_radius_mm: tuple[float, float] = (2.0, 15.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "contrast_scale": self.contrast_scale,
            "noise_hu": self.noise_hu,
        }


def training_settings(phantom_seed: int, max_slices: int = 48,
                      z_range_mm: tuple[float, float] = (1.0, 5.0)) -> PhantomSettings:
    """Training distribution: z 1–5 mm (``z_range_mm``), in-plane 0.6–1.2 mm, FOV
    185–245 mm, contrast 0.8–1.2, noise drawn by the phantom (8–25 HU)."""
    rng = np.random.default_rng([int(phantom_seed), 7])
    sz = float(rng.uniform(*z_range_mm))
    sxy = float(rng.uniform(0.6, 1.2))
    fov = float(rng.uniform(185.0, 245.0))
    nxy = int(round(fov / sxy))
    z_extent = float(rng.uniform(60.0, 240.0))
    nz = int(np.clip(round(z_extent / sz), 12, max_slices))
    cs = float(rng.uniform(0.8, 1.2))
    return PhantomSettings((nz, nxy, nxy), (sz, sxy, sxy), cs, None)


def eval_settings(phantom_seed: int, max_slices: int = 64) -> PhantomSettings:
    """Held-out distribution: other shapes and spacings than training (z 1.25–6 mm,
    in-plane 0.55–1.3 mm, FOV 170–260 mm, non-square), contrast 0.75–1.25, noise 5–35 HU."""
    rng = np.random.default_rng([int(phantom_seed), 11])
    sz = float(rng.choice([1.25, 2.0, 2.5, 3.0, 5.0, 6.0]))
    sxy = float(rng.uniform(0.55, 1.3))
    fov_y = float(rng.uniform(170.0, 260.0))
    fov_x = float(rng.uniform(170.0, 260.0))
    z_extent = float(rng.uniform(80.0, 260.0))
    nz = int(np.clip(round(z_extent / sz), 16, max_slices))
    cs = float(rng.uniform(0.75, 1.25))
    noise = float(rng.uniform(5.0, 35.0))
    return PhantomSettings(
        (nz, int(round(fov_y / sxy)), int(round(fov_x / sxy))), (sz, sxy, sxy), cs, noise
    )


@dataclass
class GridSample:
    """One phantom on a model grid (z native, y/x at the model spacing)."""

    image: np.ndarray  # (z, y, x) float32: normalised (card window) THEN resampled
    labels: np.ndarray  # (z, y, x) uint8 (LABEL_NAMES), nearest-resampled
    slice_classes: np.ndarray  # (z,) int64 from the native grid
    spacing: tuple[float, float, float]  # model grid spacing (z native)
    lesions: list[dict[str, Any]]  # centre (model-grid voxels), radius_mm, diameter_mm
    seed: int
    native_shape: tuple[int, int, int]
    native_spacing: tuple[float, float, float]


def to_model_grid(phantom: Any, spacing_yx: float, normalisation: dict) -> GridSample:
    """A phantom as model input, made exactly as inference makes it: normalise with the
    card's window, then resample in-plane to ``spacing_yx`` mm (bilinear, antialiased);
    labels nearest-resampled."""
    vol = phantom.volume
    sz, sy, sx = vol.spacing
    image = resample_yx(apply_normalisation(vol.array, normalisation), (sy, sx),
                        (spacing_yx, spacing_yx), order=1)
    labels = resample_yx(phantom.labels, (sy, sx), (spacing_yx, spacing_yx), order=0)
    n_from, n_to = vol.shape[1:], image.shape[1:]
    lesions = []
    for les in phantom.lesions:
        z, y, x = les.center_zyx
        yx = map_index([y, x], n_from, n_to)
        lesions.append({
            "center": (float(z), float(yx[0]), float(yx[1])),
            "radius_mm": float(les.radius_mm),
            "diameter_mm": 2.0 * float(les.radius_mm),
            "contrast_hu": float(les.contrast_hu),
        })
    return GridSample(
        image=image, labels=labels, slice_classes=np.asarray(phantom.slice_classes),
        spacing=(sz, float(spacing_yx), float(spacing_yx)), lesions=lesions,
        seed=int(phantom.seed), native_shape=vol.shape, native_spacing=vol.spacing,
    )


def make_phantom(phantom_seed: int, settings: PhantomSettings, **overrides: Any) -> Any:
    """The phantom of ``phantom_seed`` with ``settings``; ``overrides`` go to
    :func:`generate_phantom` (``n_lesions=0``: the same anatomy and noise without lesions)."""
    return generate_phantom(
        settings.shape, settings.spacing, int(phantom_seed),
        noise_hu=settings.noise_hu, contrast_scale=settings.contrast_scale,
        lesion_radius_mm=settings.lesion_radius_mm, **overrides,
    )


def check_z_range(z_range_mm: Any, what: str = "z_range_mm") -> tuple[float, float]:
    """A (low, high) slice-spacing range in mm, 0 < low <= high, as floats."""
    try:
        z_range = tuple(float(v) for v in z_range_mm)
    except (TypeError, ValueError):
        z_range = ()
    if len(z_range) != 2 or not all(math.isfinite(v) for v in z_range) or not 0 < z_range[0] <= z_range[1]:
        raise MedsegInputError(f"{what} must be (low, high) mm with 0 < low <= high, got {z_range_mm!r}")
    return z_range  # type: ignore[return-value]


class PhantomPool:
    """A fixed-size pool of training volumes on the model grid, refreshed in seed order."""

    def __init__(self, seeds: range, size: int, spacing_yx: float, max_slices: int,
                 normalisation: dict, prepare: Any = None,
                 z_range_mm: tuple[float, float] = (1.0, 5.0)):
        self.seeds, self.size, self.spacing_yx = seeds, int(size), float(spacing_yx)
        self.z_range_mm = (float(z_range_mm[0]), float(z_range_mm[1]))
        self.normalisation = dict(normalisation)
        self.max_slices = max_slices
        self.prepare = prepare  # optional per-sample hook (e.g. detector targets)
        self.items: list[Any] = []
        self.next_index = 0

    def _next_seed(self) -> int:
        if self.next_index >= len(self.seeds):
            self.next_index = 0  # cycle (only with absurd step counts)
        s = self.seeds[self.next_index]
        self.next_index += 1
        return s

    def _make(self) -> Any:
        s = self._next_seed()
        sample = to_model_grid(make_phantom(s, training_settings(s, self.max_slices,
                                                                 self.z_range_mm)),
                               self.spacing_yx, self.normalisation)
        if self.prepare is not None:
            self.prepare(sample)
        return sample

    def fill(self) -> Iterator[Progress]:
        while len(self.items) < self.size:
            self.items.append(self._make())
            yield Progress(len(self.items), self.size, f"phantom pool {len(self.items)}/{self.size}")

    def refresh_one(self) -> None:
        """Replace the oldest volume with a new one (round robin)."""
        slot = (self.next_index - self.size) % self.size
        self.items[slot] = self._make()


# ======================================================================================
# Shared training loop
# ======================================================================================


T = TypeVar("T")


def private_rng(trainer: Callable[..., Job[T]]) -> Callable[..., Job[T]]:
    """Run a trainer (a generator) on its own state of torch's global generator, swapped
    in only while its steps run (:class:`~.rng.PrivateRNG`): its ``deterministic(seed)``
    seeded the global generator and held it across every yield, so a caller's own draws
    changed and two runs stepped in turn were not reproducible."""
    @functools.wraps(trainer)
    def job(*args: Any, **kwargs: Any) -> Job[T]:
        # the trainer seeds this state itself (deterministic): the 0 is never drawn from;
        # deterministic algorithms are on while its steps run, as its state is
        return (yield from PrivateRNG(0, deterministic=True).run(trainer(*args, **kwargs)))
    return job


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch for the block. A trainer using it runs under :func:`private_rng`, which
    swaps in its generator state and deterministic algorithms only while its steps run."""
    torch.manual_seed(int(seed))
    yield


#: the longest time budget a training run takes
MAX_TRAINING_SECONDS = 30 * 24 * 3600.0


def _budget(steps: int | None, seconds: float | None, default_steps: int) -> tuple[int | None, float | None]:
    if steps is not None and (isinstance(steps, bool) or int(steps) < 1):
        raise MedsegInputError(f"steps must be a positive integer, got {steps!r}")
    if seconds is not None and not (float(seconds) > 0 and math.isfinite(float(seconds))):
        raise MedsegInputError(f"seconds must be a positive number, got {seconds!r}")
    if seconds is not None and float(seconds) > MAX_TRAINING_SECONDS:  # 1e308 overflowed
        raise MedsegInputError(f"seconds must be at most {MAX_TRAINING_SECONDS:g} (30 days), "
                               f"got {seconds!r}")
    if steps is None and seconds is None:
        steps = default_steps
    return (None if steps is None else int(steps)), (None if seconds is None else float(seconds))


def _lr_factor(progress: float, warmup: float = 0.03) -> float:
    """Linear warm-up then cosine decay to 5 % of the base rate; ``progress`` in [0, 1]."""
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * p))


class PlainAdamW:
    """AdamW (decoupled weight decay, bias-corrected moments) without ``torch.optim``.

    For fine-tuning inside napari: constructing any ``torch.optim`` optimizer imports
    torch._dynamo on first use, 1.2 s of Python that holds the GIL, and the GUI froze
    for that long at the start of a retrain. Training from scratch keeps
    ``torch.optim.AdamW`` (its float operations reproduce the bundled weights).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        self.params = [p for p in params if p.requires_grad]
        self.param_groups = [{"lr": float(lr)}]
        self.betas, self.eps, self.weight_decay = betas, float(eps), float(weight_decay)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        lr = self.param_groups[0]["lr"]
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            g = p.grad
            p.mul_(1 - lr * self.weight_decay)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-lr / c1)


def _train_loop(model, batch_fn, loss_fn, steps, seconds, lr, name, refresh=None,
                refresh_every=0, weight_decay=1e-4, report_every=10,
                freeze_batchnorm=False, plain_optimizer=False,
                warmup_steps: int = 0) -> Job[dict[str, Any]]:
    """Run AdamW until ``steps`` or ``seconds``; yields Progress (``partial`` = the
    step's loss) every ``report_every`` steps, returns stats.

    ``freeze_batchnorm``: BatchNorm layers keep their running statistics (eval mode),
    as fine-tuning on a few slices of one volume must (its batch statistics are not the
    population's). ``plain_optimizer``: :class:`PlainAdamW` instead of torch.optim's.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (PlainAdamW(params, lr=lr, weight_decay=weight_decay) if plain_optimizer
           else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    start = time.perf_counter()
    total = steps if steps is not None else 1000
    step, running, first_losses, last_losses, curve = 0, None, [], [], []
    model.train()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    while True:
        elapsed = time.perf_counter() - start
        if steps is not None and step >= steps:
            break
        # at least one step, whatever the budget: a run that ended before its first step
        # saved a model of random weights as if trained
        out_of_time = seconds is not None and elapsed >= seconds and step > 0
        if steps is None and out_of_time:
            break
        frac = step / steps if steps is not None else min(1.0, elapsed / seconds)
        if steps is not None and seconds is not None:
            frac = min(1.0, max(frac, elapsed / seconds))
            if out_of_time:
                break
        ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(frac) * ramp
        inputs, targets = batch_fn(step)
        loss = loss_fn(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise MedsegInputError(f"{name} training diverged (loss {value}) at step {step}")
        running = value if running is None else 0.95 * running + 0.05 * value
        if len(first_losses) < 20:
            first_losses.append(value)
        last_losses = (last_losses + [value])[-20:]
        step += 1
        if refresh is not None and refresh_every and step % refresh_every == 0:
            refresh()
        curve.append(value)
        if steps is None:
            total = max(step + 1, int(step * seconds / max(time.perf_counter() - start, 1e-6)))
        if step % report_every == 0 or step == steps:
            yield Progress(step, total, f"{name}: step {step} loss {running:.4f}",
                           partial={"step": step, "loss": value})
    model.eval()
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "loss_first20": round(float(np.mean(first_losses)), 5) if first_losses else None,
        "loss_last20": round(float(np.mean(last_losses)), 5) if last_losses else None,
        "loss_curve": curve,
    }


def _jitter(rng: np.random.Generator, x: np.ndarray, normalisation: dict) -> np.ndarray:
    """Cheap intensity augmentation on a window-normalised image: global gain 0.93–1.07
    about 40 HU and an offset of ±15 HU (in window units), clipped back to [0, 1]."""
    low, high = float(normalisation["low"]), float(normalisation["high"])
    c = (40.0 - low) / (high - low)
    gain = rng.uniform(0.93, 1.07)
    offset = rng.uniform(-15.0, 15.0) / (high - low)
    return np.clip((x - c) * gain + c + offset, 0.0, 1.0).astype(np.float32)


def _add_noise(rng: np.random.Generator, x: np.ndarray, normalisation: dict, max_hu: float) -> np.ndarray:
    """Half the time, extra white noise of 0–``max_hu`` HU (in window units), clipped to
    [0, 1]: the phantom draws 8–25 HU, scanners and held-out volumes reach 35 HU and
    more. ``max_hu`` 0 draws nothing (runs without it reproduce bit for bit)."""
    if max_hu <= 0 or rng.uniform() < 0.5:
        return x
    sigma = rng.uniform(0.0, max_hu) / (float(normalisation["high"]) - float(normalisation["low"]))
    noisy = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def _crop_window(rng: np.random.Generator, n: int, size: int) -> tuple[int, int, int]:
    """(src_start, dst_start, length) to cut ``size`` from ``n`` (random) or pad into it."""
    if n >= size:
        s = int(rng.integers(0, n - size + 1))
        return s, 0, size
    d = int(rng.integers(0, size - n + 1))
    return 0, d, n


def _crop_yx(rng, arrays: Sequence[np.ndarray], size: int, fills: Sequence[float],
             center: tuple[float, float] | None = None) -> list[np.ndarray]:
    """Cut/pad the last two axes of every array to size×size at one random offset.

    ``center``: keep this (y, x) point inside the crop (balanced detector sampling).
    """
    ny, nx = arrays[0].shape[-2:]
    out_windows = []
    for n, axis in ((ny, 0), (nx, 1)):
        if center is not None and n > size:
            c = int(round(center[axis]))
            lo = max(0, min(n - size, c - size + 16))
            hi = max(lo, min(n - size, c - 16))
            s = int(rng.integers(lo, hi + 1))
            out_windows.append((s, 0, size))
        else:
            out_windows.append(_crop_window(rng, n, size))
    (sy, dy, ly), (sx, dx, lx) = out_windows
    outs = []
    for arr, fill in zip(arrays, fills):
        out = np.full((*arr.shape[:-2], size, size), fill, dtype=arr.dtype)
        out[..., dy:dy + ly, dx:dx + lx] = arr[..., sy:sy + ly, sx:sx + lx]
        outs.append(out)
    return outs


def _cpu_name() -> str:
    """The CPU's model name and whether it has AVX-512, from /proc/cpuinfo ("" elsewhere)."""
    from .inference import cpu_flags

    name = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags()
    vector = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else ""
    return ", ".join(part for part in (name, vector) if part)


def _command(name: str, seed: int, steps: int | None, seconds: float | None, loss: str,
             sampling: str) -> str:
    # repr: the budget given, not rounded to 6 digits (":g" wrote 1234567 as 1.23457e+06)
    budget = f"--steps {steps}" if steps is not None else f"--seconds {float(seconds)!r}"
    return (f"napari-medseg train {name} --seed {seed} {budget} --loss {loss}"
            f" --sampling {sampling}")


def check_options(name: str, loss: str | None, sampling: str | None) -> tuple[str, str]:
    """(loss, sampling) for ``name``, defaults filled in; MedsegInputError naming what
    ``name`` allows otherwise (the CLI calls it before any training)."""
    loss = DEFAULTS[name]["loss"] if loss is None else str(loss)
    sampling = DEFAULTS[name]["sampling"] if sampling is None else str(sampling)
    if loss not in LOSSES[name]:
        raise MedsegInputError(f"{name} loss must be one of {', '.join(LOSSES[name])}, got {loss!r}")
    allowed = SAMPLINGS_OF.get(name, SAMPLINGS)
    if sampling not in allowed:
        raise MedsegInputError(f"{name} sampling must be one of {', '.join(allowed)}, got {sampling!r}")
    return loss, sampling


def _base_card(name: str, classes: Sequence[str], spacing_yx: float, normalisation: dict,
               seed: int, steps, seconds, loss, sampling, stats, seeds: range, pool: int,
               extra: dict | None = None) -> dict[str, Any]:
    card = {
        "classes": list(classes),
        "input_spacing_mm": [1.0, float(spacing_yx), float(spacing_yx)],
        "resample_axes": "yx",
        "normalisation": dict(normalisation),
        "training": {
            "command": _command(name, seed, steps, seconds, loss, sampling),
            "seed": seed,
            "steps": stats["steps"],
            "seconds": stats["seconds"],
            "loss": loss,
            "sampling": sampling,
            "train_seeds": [seeds.start, seeds.start + seeds_used(stats, pool)],
            "loss_first20": stats["loss_first20"],
            "loss_last20": stats["loss_last20"],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            # float sums differ between CPUs (AVX-512 vs AVX2): a rerun elsewhere can
            # differ in the last digits, and this says where the file was made
            "cpu": _cpu_name(),
        },
        "note": "input_spacing_mm[0] is nominal: z is kept native (resample_axes 'yx').",
    }
    card.update(extra or {})
    return card


def seeds_used(stats: dict[str, Any], pool: int) -> int:
    return int(stats.get("phantoms", pool))


@dataclass(frozen=True)
class _Run:
    """The checked options of one training run, with the model's defaults filled in."""

    name: str
    seed: int
    loss: str
    sampling: str
    steps: int | None
    seconds: float | None
    spacing_yx: float
    norm: dict
    lr: float
    seeds: range
    rng: np.random.Generator


def _start_run(name: str, seed: Any, steps: int | None, seconds: float | None,
               loss: str | None, sampling: str | None, spacing_yx: float | None,
               lr: float | None, stream: int) -> _Run:
    """Check the options every trainer shares; ``stream`` picks ``default_rng([seed, stream])``."""
    seed = _check_seed(seed)
    d = DEFAULTS[name]
    loss, sampling = check_options(name, loss, sampling)
    steps, seconds = _budget(steps, seconds, d["steps"])
    return _Run(name, seed, loss, sampling, steps, seconds, float(spacing_yx or d["spacing_yx"]),
                d["normalisation"], float(lr or d["lr"]), training_seeds(seed),
                np.random.default_rng([seed, stream]))


def _fit(run: _Run, model, pool: PhantomPool, batch_fn, loss_fn, refresh_every: int,
         classes: Sequence[str], pool_size: int, extra: dict) -> Job[dict[str, Any]]:
    """Train ``model`` with :func:`_train_loop`, refreshing ``pool``; return its card."""
    stats = yield from _train_loop(model, batch_fn, loss_fn, run.steps, run.seconds, run.lr,
                                   run.name, refresh=pool.refresh_one,
                                   refresh_every=refresh_every)
    stats["phantoms"] = pool.next_index
    # the seeds the pool drew: a pool shared between runs (benchmarks) is another seed's,
    # and the card claimed this seed's phantoms and a command that would train on them
    card = _base_card(run.name, classes, run.spacing_yx, run.norm, run.seed, run.steps,
                      run.seconds, run.loss, run.sampling, stats, pool.seeds, pool_size, extra)
    if pool.seeds != run.seeds:
        card["training"]["command_reproduces"] = False
        card["training"]["note"] = ("trained on a pool shared with another run (its seeds "
                                    "are train_seeds); the command draws other phantoms")
    return card


# ======================================================================================
# Classifier
# ======================================================================================


def attach_lesion_twin(sample: GridSample, max_slices: int, spacing_yx: float,
                       normalisation: dict) -> None:
    """``sample.twin``: the same training phantom drawn without its lesions (identical
    anatomy and noise; they differ only where a lesion was), on the same grid; None when
    it has no lesion slice. A counterfactual negative for the classifier: the one
    difference between a lesion slice and its twin is the lesion."""
    sample.twin = None
    if (sample.slice_classes == 2).any():
        twin = make_phantom(sample.seed, training_settings(sample.seed, max_slices), n_lesions=0)
        sample.twin = to_model_grid(twin, spacing_yx, normalisation).image


def near_lesion_normal_slices(item: GridSample, lo_mm: float = 3.0, hi_mm: float = 25.0) -> np.ndarray:
    """Normal slices 3–25 mm (and ≥ 2 slices) from the nearest lesion slice: the same
    anatomy as the lesion slices without the lesion. Hard negatives for the classifier,
    which calls 83 % of the normal slices next to a lesion, and 44 % four slices away,
    "lesion" (benchmarks/model_errors.py, validation phantoms); the measured gain from
    sampling them is small (docs/models.md, "Variants tried")."""
    classes = item.slice_classes
    lesion_z = np.flatnonzero(classes == 2)
    normal_z = np.flatnonzero(classes == 1)
    if len(lesion_z) == 0 or len(normal_z) == 0:
        return np.zeros(0, dtype=np.int64)
    gap = np.abs(normal_z[:, None] - lesion_z[None, :]).min(axis=1)
    gap_mm = gap * float(item.spacing[0])
    return normal_z[(gap >= 2) & (gap_mm >= lo_mm) & (gap_mm <= hi_mm)]


def lesion_map_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice of a coarse lesion map (N, 1, h, w) against a full-resolution mask
    (N, H, W), max-pooled to (h, w) (a cell holds a lesion if any pixel in it does).

    The Dice is over the whole batch, so a batch without lesions still has a loss."""
    target = F.adaptive_max_pool2d(mask[:, None].float(), logits.shape[-2:])
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


class _WithLesionMap(torch.nn.Module):
    """Training view of a classifier with a lesion head: x → (class logits, lesion map)."""

    def __init__(self, model: SliceClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features(x)
        return self.model.classify_features(feats), self.model.lesion_logits(feats)


@private_rng
def train_classifier(
    seed: int = 0,
    steps: int | None = None,
    seconds: float | None = None,
    *,
    loss: str | None = None,
    sampling: str | None = None,
    kernel_size: int = 3,
    activation: str = "relu",
    filters: Sequence[int] = (16, 32, 64),
    spacing_yx: float | None = None,
    batch_size: int = 32,
    crop: int = 144,
    pool_size: int = 40,
    refresh_every: int = 40,
    max_slices: int = 40,
    lr: float | None = None,
    pool: PhantomPool | None = None,
    pooling: str = "avg",
    noise_hu: float = 0.0,
    hard_negatives: float = 0.0,
    context_slices: int = 0,
    lesion_map_weight: float = 0.0,
    lesion_twins: float = 0.0,
    convs_per_block: int = 1,
) -> Job[tuple[SliceClassifier, dict[str, Any]]]:
    """Train the slice classifier (no_body / normal / lesion) on single slices.

    Variants (off by default; docs/models.md "Variants tried"): ``pooling`` "max" for the
    adaptive pooling, ``noise_hu`` extra white noise (:func:`_add_noise`),
    ``hard_negatives`` the share of normal samples drawn by
    :func:`near_lesion_normal_slices`, ``context_slices`` z ± n slices as channels,
    ``lesion_map_weight`` > 0 adds the classifier's lesion head, trained with that weight
    on the lesion mask (:func:`lesion_map_loss`); a lesion slice whose lesion the random
    crop cut away is then labelled as the normal slice the model sees.
    ``lesion_twins``: the share of "normal" samples (balanced sampling) that are a lesion
    slice of the lesion-free twin of its phantom (:func:`attach_lesion_twin`): the same
    slice, anatomy and noise with the lesion taken out, so the slice's level in the body
    cannot tell the classes apart (the classifier trained without them called the twins
    of lesion slices "lesion" as often as the lesion slices). Lesion crops that cut the
    lesion away are then labelled normal too.

    ``pool``: an already filled :class:`PhantomPool` to share between runs (benchmarks);
    it must be at ``spacing_yx``.
    """
    run = _start_run("classifier", seed, steps, seconds, loss, sampling, spacing_yx, lr, 1)
    loss, sampling, norm, rng = run.loss, run.sampling, run.norm, run.rng
    with deterministic(run.seed):
        context = int(context_slices)
        if not (isinstance(crop, int) and SliceClassifier.MIN_SIZE <= crop <= MAX_CROP):
            raise MedsegInputError(
                f"crop must be {SliceClassifier.MIN_SIZE}..{MAX_CROP} pixels, got {crop!r}")
        if not (isinstance(lesion_map_weight, (int, float)) and 0 <= lesion_map_weight < math.inf):
            raise MedsegInputError(f"lesion_map_weight must be ≥ 0, got {lesion_map_weight!r}")
        with_map = lesion_map_weight > 0
        if not (isinstance(lesion_twins, (int, float)) and 0 <= lesion_twins <= 1):
            raise MedsegInputError(f"lesion_twins must be a share in [0, 1], got {lesion_twins!r}")
        # the crop's lesion mask decides the label (a crop without the lesion is normal)
        relabel = with_map or lesion_twins > 0
        model = SliceClassifier(2 * context + 1, len(SLICE_CLASSES), kernel_size, activation,
                                filters, pool=pooling, lesion_head=with_map,
                                convs_per_block=convs_per_block)
        if pool is None:
            pool = PhantomPool(run.seeds, pool_size, run.spacing_yx, max_slices, norm,
                               prepare=functools.partial(
                                   attach_lesion_twin, max_slices=max_slices,
                                   spacing_yx=run.spacing_yx, normalisation=norm)
                               if lesion_twins > 0 else None)
        elif abs(pool.spacing_yx - run.spacing_yx) > 1e-9:
            raise MedsegInputError(f"the pool is at {pool.spacing_yx} mm, the model at {run.spacing_yx} mm")
        elif lesion_twins > 0 and pool.prepare is None:
            raise MedsegInputError("lesion_twins needs a pool made with attach_lesion_twin")
        pool_size = pool.size
        yield from pool.fill()
        counts = np.zeros(3)
        for item in pool.items:
            counts += np.bincount(item.slice_classes, minlength=3)
        weight = class_weights(counts) if loss == "weighted_ce" else None

        def batch(step: int):
            xs, ys, masks = [], [], []
            if sampling == "balanced":
                wanted = rng.integers(0, 3, size=batch_size)
            for b in range(batch_size):
                item = pool.items[int(rng.integers(len(pool.items)))]
                z = int(rng.integers(item.image.shape[0]))
                for _ in range(20):
                    item = pool.items[int(rng.integers(len(pool.items)))]
                    twin = False
                    if sampling == "balanced":
                        zs = np.flatnonzero(item.slice_classes == wanted[b])
                        if wanted[b] == 1 and hard_negatives > 0 and rng.uniform() < hard_negatives:
                            zs = near_lesion_normal_slices(item)
                        if wanted[b] == 1 and lesion_twins > 0 and rng.uniform() < lesion_twins:
                            twin, zs = True, np.flatnonzero(item.slice_classes == 2)
                        if len(zs) == 0:
                            continue
                        z = int(rng.choice(zs))
                    else:
                        z = int(rng.integers(item.image.shape[0]))
                    break
                else:  # no volume had the wanted class: a slice of the last one drawn, as is
                    twin, z = False, min(z, item.image.shape[0] - 1)
                zs = np.clip(np.arange(z - context, z + context + 1), 0, item.image.shape[0] - 1)
                source = item.twin if twin else item.image
                img = _add_noise(rng, _jitter(rng, source[zs], norm), norm, noise_hu)
                label = 1 if twin else int(item.slice_classes[z])
                if relabel:
                    img, mask = _crop_yx(rng, [img, item.labels[z] == LESION_LABEL], crop,
                                         [0.0, False])
                    if label == 2 and not mask.any():
                        label = 1
                    if twin:
                        mask = np.zeros_like(mask)  # the twin has no lesion
                    if not with_map:
                        mask = None
                else:
                    (img,) = _crop_yx(rng, [img], crop, [0.0])
                    mask = None
                if rng.uniform() < 0.5:
                    img = img[..., ::-1]  # left-right flip: organ sides matter little here
                    mask = None if mask is None else mask[..., ::-1]
                xs.append(img)
                ys.append(label)
                masks.append(mask)
            x = torch.from_numpy(np.ascontiguousarray(np.stack(xs)))
            y = torch.tensor(ys, dtype=torch.long)
            if not with_map:
                return x, y
            return x, (y, torch.from_numpy(np.ascontiguousarray(np.stack(masks))))

        def class_loss(logits, y):
            if loss == "focal":
                return focal_loss(logits, y)
            return cross_entropy(logits, y, weight)

        def loss_fn(out, target):
            if not with_map:
                return class_loss(out, target)
            (logits, lesion_logits), (y, mask) = out, target
            return class_loss(logits, y) + lesion_map_weight * lesion_map_loss(lesion_logits, mask)

        card = yield from _fit(run, _WithLesionMap(model) if with_map else model, pool, batch,
                               loss_fn, refresh_every, SLICE_CLASSES,
                               pool_size,
                               {"context_slices": context,
                                "class_counts_first_pool": counts.tolist()})
    return model, card


# ======================================================================================
# Segmenter
# ======================================================================================


@private_rng
def train_segmenter(
    seed: int = 0,
    steps: int | None = None,
    seconds: float | None = None,
    *,
    loss: str | None = None,
    sampling: str | None = None,
    widths: Sequence[int] = (16, 32, 64),
    spacing_yx: float | None = None,
    seq_len: int = 12,
    crop: int = 128,
    pool_size: int = 40,
    refresh_every: int = 25,
    max_slices: int = 48,
    lr: float | None = None,
    noise_hu: float = 20.0,
    init: str | None = None,
) -> Job[tuple[RecurrentSegmenter, dict[str, Any]]]:
    """Train the recurrent organ segmenter on runs of ``seq_len`` consecutive slices.

    ``noise_hu``: extra white noise of up to that many HU in half the sequences
    (:func:`_add_noise`); 20 for the bundled model, 0 reproduces the models before it.

    ``sampling="balanced"``: half the sequences are centred on a lesion (the rare class).

    ``init``: a segmenter (bundled name or card path) to start from instead of random
    weights, with the same architecture and grid: a further run of ``steps`` with a
    fresh learning-rate schedule. The card records it (``init_from``, and ``--init`` in
    the command), so the chain reproduces from the first run's command.
    """
    run = _start_run("segmenter", seed, steps, seconds, loss, sampling, spacing_yx, lr, 2)
    start = _init_weights(init, RecurrentSegmenter, widths, run.spacing_yx) if init else None
    loss, sampling, norm, rng = run.loss, run.sampling, run.norm, run.rng
    n_classes = len(LABEL_NAMES)
    with deterministic(run.seed):
        model = RecurrentSegmenter(1, n_classes, widths)
        if start is not None:
            model.load_state_dict(start[0].state_dict())
        pool = PhantomPool(run.seeds, pool_size, run.spacing_yx, max_slices, norm)
        yield from pool.fill()
        counts = np.zeros(n_classes)
        for item in pool.items:
            counts += np.bincount(item.labels.ravel(), minlength=n_classes)[:n_classes]
        weight = class_weights(counts) if loss == "weighted_ce" else None

        def batch(step: int):
            item = pool.items[int(rng.integers(len(pool.items)))]
            nz = item.image.shape[0]
            stride = 2 if (rng.uniform() < 0.25 and item.spacing[0] < 2.5 and nz >= 2 * seq_len) else 1
            span = min(nz, seq_len * stride)
            center = None
            if sampling == "balanced" and item.lesions and rng.uniform() < 0.5:
                les = item.lesions[int(rng.integers(len(item.lesions)))]
                cz = int(round(les["center"][0]))
                z0 = int(np.clip(cz - span // 2 + rng.integers(-span // 4, span // 4 + 1), 0, nz - span))
                center = les["center"][1:]
            else:
                z0 = int(rng.integers(0, nz - span + 1))
            zs = np.arange(z0, z0 + span, stride)
            if rng.uniform() < 0.5:
                zs = zs[::-1].copy()  # reversed z: the bidirectional GRU sees both orders
            img = _add_noise(rng, _jitter(rng, item.image[zs], norm), norm, noise_hu)
            img, lab = _crop_yx(rng, [img, item.labels[zs]], crop,
                                [0.0, 0], center=center)
            x = torch.from_numpy(np.ascontiguousarray(img[:, None]))
            return x, torch.from_numpy(lab.astype(np.int64))

        def loss_fn(logits, y):
            if loss == "dice_ce":
                return dice_ce_loss(logits, y)
            if loss == "focal":
                return focal_loss(logits, y)
            return cross_entropy(logits, y, weight)

        card = yield from _fit(run, model, pool, batch, loss_fn, refresh_every,
                               [LABEL_NAMES[i] for i in range(n_classes)], pool_size,
                               {"sequence_length": seq_len})
    if start is not None:
        # the card a name resolved to here: a user model of that name would shadow the
        # bundled one on this machine and not on another
        card["training"]["command"] += f" --init {shlex.quote(start[1]['card'])}"
        card["training"]["init_from"] = start[1]
    return model, card


def _init_weights(init: str, cls: type, widths: Sequence[int], spacing_yx: float
                  ) -> tuple[Any, dict[str, Any]]:
    """(model, {"card", "sha256", "steps"}) to start a run from; refuses another
    architecture, class list or grid."""
    model, card = load_model(init)
    arch = card.get("arch_params", {})
    if not isinstance(model, cls) or tuple(arch.get("widths", ())) != tuple(widths):
        raise MedsegInputError(f"--init {init}: not a {cls.__name__} with widths {tuple(widths)}")
    if list(card["classes"]) != [LABEL_NAMES[i] for i in range(len(LABEL_NAMES))]:
        raise MedsegInputError(
            f"--init {init}: its classes {card['classes']} are not the phantom's {list(LABEL_NAMES.values())}")
    if float(card["input_spacing_mm"][1]) != float(spacing_yx):
        raise MedsegInputError(
            f"--init {init}: its grid is {card['input_spacing_mm'][1]} mm, this run's {spacing_yx} mm")
    path = Path(card["card_path"])
    bundled = path.resolve() == (BUNDLED_DIR / path.name).resolve()
    return model, {"card": path.stem if bundled and str(init) == path.stem else str(path),
                   "sha256": card.get("sha256"),
                   "steps": card.get("training", {}).get("steps")}


# ======================================================================================
# Detector
# ======================================================================================


def check_sigma_fraction(value: Any, name: str) -> float:
    """A heatmap Gaussian's σ as a fraction of the lesion radius: a number in (0, 10]
    (training's arguments and a card's "heatmap" entry alike)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 10:
        raise MedsegInputError(f"{name} must be in (0, 10], got {value!r}")
    return float(value)


def detector_targets(sample: GridSample, sigma_fraction: float = 0.5,
                     z_sigma_fraction: float | None = None,
                     size_balance_mm: float = 0.0) -> None:
    """Attach heatmap (float16) and log-diameter targets to a model-grid sample.

    ``z_sigma_fraction``: the heatmap's σ along z as a fraction of the radius (default:
    ``sigma_fraction``). A 2.5D network sees z ± 1 slice, so on thin slices it cannot
    tell a large lesion's middle slice from the next; a sharp z target then teaches it
    to hedge with low peaks on exactly the most visible lesions.

    ``size_balance_mm`` > 0 also attaches ``heat_weight``: inside each lesion's 3σ box
    the loss weight (``size_balance_mm`` / radius)², between 1 and 10, so a small
    lesion's few target voxels count about as much as a large one's many (the soft
    focal loss sums over voxels, so a lesion's pull grows with its area). 0: no weight.
    """
    shape = sample.image.shape
    centers = [les["center"] for les in sample.lesions]
    zf = sigma_fraction if z_sigma_fraction is None else float(z_sigma_fraction)
    radii = [
        (les["radius_mm"] / sample.spacing[0], les["radius_mm"] / sample.spacing[1],
         les["radius_mm"] / sample.spacing[2])
        for les in sample.lesions
    ]
    heat_radii = [(rz * zf / sigma_fraction, ry, rx) for rz, ry, rx in radii]
    heat = gaussian_heatmap_targets(shape, centers, heat_radii if radii else 1.0, sigma_fraction)
    size = np.zeros(shape, dtype=np.float16)
    owner = np.full(shape, -1.0, dtype=np.float16)
    # size target: log-diameter in each lesion's core (Gaussian > 0.3), largest wins
    for les, r in sorted(zip(sample.lesions, radii), key=lambda t: t[0]["radius_mm"]):
        sl = clipped_box(np.round(les["center"]).astype(int), np.ceil(np.asarray(r)).astype(int), shape)
        if sl is None:
            continue
        size[sl] = math.log(les["diameter_mm"])
        owner[sl] = 1.0
    sample.heat = heat.astype(np.float16)  # type: ignore[attr-defined]
    if size_balance_mm > 0:
        weight = np.ones(shape, dtype=np.float16)
        # the same 3σ box as each lesion's Gaussian in gaussian_heatmap_targets
        for les, heat_r in zip(sample.lesions, heat_radii):
            half = np.ceil(3 * gaussian_sigmas(heat_r, sigma_fraction)).astype(int)
            box = clipped_box(np.round(les["center"]).astype(int), half, shape)
            if box is None:
                continue
            w = float(np.clip((size_balance_mm / les["radius_mm"]) ** 2, 1.0, 10.0))
            np.maximum(weight[box], np.float16(w), out=weight[box])
        sample.heat_weight = weight  # type: ignore[attr-defined]
    sample.size = size  # type: ignore[attr-defined]
    sample.size_mask = owner > 0  # type: ignore[attr-defined]
    body = sample.labels > 0
    sample.body_slices = np.flatnonzero(body.reshape(shape[0], -1).any(axis=1))  # type: ignore[attr-defined]


def detector_loss(out, target, kind: str = "focal", size_weight: float = 0.1) -> torch.Tensor:
    """``target``: (heatmap, log-diameter, size mask[, heatmap weight (soft_focal only)])."""
    heat_t, size_t, size_m = target[:3]
    heat_w = target[3] if len(target) > 3 else None
    if heat_w is not None and kind != "soft_focal":
        raise MedsegInputError(f"a heatmap weight needs the soft_focal loss, not {kind!r}")
    if kind == "focal":
        heat_loss = centernet_focal_loss(out.heatmap, heat_t)
    elif kind == "soft_focal":
        heat_loss = soft_focal_loss(out.heatmap, heat_t, weight=heat_w)
    else:
        heat_loss = heatmap_bce_loss(out.heatmap, heat_t) * 50.0
    if bool(size_m.any()):
        size_loss = F.smooth_l1_loss(out.log_diameter[size_m], size_t[size_m])
    else:
        size_loss = out.log_diameter.sum() * 0.0
    return heat_loss + size_weight * size_loss


def train_detector(
    seed: int = 0,
    steps: int | None = None,
    seconds: float | None = None,
    *,
    members: int = 1,
    **options: Any,
) -> Job[tuple[LesionDetector, dict[str, Any]]]:
    """Train the lesion detector (:func:`train_detector_network`, ``options`` its keywords).

    ``members`` > 1 trains that many networks with seeds ``seed``, ``seed`` + 1, … (each
    the very run ``members=1`` with that seed makes; the budget is per network) and
    returns their ensemble (:meth:`LesionDetector.ensemble`), whose card lists them.
    """
    members = positive_int(members, "members")
    nets, cards = [], []
    for k in range(members):
        job = train_detector_network(seed + k if members > 1 else seed, steps, seconds, **options)
        if members > 1:
            job = _labelled(job, f"network {k + 1}/{members}: ")
        net, card = yield from job
        nets.append(net)
        cards.append(card)
    if members == 1:
        return nets[0], cards[0]
    card, training = cards[0], cards[0]["training"]
    training["members"] = [{key: c["training"][key] for key in
                            ("seed", "seconds", "train_seeds", "loss_first20", "loss_last20")}
                           for c in cards]
    training["seconds"] = round(sum(c["training"]["seconds"] for c in cards), 1)
    training["command"] += f" --members {members}"
    return LesionDetector.ensemble(nets), card


def _labelled(job: Job[Any], prefix: str) -> Job[Any]:
    """``job`` with ``prefix`` before every progress message."""
    while True:
        try:
            p = next(job)
        except StopIteration as stop:
            return stop.value
        yield Progress(p.step, p.total, prefix + p.message, p.partial)


#: lesions fainter than this (|lesion − host organ| in HU) count as faint for ``faint_weight``
FAINT_LESION_HU = 20.0


def detector_sample(rng: np.random.Generator, item: Any, context: int, crop: int,
                    norm: dict, balanced: bool = True, noise_hu: float = 0.0,
                    faint_weight: float = 1.0) -> list[np.ndarray]:
    """One training crop of a pool volume (:func:`detector_targets` done): the slice and
    its ``context`` neighbours on each side, heatmap, size and size mask of the slice, with
    intensity jitter and a random flip. ``balanced``: half the time a slice near a lesion
    centre, cropped so the lesion is in view; otherwise any body slice. ``faint_weight``:
    how much more often a faint lesion (|contrast| < :data:`FAINT_LESION_HU`) is the one
    picked than another (1: all alike, the same draws as before the option)."""
    nz = item.image.shape[0]
    center = None
    if balanced and item.lesions and rng.uniform() < 0.5:
        if faint_weight == 1.0:
            pick = int(rng.integers(len(item.lesions)))
        else:
            w = np.array([faint_weight if abs(les.get("contrast_hu", np.inf)) < FAINT_LESION_HU else 1.0
                          for les in item.lesions])
            pick = int(rng.choice(len(w), p=w / w.sum()))
        les = item.lesions[pick]
        rz = max(1, int(les["radius_mm"] / item.spacing[0]))
        z = int(np.clip(round(les["center"][0]) + rng.integers(-rz, rz + 1), 0, nz - 1))
        center = les["center"][1:]
    else:
        body = item.body_slices
        z = int(rng.choice(body)) if len(body) else int(rng.integers(nz))
    zs = np.clip(np.arange(z - context, z + context + 1), 0, nz - 1)
    img = _add_noise(rng, _jitter(rng, item.image[zs], norm), norm, noise_hu)
    arrays, fills = [img, item.heat[z], item.size[z], item.size_mask[z]], [0.0, 0.0, 0.0, False]
    if getattr(item, "heat_weight", None) is not None:
        arrays.append(item.heat_weight[z])
        fills.append(1.0)
    out = _crop_yx(rng, arrays, crop, fills, center=center)
    if rng.uniform() < 0.5:
        out = [a[..., ::-1] for a in out]
    return out


@private_rng
def train_detector_network(
    seed: int = 0,
    steps: int | None = None,
    seconds: float | None = None,
    *,
    loss: str | None = None,
    sampling: str | None = None,
    widths: Sequence[int] = (16, 32, 64),
    spacing_yx: float | None = None,
    batch_size: int = 16,
    crop: int = 128,
    pool_size: int = 40,
    refresh_every: int = 25,
    max_slices: int = 48,
    lr: float | None = None,
    noise_hu: float = 0.0,
    z_sigma_fraction: float = 1.0,
    sigma_fraction: float = 0.5,
    context_slices: int = 1,
    convs_per_stage: int = 2,
    size_balance_mm: float = 0.0,
    z_range_mm: Sequence[float] = (1.0, 5.0),
    faint_weight: float = 1.0,
) -> Job[tuple[LesionDetector, dict[str, Any]]]:
    """Train the 2.5D centre-heatmap lesion detector (2·``context_slices`` + 1 slices in,
    heatmap and size of the middle slice out).

    The defaults are the bundled recipe (docs/models.md, chosen on validation phantoms):
    ``loss`` "soft_focal", heatmap σ = 0.5 · radius in-plane (``sigma_fraction``) and
    1.0 · radius along z (``z_sigma_fraction``, :func:`detector_targets`), z ± 1 slice
    (``context_slices``). ``noise_hu`` adds white noise (:func:`_add_noise`; off).
    ``convs_per_stage``: conv layers per encoder stage (2). ``size_balance_mm`` > 0
    weights each lesion's heatmap loss by (that / radius)², so small lesions count
    about as much as large ones (:func:`detector_targets`; soft_focal only; off).
    ``z_range_mm``: the training phantoms' slice spacing range (1–5 mm).
    ``faint_weight``: balanced sampling picks a faint lesion (|contrast| < 20 HU) that
    many times as often as another (1: off).

    ``sampling="balanced"``: half the samples are slices near a lesion centre, cropped
    so the lesion is in view; ``"uniform"``: any body slice, random crop.
    """
    run = _start_run("detector", seed, steps, seconds, loss, sampling, spacing_yx, lr, 3)
    loss, sampling, norm, rng = run.loss, run.sampling, run.norm, run.rng
    context = positive_int(context_slices, "context_slices")
    check_sigma_fraction(sigma_fraction, "sigma_fraction")
    check_sigma_fraction(z_sigma_fraction, "z_sigma_fraction")
    size_balance_mm = float(size_balance_mm)
    if not (math.isfinite(size_balance_mm) and size_balance_mm >= 0):
        raise MedsegInputError(f"size_balance_mm must be a number >= 0, got {size_balance_mm!r}")
    if size_balance_mm > 0 and loss != "soft_focal":
        raise MedsegInputError(f"size_balance_mm weights the soft_focal loss, not {loss!r}")
    heatmap_card = {"loss": loss, "sigma_fraction": float(sigma_fraction),
                    "z_sigma_fraction": float(z_sigma_fraction)}
    if size_balance_mm > 0:  # absent when off: earlier cards stay as they were
        heatmap_card["size_balance_mm"] = size_balance_mm
    z_range = check_z_range(z_range_mm)
    extra_card = {"training_z_range_mm": list(z_range)} if z_range != (1.0, 5.0) else {}
    faint_weight = float(faint_weight)
    if not (math.isfinite(faint_weight) and faint_weight > 0):
        raise MedsegInputError(f"faint_weight must be a number > 0, got {faint_weight!r}")
    if faint_weight != 1.0:
        if sampling != "balanced":
            raise MedsegInputError("faint_weight weights the lesions balanced sampling picks; "
                                   f"sampling is {sampling!r}")
        extra_card["training_faint_weight"] = faint_weight
    with deterministic(run.seed):
        model = LesionDetector(2 * context + 1, widths, convs_per_stage=convs_per_stage)
        pool = PhantomPool(run.seeds, pool_size, run.spacing_yx, max_slices, norm,
                           prepare=functools.partial(detector_targets,
                                                     sigma_fraction=sigma_fraction,
                                                     z_sigma_fraction=z_sigma_fraction,
                                                     size_balance_mm=size_balance_mm),
                           z_range_mm=z_range)
        yield from pool.fill()

        def batch(step: int):
            xs, hs, ss, ms, ws = [], [], [], [], []
            for _ in range(batch_size):
                item = pool.items[int(rng.integers(len(pool.items)))]
                img, heat, size, mask, *weight = detector_sample(
                    rng, item, context, crop, norm, sampling == "balanced", noise_hu, faint_weight)
                xs.append(img)
                hs.append(heat)
                ss.append(size)
                ms.append(mask)
                ws.extend(weight)
            x = torch.from_numpy(np.ascontiguousarray(np.stack(xs)))
            t = (torch.from_numpy(np.ascontiguousarray(np.stack(hs)[:, None], dtype=np.float32)),
                 torch.from_numpy(np.ascontiguousarray(np.stack(ss)[:, None], dtype=np.float32)),
                 torch.from_numpy(np.ascontiguousarray(np.stack(ms)[:, None])))
            if ws:
                t += (torch.from_numpy(np.ascontiguousarray(np.stack(ws)[:, None], dtype=np.float32)),)
            return x, t

        card = yield from _fit(run, model, pool, batch, lambda o, t: detector_loss(o, t, loss),
                               refresh_every, ["lesion"], pool_size,
                               {"context_slices": context, "peak_threshold": 0.3,
                                "min_distance_mm": 8.0,
                                # a second peak inside a large lesion is not another one
                                "nms_radius_fraction": 1.0,
                                # fine-tuning makes its targets and loss the same way
                                "heatmap": heatmap_card, **extra_card})
    return model, card


def _train_generator(*args: Any, **kwargs: Any):
    from .generation import train_generator  # generation builds on this module

    return train_generator(*args, **kwargs)


TRAINERS = {
    "classifier": train_classifier,
    "segmenter": train_segmenter,
    "detector": train_detector,
    "generator": _train_generator,
}


def train(name: str, seed: int = 0, steps: int | None = None, seconds: float | None = None,
          **kwargs: Any) -> Job[tuple[Any, dict[str, Any]]]:
    """Dispatch to the trainer of model ``name`` (one of :data:`MODEL_NAMES`)."""
    if name not in TRAINERS:
        raise MedsegInputError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return TRAINERS[name](seed, steps, seconds, **kwargs)
