"""Stochastic weight averaging from the bundled segmenter: does averaging weights help the lesion?

    .venv/bin/python benchmarks/segmenter_swa.py --out DIR [--steps 3000] [--lr-factor 0.25]
        [--average-from 500] [--every 50] [--seed 3]     # ~15 min on one thread

Continues ``napari-medseg train segmenter --init segmenter`` on new phantoms (``--seed``;
the bundled model used seed 0) at a constant learning rate (``--lr-factor`` × the
default 2e-3, instead of the warm-up and cosine decay), averages the weights every
``--every`` steps from step ``--average-from`` on, then recomputes the BatchNorm
statistics for the averaged weights over 300 training batches (the running statistics of
the last step belong to the last weights, not their average). Writes DIR/swa.safetensors
+ card; score it with ``segmenter_inference_variants.py --models segmenter DIR/swa.json``.

The averaging wraps the trainer's loop here, in the benchmark, so the product's training
code stays as the bundled weights were made.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import napari_medseg.core.training as tr
from napari_medseg.core.models.registry import save_model
from napari_medseg.core.progress import run_to_completion


AVERAGED: list[int] = []  # snapshots averaged, per run


def averaging_loop(average_from: int, every: int, bn_batches: int = 300):
    """A drop-in for ``training._train_loop`` that averages the weights it visits."""
    plain_loop = tr._train_loop

    def loop(model, batch_fn, loss_fn, *args, **kwargs):
        kwargs["report_every"] = every
        job = plain_loop(model, batch_fn, loss_fn, *args, **kwargs)
        mean, n = None, 0
        while True:
            try:
                report = next(job)
            except StopIteration as stop:
                stats = stop.value
                break
            if report.step >= average_from and report.step % every == 0:
                snap = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                        if v.dtype.is_floating_point and "running_" not in k}
                if mean is None:
                    mean = snap
                else:
                    for k in mean:
                        mean[k] += (snap[k] - mean[k]) / (n + 1)
                n += 1
            yield report
        if mean is None:
            raise SystemExit("no weights averaged: --average-from is past the last step")
        state = model.state_dict()
        for k, v in mean.items():
            state[k].copy_(v)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative mean over the batches below
        model.train()
        with torch.no_grad():
            for i in range(bn_batches):
                model(batch_fn(10**6 + i)[0])
        for m in norms:
            m.momentum = 0.1
        model.eval()
        AVERAGED.append(n)
        return stats

    return loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr-factor", type=float, default=0.25)
    ap.add_argument("--average-from", type=int, default=500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr._lr_factor = lambda progress, warmup=0.03: args.lr_factor
    tr._train_loop = averaging_loop(args.average_from, args.every)
    t0 = time.perf_counter()
    model, card = run_to_completion(tr.train_segmenter(seed=args.seed, steps=args.steps, init="segmenter"))
    card["training"]["swa"] = {"lr_factor": args.lr_factor, "average_from": args.average_from,
                               "every": args.every, "snapshots": AVERAGED[-1],
                               "trainer_command": card["training"]["command"]}
    # the trainer's command alone would not make these weights: this script's does
    card["training"]["command"] = ".venv/bin/python " + " ".join(sys.argv)
    save_model(model, args.out, "swa", card)
    print(f"{args.out}/swa.json: {AVERAGED[-1]} snapshots averaged, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
