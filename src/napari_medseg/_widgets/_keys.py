"""Keyboard shortcuts of the Retrain widgets, bound on the viewer.

A radiologist corrects slice after slice with one hand on the keyboard: paint (P), step
(the arrows), mark the slice reviewed, go to the next listed slice, retrain. None of those
last three had a key. They go to the Retrain widget whose annotation layer is the active
layer (or the only Retrain widget open), and are chosen off napari's own bindings: K is
free in the viewer, Labels and Points; Shift+arrows are free beside the plain arrows
(which step slices); Ctrl+Shift+R is free (Ctrl+R resets the view).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from napari.utils.notifications import show_info

#: key → (what it does, for the help text, the widget method it calls)
SHORTCUTS: dict[str, tuple[str, str]] = {
    "K": ("mark the current slice correct / reviewed", "_mark_current"),
    "Shift-Right": ("go to the next listed slice", "_go_to_next_listed"),
    "Shift-Left": ("go to the previous listed slice", "_go_to_previous_listed"),
    "Control-Shift-R": ("retrain (and re-predict)", "_retrain_by_key"),
}

#: the open Retrain widgets, and the viewers whose keys are bound
_WIDGETS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_BOUND: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(widget: Any, viewer: Any) -> None:
    """Let ``widget`` answer the shortcuts on ``viewer`` (the real viewer, not a proxy);
    the keys are bound once per viewer."""
    _WIDGETS.add(widget)
    if viewer in _BOUND:
        return
    for key, (_what, method) in SHORTCUTS.items():
        if _taken(viewer, key):  # bound by the user or another plugin: theirs stays
            continue
        viewer.bind_key(key, _handler(method))
    _BOUND.add(viewer)


def _taken(viewer: Any, key: str) -> bool:
    """Whether ``key`` is bound on the viewer or on its class: ``bind_key(overwrite=
    False)`` looks at the viewer's own table only, and a binding made the usual way
    (``napari.Viewer.bind_key``) was shadowed."""
    try:
        from napari.utils.key_bindings import coerce_keybinding

        combo = coerce_keybinding(key)
    except Exception:  # an older napari: compare by name
        combo = key
    tables = (getattr(viewer, "keymap", {}), getattr(type(viewer), "class_keymap", {}))
    return any(combo in table or key in table for table in tables)


def _handler(method: str) -> Callable[[Any], None]:
    def handle(viewer: Any) -> None:
        widget = _widget_for(viewer)
        if widget is None:
            open_ = any(w.answers_keys_of(viewer) for w in list(_WIDGETS))
            show_info("napari-medseg: pick the annotation layer of a Retrain widget (select "
                      "it in the layer list) to use its shortcuts" if open_ else
                      "napari-medseg: no Retrain widget is open for this key")
            return
        getattr(widget, method)()

    handle.__name__ = method.strip("_")
    return handle


def _widget_for(viewer: Any) -> Any:
    """The open Retrain widget on ``viewer`` whose picked annotation layer is the active
    layer; the only one open when no picked layer is active; else None."""
    widgets = [w for w in list(_WIDGETS) if w.answers_keys_of(viewer)]
    active = viewer.layers.selection.active
    picked = [w for w in widgets if active is not None and w._layer_pick.value is active]
    if len(picked) == 1:
        return picked[0]
    return widgets[0] if len(widgets) == 1 else None


def help_text() -> str:
    """The shortcuts, for a tooltip."""
    return "Keys: " + "; ".join(f"{key.replace('-', '+').replace('Control', 'Ctrl')} "
                                f"{what}" for key, (what, _m) in SHORTCUTS.items())
