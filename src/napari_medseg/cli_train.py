"""``napari-medseg train`` and ``napari-medseg evaluate`` (registered by cli.build_parser).

``train MODEL --seed S --out DIR`` trains from scratch on phantoms, tunes the detector's
peak threshold on validation seeds, evaluates on held-out seeds, optionally runs the
class-imbalance ablation, and writes ``DIR/MODEL.safetensors`` + ``DIR/MODEL.json``.
``evaluate MODEL`` (a name or a card path) prints held-out metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .cli_infer import threads_arg
from .core.errors import MedsegInputError

#: the run without the imbalance fix, per model (the ablation's "without" arm)
NO_IMBALANCE_FIX = {
    "classifier": {"loss": "ce", "sampling": "uniform"},
    "segmenter": {"loss": "ce", "sampling": "uniform"},
    "detector": {"loss": "bce", "sampling": "uniform"},
}


#: per-model recipe options (train_MODEL keywords) the CLI passes through; a bundled
#: model's card command names the ones it used
RECIPES = {
    "classifier": ("convs_per_block", "pooling", "crop", "lesion_twins", "lesion_map_weight"),
    "detector": ("z_range_mm",),
}


def _seeds_text(metrics: dict) -> str:
    """The evaluation's seeds for a reader: its JSON's [lo, hi) range (what the command
    always evaluates: consecutive seeds) as "lo–(hi − 1)"; it printed "[900000, 900001]"
    for the one phantom 900000."""
    seeds, n = metrics.get("eval_seeds"), metrics.get("n_volumes")
    if isinstance(seeds, list) and len(seeds) == 2 and seeds[1] - seeds[0] == n:
        return str(seeds[0]) if n == 1 else f"{seeds[0]}–{seeds[1] - 1}"
    return str(seeds)


def _recipe(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The recipe options given on the command line (refused for a model they are not for)."""
    for owner, keys in RECIPES.items():
        if owner == name:
            continue
        foreign = [k for k in keys if getattr(args, k, None) is not None]
        if foreign:
            flags = ", ".join(_flag(k) for k in foreign)
            raise MedsegInputError(f"{flags}: {owner} options; not available for {name}")
    return {k: getattr(args, k) for k in RECIPES.get(name, ())
            if getattr(args, k, None) is not None}


def _flag(key: str, value: Any = None) -> str:
    """``--key-name`` or ``--key-name VALUE`` (a list as space-separated values)."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return flag
    values = value if isinstance(value, (list, tuple)) else [value]
    return " ".join([flag, *(str(v) for v in values)])


def _progress_printer(quiet: bool):
    last = [0.0]

    def show(p) -> None:
        now = time.perf_counter()
        if quiet or now - last[0] < 5.0:
            return
        last[0] = now
        print(f"[{p.step}/{p.total}] {p.message}", file=sys.stderr, flush=True)

    return show


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        if n == 0:  # torch's own setting, as the parser's help says (and cli_infer does)
            return
        if n < 1:
            raise MedsegInputError(f"--threads must be at least 1, got {n}")
        # not capped at this machine's CPUs: a card's recorded count must rerun as it was
        # (float sums depend on it), but 100000 threads crashed the process
        if n > MAX_THREADS:
            raise MedsegInputError(f"--threads must be at most {MAX_THREADS}, got {n}")
        torch.set_num_threads(n)


#: more torch threads than any machine this runs on has cores
MAX_THREADS = 256
#: 25× the default pool of 40 phantoms (each held in memory while training)
MAX_POOL_SIZE = 1000
#: a VGG-style block of 8 convs is already deeper than any recipe here
MAX_CONVS_PER_BLOCK = 8
#: detector ensemble members, each trained in full
MAX_MEMBERS = 16


def _eval_progress(quiet: bool):
    def show(i: int, n: int, msg: str) -> None:
        if not quiet:
            print(f"[eval {i}/{n}] {msg}", file=sys.stderr, flush=True)

    return show


def _headline(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    keys = {
        "classifier": ("balanced_accuracy", "recall"),
        "segmenter": ("min_dice_foreground", "dice"),
        "detector": ("sensitivity_ge_5mm_at_1fp", "fp_per_volume_at_that_threshold",
                     "at_card_threshold"),
        "generator": ("min_psnr_gain_db", "factors"),
    }[name]
    return {k: metrics.get(k) for k in keys}


def _train_once(name: str, seed: int, steps, seconds, quiet: bool, **kw):
    from .core.progress import run_to_completion
    from .core.training import train

    return run_to_completion(train(name, seed, steps, seconds, **kw), _progress_printer(quiet))


# seed_list's limit: each seed range holds 100 000 phantoms
MAX_PHANTOMS = 100_000


def _check_before_training(args: argparse.Namespace) -> None:
    """What would only fail at the end: minutes of training must not end in "File exists"."""
    for flag in ("eval_seeds", "ablation_steps", "ablation_eval_seeds", "validation_seeds"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            raise MedsegInputError(f"--{flag.replace('_', '-')} must be ≥ 0, got {value}")
    from .core.training import MODEL_NAMES, check_options, training_seeds

    if args.model in MODEL_NAMES:  # an unknown loss or sampling, said before any training
        check_options(args.model, args.loss, args.sampling)
    training_seeds(args.seed)  # refuses a seed out of range (it failed deep in torch)
    members = getattr(args, "members", None) or 1
    if members > 1:  # member k trains with seed + k: the last one failed after the first
        training_seeds(args.seed + members - 1)
    # phantom counts that seed_list would refuse only after the training
    counts = [("eval_seeds", args.eval_seeds, args.eval_seeds != 0)]
    if args.model == "detector":
        counts.append(("validation_seeds", args.validation_seeds, True))
    elif args.model == "generator" and args.validation_seeds:
        # it calibrates on max(1, n // 2) phantoms: 0 is fine, too many failed after training
        half = max(1, args.validation_seeds // 2)
        if half > MAX_PHANTOMS:
            raise MedsegInputError(f"--validation-seeds must be at most {2 * MAX_PHANTOMS + 1}"
                                   f" for the generator, got {args.validation_seeds}")
    if args.ablation_steps:
        counts.append(("ablation_eval_seeds", args.ablation_eval_seeds, True))
    for flag, value, used in counts:
        if used and not 1 <= value <= MAX_PHANTOMS:
            raise MedsegInputError(
                f"--{flag.replace('_', '-')} must be 1..{MAX_PHANTOMS}, got {value}")
    for flag, value, most in (("pool_size", getattr(args, "pool_size", None), MAX_POOL_SIZE),
                              ("convs_per_block", getattr(args, "convs_per_block", None),
                               MAX_CONVS_PER_BLOCK),
                              ("members", getattr(args, "members", None), MAX_MEMBERS)):
        # a typo of many digits built phantoms or layers until memory ran out
        if value is not None and value > most:
            raise MedsegInputError(f"--{flag.replace('_', '-')} must be at most {most}, got {value}")
    from .core.training import _budget

    _budget(getattr(args, "steps", None), getattr(args, "seconds", None), 1)  # said now, not
    # after the phantom pool is built
    if not str(args.out).strip():  # an unset $OUT: not the current folder in silence
        raise MedsegInputError("--out is empty; give a folder to write into")
    init = getattr(args, "init", None)
    if init is not None and not str(init).strip():  # an unset $PREV
        raise MedsegInputError("--init is empty (an unset shell variable?); give a segmenter "
                               "card or name")
    out = Path(args.out).expanduser()
    card = _init_card(init) if init is not None else None
    if card is not None and same_path(card, out / f"{args.model}.json"):
        # replaced by this run, the card's recorded command would start from the new model
        raise MedsegInputError("--init is the model this run would replace in --out; copy it "
                               "elsewhere first or pass another --out", out)
    if out.exists() and not out.is_dir():
        raise MedsegInputError("--out must be a folder; a file of that name exists", out)
    from .core.models.registry import BUNDLED_DIR, user_models_dir

    if (BUNDLED_DIR / f"{args.model}.json").exists() and same_path(out, user_models_dir()):
        # found first by name, it would stand in for the bundled model in every command
        # that names it (`evaluate segmenter`, `--model`, `--init`), as finetune refuses
        raise MedsegInputError(f"'{args.model}' is a bundled model's name; in the user models "
                               "folder this model would replace it everywhere: pass another "
                               "--out (and load it by its path)", out)
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) \
            or not can_write_into(parent):
        raise MedsegInputError("--out cannot be created or written here", out)
    folders = [f"{args.model}{ext}" for ext in (".json", ".safetensors")
               if (out / f"{args.model}{ext}").is_dir()]
    if folders:  # --overwrite cannot replace a folder: said now, not after the training
        raise MedsegInputError(f"{' and '.join(folders)} in --out is a folder; remove it or "
                               "pass another --out", out)
    existing = [f"{args.model}{ext}" for ext in (".json", ".safetensors")
                if (out / f"{args.model}{ext}").exists()]
    if existing and not args.overwrite:  # a model (maybe the --init one) silently replaced
        raise MedsegInputError(f"{' and '.join(existing)} exist in --out; pass --overwrite "
                               "to replace them, or another --out", out)
    _refuse_write_protected(out, existing)


def can_write_into(folder: Path) -> bool:
    """Whether a file can be made in ``folder``, tried (a nameless one, gone at once):
    ``os.access`` says yes to root everywhere but on a read-only mount (under /proc too),
    and a run then trained its whole budget before the save failed."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def same_path(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file or folder, links followed (either may not exist)."""
    return os.path.realpath(Path(a).expanduser()) == os.path.realpath(Path(b).expanduser())


def _init_card(init: str) -> Path | None:
    """The card ``--init`` names (a path, or a name looked up as the run will look it up,
    the user folder first); None if there is none (said later)."""
    from .core.models.registry import resolve_card

    try:
        return resolve_card(str(init))
    except MedsegInputError:
        return None


def _refuse_write_protected(out: Path, names: list[str]) -> None:
    """A write-protected model file is refused at the save: said now, not after the
    minutes of training."""
    from .core.io._common import refuse_write_protected

    for name in names:
        refuse_write_protected(out / name, "--overwrite cannot replace it")


def cmd_train(args: argparse.Namespace) -> int:
    from .core.evaluation import evaluate, tune_detector
    from .core.models.registry import save_model
    from .core.training import MODEL_NAMES

    name = args.model
    if name not in MODEL_NAMES:
        raise MedsegInputError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if args.ablation_steps and name not in NO_IMBALANCE_FIX:
        raise MedsegInputError(f"--ablation-steps compares class-imbalance fixes; {name} has none")
    _check_before_training(args)
    _set_threads(args.threads)
    kw = {}
    if args.loss:
        kw["loss"] = args.loss
    if args.sampling:
        kw["sampling"] = args.sampling
    if args.init is not None:
        if name != "segmenter":
            raise MedsegInputError(f"--init continues a segmenter run; not available for {name}")
        kw["init"] = args.init
    if args.members != 1:
        if name != "detector":
            raise MedsegInputError(f"--members makes a detector ensemble; not available for {name}")
        kw["members"] = args.members
    if args.pool_size is not None:
        if args.pool_size < 1:
            raise MedsegInputError(f"--pool-size must be at least 1, got {args.pool_size}")
        kw["pool_size"] = args.pool_size
    recipe = _recipe(name, args)
    kw.update(recipe)
    t0 = time.perf_counter()
    model, card = _train_once(name, args.seed, args.steps, args.seconds, args.quiet, **kw)
    # the exact command that reproduces this file
    training = card["training"]
    training["command"] += "".join(" " + _flag(k, v) for k, v in recipe.items())
    training["command"] += f" --out {shlex.quote(str(args.out))}"
    if args.eval_seeds != 12:
        training["command"] += f" --eval-seeds {args.eval_seeds}"
    if args.validation_seeds != 10 and name in ("detector", "generator"):
        # the detector's threshold and the generator's residual scale are fitted on them
        training["command"] += f" --validation-seeds {args.validation_seeds}"
    if args.pool_size is not None:
        training["command"] += f" --pool-size {args.pool_size}"
    # float sums depend on the thread count: the command names the one used, given or not
    training["command"] += f" --threads {args.threads or training.get('threads', 1)}"
    if args.ablation_steps:
        training["command"] += (f" --ablation-steps {args.ablation_steps}"
                                f" --ablation-eval-seeds {args.ablation_eval_seeds}")
    if name == "detector":
        tuned = tune_detector(model, card, args.validation_seeds,
                              on_progress=_eval_progress(args.quiet))
        card["peak_threshold"] = tuned["peak_threshold"]
        card["min_distance_mm"] = tuned["min_distance_mm"]
        card["threshold_tuning"] = tuned["validation"]
    if name == "generator":
        from .core.generation import calibrate_generator

        tuned = calibrate_generator(model, card, max(1, args.validation_seeds // 2),
                                    on_progress=_eval_progress(args.quiet))
        card["residual_scale"] = tuned["residual_scale"]
        card["calibration"] = tuned
    if args.eval_seeds:
        t1 = time.perf_counter()
        card["metrics"] = evaluate(model, card, args.eval_seeds, _eval_progress(args.quiet))
        card["metrics"]["eval_seconds"] = round(time.perf_counter() - t1, 1)
    if args.ablation_steps:
        card["ablation"] = _ablation(name, args, card)
    card["training"]["wall_seconds_total"] = round(time.perf_counter() - t0, 1)
    # the folder checked before training: "--out=~/x" reaches us with its "~" unexpanded
    path = save_model(model, Path(args.out).expanduser(), name, card)
    print(f"wrote {path} and {path.with_suffix('.safetensors').name}"
          f" ({training['steps']} steps, {training['seconds']} s training)")
    if "metrics" in card:
        print(json.dumps(_headline(name, card["metrics"])))
    return 0


def _ablation(name: str, args: argparse.Namespace, card: dict[str, Any]) -> dict[str, Any]:
    """Same seed and short budget, with and without the imbalance fix, held-out metrics."""
    from .core.evaluation import evaluate, tune_detector
    from .core.training import DEFAULTS

    arms = {
        "with_fix": {"loss": args.loss or DEFAULTS[name]["loss"],
                     "sampling": args.sampling or DEFAULTS[name]["sampling"]},
        "without_fix": NO_IMBALANCE_FIX[name],
    }
    out: dict[str, Any] = {"steps": args.ablation_steps, "eval_volumes": args.ablation_eval_seeds}
    # both arms train the main run's recipe and phantom pool; only the fix differs (the
    # arms built the default 40-phantom pool whatever --pool-size said)
    recipe = _recipe(name, args)
    if args.pool_size is not None:
        recipe["pool_size"] = out["pool_size"] = args.pool_size
    for arm, opts in arms.items():
        model, arm_card = _train_once(name, args.seed, args.ablation_steps, None, args.quiet,
                                      **opts, **recipe)
        if name == "detector":
            tuned = tune_detector(model, arm_card, max(4, args.validation_seeds // 2))
            arm_card.update(peak_threshold=tuned["peak_threshold"],
                            min_distance_mm=tuned["min_distance_mm"])
        metrics = evaluate(model, arm_card, args.ablation_eval_seeds, _eval_progress(args.quiet))
        out[arm] = {**opts, "seconds": arm_card["training"]["seconds"],
                    **_headline(name, metrics)}
        if name == "segmenter":
            out[arm]["dice_lesion"] = metrics["dice"].get("lesion")
        if name == "classifier":
            out[arm]["recall_lesion"] = metrics["recall"].get("lesion")
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .core.evaluation import evaluate
    from .core.models.registry import load_model

    _set_threads(args.threads)
    if args.seeds is not None and args.seeds < 1:
        raise MedsegInputError(f"--seeds must be at least 1, got {args.seeds}")
    model, card = load_model(args.model)
    t0 = time.perf_counter()
    metrics = evaluate(model, card, args.seeds, None if args.json else _eval_progress(False))
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["card"] = card.get("card_path")
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"model:   {card.get('name')} ({card.get('architecture')}) from {card.get('card_path')}")
    print(f"held-out phantoms: {metrics['n_volumes']} (seeds {_seeds_text(metrics)})")
    for key, value in metrics.items():
        if key in ("model", "card", "eval_seeds", "n_volumes", "distribution", "path"):
            continue
        print(f"{key}: {json.dumps(value)}")
    return 0


def register(sub: Any) -> None:
    """Add ``train`` and ``evaluate`` to the napari-medseg subparsers."""
    p = sub.add_parser("train", help="train a model from scratch on synthetic phantoms")
    p.add_argument("model", help="classifier, segmenter, detector or generator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for MODEL.safetensors + MODEL.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace MODEL.json and MODEL.safetensors if --out holds them")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimiser steps (reproducible; default per model)")
    budget.add_argument("--seconds", type=float, help="wall-clock budget instead of steps")
    p.add_argument("--loss", help="classifier: ce|weighted_ce|focal; segmenter: "
                   "ce|dice_ce|focal|weighted_ce; detector: soft_focal|focal|bce; generator: mse|l1")
    p.add_argument("--sampling", choices=("balanced", "uniform"))
    p.add_argument("--eval-seeds", type=int, default=12,
                   help="held-out phantoms to evaluate on after training (0: skip)")
    p.add_argument("--validation-seeds", type=int, default=10,
                   help="validation phantoms for the detector's threshold (the generator"
                        " uses half as many for its residual scale)")
    p.add_argument("--ablation-steps", type=int, default=0,
                   help="also train with and without the imbalance fix for this many steps")
    p.add_argument("--ablation-eval-seeds", type=int, default=6)
    p.add_argument("--pool-size", type=int, default=None,
                   help="phantoms held in memory while training (default per model)")
    p.add_argument("--init", default=None,
                   help="segmenter: start from this model (bundled name or card path) "
                        "instead of random weights")
    p.add_argument("--members", type=int, default=1,
                   help="detector: train this many networks (seeds SEED, SEED+1, ...) and "
                        "average them (the ablation trains one)")
    p.add_argument("--threads", type=threads_arg, default=None, help="torch threads")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    recipe = p.add_argument_group("classifier recipe (docs/models.md)")
    recipe.add_argument("--convs-per-block", type=int, help="conv layers before each pooling (1)")
    recipe.add_argument("--pooling", choices=("avg", "max"), help="adaptive pooling before the FC layers (avg)")
    recipe.add_argument("--crop", type=int, help="training crop in pixels (144)")
    recipe.add_argument("--lesion-twins", type=float,
                        help="share of normal samples that are lesion slices with the lesion taken out (0)")
    recipe.add_argument("--lesion-map-weight", type=float,
                        help="weight of the lesion-map head trained on the lesion mask (0: no head)")
    recipe = p.add_argument_group("detector recipe (docs/models.md)")
    recipe.add_argument("--z-range-mm", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="slice spacing range of the training phantoms in mm (1 5)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="held-out metrics of a model on unseen phantoms")
    p.add_argument("model", help="a model name (classifier, segmenter, detector, generator)"
                                 " or a card path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seeds", type=int, default=None, help="number of held-out phantoms (default 12)")
    p.add_argument("--threads", type=threads_arg, default=None, help="torch threads")
    p.set_defaults(func=cmd_evaluate)
