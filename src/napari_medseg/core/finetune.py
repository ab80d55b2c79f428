"""Fine-tune the segmenter on a user's corrections: partial annotation, seconds, CPU.

The user corrects some slices of a volume (the *annotated* slices). On those slices every
voxel is a target — the corrections and what the user left as it was; every other voxel
is ignored by the loss (``IGNORE_INDEX``). :func:`finetune_segmenter` trains a COPY of
the model (the caller's model is never touched, so a cancel leaves it exactly as it was)
and returns it with a new card. :class:`VersionHistory` keeps v0 (the starting model),
v1, v2 … in memory for revert and save; :func:`unannotated_updates` says which voxels a
re-prediction may change (never one on an annotated or missing slice).

Why the loss looks the way it does (class imbalance):

- cross-entropy weighted per class by inverse frequency over the annotated voxels
  (:func:`~.training.class_weights`), plus soft Dice, so a small structure counts as
  much as the background around it;
- voxels where the annotation disagrees with the model's own prediction at the start
  (the corrections) weigh ``1 + correction_weight`` times more, and half the training
  crops are centred on one, so a few painted voxels still move the model.

Not forgetting: on the unannotated slices of each training crop, a KL term
(``keep_weight``) keeps the prediction close to the starting model's ("learning without
forgetting"); without it, in an exploratory run, a round on lesion-free slices erased
the lesions the model had found elsewhere.

BatchNorm statistics stay frozen (a few slices of one volume are not a population).
Held-out check: with two or more annotated slices one of them (rotating with the version
number, so successive rounds leave each slice out in turn) is left out for the first 75 %
of the budget; its Dice is measured before training and at that point, then it joins the
training for the rest. The Dice is on the input grid, mean over the structures present
in the slice or the prediction.

This module lives beside :mod:`.training` (train from scratch on phantoms) and uses its
losses and training loop; it is separate because its data is the user's volume, not a
phantom stream.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MedsegInputError
from .text import counted
from .inference import (
    ModelGridSlices,
    ThreadGovernor,
    card_spacing_yx,
    check_model_args,
    labels_from_logits,
    positive_int,
)
from .models.registry import build_for_weights, save_model, user_models_dir
from .models.segmenter import RecurrentSegmenter
from .rng import PrivateRNG
from .volume import DEFAULT_DIAMETER_MM, Volume
from .progress import Job, Progress
from .resample import resample_yx
from .models.classifier import check_choice
from .models.detector import LesionDetector
from .resample import map_index
from .training import (
    IGNORE_INDEX,
    _check_seed,
    LOSSES,
    _budget as _train_budget,
    _crop_yx,
    PhantomPool,
    _train_loop,
    check_sigma_fraction,
    check_z_range,
    class_weights,
    detector_loss,
    detector_sample,
    detector_targets,
    training_seeds,
    soft_dice_loss,
)

#: label values a user may paint and a model may learn (255 is the loss's "ignore")
MAX_LABEL = 254
#: default time budget of one retrain round, seconds
DEFAULT_SECONDS = 15.0
#: training phantoms mixed into each detector fine-tuning batch (see finetune_detector)
REHEARSAL_PHANTOMS = 3
REHEARSAL_MAX_SLICES = 48
#: default round when the annotation holds a new structure: its output is learnt from
#: scratch (benchmarks/bench_finetune.py: stomach Dice 0.22 after 15 s, 0.76 after 30 s)
NEW_STRUCTURE_SECONDS = 30.0
#: steps a new structure needs (validation phantoms, ``finetune_variants.py --new-structure
#: --steps N``: stomach Dice 0.58 / 0.01 / 0.40 after 150 steps, 0.77 / 0.75 / 0.71 after
#: 300); a 15 s round makes 55–150 of them, depending on the CPU
NEW_STRUCTURE_STEPS = 300
#: share of the budget trained without the held-out slice
HOLDOUT_PHASE = 0.75
#: annotated slices a round needs to hold one out: with two, the first phase trained on
#: ONE slice, and a round of 25-40 steps ended with the liver nearly gone on one phantom
#: (13-141 ml of 259; the same rounds without a held-out slice 270-283 ml; with three
#: annotated slices, one held out, 264-271 ml; `benchmarks/finetune_warmup.py`)
MIN_SLICES_FOR_HOLDOUT = 3
#: a round's ``seconds`` include its whole-volume passes (the model's prediction on the
#: annotated slices, the held-out slice's score); training keeps at least this share
MIN_TRAINING_SHARE = 0.5


@dataclass(frozen=True)
class FinetuneReport:
    """What one retrain round did and measured."""

    slices: tuple[int, ...]
    steps: int
    seconds: float
    loss_curve: tuple[float, ...]
    holdout_slice: int | None
    holdout_dice_before: float | None
    holdout_dice_after: float | None
    new_classes: tuple[str, ...]
    #: segmenter: voxels (model grid) where the annotation corrected the model; detector: points given
    corrections: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "slices": list(self.slices),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "holdout_slice": self.holdout_slice,
            "holdout_dice_before": _round(self.holdout_dice_before),
            "holdout_dice_after": _round(self.holdout_dice_after),
            "new_classes": list(self.new_classes),
            "corrections": self.corrections,
            "loss_first": _round(self.loss_curve[0] if self.loss_curve else None),
            "loss_last": _round(self.loss_curve[-1] if self.loss_curve else None),
        }


@dataclass(frozen=True)
class FinetuneResult:
    model: nn.Module
    card: dict[str, Any]
    report: FinetuneReport


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


# ======================================================================================
# Checks
# ======================================================================================
#: steps over which a round's learning rate ramps up (each phase's); 0: the schedule's own
#: 3 % of the round. Tried against short rounds that left the segmenter worse
#: (`benchmarks/finetune_warmup.py`): a ramp of 10-40 steps only moved the dip to other
#: step counts (on one phantom the liver fell to 8-37 ml of 259 at 25, 40 or 60 steps,
#: depending on the ramp), so none is used; the widget keeps such a round from the layer
#: by its held-out Dice instead
FINETUNE_WARMUP_STEPS = 0


def check_annotations(volume: Any, labels: Any, slices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """``labels`` as a (z, y, x) integer array matching ``volume``, and the annotated
    slices (sorted, unique, acquired); MedsegInputError says what is wrong."""
    arr = np.asarray(labels)
    shape = tuple(volume.shape)
    if arr.ndim == 2 and shape[0] == 1:
        arr = arr[None]
    if arr.shape != shape:
        raise MedsegInputError(
            f"the labels have shape {arr.shape}, the image {shape}; pick the Labels layer "
            "drawn on this image")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise MedsegInputError(f"labels must hold integers, got {arr.dtype}")
    zs = _check_slices(volume, slices,
                       "no annotated slices: correct or mark at least one slice before retraining")
    values = arr[zs]
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > MAX_LABEL:
        raise MedsegInputError(f"label values must be 0–{MAX_LABEL}, found {lo}–{hi}")
    if hi == 0:
        raise MedsegInputError(
            "the annotated slices hold only background (0); paint at least one structure")
    return arr, zs


#: abbreviations of a side in structure names (3D Slicer's "Kidney (L)")
_SIDE_WORDS = {"l": "left", "lt": "left", "r": "right", "rt": "right"}


def label_name_conflicts(names: Mapping[int, str], classes: Sequence[str], labels: Any,
                         slices: Sequence[int]) -> list[tuple[int, str, str]]:
    """(value, name in the labels, name in the model) for each value painted on
    ``slices`` whose name says it is another structure than the model's class of that
    number (another tool's or model's numbering: trained in silently, liver as spleen).
    A placeholder class (unused_N, structure_N) takes the labels' name: no conflict."""
    def words(name: str) -> list[str]:  # "Left kidney", "Kidney (L)" and kidney_left alike
        return sorted(_SIDE_WORDS.get(w, w) for w in re.sub(r"[^a-z0-9]+", " ",
                                                            name.lower()).split())

    def same(a: str, b: str) -> bool:
        return words(a) == words(b)

    inside = [z for z in slices if 0 <= z < len(labels)]  # others: the caller says so
    present = {int(v) for v in np.unique(np.asarray(labels)[inside])} if inside else set()
    return [(v, str(names[v]), str(classes[v])) for v in sorted(present)
            if 0 < v < len(classes) and v in names
            and str(classes[v]) not in (f"unused_{v}", f"structure_{v}")
            and not same(str(names[v]), str(classes[v]))]


def measured_values(volume: Any, arr: np.ndarray, zs: Sequence[int]) -> np.ndarray:
    """The label values on the annotated slices' measured voxels: a stroke on a slice's
    NaN voxels teaches nothing (they are ignored by the loss), so its value must not make
    a structure the model "learnt"."""
    values = arr[zs]
    unmeasured = np.isnan(np.asarray(volume.array)[zs])
    return values[~unmeasured] if unmeasured.any() else values.ravel()


def trained_before(card: Mapping[str, Any]) -> set[int]:
    """The slices the card's model was fine-tuned on, in every round of its lineage (its
    card's ``finetune_history``); slice numbers of whatever image each round used."""
    seen: set[int] = set()
    history = card.get("finetune_history")
    for record in history if isinstance(history, list) else ():
        slices = record.get("slices") if isinstance(record, Mapping) else None
        for z in slices if isinstance(slices, list) else ():
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                seen.add(_whole(z))
    return seen


def _whole(z: Any) -> int:
    """A slice index: an integer, or a float with no fraction; not a bool."""
    if isinstance(z, (bool, np.bool_)):
        raise TypeError(z)
    if isinstance(z, (float, np.floating)):
        if not float(z).is_integer():
            raise ValueError(z)
        return int(z)
    return operator.index(z)


def _ranges(zs: Sequence[int], most: int = 6) -> str:
    """Sorted indices as "3–5, 9", at most ``most`` runs (a typo'd range is thousands)."""
    runs: list[list[int]] = []
    for z in zs:
        if runs and z == runs[-1][1] + 1:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    text = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs[:most])
    return text + (f" … ({len(runs) - most} more runs)" if len(runs) > most else "")


def _check_slices(volume: Any, slices: Sequence[int], empty_message: str) -> list[int]:
    """Sorted unique slice indices, inside the volume and acquired."""
    try:
        zs = sorted({_whole(z) for z in slices})
    except (TypeError, ValueError) as exc:  # 2.7 used to train on slice 2
        raise MedsegInputError(f"slices must be whole numbers, got {slices!r}") from exc
    if not zs:
        raise MedsegInputError(empty_message)
    bad = [z for z in zs if not 0 <= z < volume.shape[0]]
    if bad:
        raise MedsegInputError(
            f"{'slice' if len(bad) == 1 else 'slices'} {_ranges(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} outside the volume (0–{volume.shape[0] - 1})")
    missing = [z for z in zs if volume.missing[z]]
    if missing:
        one = len(missing) == 1
        raise MedsegInputError(f"{'slice' if one else 'slices'} {_ranges(missing)} "
                               f"{'was' if one else 'were'} not acquired (missing); "
                               f"{'it' if one else 'they'} cannot be training data")
    return zs


def _check_number(value: Any, what: str, positive: bool = False) -> None:
    """A finite number ≥ 0 (> 0 with ``positive``): NaN would switch a loss term off
    silently, a negative learning rate would train away from the annotations."""
    try:
        ok = math.isfinite(float(value)) and (float(value) > 0 if positive else float(value) >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MedsegInputError(f"{what} must be a finite number {'>' if positive else '≥'} 0, "
                               f"got {value!r}")


def _budget(steps: int | None, seconds: float | None, default_seconds: float
            ) -> tuple[int | None, float | None]:
    """Checked (steps, seconds); a time budget of ``default_seconds`` when neither is given."""
    return _train_budget(steps, default_seconds if steps is None and seconds is None else seconds, 1)


def new_structure_advice(report: FinetuneReport) -> str | None:
    """For a round that gained a class in fewer than :data:`NEW_STRUCTURE_STEPS` steps:
    the Seconds that would reach them at this round's pace, as advice; otherwise None."""
    if not report.new_classes or not report.steps or report.steps >= 0.9 * NEW_STRUCTURE_STEPS:
        return None
    need = 5 * math.ceil(report.seconds * NEW_STRUCTURE_STEPS / report.steps / 5)
    return (f"a new structure is learnt from scratch in about {NEW_STRUCTURE_STEPS} steps and this"
            f" round made {report.steps}: if it is missing on other slices, retrain with Seconds ≥ {need}")


def slice_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the foreground values present in ``truth`` or ``pred``. A slice
    with no foreground in ``truth`` (marked correct outside the body) scores 1 − the
    fraction of its pixels ``pred`` gives a structure: 1.0 when predicted empty too (it
    was NaN, shown "Dice nan → nan", and a round that painted false positives there
    passed the held-out check, NaN comparing False), while a stray voxel costs next to
    nothing (a Dice over no truth would be 0 for one voxel, and reject the round)."""
    if not (np.asarray(truth) > 0).any():
        return float(1.0 - (np.asarray(pred) > 0).mean()) if np.size(pred) else 1.0
    values = np.union1d(np.unique(pred), np.unique(truth))
    scores = []
    for v in values[values > 0]:
        p, t = pred == v, truth == v
        denom = p.sum() + t.sum()
        scores.append(2.0 * np.logical_and(p, t).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0


# ======================================================================================
# Fine-tuning
# ======================================================================================
def _volume_logits(model: RecurrentSegmenter, x: torch.Tensor, zs: Sequence[int],
                   message: str) -> Job[dict[int, torch.Tensor]]:
    """Logits (C, h, w) of slices ``zs`` from the pass over the whole volume that
    inference makes (both GRU directions carry every slice); a generator yielding
    Progress per chunk (a cancel point), which stops after the last chunk it needs.
    A window of ±3 slices around each disagreed with the model's own output on tens of
    voxels per slice (±24 still on 69 voxels, benchmarks/segmenter_context_window.py: the
    GRU's memory is long): a layer left as segmented counted 78 "corrections" and a
    held-out Dice of 0.94."""
    out: dict[int, torch.Tensor] = {}
    wanted = set(int(z) for z in zs)
    last = max(wanted)
    was_training = model.training
    model.eval()
    chunks = model.iter_chunks(x)
    try:
        while True:
            # inference mode only around the model's work, never across a yield: the
            # caller's code between two reports runs in its own grad mode
            with torch.inference_mode():
                part = next(chunks, None)
                if part is not None and part.logits is not None:
                    for z in wanted.intersection(range(part.start, part.stop)):
                        out[z] = part.logits[z - part.start].clone()
            if part is None:
                break
            yield Progress(part.step, part.total, message)
            if part.logits is not None and part.stop > last:
                break
    finally:
        chunks.close()
        model.train(was_training)
    return out


#: ``finetune_segmenter(trainable=...)``: which parts of the segmenter a round updates
TRAINABLE_PARTS: dict[str, tuple[str, ...]] = {
    "all": (),
    "encoder": ("enc1", "enc2", "enc3"),
    "early": ("enc1", "enc2"),
    "decoder": ("up2", "dec2", "up1", "dec1", "head"),
}


def _freeze_except(model: nn.Module, trainable: str, grows: bool) -> None:
    """requires_grad off outside the ``trainable`` part (a grown head always trains);
    ``"all"`` turns it on everywhere."""
    parts = TRAINABLE_PARTS[trainable]
    if parts and grows:  # () is "all": adding the head to it would freeze everything else
        parts = parts + ("head",)
    for name, child in model.named_children():
        for p in child.parameters():
            p.requires_grad_(not parts or name in parts)


def keep_loss(logits: torch.Tensor, teacher_logp: torch.Tensor, free: torch.Tensor,
              balance: bool = False) -> torch.Tensor:
    """KL(teacher ‖ model) averaged over the ``free`` (unannotated) voxels; 0 when none.

    ``logits``, ``teacher_logp``: (N, C, H, W); ``free``: (N, H, W) bool. ``balance``
    weights each voxel by :func:`class_weights` of the teacher's class, so the few voxels
    of a rare structure the model found (a lesion) count as much as the background.
    """
    free = free.unsqueeze(1)
    if not bool(free.any()):
        return logits.sum() * 0.0
    kl = (teacher_logp.exp() * (teacher_logp - logits.log_softmax(1))).sum(1, keepdim=True)[free]
    if not balance:
        return kl.mean()
    cls = teacher_logp.argmax(1, keepdim=True)[free]
    w = class_weights(torch.bincount(cls, minlength=logits.shape[1]).tolist())[cls]
    return (kl * w).sum() / w.sum()


def _revived(old: Sequence[str], present: set[int]) -> set[int]:
    """Values the model has a slot for but never learnt (``unused_<v>``, made as a gap
    when a higher value was painted before) that the user paints now: new structures."""
    return {v for v in present if v < len(old) and old[v] == f"unused_{v}"}


def _class_names(old: Sequence[str], n_classes: int, present: set[int],
                 names: Mapping[int, str] | None) -> list[str]:
    """The grown model's class names: a painted new value takes the layer's name for it
    (``names``) or ``structure_<v>``; a value in between never painted stays the
    placeholder ``unused_<v>`` whatever name the layer gives it (it was named after a
    structure the model never learnt, and was then no longer found as new when painted).
    A given name that is itself a placeholder (a layer's names table copied from a card)
    is no name (the slot stayed ``unused_<v>`` and was "new" in every round)."""
    out = list(old)

    def named(v: int) -> str:
        # one line, and not another class's name: two "liver" classes merged into one
        # entry of the volume summary, which then left the real liver out
        given = " ".join(str((names or {}).get(v) or "").split())
        taken = {name for i, name in enumerate(out) if i != v}
        return (given if given and given != f"unused_{v}" and given not in taken
                else f"structure_{v}")

    for v in sorted(_revived(old, present)):
        out[v] = named(v)
    # a structure learnt unnamed, named in the layer since: the name reaches the model
    # (the layer said "gallbladder", the saved model and its Segment results structure_9)
    for v, name in enumerate(old):
        if name == f"structure_{v}":
            out[v] = named(v)
    for v in range(len(old), n_classes):
        out.append(named(v) if v in present else f"unused_{v}")
    return out


def _annotation_targets(volume: Volume, arr: np.ndarray, zs: Sequence[int],
                        card: Mapping[str, Any], grid: tuple[int, int]) -> np.ndarray:
    """(z, h, w) uint8 training targets on the model grid: the annotated slices' labels,
    IGNORE_INDEX elsewhere and on voxels never measured (NaN: a turned series' gap
    planes, which the model reads as the plane beside them; a user's stroke across
    them, or the 0 left there, must not teach that tissue a class)."""
    nz = volume.shape[0]
    spacing_from, spacing_to = volume.spacing[1:], card_spacing_yx(card)
    target = np.full((nz, *grid), IGNORE_INDEX, dtype=np.uint8)
    target[zs] = resample_yx(arr[zs].astype(np.uint8), spacing_from, spacing_to, order=0,
                             out_shape_yx=grid)
    unmeasured = np.isnan(np.asarray(volume.array)[zs])
    if unmeasured.any():
        gone = resample_yx(unmeasured.astype(np.uint8), spacing_from, spacing_to, order=0,
                           out_shape_yx=grid).astype(bool)
        target[zs] = np.where(gone, IGNORE_INDEX, target[zs])
    return target


def finetune_segmenter(
    volume: Any,
    model: RecurrentSegmenter,
    card: Mapping[str, Any],
    labels: Any,
    slices: Sequence[int],
    *,
    steps: int | None = None,
    seconds: float | None = None,
    class_names: Mapping[int, str] | None = None,
    lr: float = 1e-3,
    correction_weight: float = 4.0,
    keep_weight: float = 3.0,
    keep_balance: bool = False,
    trainable: str = "all",
    class_balance: bool = True,
    holdout: bool = True,
    dice_present_only: bool = True,
    version: int = 1,
    seq_len: int = 6,
    crop: int = 128,
    seed: int = 0,
    threads: int | None = None,
    model_labels: Any = None,
) -> Job[FinetuneResult]:
    """Fine-tune a copy of ``model`` on ``labels`` at ``slices`` (a generator).

    ``labels`` (z, y, x) integer label values on the volume's grid (a 2D array for a
    one-slice volume); values above the model's last class are new structures: the copy
    grows its output head (:meth:`RecurrentSegmenter.with_classes`), named from
    ``class_names`` (value → name) or ``structure_<value>``. Budget: ``steps`` and/or
    ``seconds`` (default :data:`DEFAULT_SECONDS`, or :data:`NEW_STRUCTURE_SECONDS` when
    the annotation holds a new structure). Yields Progress every step with the
    step's loss in ``partial``; returns a :class:`FinetuneResult`. ``version`` picks the
    held-out slice (rotating over the annotated slices no earlier round in the card's
    ``finetune_history`` trained on; none left: no held-out score) and goes into the card. ``model_labels`` (z, y, x): the
    labels ``model`` gives this volume (``segment_volume``'s, e.g. what a widget last
    predicted with it); it spares the round its first pass over the volume, which
    otherwise finds them (corrections and the held-out Dice before are measured
    against them).

    Loss: class-weighted cross-entropy with the corrected voxels weighted
    ``1 + correction_weight``, soft Dice (over the classes a crop's annotated voxels hold
    when ``dice_present_only``), and ``keep_weight`` × KL to the starting model on the
    unannotated voxels (class-balanced over the starting model's classes when
    ``keep_balance``; tried, not the default). ``trainable`` (:data:`TRAINABLE_PARTS`)
    limits the update to part of the network. The defaults were chosen on validation phantoms
    (``benchmarks/finetune_variants.py``).
    """
    classes = check_model_args(volume, model, card, RecurrentSegmenter, "fine-tuning")
    arr, zs = check_annotations(volume, labels, slices)
    if model_labels is not None and np.shape(model_labels) != tuple(volume.shape):
        raise MedsegInputError(f"model_labels have shape {np.shape(model_labels)}, the volume "
                               f"{tuple(volume.shape)}")
    _check_number(correction_weight, "correction_weight")
    _check_number(keep_weight, "keep_weight")
    _check_number(lr, "lr", positive=True)
    seed = _check_seed(seed)
    seq_len, crop = positive_int(seq_len, "seq_len"), positive_int(crop, "crop")
    check_choice(trainable, tuple(TRAINABLE_PARTS), "trainable")

    nz, ny, nx = volume.shape
    # (here, not in check_annotations: the widget checks a lazy image's labels before
    # any voxel of it is read)
    present = {int(v) for v in np.unique(measured_values(volume, arr, zs))}
    if present <= {0}:
        raise MedsegInputError(
            "the annotated slices hold only background (0) where the image has values; "
            "paint at least one structure there")
    n_classes = max(model.n_classes, max(present) + 1)
    revived = _revived(classes, present)
    new_structure = n_classes > model.n_classes or bool(revived)
    steps, seconds = _budget(steps, seconds, NEW_STRUCTURE_SECONDS if new_structure
                             else DEFAULT_SECONDS)
    names = _class_names(classes, n_classes, present, class_names)
    # the structures learnt anew; a slot below a new value stays an unused placeholder
    new_names = tuple(names[v] for v in sorted(revived)) + tuple(
        names[v] for v in range(len(classes), n_classes) if names[v] != f"unused_{v}")
    sy, sx = volume.spacing[1:]
    rng = np.random.default_rng([int(seed), int(version), 6])

    # seeded draws (dropout, a grown head's init) come from the job's own state, which
    # is swapped in only while its code runs (core.rng); not training.deterministic:
    # torch.use_deterministic_algorithms imports torch._dynamo (1.4 s holding the GIL:
    # the GUI froze for 2 s at the start of every first round)
    torch_rng = PrivateRNG(seed)
    round_start = time.perf_counter()
    with ThreadGovernor(threads) as governor:
        yield Progress(0, 1, "preparing the annotated slices")
        grid_slices = ModelGridSlices(volume, card)
        h, w = grid_slices.grid
        x_all = grid_slices[0:nz]  # (z, 1, h, w): exactly what inference feeds the model
        target = _annotation_targets(volume, arr, zs, card, (h, w))
        work = copy.deepcopy(model)
        if n_classes > model.n_classes:
            with torch_rng.active():
                work = work.with_classes(n_classes)
        work.eval()
        teacher = copy.deepcopy(work).eval() if keep_weight > 0 else None
        _freeze_except(work, trainable, grows=n_classes > model.n_classes)
        # what the model shows on the annotated slices: corrections = disagreements
        if model_labels is None:
            before = yield from _volume_logits(work, x_all, zs,
                                               "the model's prediction on the annotated slices")

            def shown_at(z: int) -> np.ndarray:
                return labels_from_logits(before[z][None], (ny, nx))[0].numpy()
        else:
            def shown_at(z: int) -> np.ndarray:
                return np.array(model_labels[z], dtype=np.int64)
        yield Progress(0, 1, "weighting the corrections")

        def unmeasured_at(z: int) -> np.ndarray:  # NaN voxels: no correction, no score
            return np.isnan(np.asarray(volume.array[z]))

        corrected = np.zeros((nz, h, w), dtype=bool)
        for z in zs:
            # compared where the user saw the prediction, on the input grid, then brought
            # to the model grid: comparing on the model grid with the resampled labels
            # called every structure edge a correction (310 "corrections" on a slice left
            # as the model labelled it, at 1.6 mm pixels)
            shown = shown_at(z)
            changed = ((shown != arr[z]) & ~unmeasured_at(z)).astype(np.uint8)[None]
            corrected[z] = resample_yx(changed, (sy, sx), card_spacing_yx(card), order=0,
                                       out_shape_yx=(h, w))[0].astype(bool)

        def weights_for(train_zs: list[int]) -> np.ndarray:
            """Voxel weights from the class counts of ``train_zs`` only: the held-out
            slice's labels must not shape the phase it is held out of."""
            counts = np.bincount(target[train_zs].ravel(), minlength=n_classes)[:n_classes]
            cw = class_weights(counts) if class_balance else torch.ones(n_classes)
            cw_np = cw.numpy().astype(np.float32)
            weight = np.zeros((nz, h, w), dtype=np.float32)
            t = target[train_zs].astype(np.int64)
            known = t != IGNORE_INDEX  # never-measured voxels of an annotated slice: 0
            part = np.zeros(t.shape, dtype=np.float32)
            part[known] = cw_np[t[known]] * (1.0 + correction_weight * corrected[train_zs][known])
            weight[train_zs] = part
            return weight

        # never a slice an earlier round of this model's lineage trained on: its score
        # there is no held-out score (round 2 held out a slice round 1 had learnt); nor
        # the only slice showing a new structure, which 75 % of the round would train
        # without while growing the head for it
        unknown = {v for v in present if v >= model.n_classes} | revived
        shown_on = {z: {int(v) for v in np.unique(measured_values(volume, arr, [z]))} & unknown
                    for z in zs} if unknown else {z: set() for z in zs}

        def sole_holder(z: int) -> bool:
            return bool(shown_on[z] - set().union(*(shown_on[o] for o in zs if o != z)))

        fresh = [z for z in zs if z not in trained_before(card) and not sole_holder(z)]
        held = (fresh[(int(version) - 1) % len(fresh)]
                if holdout and len(zs) >= MIN_SLICES_FOR_HOLDOUT and fresh else None)
        dice_before = dice_after = None
        if held is not None:
            pred = shown_at(held)
            # never measured: not scored either way (background in both; copying the
            # annotation into the prediction there counted strokes over a gap as agreement)
            gone = unmeasured_at(held)
            held_truth = np.where(gone, 0, arr[held])
            pred[gone] = 0
            dice_before = slice_dice(pred, held_truth)

        x_np = x_all[:, 0].contiguous().numpy()
        size = min(int(crop), max(h, w))
        L = min(int(seq_len), nz)

        def make_batch(train_zs: list[int]):
            weight = weights_for(train_zs)

            def batch(step: int):
                zc = int(rng.choice(train_zs))
                z0 = int(np.clip(zc - rng.integers(0, L), 0, nz - L))
                seq = np.arange(z0, z0 + L)
                center = None
                if rng.uniform() < 0.5 and corrected[zc].any():
                    ys, xs = np.nonzero(corrected[zc])
                    k = int(rng.integers(len(ys)))
                    center = (float(ys[k]), float(xs[k]))
                tgt = target[seq].copy()
                wts = weight[seq].copy()
                off = [z for z in range(z0, z0 + L) if z not in train_zs]
                if off:  # annotated but held out / not in this phase: ignore
                    tgt[np.asarray(off) - z0] = IGNORE_INDEX
                    wts[np.asarray(off) - z0] = 0.0
                img, tgt, wts = _crop_yx(rng, [x_np[seq], tgt, wts], size,
                                         [0.0, IGNORE_INDEX, 0.0], center=center)
                if rng.uniform() < 0.5:
                    img, tgt, wts = img[::-1], tgt[::-1], wts[::-1]
                # a copy, not ascontiguousarray: a reversed one-slice array keeps its
                # negative stride there (it counts as contiguous), which torch refuses
                x = torch.from_numpy(np.array(img[:, None], copy=True))
                tgt = torch.from_numpy(tgt.astype(np.int64))
                keep = None
                if keep_weight > 0:
                    with torch.inference_mode():
                        keep = teacher(x).log_softmax(1)
                return x, (tgt, torch.from_numpy(wts.copy()), keep)
            return batch

        def loss_fn(logits, t):
            tgt, wts, keep = t
            ce = F.cross_entropy(logits, tgt, ignore_index=IGNORE_INDEX, reduction="none")
            loss = (ce * wts).sum() / wts.sum().clamp_min(1e-6) + soft_dice_loss(
                logits, tgt, present_only=dice_present_only)
            if keep is not None:  # unannotated voxels: stay close to the starting model
                loss = loss + keep_weight * keep_loss(logits, keep, tgt == IGNORE_INDEX, keep_balance)
            return loss

        def budget(share: float, first: bool) -> tuple[int | None, float | None]:
            """The phase's share; the steps of the two phases add up to ``steps``."""
            if steps is None:
                s = None
            elif len(phases) == 1:
                s = int(steps)
            else:
                first_steps = max(1, int(int(steps) * HOLDOUT_PHASE))
                s = first_steps if first else int(steps) - first_steps
            t = None if train_seconds is None else train_seconds * share
            if not first and t is not None:  # the held-out slice's pass counts too
                t = max(MIN_TRAINING_SHARE * t, t - heldout_seconds)
            return s, t

        phases = [(zs, 1.0, lr)]
        if held is not None:
            phases = [([z for z in zs if z != held], HOLDOUT_PHASE, lr), (zs, 1 - HOLDOUT_PHASE, lr * 0.5)]
        curve: list[float] = []
        total_steps, heldout_seconds = 0, 0.0
        # the round's time counts its whole-volume passes (a few seconds on a long
        # series), but training keeps at least MIN_TRAINING_SHARE of ``seconds``
        train_seconds = None if seconds is None else max(
            MIN_TRAINING_SHARE * float(seconds),
            float(seconds) - (time.perf_counter() - round_start))
        for i, (train_zs, share, phase_lr) in enumerate(phases):
            s, t = budget(share, i == 0)
            if s == 0:  # a one-step budget: the held-out phase takes it
                continue
            stats = yield from torch_rng.run(_train_loop(
                work, make_batch(train_zs), loss_fn, s, t, phase_lr, "retrain",
                report_every=1, freeze_batchnorm=True, plain_optimizer=True,
                refresh=governor.update, refresh_every=1, warmup_steps=FINETUNE_WARMUP_STEPS))
            curve += stats["loss_curve"]
            total_steps += stats["steps"]
            if i == 0 and held is not None:
                t_held = time.perf_counter()
                after = (yield from _volume_logits(
                    work, x_all, [held], f"scoring the held-out slice {held}"))[held]
                heldout_seconds = time.perf_counter() - t_held
                pred = labels_from_logits(after[None], (ny, nx))[0].numpy()
                pred[gone] = 0
                dice_after = slice_dice(pred, held_truth)
                yield Progress(total_steps, total_steps,
                               f"held-out slice {held}: Dice {dice_before:.2f} → {dice_after:.2f}")
        work.eval()
        _freeze_except(work, "all", grows=False)  # the result trains fully in a next round
        elapsed = time.perf_counter() - round_start

    report = FinetuneReport(
        slices=tuple(zs), steps=total_steps, seconds=elapsed, loss_curve=tuple(curve),
        holdout_slice=held, holdout_dice_before=dice_before, holdout_dice_after=dice_after,
        new_classes=new_names, corrections=int(corrected.sum()),
    )
    return FinetuneResult(work, finetuned_card(card, work, names, report, version), report)


# ======================================================================================
# Detector: learn from added, moved and deleted points
# ======================================================================================


def check_points(volume: Any, points: Any, diameters: Any, slices: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Points (n, 3) in voxel (z, y, x) inside ``volume``, diameters (n,) in mm (NaN →
    :data:`DEFAULT_DIAMETER_MM`), reviewed slices sorted, unique and acquired."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        pts = np.zeros((0, 3))
    if pts.ndim == 2 and pts.shape[1] == 2 and volume.shape[0] == 1:
        pts = np.column_stack([np.zeros(len(pts)), pts])
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise MedsegInputError(f"points must be (n, 3) z, y, x coordinates, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise MedsegInputError("point coordinates must be finite")
    upper = np.asarray(volume.shape) - 0.5
    outside = np.any((pts < -0.5) | (pts > upper), axis=1)
    if outside.any():
        raise MedsegInputError(f"{counted(int(outside.sum()), 'point')} outside the image {tuple(volume.shape)}")
    d = np.full(len(pts), DEFAULT_DIAMETER_MM) if diameters is None else np.asarray(
        diameters, dtype=np.float64).reshape(-1)
    if len(d) != len(pts):
        raise MedsegInputError(f"{counted(len(pts), 'point')} but {counted(len(d), 'diameter')}")
    if np.any(np.isinf(d) | (d < 0)):
        raise MedsegInputError("lesion diameters must be positive millimetres (or unknown: NaN)")
    d = np.where(np.isfinite(d) & (d > 0), d, DEFAULT_DIAMETER_MM)
    zs = _check_slices(volume, slices,
                       "no reviewed slices: add, move or delete a point, or mark a slice reviewed, first")
    return pts, d, zs


def reviewed_targets(pts: np.ndarray, diam: np.ndarray, reviewed: np.ndarray,
                     native_yx: tuple[int, int], grid_yx: tuple[int, int],
                     spacing: tuple[float, float, float], heatmap: Mapping[str, Any]):
    """(lesions, heat, size, size_mask) on the model grid for a detector round.

    The user vouches for the points on the slices they reviewed: those make the target,
    as in training. A point on another slice (a detection nobody checked) teaches
    nothing, and where its heatmap reaches a reviewed slice those voxels are left out of
    the loss (−1) rather than called lesion or background. Unreviewed slices: −1."""
    nz = len(reviewed)
    (ny, nx), (h, w) = native_yx, grid_yx
    lesions, unreviewed = [], []
    for (z, y, x), d in zip(pts, diam):
        gy, gx = map_index([y, x], (ny, nx), (h, w))
        les = {"center": (float(z), float(gy), float(gx)),
               "radius_mm": float(d) / 2, "diameter_mm": float(d)}
        (lesions if reviewed[int(np.clip(round(z), 0, nz - 1))] else unreviewed).append(les)

    def targets_of(group: list[dict[str, Any]]) -> _DetectorTarget:
        t = _DetectorTarget(image=np.zeros((nz, h, w), np.float32), spacing=spacing,
                            lesions=group, labels=np.zeros((nz, 1, 1), np.uint8))
        detector_targets(t, sigma_fraction=heatmap["sigma_fraction"],
                         z_sigma_fraction=heatmap["z_sigma_fraction"])
        return t

    target = targets_of(lesions)
    heat = target.heat.astype(np.float32)
    size_mask = target.size_mask & reviewed[:, None, None]
    size = target.size.astype(np.float32)
    if unreviewed:
        shadow = targets_of(unreviewed)
        heat[(shadow.heat > 0.01) & (heat < 0.01)] = -1.0
        size_mask &= ~shadow.size_mask
    heat[~reviewed] = -1.0  # ignored by the heatmap loss
    return lesions, heat, size, size_mask


def finetune_detector(
    volume: Any,
    model: LesionDetector,
    card: Mapping[str, Any],
    points: Any,
    diameters_mm: Any,
    slices: Sequence[int],
    *,
    steps: int | None = None,
    seconds: float | None = None,
    lr: float = 1e-4,
    keep_weight: float = 1.0,
    rehearsal: int = REHEARSAL_PHANTOMS,
    version: int = 1,
    batch_size: int = 8,
    crop: int = 128,
    seed: int = 0,
    threads: int | None = None,
) -> Job[FinetuneResult]:
    """Fine-tune a copy of the lesion detector on the user's points (a generator).

    ``points`` (n, 3) voxel (z, y, x) on the volume's grid: the COMPLETE set of lesions
    on the reviewed ``slices`` (a slice with no point near it teaches "no lesion here",
    which is how deleted false positives are learned). The heatmap target is built from
    the points on reviewed slices exactly as in training (:func:`~.training.detector_targets`);
    a point on an unreviewed slice teaches nothing, and the reviewed voxels its heatmap
    would reach are left out of the loss. The target is scored
    with the heatmap loss the detector was trained with (:func:`detector_heatmap`);
    only the reviewed slices enter that loss (it ignores the others). A quarter
    of each batch (half without rehearsal) are unreviewed slices whose heatmap is held to
    the starting model's (``keep_weight``), so a round on a few slices with added lesions
    does not teach the detector to fire everywhere else.

    ``rehearsal`` training phantoms (0: none) with their exact lesions take another
    quarter of each batch (half when every slice is reviewed and there is nothing to hold
    to the starting model): a few points of one volume alone pull the detector away from
    what it had learnt, round after round. The learning rate (1e-4) and the rehearsal were
    chosen on validation volumes (``benchmarks/detector_finetune_rounds.py --seed-shift
    -50000``): over four rounds the detector kept 8–12 of the 24 lesions of four other
    volumes (13 before any round) and learnt the shown ones, where plain rounds at 1e-3
    lowered it to 1–4; 3e-4, chosen first on evaluation volumes by mistake, kept 7–10.
    """
    check_model_args(volume, model, card, LesionDetector, "fine-tuning")
    rehearsal = positive_int(rehearsal, "rehearsal") if rehearsal else 0  # 0 (or False): none
    _check_number(keep_weight, "keep_weight")
    _check_number(lr, "lr", positive=True)
    seed = _check_seed(seed)
    heatmap = detector_heatmap(card)
    pts, diam, zs = check_points(volume, points, diameters_mm, slices)
    steps, seconds = _budget(steps, seconds, DEFAULT_SECONDS)
    nz, ny, nx = volume.shape
    rng = np.random.default_rng([int(seed), int(version), 7])
    context = model.in_slices // 2
    torch_rng = PrivateRNG(seed)  # as in finetune_segmenter
    with ThreadGovernor(threads) as governor:
        yield Progress(0, 1, "preparing the reviewed slices")
        grid_slices = ModelGridSlices(volume, card, context)
        h, w = grid_slices.grid
        x_all = grid_slices[0:nz].contiguous().numpy()  # (z, 2·context + 1, h, w)
        sz = volume.spacing[0]
        sy, sx = (volume.spacing[1] * ny / h, volume.spacing[2] * nx / w)
        reviewed = np.zeros(nz, dtype=bool)
        reviewed[zs] = True
        lesions, heat, size, size_mask = reviewed_targets(
            pts, diam, reviewed, (ny, nx), (h, w), (sz, sy, sx), heatmap)
        work = copy.deepcopy(model).eval()
        teacher = copy.deepcopy(model).eval() if keep_weight > 0 else None
        others = np.flatnonzero(~reviewed & ~volume.missing)
        size_crop = min(int(crop), max(h, w))
        n_keep = batch_size // 2 if (teacher is not None and len(others)) else 0
        pool = (yield from rehearsal_pool(card, rehearsal)) if rehearsal else None
        n_rehearse = 0  # the training phantoms' samples come after the n_keep ones
        if pool is not None:
            n_rehearse = batch_size // 4 if n_keep else batch_size // 2
            n_keep = max(n_keep - n_rehearse, 0)

        def batch(step: int):
            xs, hs, ss, ms = [], [], [], []
            for i in range(batch_size):
                if n_keep <= i < n_keep + n_rehearse:
                    item = pool.items[int(rng.integers(len(pool.items)))]
                    sample = detector_sample(rng, item, context, size_crop, pool.normalisation)
                    for out, a, dtype in zip((xs, hs, ss, ms), sample,
                                             (np.float32, np.float32, np.float32, bool)):
                        out.append(a.astype(dtype, copy=False))
                    continue
                keep = i < n_keep  # an unreviewed slice: stay close to the starting model
                z = int(rng.choice(others if keep else zs))
                center = None
                near = [les["center"][1:] for les in lesions if abs(les["center"][0] - z) <= 2]
                if near and not keep and rng.uniform() < 0.7:
                    center = near[int(rng.integers(len(near)))]
                img, ht, sz_, mk = _crop_yx(rng, [x_all[z], heat[z], size[z], size_mask[z]],
                                            size_crop, [0.0, -1.0, 0.0, False], center=center)
                if rng.uniform() < 0.5:
                    img, ht, sz_, mk = (a[..., ::-1] for a in (img, ht, sz_, mk))
                xs.append(img)
                hs.append(ht)
                ss.append(sz_)
                ms.append(mk)
            x = torch.from_numpy(np.ascontiguousarray(np.stack(xs)))
            t = (torch.from_numpy(np.ascontiguousarray(np.stack(hs)[n_keep:, None])),
                 torch.from_numpy(np.ascontiguousarray(np.stack(ss)[n_keep:, None])),
                 torch.from_numpy(np.ascontiguousarray(np.stack(ms)[n_keep:, None])))
            soft = None
            if n_keep:
                with torch.no_grad():  # not inference_mode: the target joins autograd
                    soft = torch.sigmoid(teacher(x[:n_keep]).heatmap)
            return x, (t, soft)

        def loss_fn(out, target):
            t, soft = target
            learned = type(out)(*(o[n_keep:] for o in out))
            loss = detector_loss(learned, t, heatmap["loss"])
            if soft is not None:
                # per-pixel mean × 50: the scale training's plain-BCE detector loss uses
                loss = loss + keep_weight * 50.0 * F.binary_cross_entropy_with_logits(
                    out.heatmap[:n_keep], soft)
            return loss

        t0 = time.perf_counter()
        stats = yield from torch_rng.run(_train_loop(
            work, batch, loss_fn, steps, seconds, lr, "retrain detector", report_every=1,
            freeze_batchnorm=True, plain_optimizer=True, refresh=governor.update, refresh_every=1))
        work.eval()
        elapsed = time.perf_counter() - t0
    report = FinetuneReport(
        slices=tuple(zs), steps=stats["steps"], seconds=elapsed,
        loss_curve=tuple(stats["loss_curve"]), holdout_slice=None, holdout_dice_before=None,
        holdout_dice_after=None, new_classes=(),
        # the points on the reviewed slices: those on others teach nothing
        corrections=int(np.isin(np.clip(np.rint(pts[:, 0]), 0, volume.shape[0] - 1).astype(int),
                                zs).sum()) if len(pts) else 0,
    )
    return FinetuneResult(work, finetuned_card(card, work, list(card["classes"]), report, version),
                          report)


def detector_heatmap(card: Mapping[str, Any]) -> dict[str, Any]:
    """How a detector card's heatmap was trained: {"loss", "sigma_fraction",
    "z_sigma_fraction"} (the Gaussian's σ in-plane and along z, fractions of the radius).

    Fine-tuning builds its targets and loss the same way. Cards from before the choice
    have no "heatmap" entry: CenterNet focal loss, σ = radius / 2 on every axis."""
    heatmap = {"loss": "focal", "sigma_fraction": 0.5, "z_sigma_fraction": 0.5,
               **dict(card.get("heatmap") or {})}
    if heatmap["loss"] not in LOSSES["detector"]:
        raise MedsegInputError(f"the card's detector loss {heatmap['loss']!r} is not one of"
                               f" {', '.join(LOSSES['detector'])}")
    for key in ("sigma_fraction", "z_sigma_fraction"):
        check_sigma_fraction(heatmap[key], f"the card's heatmap {key}")
    return heatmap


_REHEARSAL_POOLS: dict[tuple, PhantomPool] = {}


def rehearsal_pool(card: Mapping[str, Any], n: int) -> Job[PhantomPool]:
    """``n`` training phantoms on a detector card's grid with its heatmap targets (a
    generator). Kept for the last recipe asked for (about half a second and 15 MB each),
    so later rounds start at once."""
    heatmap = detector_heatmap(card)
    spacing_yx = card_spacing_yx(card)[0]
    norm = dict(card["normalisation"])
    # the slice spacings the detector was trained on (cards without the key: 1–5 mm)
    z_range = check_z_range(card.get("training_z_range_mm", (1.0, 5.0)),
                            "the card's training_z_range_mm")
    key = (spacing_yx, tuple(sorted(norm.items())), heatmap["sigma_fraction"],
           heatmap["z_sigma_fraction"], z_range, int(n))
    pool = _REHEARSAL_POOLS.get(key)
    if pool is None:
        pool = PhantomPool(training_seeds(0), int(n), spacing_yx, REHEARSAL_MAX_SLICES, norm,
                           prepare=functools.partial(
                               detector_targets, sigma_fraction=heatmap["sigma_fraction"],
                               z_sigma_fraction=heatmap["z_sigma_fraction"]),
                           z_range_mm=z_range)
        for progress in pool.fill():
            yield Progress(progress.step, progress.total, f"rehearsal {progress.message}")
        _REHEARSAL_POOLS.clear()  # one recipe at a time: a pool per card would only grow
        _REHEARSAL_POOLS[key] = pool
    return pool


@dataclass
class _DetectorTarget:
    """The fields :func:`~.training.detector_targets` reads (a GridSample without the phantom)."""

    image: np.ndarray
    spacing: tuple[float, float, float]
    lesions: list[dict[str, Any]]
    labels: np.ndarray


#: base-card keys that describe the base model's weights, not the fine-tuned copy's
_NOT_INHERITED = ("sha256", "card_path", "weights_file", "n_parameters", "metrics",
                  "ablation", "arch_params", "architecture", "training", "threshold_tuning")


def finetuned_card(card: Mapping[str, Any], model: nn.Module, classes: Sequence[str],
                   report: FinetuneReport, version: int) -> dict[str, Any]:
    """The card of a fine-tuned copy: the base card's input contract, the new classes,
    where it came from and what the retrain measured (the base's held-out metrics do not
    describe it, so they are dropped)."""
    out = {k: v for k, v in card.items() if k not in _NOT_INHERITED}
    base_name = str(card.get("name", "model"))
    history = list(card.get("finetune_history", []))
    history.append({**report.as_dict(), "version": int(version),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    # the model this round started from (a chain's parent, not only its
                    # root in "finetuned_from"); sha256 None: an unsaved version
                    "from": {"name": base_name, "version": card.get("version"),
                             "sha256": card.get("sha256")}})
    out.update({
        "name": base_name,
        "architecture": type(model).__name__,
        "arch_params": dict(model.arch_params),
        "classes": list(classes),
        # rounds in its lineage, whatever a widget numbers its versions: a chain made
        # from the command line said "+ft1" at every link
        "version": f"{str(card.get('version', '1.0')).split('+')[0]}+ft{len(history)}",
        "finetuned_from": {"name": base_name, "version": card.get("version"),
                           "sha256": card.get("sha256")} if "finetuned_from" not in card
        else card["finetuned_from"],
        "finetune_history": history,
    })
    return out


# ======================================================================================
# Writing predictions back and keeping versions
# ======================================================================================
def unannotated_updates(current: np.ndarray, predicted: np.ndarray, protected: np.ndarray
                        ) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(indices, values) of the voxels where ``predicted`` differs from ``current``,
    leaving out every slice where ``protected`` (z,) is True (annotated or missing)."""
    current = np.asarray(current)
    predicted = np.asarray(predicted)
    if current.shape != predicted.shape:
        raise MedsegInputError(f"prediction {predicted.shape} and labels {current.shape} differ in shape")
    protected = np.asarray(protected, dtype=bool)
    if protected.shape != current.shape[:1]:
        raise MedsegInputError("need one protected flag per slice")
    # on napari's thread after every round: the 3-D np.nonzero alone held it 0.2-0.26 s on
    # a 300 x 512 x 512 scan; flat indices cost a quarter of that, and protected slices
    # are never compared
    changed = np.zeros(current.shape, dtype=bool)
    free = np.flatnonzero(~protected)
    for start, stop in _runs(free):
        np.not_equal(predicted[start:stop], current[start:stop], out=changed[start:stop])
    flat = np.flatnonzero(changed)
    idx = np.unravel_index(flat, current.shape)
    return idx, predicted.reshape(-1)[flat] if predicted.flags.c_contiguous else predicted[idx]


@dataclass(frozen=True)
class WritePlan:
    """:func:`unannotated_updates` computed ahead, off napari's thread, on the layer's
    array as it was then: ``protected`` (z,) the slices it left out, ``max_label`` the
    prediction's largest value (whether the layer's dtype holds it)."""

    protected: np.ndarray
    indices: tuple[np.ndarray, ...]
    values: np.ndarray
    max_label: int


def plan_updates(current: np.ndarray, predicted: np.ndarray, protected: np.ndarray) -> WritePlan:
    """A :class:`WritePlan` of ``predicted`` into ``current`` (a worker reads the layer's
    array while the user may paint: the slices changed meanwhile are compared again by
    :func:`planned_updates`)."""
    idx, values = unannotated_updates(current, predicted, protected)
    return WritePlan(np.array(protected, dtype=bool), idx, values,
                     int(np.asarray(predicted).max(initial=0)))


def planned_updates(current: np.ndarray, predicted: np.ndarray, protected: np.ndarray,
                    plan: WritePlan, touched: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """``unannotated_updates(current, predicted, protected)``, from ``plan`` made on an
    earlier state of ``current`` that differs from now only on the ``touched`` (z,) slices.

    Those slices, and the ones the plan left out that are not protected now, are compared
    anew; every other slice's updates come from the plan (on napari's thread the whole
    comparison held it about 50-90 ms on a 200 × 512 × 512 scan).
    """
    current = np.asarray(current)
    protected = np.asarray(protected, dtype=bool)
    touched = np.asarray(touched, dtype=bool)
    if plan.protected.shape != protected.shape or touched.shape != protected.shape:
        raise MedsegInputError("need one protected and one touched flag per slice")
    fresh = (touched | plan.protected) & ~protected
    stale = protected | fresh  # the plan's updates there are dropped
    keep = ~stale[plan.indices[0]]
    idx = tuple(axis[keep] for axis in plan.indices)
    values = plan.values[keep]
    if fresh.any():
        more_idx, more_values = unannotated_updates(current, predicted, ~fresh)
        idx = tuple(np.concatenate([a, b]) for a, b in zip(idx, more_idx))
        values = np.concatenate([values, more_values])
    return idx, values


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] → [(3, 6), (9, 10)]: sorted indices as half-open runs."""
    if not len(indices):
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate([indices[:1], indices[breaks + 1]])
    stops = np.concatenate([indices[breaks], indices[-1:]]) + 1
    return list(zip(starts.tolist(), stops.tolist()))


@dataclass
class ModelVersion:
    number: int
    state: dict[str, torch.Tensor]
    card: dict[str, Any]
    created: str
    report: FinetuneReport | None = None

    def describe(self) -> str:
        if self.report is None:
            return f"v{self.number} · {self.card.get('name', 'model')} {self.card.get('version', '')} (start)"
        r = self.report
        # the held-out Dice before the counts: the version picker cuts a long entry short
        held = "" if r.holdout_dice_after is None else (
            f" · Dice {r.holdout_dice_before:.2f}→{r.holdout_dice_after:.2f} on held-out "
            f"slice {r.holdout_slice}")
        return (f"v{self.number} · {self.created[11:16]}{held} · "
                f"{counted(len(r.slices), 'slice')} · {counted(r.steps, 'step')}")


@dataclass
class VersionHistory:
    """v0 (the starting model), v1, v2 …: weights copied to memory, a current index.

    Retraining starts from the current version; reverting only moves the index, so no
    version is ever lost until the history is discarded.
    """

    versions: list[ModelVersion] = field(default_factory=list)
    current: int = 0
    saved: set[int] = field(default_factory=set)  # versions written to a model folder

    @property
    def unsaved(self) -> list[int]:
        """The versions a round made that were never saved (v0 is a model on disk)."""
        return [v.number for v in self.versions[1:] if v.number not in self.saved]

    @classmethod
    def start(cls, model: nn.Module, card: Mapping[str, Any]) -> "VersionHistory":
        history = cls()
        history._append(model, dict(card), None)
        return history

    def _append(self, model: nn.Module, card: dict, report: FinetuneReport | None) -> ModelVersion:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # a deep copy: a caller changing a nested list of its card (classes, history)
        # must not change the version kept
        card = {**copy.deepcopy(dict(card)), "architecture": type(model).__name__,
                "arch_params": dict(model.arch_params)}
        v = ModelVersion(len(self.versions), state, card,
                         time.strftime("%Y-%m-%dT%H:%M:%S%z"), report)
        self.versions.append(v)
        self.current = v.number
        return v

    def add(self, result: FinetuneResult) -> ModelVersion:
        return self._append(result.model, result.card, result.report)

    @property
    def next_number(self) -> int:
        return len(self.versions)

    def revert(self, number: int) -> ModelVersion:
        if not 0 <= int(number) < len(self.versions):
            raise MedsegInputError(f"no version v{number} (have v0–v{len(self.versions) - 1})")
        self.current = int(number)
        return self.versions[self.current]

    def model(self, number: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """A fresh model (eval mode) and card of version ``number`` (default: current)."""
        number = self.current if number is None else int(number)
        if not 0 <= number < len(self.versions):  # -1 would be the last version
            raise MedsegInputError(f"no version v{number} (have v0–v{len(self.versions) - 1})")
        v = self.versions[number]
        model = build_for_weights(v.card)
        model.load_state_dict(v.state, strict=True)
        return model.eval(), copy.deepcopy(dict(v.card))

    def save(self, number: int, name: str, directory: Any = None) -> Any:
        """Write version ``number`` as ``name`` (safetensors + card) into ``directory``
        (default: the user models folder), crash-safe; returns the card path."""
        model, card = self.model(number)
        card.pop("card_path", None)
        folder = user_models_dir(create=True) if directory is None else directory
        path = save_model(model, folder, name, {**card, "name": name}, unique_weights=True)
        self.saved.add(int(number))
        return path
