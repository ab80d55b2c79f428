"""Unsupervised adaptation to the fine-tuning benchmark's domain shift (tried, not adopted).

    .venv/bin/python benchmarks/domain_adaptation.py [--out FILE]

Before any annotation, two ways to adapt the bundled segmenter to a domain-shifted volume
without labels, on ``finetune_variants.py``'s validation phantoms (seeds 850001–850004,
``bench_finetune.SHIFT``: organ contrast × 0.6, noise 45 HU, 5 mm slices):

- **window**: the phantom's contrast acts on organ enhancement around 40 HU, so narrow
  the input window around 40 HU by the factor (1.0 = the card's −200…300 HU);
- **AdaBN**: re-estimate every BatchNorm's running mean and variance on the volume's own
  slices (``adabn``), the usual test-time adaptation for a shift in intensities.

Dice per structure over all slices, averaged over the volumes ("mean": foreground
structures present, lesion included; "organs": without body and lesion). One minute.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from _common import emit, machine
from bench_finetune import SHIFT, segment, summary
from finetune_variants import SEEDS
from napari_medseg.core.inference import ModelGridSlices
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import generate_phantom

WINDOW_FACTORS = (1.0, 0.8, 0.6)


def adabn(model: torch.nn.Module, card: dict, volume, batch: int = 8) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the volume's (cumulative average)."""
    adapted = copy.deepcopy(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    x = ModelGridSlices(volume, card)[0:volume.shape[0]]
    with torch.no_grad():
        for a in range(0, len(x), batch):
            adapted(x[a:a + batch].contiguous())
    return adapted.eval()


def scores(model_for, card, phantoms) -> dict:
    """Dice of ``model_for(phantom)`` on each phantom."""
    rows = []
    for p in phantoms:
        labels, _ = segment(p.volume, model_for(p), card)
        s = summary(labels, p.labels, np.arange(len(p.labels)), 9)
        rows.append({"mean": s["mean"], "organs": s["organs"], "lesion": s["dice"]["lesion"]})
    return {"per_volume": rows,
            "mean": round(float(np.mean([r["mean"] for r in rows])), 4),
            "organs": round(float(np.mean([r["organs"] for r in rows])), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    model, card = load_model("segmenter")
    phantoms = [generate_phantom(seed=s, **SHIFT) for s in SEEDS]
    result = {"benchmark": "domain_adaptation", "seeds": list(SEEDS), "window": {}, "machine": machine()}
    for f in WINDOW_FACTORS:
        c = dict(card, normalisation={"type": "window", "low": 40 - 240 * f, "high": 40 + 260 * f})
        result["window"][f"{f:g}"] = r = scores(lambda p: model, c, phantoms)
        print("window", f, r["mean"], r["organs"], flush=True)
    result["adabn"] = r = scores(lambda p: adabn(model, card, p.volume), card, phantoms)
    print("adabn", r["mean"], r["organs"], flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
