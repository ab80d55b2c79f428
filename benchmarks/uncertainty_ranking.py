"""Do the "correct first" slices point at the segmenter's errors? Held-out phantoms.

    .venv/bin/python benchmarks/uncertainty_ranking.py [--seeds 12] [--samples 8] [--out JSON]

The Uncertainty widget (and Retrain's "Correct next") ranks slices by their mean
MC-dropout entropy over the voxels predicted as a structure. Per held-out phantom
(seeds 900000+) this measures, against each slice's number of wrongly labelled voxels
(the workload a correction removes):

- **spearman**: the rank correlation of the score with that number over the slices;
- **top5_captured**: the wrong voxels on the 5 slices ranked first, over those on the 5
  slices with the most (1 = the ranking an oracle with the ground truth would give);

for the shipped score and two alternatives: ``structures_but_body`` (the mean over the
organs and lesions only: a review suggested the body dilutes it) and ``slice_sum`` (the
entropy summed over the slice).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import spearmanr

from _common import emit, machine
from napari_medseg.core.explain import segmentation_uncertainty
from napari_medseg.core.models import load_model
from napari_medseg.core.progress import run_to_completion
from napari_medseg.core.training import EVAL_SEEDS, eval_settings, make_phantom

TOP = 5


def scores(result, body: int) -> dict[str, np.ndarray]:
    ent, lab = result.entropy, result.labels
    nz = len(result.per_slice)
    structures = [(lab[z] > 0) & (lab[z] != body) for z in range(nz)]
    return {
        "shipped_mean_over_structures": np.asarray(result.per_slice, dtype=float),
        "structures_but_body": np.array([ent[z][m].mean() if m.any() else np.nan
                                         for z, m in enumerate(structures)]),
        "slice_sum": ent.reshape(nz, -1).sum(axis=1).astype(float),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12, help="held-out phantoms")
    ap.add_argument("--samples", type=int, default=8, help="dropout samples (the widget's default)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    model, card = load_model("segmenter")
    classes = list(card["classes"])
    body = classes.index("body") if "body" in classes else -1
    per_volume, rows = [], {}
    for seed in range(EVAL_SEEDS[0], EVAL_SEEDS[0] + args.seeds):
        phantom = make_phantom(seed, eval_settings(seed))
        result = run_to_completion(segmentation_uncertainty(phantom.volume, model, card,
                                                            samples=args.samples))
        wrong = np.array([(result.labels[z] != phantom.labels[z]).sum()
                          for z in range(phantom.volume.shape[0])], dtype=float)
        best = np.sort(wrong)[::-1][:TOP].sum()
        entry = {"seed": seed, "slices": int(len(wrong))}
        for name, score in scores(result, body).items():
            ok = np.isfinite(score)
            first = np.argsort(-np.nan_to_num(score, nan=-1.0), kind="stable")[:TOP]
            entry[name] = {"spearman": float(spearmanr(score[ok], wrong[ok]).correlation),
                           "top5_captured": float(wrong[first].sum() / best) if best else None}
            rows.setdefault(name, []).append(entry[name])
        per_volume.append(entry)
        print(seed, {k: (round(v["spearman"], 3), v["top5_captured"] and round(v["top5_captured"], 3))
                     for k, v in entry.items() if isinstance(v, dict)}, flush=True)
    summary = {name: {"spearman_mean": float(np.nanmean([r["spearman"] for r in v])),
                      "top5_captured_mean": float(np.nanmean([r["top5_captured"] for r in v
                                                              if r["top5_captured"] is not None]))}
               for name, v in rows.items()}
    for name, v in summary.items():
        print(f"{name:32s} spearman {v['spearman_mean']:.3f}  top-5 captured "
              f"{v['top5_captured_mean']:.3f}", flush=True)
    emit({"benchmark": "uncertainty_ranking", "set": "evaluation", "samples": args.samples,
          "seeds": [EVAL_SEEDS[0], EVAL_SEEDS[0] + args.seeds - 1], "top": TOP,
          "summary": summary, "per_volume": per_volume, "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
