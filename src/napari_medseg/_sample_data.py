"""npe2 sample data: a synthetic abdominal CT with its ground truth, aligned."""

from __future__ import annotations

from .core.phantom import LABEL_NAMES, Phantom, generate_phantom
from ._layers import labels_layer_data, points_layer_data, volume_layer_data, watch_added_lesions

SAMPLE_SHAPE = (48, 192, 192)
SAMPLE_SPACING = (2.5, 1.0, 1.0)


def phantom_layer_data(phantom: Phantom, prefix: str = "phantom") -> list[tuple]:
    volume = phantom.volume
    seed = volume.metadata.get("phantom_seed")
    name = f"{prefix} CT (seed {seed})"
    centers = [lesion.center_zyx for lesion in phantom.lesions]
    diameters = [2.0 * lesion.radius_mm for lesion in phantom.lesions]
    return [
        volume_layer_data(volume, name=name),
        # the kind first, in its first word: a narrow layer list cuts a name's middle,
        # where the seed was ("phantom CT (s… ground truth"), and "ground truth · …" and
        # "ground-truth lesions · …" both read "ground truth…"
        labels_layer_data(phantom.labels, volume, f"labels, ground truth · {name}", LABEL_NAMES),
        points_layer_data(
            centers,
            diameters,
            volume,
            f"lesions, ground truth · {name}",
            # cyan: detections are lime rings with yellow text, and on the same lesion
            # the two rings and texts could not be told apart
            colour="cyan",
            features={
                "organ": [lesion.organ for lesion in phantom.lesions],
                "contrast_hu": [lesion.contrast_hu for lesion in phantom.lesions],
            },
        ),
    ]


def synthetic_ct() -> list[tuple]:
    """Synthetic abdominal CT (with ground truth): image, organ labels and lesion points."""
    from .core.errors import MedsegInputError

    try:
        phantom = generate_phantom(SAMPLE_SHAPE, SAMPLE_SPACING, seed=0)
    except MedsegInputError as exc:  # e.g. too little memory left: said, not a traceback
        from napari.utils.notifications import show_error

        show_error(f"napari-medseg sample: {exc}")
        return []
    data = phantom_layer_data(phantom)
    _mark_added_lesions_once_opened(data)
    return data


def _mark_added_lesions_once_opened(layer_data: list[tuple]) -> None:
    """Give the lesion layer napari is about to add the "added" handling the Phantom
    widget gives its own (:func:`watch_added_lesions`): a point added after selecting a
    lesion took that lesion's diameter, organ and contrast. napari hands sample data no
    hook, so the viewer opening it (the current one) is watched until the layer comes."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no napari or no viewer (a script calling this): nothing to watch
        return
    names = [kwargs["name"] for _data, kwargs, kind in layer_data if kind == "points"]
    if viewer is None or not names:
        return
    inserted = viewer.layers.events.inserted

    def on_inserted(event) -> None:
        layer = event.value
        # napari appends " [1]" to a name already taken
        if type(layer).__name__ == "Points" and layer.name.split(" [")[0] in names:
            inserted.disconnect(on_inserted)
            watch_added_lesions(layer)

    inserted.connect(on_inserted)
