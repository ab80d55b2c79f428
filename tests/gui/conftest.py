import numpy as np
import pytest
import torch

from napari_medseg.core.models import (
    LesionDetector,
    RecurrentSegmenter,
    SliceClassifier,
    SliceGenerator,
    save_model,
    user_models_dir,
)
from napari_medseg.core.phantom import LABEL_NAMES, SLICE_CLASSES

WINDOW = {"type": "window", "low": -200.0, "high": 300.0}


@pytest.fixture(autouse=True, scope="session")
def _manifests_parsed_once():
    """napari's viewer fixture drops the plugin registry before each test, and npe2
    parsed every plugin's YAML manifest again with pure-Python yaml: a quarter of a
    second of each viewer. The same text gives the same manifest, so it is parsed once."""
    import copy

    from npe2.manifest import _bases

    parse = _bases._load_yaml_no_duplicates
    parsed: dict[bytes, object] = {}

    def load(stream):
        text = stream.read()
        if text not in parsed:
            parsed[text] = parse(text)
        return copy.deepcopy(parsed[text])

    _bases._load_yaml_no_duplicates = load
    yield
    _bases._load_yaml_no_duplicates = parse


@pytest.fixture
def random_models(tmp_path, monkeypatch):
    """Small random-init models in a private user folder: {architecture: card path}.

    Widget tests check plumbing (layers, alignment, progress, cancel), not accuracy —
    held-out accuracy of the trained weights is `napari-medseg evaluate`'s job.
    """
    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    folder = user_models_dir(create=True)
    torch.manual_seed(0)
    common = {"input_spacing_mm": [2.5, 1.5, 1.5], "resample_axes": "yx", "normalisation": WINDOW}
    paths = {
        "RecurrentSegmenter": save_model(
            RecurrentSegmenter(n_classes=len(LABEL_NAMES), widths=(8, 16, 16)).eval(),
            folder, "test-segmenter",
            {**common, "classes": [LABEL_NAMES[i] for i in sorted(LABEL_NAMES)]},
        ),
        "SliceClassifier": save_model(
            SliceClassifier(n_classes=len(SLICE_CLASSES), filters=(8, 8, 8), hidden=16).eval(),
            folder, "test-classifier", {**common, "classes": list(SLICE_CLASSES)},
        ),
        "LesionDetector": save_model(
            LesionDetector(widths=(8, 16, 16)).eval(), folder, "test-detector",
            {**common, "classes": ["lesion"], "peak_threshold": 0.5, "min_distance_mm": 8.0,
             "context_slices": 1},
        ),
        # zero-initialised head: generates exactly linear interpolation
        "SliceGenerator": save_model(
            SliceGenerator(widths=(8, 16, 16)).zero_residual_().eval(), folder, "test-generator",
            {"classes": ["intensity"], "input_spacing_mm": [1.0, 1.0, 1.0],
             "normalisation": {"type": "percentile", "low_percentile": 0.5,
                               "high_percentile": 99.5}},
        ),
    }
    return {arch: str(path) for arch, path in paths.items()}


@pytest.fixture
def small_phantom():
    from napari_medseg.core.phantom import generate_phantom

    return generate_phantom((8, 96, 96), (2.5, 2.0, 2.0), seed=5, n_lesions=1)



@pytest.fixture
def lazy_image():
    """``make(viewer, phantom) -> (image layer, reads)``: the phantom as a dask image
    whose every chunk read appends whether the GUI (main) thread did it."""
    import threading

    import dask.array as da

    def make(viewer, phantom):
        reads: list[bool] = []

        def read(block):
            reads.append(threading.current_thread() is threading.main_thread())
            return block

        lazy = da.from_array(phantom.volume.array, chunks=(2, -1, -1)).map_blocks(read)
        return viewer.add_image(lazy, name="lazy", scale=phantom.volume.spacing), reads

    return make


def plugin_view(viewer):
    """The viewer as napari hands it to a plugin's dock widget: a PublicOnlyProxy (see
    Window.add_plugin_dock_widget). Widgets built on the plain viewer in tests missed
    what the proxy changes (a new wrapper object per attribute read)."""
    from napari.utils._proxies import PublicOnlyProxy

    return PublicOnlyProxy(viewer)


def run_widget(qtbot, widget, image=None, model=None, timeout=120_000):
    """Pick ``image`` and ``model`` (when given) on a model widget, press its Run button
    and wait for the job to end."""
    if image is not None:
        widget._image.value = image
    if model is not None:
        widget._model.value = model
    widget._run.clicked.emit()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=timeout)
