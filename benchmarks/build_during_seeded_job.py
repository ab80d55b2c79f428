"""How long building a model for saved weights waits while a seeded job runs.

    .venv/bin/python benchmarks/build_during_seeded_job.py [--shape 60 384 384] [--out FILE]

Retrain's Save (on napari's thread) builds the model of the version it writes with
``registry.build_for_weights``. An Uncertainty job runs MC dropout from its own seeded
state of torch's generator (``core.rng.PrivateRNG``), holding the RNG lock for each
step. The bundled segmenter's uncertainty runs in a thread here while the main thread
builds the same architecture every 50 ms; the JSON gives the build times during the job
next to one on its own (the same run). Built with a random initialisation under the lock,
a build waited for the step to end (max 651 ms, median 601 ms, 2026-12-05); built on
torch's meta device it draws nothing and waits for nothing.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[60, 384, 384])
    parser.add_argument("--out")
    args = parser.parse_args()

    from napari_medseg.core.explain import segmentation_uncertainty
    from napari_medseg.core.models.registry import BUNDLED_DIR, build_for_weights, load_model
    from napari_medseg.core.phantom import generate_phantom
    from napari_medseg.core.progress import run_to_completion

    phantom = generate_phantom(tuple(args.shape), (2.5, 0.9, 0.9), seed=3, n_lesions=1)
    model, card = load_model(BUNDLED_DIR / "segmenter.json")
    done = threading.Event()

    def job() -> None:
        run_to_completion(segmentation_uncertainty(phantom.volume, model, card))
        done.set()

    worker = threading.Thread(target=job)
    worker.start()
    time.sleep(1.0)
    waits = []
    while not done.is_set():
        start = time.perf_counter()
        build_for_weights(card)
        waits.append(time.perf_counter() - start)
        time.sleep(0.05)
    worker.join()
    start = time.perf_counter()
    build_for_weights(card)
    alone = time.perf_counter() - start
    emit({
        "benchmark": "build_during_seeded_job",
        "shape_zyx": args.shape,
        "builds_during_job": len(waits),
        "build_ms_alone": 1000 * alone,
        "build_ms_during_job_max": 1000 * max(waits) if waits else None,
        "build_ms_during_job_median": 1000 * float(np.median(waits)) if waits else None,
    }, args.out)


if __name__ == "__main__":
    main()
