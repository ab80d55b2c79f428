"""Flip test-time augmentation and ensembles for the detector, measured on VALIDATION phantoms.

    .venv/bin/python benchmarks/detector_tta.py [--card DIR/detector.json] [--seeds 12]
        [--ensemble DIR1/detector.json ...]

The detector's centre heatmap and diameter map averaged over in-plane flips of its
input (each flipped back): none (the product), x, and x, y and both (4 passes). Peaks
are then extracted with the card's threshold-free sweep and NMS, as ``detect_lesions``
does. Printed and in the JSON: sensitivity for lesions ≥ 5 mm at 0.25 / 0.5 / 1 / 2 / 4
false positives per volume for each. About 2 min for 12 phantoms (the 4-pass arm runs
the network 4 times).

``--ensemble CARD …``: detectors trained with other seeds (same grid and input slices);
adds an arm per member alone and an "ensemble" arm, the mean heatmap and diameter of
``--card`` and all members (no flips).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import machine
from detector_multiscale import matched_peaks, report, sensitivity_table
from napari_medseg.core.inference import ModelGridSlices, prepare_model
from napari_medseg.core.models import load_model
from napari_medseg.core.training import VALIDATION_SEEDS, eval_settings, make_phantom

FLIPS = {"none": [()], "x": [(), (-1,)], "xy": [(), (-1,), (-2,), (-2, -1)]}


def maps(fast, slices, nz: int, flips) -> tuple[np.ndarray, np.ndarray]:
    """Mean heatmap and diameter over ``flips`` (tuples of dims), each flipped back."""
    heat, size = [], []
    with torch.inference_mode():
        for a in range(0, nz, 4):
            x = slices[a:min(nz, a + 4)]
            hs, ss = [], []
            for dims in flips:
                out = fast(x.flip(dims) if dims else x)
                h, d = torch.sigmoid(out.heatmap[:, 0]), torch.exp(out.log_diameter[:, 0])
                hs.append(h.flip(dims) if dims else h)
                ss.append(d.flip(dims) if dims else d)
            heat.append(torch.stack(hs).mean(0))
            size.append(torch.stack(ss).mean(0))
    return torch.cat(heat).numpy(), torch.cat(size).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="detector", help="a detector card (default: bundled)")
    ap.add_argument("--seeds", type=int, default=12, help="validation phantoms")
    ap.add_argument("--ensemble", nargs="*", default=[], help="more detector cards to average with --card")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    model, card = load_model(args.card)
    fast = prepare_model(model)
    members = []
    for path in args.ensemble:
        m, c = load_model(path)
        if c["input_spacing_mm"] != card["input_spacing_mm"] or m.in_slices != model.in_slices:
            raise SystemExit(f"{path}: another grid or input slices than {args.card}")
        members.append((path, prepare_model(m)))
    records = {w: [] for w in [*FLIPS, *(p for p, _ in members), *(["ensemble"] if members else [])]}
    for seed in range(VALIDATION_SEEDS[0], VALIDATION_SEEDS[0] + args.seeds):
        ph = make_phantom(seed, eval_settings(seed))
        vol = ph.volume
        slices = ModelGridSlices(vol, card, model.in_slices // 2)
        for way, flips in FLIPS.items():
            heat, size = maps(fast, slices, vol.shape[0], flips)
            records[way].append(matched_peaks(heat, size, ph, card))
            if way == "none" and members:
                heats, sizes = [heat], [size]
                for path, member in members:
                    h, d = maps(member, slices, vol.shape[0], FLIPS["none"])
                    records[path].append(matched_peaks(h, d, ph, card))
                    heats.append(h)
                    sizes.append(d)
                records["ensemble"].append(matched_peaks(np.mean(heats, 0), np.mean(sizes, 0), ph, card))
    report({"benchmark": "detector_tta", "card": args.card, "ensemble": args.ensemble,
            **sensitivity_table(records, args.seeds), "machine": machine()}, args.out)


if __name__ == "__main__":
    main()
