"""Taking the viewer to a place in a layer, whatever order the user gave the axes."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def camera(viewer: Any) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` since napari 0.9 (``viewer.camera``,
    deprecated there, before it)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def go_to_world(viewer: Any, layer: Any, world: Sequence[float],
                axes: Sequence[int] | None = None) -> None:
    """Show the point ``world`` (the layer's world coordinates, one per layer axis) of
    ``layer``: the sliders take the axes not shown, the camera the shown ones. The layer's
    axes are the viewer's last ones (a 4D layer may be open), and the user may have
    reordered them (e.g. a sagittal view). ``axes``: only these layer axes move (the
    others stay where they are)."""
    dims = viewer.dims
    offset = dims.ndim - layer.ndim
    moving = range(layer.ndim) if axes is None else axes
    ratio = to_viewer_units(viewer, layer)
    wanted = {offset + a: float(world[a]) * ratio[a] for a in moving}
    hidden = [a for a in dims.not_displayed if a in wanted]
    if hidden:
        sliders = _sliders_showing(viewer, layer, world, [a - offset for a in hidden], ratio)
        dims.set_point(hidden, list(sliders * ratio[[a - offset for a in hidden]]))
    shown = list(dims.displayed)
    if dims.ndisplay == 3 and any(a in wanted for a in shown):
        # no slider shows then, yet the widgets name (and Retrain marks) the slice at the
        # dims point: it stayed on the slice shown before the jump
        dims.set_point([a for a in shown if a in wanted], [wanted[a] for a in shown if a in wanted])
    if any(a in wanted for a in shown):
        cam = camera(viewer)
        now = list(cam.center)[-len(shown):]
        cam.center = tuple(wanted.get(a, now[i]) for i, a in enumerate(shown))


def _sliders_showing(viewer: Any, layer: Any, world: Sequence[float],
                     moving: Sequence[int], ratio: np.ndarray) -> np.ndarray:
    """World positions (the layer's units) for the sliders of the hidden layer axes
    ``moving`` at which napari draws the data slice holding ``world``. napari picks a
    layer's slice from the rows of its world-to-data transform for the hidden axes, with
    the shown axes left out: on a rotated layer (an oblique scan whose z mixes in y) the
    slider at the point's world z showed another slice (slice 7 showed 5 at 30°). For
    scale and translate alone this is the point's world position itself. ``ratio``:
    :func:`to_viewer_units` of the layer."""
    from .._layers import world_matrix

    ndim = layer.ndim
    offset = viewer.dims.ndim - ndim
    linear = np.linalg.inv(world_matrix(layer))[:ndim, :ndim]
    moving = list(moving)
    # the point's data coordinates on those axes, from the hidden axes' world positions
    # alone: the moving ones (unknown) and those that stay where their sliders are
    rhs = linear[moving] @ np.asarray(world, dtype=float)
    staying = [a for a in range(ndim)
               if offset + a in viewer.dims.not_displayed and a not in moving]
    if staying:
        kept = np.array([viewer.dims.point[offset + a] / ratio[a] for a in staying])
        rhs = rhs - linear[np.ix_(moving, staying)] @ kept
    try:
        return np.linalg.solve(linear[np.ix_(moving, moving)], rhs)
    except np.linalg.LinAlgError:  # no slider position shows it: the nearest in world
        return np.asarray(world, dtype=float)[moving]


def to_viewer_units(viewer: Any, layer: Any) -> np.ndarray:
    """Viewer world units per ``layer`` world unit, on each layer axis. napari draws
    layers whose units are all lengths in one unit (``dims.units``), converting: a layer
    in cm beside one in mm has its numbers multiplied by 10 on screen (a jump to its slice
    4, at 2.0 cm, went to 2 mm). With any other unit (pixels) it converts nothing."""
    from .._layers import length_mm

    ndim = layer.ndim
    # None when the layers' units disagree in kind (mm beside pixels): nothing converted
    viewer_units = list(getattr(viewer.dims, "units", None) or ())[-ndim:]
    layer_units = list(getattr(layer, "units", None) or ())
    if len(viewer_units) != ndim or len(layer_units) != ndim:
        return np.ones(ndim)
    v = [length_mm(u) for u in viewer_units]
    lay = [length_mm(u) for u in layer_units]
    if any(x is None for x in v + lay):
        return np.ones(ndim)
    return np.asarray(lay) / np.asarray(v)


def drawn_matrix(viewer: Any, layer: Any) -> np.ndarray:
    """``layer``'s data-to-world matrix in the viewer's units, i.e. where napari draws
    it: converted when napari converts (every unit a length), raw otherwise (a pixel-unit
    layer open: napari then draws every layer at its raw numbers)."""
    from .._layers import world_matrix

    matrix = world_matrix(layer)
    ndim = matrix.shape[0] - 1
    matrix[:ndim, :] *= to_viewer_units(viewer, layer)[:, None]
    return matrix


def slice_at(viewer: Any, layer: Any) -> float:
    """The data z of a 3D ``layer`` at the viewer's current point (from the z slider:
    napari slices by the world z alone, even for a sheared layer)."""
    world_z = viewer.dims.point[-3] / to_viewer_units(viewer, layer)[-3]
    return float(layer.world_to_data([world_z, 0, 0])[0])


def go_to_slice(viewer: Any, layer: Any, z: int) -> None:
    """Slice ``z`` of a 3D ``layer``: the z slider moves there, or, when the user put z on
    screen (axes reordered), the view centres on it."""
    if layer is None or layer not in viewer.layers or layer.ndim < 3:
        return
    go_to_world(viewer, layer, layer.data_to_world([int(z), 0, 0]), axes=[layer.ndim - 3])
    if not slice_axis_shown(viewer, layer) and viewer.dims.ndisplay == 2:
        shown = round(slice_at(viewer, layer))
        if shown != int(z):  # napari's slider does not reach it
            from napari.utils.notifications import show_warning

            # the slider may not reach the layer at all (it lies beside the other
            # layers along z): "showing slice -1" named a slice that does not exist
            at = (f"showing slice {shown}" if 0 <= shown < layer.data.shape[-3]
                  else "no slice of it is shown there")
            show_warning(f"slice {int(z)} of '{layer.name}' cannot be shown: napari's slider "
                         f"does not reach it {_why_unreachable(viewer, layer)} ({at})")


def _why_unreachable(viewer: Any, layer: Any) -> str:
    """Why the z slider cannot land on a slice of ``layer``: the layer is rotated or
    sheared, or the slider steps on a grid the open layers set (another layer's finer or
    shifted slices: a series half a slice off, or the last slice beyond the grid)."""
    from .._layers import world_matrix

    linear = world_matrix(layer)[:-1, :-1]
    if not np.allclose(linear, np.diag(np.diag(linear))):
        return "on this rotated or sheared layer"
    axis = viewer.dims.ndim - 3
    start, _stop, step = viewer.dims.range[axis]
    label = str(viewer.dims.axis_labels[axis])
    if label.lstrip("-").isdigit():  # napari's default label ("-3" or "0"): not a name
        label = "z"
    return (f"on this layer: it steps by {step:g} from {start:g} "
            f"({label}, set by all the open layers' slices)")


def slice_axis_shown(viewer: Any, layer: Any) -> bool:
    """Whether the layer's slice (z) axis runs across a 2D view rather than on a slider
    (axes reordered). A 3D view shows every axis: its slider position still names a slice."""
    # the layer's axes are the viewer's last ones: its z is the viewer's third from last
    return (layer.ndim >= 3 and viewer.dims.ndisplay == 2
            and viewer.dims.ndim - 3 in viewer.dims.displayed)
