"""How long does an autosave hold napari's own thread while the user paints?

    xvfb-run -a .venv/bin/python benchmarks/bench_autosave.py [--slices 300] [--dtype int32] [--out FILE]

Opens an image and a Labels layer of ``--slices`` × 512 × 512 in a real viewer (under
Xvfb), docks the Retrain widget on them, and five times paints a 60 × 60 stroke on a
slice and autosaves (as the widget's 1.5 s timer does while the user paints). For each
save it records the seconds ``autosave_now`` takes on the GUI thread (the copy of the
layer and the slice lists) and the longest event-loop stall (a 5 ms QTimer) while the
background thread compresses and writes it. Same-run reference: a plain ``np.copy`` of
the layer's array, timed just before. Prints one JSON object; goal: every stall ≤ 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--dtype", default="int32", choices=["uint8", "int32"])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    os.environ["NAPARI_MEDSEG_HOME"] = tempfile.mkdtemp(prefix="medseg-bench-autosave-")

    import numpy as np
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_medseg._widgets.retrain import RetrainWidget

    shape = (args.slices, 512, 512)
    viewer = napari.Viewer(show=False)
    image = viewer.add_image(
        np.random.default_rng(0).normal(0, 100, shape).astype(np.float32), name="ct")
    labels = viewer.add_labels(np.zeros(shape, args.dtype), name="annotations")
    widget = RetrainWidget(viewer)
    widget._image.value, widget._labels_pick.value = image, labels
    app = QApplication.instance()
    saves = []
    for z in (10, 11, 50, 51, 52):
        t = time.perf_counter()
        np.copy(labels.data)
        plain_copy = time.perf_counter() - t
        ys, xs = np.mgrid[200:260, 200:260]
        labels.selected_label = 2
        labels.data_setitem((np.full(ys.size, z), ys.ravel(), xs.ravel()), 2)
        widget._autosave_timer.stop()  # saved now, not by the timer
        t = time.perf_counter()
        widget.autosave_now()
        gui = time.perf_counter() - t
        ticks, last = [], [time.perf_counter()]

        def tick() -> None:
            now = time.perf_counter()
            ticks.append(now - last[0])
            last[0] = now

        timer = QTimer()
        timer.timeout.connect(tick)
        timer.start(5)
        started = time.perf_counter()
        while widget._writing_snapshots:
            app.processEvents()
            time.sleep(0.001)
        write = time.perf_counter() - started
        timer.stop()
        saves.append({"gui_thread_s": round(gui, 4), "plain_copy_s": round(plain_copy, 4),
                      "gui_over_plain_copy": round(gui / plain_copy, 2),
                      "longest_stall_while_writing_s": round(max(ticks, default=0.0), 4),
                      "write_s": round(write, 3)})
    worst = max(max(s["gui_thread_s"], s["longest_stall_while_writing_s"]) for s in saves)
    result = {"benchmark": "autosave", "shape": list(shape), "dtype": args.dtype,
              "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "saves": saves, "longest_gui_stall_s": round(worst, 4),
              "goal_stall_at_most_0.1_s": worst <= 0.1}
    viewer.close()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
