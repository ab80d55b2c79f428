"""What a Retrain round on a long series spends outside training, and what starting it
from the version's last prediction saves.

    .venv/bin/python benchmarks/finetune_round_passes.py --repeats 3 > benchmarks/results/finetune_round_passes.json

A round passes over the whole volume to find what its model predicts on the annotated
slices (corrections, the held-out Dice before), passes again after its first phase for
the held-out slice, and the widget then re-predicts the volume. The widget now keeps the
whole-volume prediction of the version it last wrote and gives it to the next round
(``finetune_segmenter(model_labels=...)``), which skips the first pass. On a
``--slices`` × 256 × 256 phantom (a seed no training used) with five annotated slices
spread over it, rounds of ``--seconds`` run alternately without and with the kept
prediction: wall seconds of the round (its ``seconds`` budget counts the passes;
training keeps at least half of it), training steps, and the re-predict the widget runs
after it, each in the same run. About 2 min at the defaults.
"""

from __future__ import annotations

import argparse
import json
import time

from napari_medseg.core.finetune import finetune_segmenter
from napari_medseg.core.inference import segment_volume
from napari_medseg.core.models.registry import BUNDLED_DIR, load_model
from napari_medseg.core.phantom import generate_phantom
from napari_medseg.core.progress import run_to_completion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, card = load_model(BUNDLED_DIR / "segmenter.json")
    phantom = generate_phantom((args.slices, 256, 256), (2.5, 1.0, 1.0), seed=5)
    n = args.slices
    annotated = [int(round(n * f)) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
    t0 = time.perf_counter()
    shown = run_to_completion(segment_volume(phantom.volume, model, card)).labels
    repredict_s = time.perf_counter() - t0
    rows = []
    for repeat in range(args.repeats):
        for kept in (False, True):
            t0 = time.perf_counter()
            result = run_to_completion(finetune_segmenter(
                phantom.volume, model, card, phantom.labels, annotated, seconds=args.seconds,
                seed=repeat, model_labels=shown if kept else None))
            rows.append({"repeat": repeat, "kept_prediction": kept,
                         "round_seconds": round(time.perf_counter() - t0, 2),
                         "steps": result.report.steps,
                         "corrections": result.report.corrections,
                         "holdout_dice_before": round(result.report.holdout_dice_before, 4)})
    mean = {kept: [r for r in rows if r["kept_prediction"] is kept] for kept in (False, True)}
    summary = {str(kept).lower(): {
        "round_seconds": round(sum(r["round_seconds"] for r in rs) / len(rs), 2),
        "steps": round(sum(r["steps"] for r in rs) / len(rs), 1)} for kept, rs in mean.items()}
    print(json.dumps({"benchmark": "finetune_round_passes", "volume_zyx": [n, 256, 256],
                      "annotated_slices": annotated, "seconds_budget": args.seconds,
                      "repredict_seconds": round(repredict_s, 2), "rounds": rows,
                      "mean_by_kept_prediction": summary}))


if __name__ == "__main__":
    main()
