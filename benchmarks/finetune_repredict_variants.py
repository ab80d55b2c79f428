"""Re-predicting after a fine-tuning round, compared on VALIDATION phantoms.

    .venv/bin/python benchmarks/finetune_repredict_variants.py [STEPS] > benchmarks/results/finetune_repredict_variants.json

The protocol of ``finetune_variants.py`` (seeds 850001–850004, 3 or 5 corrected slices,
one round, here a fixed number of steps, default 170: deterministic), then the untouched
slices labelled three ways: the fine-tuned model v1 alone (what the widget does; also
through the engine's own path as a check), the average of v0's and v1's class
probabilities, and v1 averaged with itself on the left-right flipped volume (test-time
flip). Mean / organ Dice on the untouched slices, averaged over the volumes. About 8 min.
"""
import json
import sys

import numpy as np
import torch

from _common import machine
from bench_finetune import SHIFT, round_on, segment, spread, summary
from finetune_variants import SEEDS
from napari_medseg.core.models import load_model
from napari_medseg.core.phantom import generate_phantom
from napari_medseg.core.inference import ModelGridSlices, prepare_model, labels_from_logits

def probs(volume, model, card, flip=False):
    g = ModelGridSlices(volume, card)
    m = prepare_model(model)
    out = []
    with torch.inference_mode():
        x = g[0:len(g)]
        if flip:
            x = torch.flip(x, dims=[-1])
        for c in m.iter_chunks(x, 4):
            if c.logits is not None:
                p = torch.softmax(c.logits, 1)
                out.append(torch.flip(p, dims=[-1]) if flip else p)
    return torch.cat(out)

def labels_of(p, shape):
    return np.concatenate([labels_from_logits(torch.log(p[i:i+4] + 1e-8), shape).numpy() for i in range(0, len(p), 4)])

model, card = load_model("segmenter")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 170
rows = {3: [], 5: []}
for seed in SEEDS:
    p = generate_phantom(seed=seed, **SHIFT)
    before, _ = segment(p.volume, model, card)
    body = np.flatnonzero(p.labels.reshape(len(p.labels), -1).any(axis=1))
    p0 = probs(p.volume, model, card)
    shape = p.volume.shape[1:]
    for k in (3, 5):
        zs = spread(body, k)
        ann = before.copy(); ann[zs] = p.labels[zs]
        untouched = np.setdiff1d(np.arange(len(p.labels)), zs)
        res, after, _, _ = round_on(p.volume, model, card, ann, zs, None, steps=steps)
        p1 = probs(p.volume, res.model, res.card)
        p1f = probs(p.volume, res.model, res.card, flip=True)
        variants = {"v1": after, "v1_engine_check": labels_of(p1, shape),
                    "avg_v0_v1": labels_of((p0 + p1) / 2, shape),
                    "v1_flipTTA": labels_of((p1 + p1f) / 2, shape)}
        r = {name: summary(lab, p.labels, untouched, 9) for name, lab in variants.items()}
        r["before"] = summary(before, p.labels, untouched, 9)
        rows[k].append({n: (v["mean"], v["organs"], v["dice"]["lesion"]) for n, v in r.items()})
        print(seed, k, rows[k][-1], file=sys.stderr, flush=True)
out = {"benchmark": "finetune_repredict_variants", "seeds": list(SEEDS), "steps": steps,
       "per_volume_mean_organs_lesion": {str(k): v for k, v in rows.items()},
       "mean": {str(k): {n: {"mean": round(float(np.mean([r[n][0] for r in rows[k]])), 4),
                             "organs": round(float(np.mean([r[n][1] for r in rows[k]])), 4)}
                         for n in rows[k][0]} for k in rows},
       "machine": machine()}
print(json.dumps(out))
