"""Shared shape of the model dock widgets: pick an image and a model, run, cancel.

Subclasses say which architecture they run (``architecture``), which core job runs it
(``core_job``) and how its result becomes layers (``show_result``). Everything else —
layer and model pickers, copying the input, the worker, progress, cancel, errors, a
removed input layer — lives here once.
"""

from __future__ import annotations

import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, Label, ProgressBar, PushButton
from napari.utils.notifications import show_warning
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtWidgets import QSizePolicy

from .. import _jobs
from .._layers import read_deferred, volume_from_layer, world_matrix_mm
from ..core.errors import MedsegInputError
from ..core.inference import input_warnings
from ..core.models.registry import BUNDLED_DIR, list_models, load_model
from ..core.text import counted, slice_ranges  # noqa: F401 (slice_ranges: the widgets' name for it)


#: the least time between two redraws of a job's progress in a widget: each redraw of a
#: dock widget re-composites napari's canvas (costly under software OpenGL)
REDRAW_S = 0.25


def model_choices(architecture: str, keep: Any = None) -> list[tuple[str, str]]:
    """(display name, card path) for every bundled and user model of ``architecture``.

    ``keep``: the card path a picker shows now. Gone or unreadable since it was picked, it
    stays listed as unavailable (Run then says why), rather than the picker moving on its
    own to another model that the next run would use unannounced."""
    choices, skipped = [], []
    for card in list_models(skipped=skipped):
        if card.get("architecture") != architecture:
            continue
        where = "bundled" if Path(card["card_path"]).parent == BUNDLED_DIR else "user"
        version = card.get("version", "?")
        choices.append((f"{card['name']} v{version} ({where})", card["card_path"]))
    # the bundled model first, so a new picker starts on it, as the CLI does without
    # --model: a model saved from a (maybe poor) round became every later session's
    # default in silence, and the GUI and the CLI gave the same scan different answers
    choices.sort(key=lambda choice: not choice[0].endswith("(bundled)"))
    # two cards of one name and version (a copied file): magicgui lists one label once
    taken = [label for label, _ in choices]
    choices = [(f"{label} – {Path(path).name}" if taken.count(label) > 1 else label, path)
               for label, path in choices]
    # a damaged card of this kind (or of no kind one can read) stays in the list: it
    # vanished in silence, and picked, Run says what is wrong with it
    for path, _why, named in skipped:
        if named in (None, architecture) and path != keep:
            choices.append((f"{Path(path).name} (unreadable)", path))
    if isinstance(keep, str) and keep and keep not in {path for _, path in choices}:
        choices.append((f"{Path(keep).name} (unavailable)", keep))
    return choices


def provenance(card: dict, image_name: str) -> dict[str, Any]:
    """What every output layer records about how it was made."""
    return {
        "model": card.get("name"),
        "model_version": card.get("version"),
        "model_sha256": card.get("sha256"),
        "input_layer": image_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


#: result layer -> the image layer (weakly) a model widget made it on: by identity, as a
#: name changes with a rename and passes to another layer
_MADE_ON: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: the image layers whose results are being added now (napari's "inserted" event for a
#: result comes before the widget adding it can record it)
_ADDING_ON: list = []


#: image layer -> the token its results' metadata name it by, and back: napari's copies
#: of a result (Duplicate Layer, Convert to …) are new objects that keep the metadata, and
#: a copy of scan A's segmentation was taken as made on nothing known (and picked for
#: scan B, trained on and written into)
_IMAGE_TOKENS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TOKEN_IMAGES: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_TOKEN_KEY = "made_on_layer"


def made_on(layer: Any) -> Any:
    """The image layer a model widget made ``layer`` (or the layer napari copied it from)
    on: Segment's labels, Detect's points; or None: not a result, or its image is gone."""
    ref = _MADE_ON.get(layer)
    if ref is not None:
        return ref()
    if _ADDING_ON:
        return _ADDING_ON[-1]
    medseg = (getattr(layer, "metadata", None) or {}).get("medseg")
    token = medseg.get(_TOKEN_KEY) if isinstance(medseg, dict) else None
    return _TOKEN_IMAGES.get(token) if isinstance(token, str) else None


def _mark_made_on(result: Any, image: Any) -> None:
    """Record that a model widget made ``result`` on ``image`` (for copies too)."""
    _MADE_ON[result] = weakref.ref(image)
    token = _IMAGE_TOKENS.get(image)
    if token is None:
        token = _IMAGE_TOKENS[image] = uuid.uuid4().hex
        _TOKEN_IMAGES[token] = image
    medseg = result.metadata.get("medseg")
    if isinstance(medseg, dict):
        medseg[_TOKEN_KEY] = token


#: results the user changed since a model widget added them: painted, erased, filled,
#: points added, moved, deleted or resized (a re-run hid a result corrected by hand)
_EDITED_RESULTS: "weakref.WeakSet" = weakref.WeakSet()


def _mark_edited(event) -> None:
    source = getattr(event, "source", None)
    if source is not None:
        _EDITED_RESULTS.add(source)


def _watch_edits(layer) -> None:
    """Note in :data:`_EDITED_RESULTS` when ``layer`` is edited (by its events: a Labels
    stroke, new data, any Points data change or resize; not set_data, which scrolling
    emits)."""
    for name in ("paint", "data", "size"):
        emitter = getattr(layer.events, name, None)
        if emitter is not None:
            emitter.connect(_mark_edited)


#: every open Model picker: a model saved from one widget is listed in all of them at
#: once (napari re-reads a picker's choices only when the layer list changes)
_MODEL_PICKERS: "weakref.WeakSet[ComboBox]" = weakref.WeakSet()


def layer_choices(layers) -> list[tuple[str, Any]]:
    """(label, layer) for a picker, each label once: magicgui finds an entry by its label,
    and a layer renamed to a picked one's name (napari makes it "CT [1]" only after
    telling the pickers "CT") was merged into the picked entry, which then held it."""
    layers = list(layers)
    taken = {str(layer.name) for layer in layers}  # a layer may be called "CT (2)" itself
    used: set[str] = set()
    out = []
    for layer in layers:
        name = str(layer.name)
        label, n = name, 1
        while label in used or (label != name and label in taken):
            n += 1
            label = f"{name} ({n})"
        used.add(label)
        out.append((label, layer))
    return out


class KeepingComboBox(ComboBox):
    """A ComboBox that keeps its value (the same object) over a re-listing. magicgui
    keeps an entry by its label: a label that changed selected the first entry, and the
    widget ran with it unannounced (a picked layer renamed: the picker jumped to the
    first layer and Segment ran on another scan; a model listed beside a copy of the
    same name, or found unavailable, picked another model). ``changed`` is emitted only
    when the value did change (its layer removed).

    Its width does not follow its longest entry: one Generate result's name
    ("synthetic ×2 · … (linear interpolation) [1]") widened a dock to 468 px and the
    canvas lost a third of its width; the entries are elided in the box (the list that
    drops down shows them whole)."""

    #: characters the closed box is sized for
    MIN_CHARS = 22

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        box = self.native
        box.setSizeAdjustPolicy(
            type(box).SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        box.setMinimumContentsLength(self.MIN_CHARS)
        # the list that drops down as wide as its longest entry
        box.view().setMinimumWidth(box.view().sizeHintForColumn(0))
        self.changed.connect(lambda _v: self._fit_list())

    def _fit_list(self) -> None:
        view = self.native.view()
        view.setMinimumWidth(view.sizeHintForColumn(0) + 24)

    def reset_choices(self, *_: Any) -> None:
        keep = self.value
        with self.changed.blocked():
            super().reset_choices()
            if keep is not None and keep in self.choices and self.value != keep:
                self.value = keep
        self._fit_list()
        if self.value != keep:
            self.changed.emit(self.value)


def model_picker(architecture: str) -> ComboBox:
    """A "Model" picker listing the bundled and user models of ``architecture``."""
    picker = KeepingComboBox(label="Model", choices=lambda w=None: model_choices(
        architecture, keep=None if w is None else w.value))
    _MODEL_PICKERS.add(picker)
    return picker


def refresh_model_pickers() -> None:
    """List a newly saved model in every open Model picker (a picker keeps its value)."""
    for picker in list(_MODEL_PICKERS):
        if not widget_closed(picker):
            picker.reset_choices()


def plain_viewer(viewer):
    """The viewer itself where napari hands a plugin's widget a ``PublicOnlyProxy`` of it
    (every widget whose ``__init__`` takes a ``napari.viewer.Viewer``). Through the proxy
    each attribute read makes a new wrapper object: the layer a widget added was never
    ``is`` the layer napari's events carry (a deleted detections layer left Detect's
    slider and list live), weak references to wrappers died at once, and every read
    inspected the caller's frame. The widgets use public API only; they need the real
    objects to follow them."""
    return getattr(viewer, "__wrapped__", viewer)


class LayerNameFollower:
    """Calls ``callback`` (a widget's method) when any layer, present or added later, is
    renamed: a rename fires nothing on the layer list, and pickers would keep showing the
    old name. The widget keeps this object; napari holds both methods weakly (a closure
    connected to the layer list kept every widget, closed or not, for the viewer's life).
    """

    def __init__(self, viewer, callback: Callable[..., Any]):
        self._viewer = viewer
        self._callback = weakref.WeakMethod(callback)

    def _on_inserted(self, event) -> None:
        callback = self._callback()
        if callback is not None:
            event.value.events.name.connect(callback)

    def connect(self, connect: bool = True) -> None:
        """Follow the names (again); ``connect=False``: no longer."""
        callback = self._callback()
        if callback is None:
            return
        inserted = self._viewer.layers.events.inserted
        (inserted.connect if connect else inserted.disconnect)(self._on_inserted)
        for layer in self._viewer.layers:
            (layer.events.name.connect if connect else layer.events.name.disconnect)(callback)


#: a layer's events after which a result made from it may no longer fit it
GEOMETRY_EVENTS = ("data", "scale", "translate", "rotate", "shear", "affine", "units")


def rewatch_geometry(old_layer, new_layer, callback) -> None:
    """Move ``callback`` from ``old_layer``'s :data:`GEOMETRY_EVENTS` to ``new_layer``'s
    (either may be None)."""
    connect_layer_events(old_layer, GEOMETRY_EVENTS, callback, False)
    connect_layer_events(new_layer, GEOMETRY_EVENTS, callback)


def connect_layer_events(layer, names, callback, connect: bool = True) -> None:
    """(Dis)connect ``callback`` to those of the events ``names`` that ``layer`` has (an
    older napari has no ``units``, a Labels layer no ``contrast_limits``); None: nothing."""
    for name in names if layer is not None else ():
        emitter = getattr(layer.events, name, None)
        if emitter is not None:
            (emitter.connect if connect else emitter.disconnect)(callback)


def _geometry(layer) -> tuple:
    """What a result computed from ``layer`` depends on: its data object, shape and
    placement in the world, in mm (a result made from other data must not land on it;
    nor one made before the layer's units changed from mm to cm, ten times its size).
    The data are referred to weakly: a widget keeping this must not keep a deleted
    layer's volume in memory."""
    return (_weak(layer.data), tuple(layer.data.shape), world_matrix_mm(layer))


def _weak(obj) -> Callable[[], Any]:
    """A weak reference to ``obj``, or a strong one where it takes no weak references."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _same_geometry(a: tuple, b: tuple) -> bool:
    data = a[0]()
    same_data = data is not None and data is b[0]() and a[1] == b[1]
    return same_data and all(x.shape == y.shape and np.allclose(x, y) for x, y in zip(a[2:], b[2:]))


def progress_bar() -> ProgressBar:
    """A hidden progress bar that keeps its place in the layout: showing it at a click
    then re-lays out nothing (a dock that grew re-laid out the window and redrew the
    canvas inside the click, 25-30 ms under Xvfb's software OpenGL)."""
    bar = ProgressBar(value=0, min=0, max=100, visible=False)
    policy = bar.native.sizePolicy()
    policy.setRetainSizeWhenHidden(True)
    bar.native.setSizePolicy(policy)
    return bar


def set_status(label, text: str) -> None:
    """``label.value = text`` unless the viewer holding it was closed meanwhile."""
    if not widget_closed(label):
        label.value = text


class DockWatch(QObject):
    """Tells a dock widget when it is closed.

    napari's close button on a dock (``remove_dock_widget``) only takes the widget out of
    it: the widget lives on, its job ran to the end and added its layers, and a Retrain
    widget kept tracking and autosaving beside the new instance napari opens next time.
    ``on_removed`` runs then; ``on_docked`` if it is docked again. ``on_window_close``
    runs when the window it is docked in starts closing (its close button, Ctrl+W, Ctrl+Q),
    while the widget's Qt objects still exist: they are deleted before the application's
    ``aboutToQuit``, and the layers are not removed on the way."""

    _native = None  # set before the filter is installed; Qt may call it while tearing down
    _window = None
    docked = False

    def __init__(self, widget: Container, on_removed: Callable[[], None],
                 on_docked: Callable[[], None] | None = None,
                 on_window_close: Callable[[], None] | None = None):
        super().__init__(widget.native)
        self._native = widget.native
        self._on_removed, self._on_docked = on_removed, on_docked
        self._on_window_close = on_window_close
        self._was_removed = False
        widget.native.installEventFilter(self)

    def watch_window(self) -> None:
        """Follow the window the widget sits in now (when it is docked, its dock may not
        be in the main window yet: call this again when it matters)."""
        window = self._native.window()
        known = self._window() if self._window is not None else None
        if self._on_window_close is None or window is self._native or window is known:
            return
        if known is not None:
            known.removeEventFilter(self)
        # weakly: a reference kept the closed viewer's window (and viewer) alive
        self._window = weakref.ref(window)
        window.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        if (self._window is not None and obj is self._window()
                and event.type() == QEvent.Type.Close):
            if self.docked:
                self._on_window_close()
            return False
        if obj is self._native and event.type() == QEvent.Type.ParentChange:
            if self._native.parent() is None:
                if self.docked:
                    self.docked, self._was_removed = False, True
                    self._on_removed()
            elif not self.docked:
                self.docked = True
                self.watch_window()
                if self._was_removed and self._on_docked is not None:
                    self._was_removed = False
                    self._on_docked()
        return False


def widget_closed(widget) -> bool:
    """Whether the viewer holding ``widget`` (a magicgui widget) was closed: its Qt object
    is deleted, and a late result or progress report has nowhere to go."""
    try:
        widget.native.objectName()
    except RuntimeError:
        return True
    return False


class _OnLayout(QObject):
    """Calls ``callback`` when ``widget`` is shown or its layout is redone."""

    def __init__(self, widget, callback: Callable[[], None]):
        super().__init__(widget)
        self._callback = callback
        widget.installEventFilter(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() in (QEvent.Type.Show, QEvent.Type.LayoutRequest):
            try:
                self._callback()
            except RuntimeError:  # torn down
                pass
        return False


def name_controls(container) -> None:
    """Give each control its label as its accessible name (a screen reader read "combo
    box" without "Image")."""
    for widget in getattr(container, "_list", ()):
        if hasattr(widget, "_list"):  # a row of buttons, a nested container
            name_controls(widget)
            continue
        name = str(getattr(widget, "label", "") or getattr(widget, "text", "") or "").strip()
        native = getattr(widget, "native", None)
        if name and native is not None and not native.accessibleName():
            native.setAccessibleName(name)


def hand_keys_to_napari(root) -> None:
    """napari's shortcuts (P to paint, Ctrl+Z, the arrows that step slices) reach a dock's
    control that has keyboard focus first, and a click left focus there: a click on the
    Labels picker then L switched Retrain's layer by type-ahead, and after Mark current
    slice the Right arrow walked the buttons instead of the slices. Pickers, buttons,
    sliders and lists take focus from Tab only (the keyboard still reaches them); a number
    or text typed into a box hands focus back to the viewer once entered."""
    from qtpy.QtWidgets import (QAbstractButton, QAbstractSlider, QAbstractSpinBox,
                                QComboBox, QLineEdit, QListWidget, QScrollArea, QWidget)

    def back(box) -> None:
        if box.hasFocus() or (box.focusWidget() is not None and box.focusWidget().hasFocus()):
            window = box.window()
            central = getattr(window, "centralWidget", lambda: None)()
            if central is not None:
                central.setFocus()

    for child in [root, *root.findChildren(QWidget)]:
        if isinstance(child, (QComboBox, QAbstractButton, QAbstractSlider, QListWidget)):
            child.setFocusPolicy(Qt.FocusPolicy.TabFocus)
        elif isinstance(child, QScrollArea):  # a click on a dock's blank space took the arrows
            child.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        elif isinstance(child, QAbstractSpinBox) or (
                isinstance(child, QLineEdit)
                and not isinstance(child.parent(), (QAbstractSpinBox, QComboBox))):
            child.editingFinished.connect(lambda box=child: back(box))


class ScrollableDock:
    """For a Container made with ``scrollable=True``: napari docks ``native``, which for
    a scrollable Container is the widget inside the scroll area, and the dock could not
    shrink below its controls. Docked in one column, a dock that cannot shrink takes its
    height from the others (with five docks Retrain kept 94 px, its pickers alone; with
    all ten the window grew past the screen)."""

    @property
    def native(self):
        """The scroll area around the controls."""
        return self._widget._mgui_get_root_native_widget()

    @staticmethod
    def fit_width(widget, sideways: bool = False, pack: bool = True) -> None:
        """As wide as the controls beside the vertical scroll bar, refitted when shown
        and laid out again (napari's style sheet widens the controls only once shown;
        magicgui sized the area as its rows were added, and the right 11 px were cut).
        ``sideways``: a sideways scroll bar for what grows later (else up and down only);
        ``pack``: the rows packed at the top (a dock taller than them spread them apart).
        Once docked, it takes the height its controls want (:meth:`claim_height`)."""
        def fit() -> None:
            area = widget.native
            need = (area.widget().minimumSizeHint().width()
                    + area.verticalScrollBar().sizeHint().width() + 2 * area.frameWidth())
            if area.minimumWidth() < need:
                area.setMinimumWidth(need)
            if not widget.__dict__.get("_height_claimed"):
                widget._height_claimed = ScrollableDock.claim_height(widget)

        if widget.__dict__.get("_fit_width") is not None:  # once: a second stretch else
            return
        area = widget.native
        area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded if sideways
                                          else Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        layout = area.widget().layout()
        if pack and hasattr(layout, "addStretch"):
            layout.addStretch(1)
        widget._fit_width = _OnLayout(area.widget(), fit)
        fit()
        hand_keys_to_napari(area)
        name_controls(widget)


    @staticmethod
    def claim_height(widget) -> bool:
        """Once docked, take the height the controls want from the docks beside it: Qt
        gives a dock added below another its minimum (docked under Classify, Generate
        showed its two pickers in 69 px, its Run button out of sight, beside 500 px of
        Classify's empty space; Retrain three rows of a 920 px form). False while it is
        not docked yet (asked again at the next layout)."""
        from qtpy.QtWidgets import QDockWidget, QMainWindow

        dock = widget.native.parent()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parent()
        window = dock.parent() if dock is not None else None
        if not isinstance(window, QMainWindow) or dock.isFloating() or not dock.isVisible():
            return False
        want = min(_wanted_height(dock), int(0.75 * window.height()))
        if dock.height() >= want:
            return True
        # the docks stacked with it keep what their own controls ask for (Qt shares a
        # resize out in proportion, leaving one's empty space and this one short)
        area = window.dockWidgetArea(dock)
        column = [d for d in window.findChildren(QDockWidget)
                  if d is not dock and d.isVisible() and not d.isFloating()
                  and window.dockWidgetArea(d) == area and abs(d.x() - dock.x()) < 5]
        window.resizeDocks([*column, dock], [*map(_wanted_height, column), want],
                           Qt.Orientation.Vertical)
        return True


def _wanted_height(dock) -> int:
    """What a dock's controls ask for, with its title bar: for a scrollable one, its
    inner controls (the scroll area asks for little)."""
    inner = dock.widget()
    from qtpy.QtWidgets import QScrollArea

    if isinstance(inner, QScrollArea) and inner.widget() is not None:
        inner = inner.widget()
    hint = inner.sizeHint().height() if inner is not None else 0
    return max(dock.minimumSizeHint().height(), hint + 40)


class ModelRunWidget(Container):
    architecture: str = ""
    task: str = ""  # "Segment", "Detect", ...
    #: what the result does where the image has voxels without a value (NaN) on an
    #: acquired slice, said under the result (None: the widget says it its own way)
    unmeasured_effect: str | None = "left without a result"

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer = plain_viewer(viewer)
        self._worker = None
        self._result_note = ""  # the latest result's missing-slices line
        self._image = KeepingComboBox(label="Image", choices=self._image_choices,
                                      nullable=False)
        self._model = model_picker(self.architecture)
        self._image.tooltip = (
            "The image layer to run on: shown scans first, generated volumes after acquired "
            "ones; explanation maps are not offered")
        self._model.tooltip = (
            f"The {self.architecture} to run: the bundled one, or one you saved (Retrain's "
            "Save version, or napari-medseg train / finetune)")
        self._run = PushButton(text=self.task or "Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = Label(value="")
        self._status.native.setWordWrap(True)  # long results must not widen the dock
        # a short line ("Segment: segmenting") was wrapped into a narrow centred column
        # Minimum: stacked under other docks, Preferred let Qt cut the line in half (the
        # lesion volume hidden), as Retrain's status already learnt
        self._status.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                          QSizePolicy.Policy.Minimum)
        # the job's progress, here and not in napari's activity dock (see _on_run)
        self._progress = progress_bar()
        self._drawn_at = 0.0
        self._run.changed.connect(self._on_run)
        self._run.tooltip = (f"Run {self.task} on the picked image in the background; the "
                             "viewer stays usable, Cancel stops it")
        self._cancel.tooltip = "Stop the run; nothing is added"
        self._cancel.changed.connect(self._on_cancel)
        super().__init__(
            widgets=[
                self._image,
                self._model,
                *self.extra_widgets(),
                Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
                self._progress,
                self._status,
                *self.result_widgets(),
            ],
            scrollable=True,  # see ScrollableDock
        )
        ScrollableDock.fit_width(self)
        self._names = LayerNameFollower(viewer, self._refresh_layers)
        self._connect_viewer()
        # closed: its job stops, and it follows the viewer no more (it went on rewriting
        # its detections layer's shown points, and re-reading volumes, until the viewer
        # closed); docked again: it follows again
        self._dock_watch = DockWatch(self, self._close_down, self._reopen)

    native = ScrollableDock.native

    def viewer_events(self) -> list[tuple[Any, Callable[..., Any]]]:
        """(event, method) pairs of the viewer this widget follows while it is docked."""
        layers = self._viewer.layers.events
        return [(layers.inserted, self._refresh_layers), (layers.removed, self._refresh_layers),
                (layers.moved, self._refresh_layers)]

    def _connect_viewer(self, connect: bool = True) -> None:
        for event, method in self.viewer_events():
            (event.connect if connect else event.disconnect)(method)
        self._names.connect(connect)

    def _close_down(self) -> None:
        self._on_cancel()
        self._connect_viewer(False)
        self._watch_result_image(None)  # closed: it says nothing of the image any more
        self.drop_result()

    def _reopen(self) -> None:
        self._connect_viewer()
        self._refresh_layers()

    def drop_result(self) -> None:
        """Let go of the last result and the layers it follows (the dock was closed)."""

    # -- for subclasses ------------------------------------------------------------------
    def extra_widgets(self) -> list:
        return []

    def result_widgets(self) -> list:
        return []

    def options(self) -> dict:
        """The run's settings, read from the widgets in the GUI thread when Run is
        clicked (the worker must not read Qt widgets; the user may change them meanwhile)."""
        return {}

    def needs_model(self, options: dict) -> bool:
        return True

    def core_job(self, volume, model, card, options: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def show_result(self, result, card: dict, image_layer, volume,
                    options: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    def missing_note(self, volume, result, options: dict) -> str:
        """A line naming the slices missing from the input (shown under the result): axial
        slices, and the planes a turned coronal or sagittal series lacks (the reader
        records those along y or x; they were left empty without a word)."""
        parts = []
        if volume.missing.any():
            parts.append(f"Missing slices {slice_ranges(volume.missing_slices())}")
        planes = volume.metadata.get("missing_planes") or {}
        axis = planes.get("axis") if isinstance(planes, dict) else None
        if axis in ("y", "x"):
            n = volume.shape["zyx".index(axis)]
            gaps = sorted({int(i) for i in planes.get("indices") or () if 0 <= int(i) < n})
            if gaps:
                kind = "coronal" if axis == "y" else "sagittal"
                parts.append(f"{'m' if parts else 'M'}issing planes along {axis} ({kind}): "
                             f"{slice_ranges(gaps)}")
        lines = ["; ".join(parts) + " (not acquired): left without a result"] if parts else []
        unmeasured = volume.unmeasured_voxels()
        if self.unmeasured_effect and unmeasured.any() and axis not in ("y", "x"):
            # a masked patch: Classify gave a confident class from a slice 1 voxel of
            # which was measured, without a word
            zs = np.flatnonzero(unmeasured)
            lines.append(f"{counted(int(unmeasured.sum()), 'voxel')} without a value (NaN) on "
                         f"{'slice' if len(zs) == 1 else 'slices'} {slice_ranges(zs)}: "
                         f"{self.unmeasured_effect}")
        return "\n".join(lines)

    # -- plumbing ---------------------------------------------------------------------
    def _image_choices(self, _widget=None):
        from napari.layers import Image

        from .._layers import is_explanation_map

        # a map is no scan: with the CT deleted, the picker fell on a Grad-CAM map and Run
        # explained the map
        return layer_choices(layer for layer in self._viewer.layers
                             if isinstance(layer, Image) and not is_explanation_map(layer))

    def _refresh_layers(self, _event=None) -> None:
        self._image.reset_choices()
        running_on = getattr(self, "_running_on", None)
        if self._worker is not None and running_on is not None \
                and running_on not in self._viewer.layers:
            # nothing can show its result: it ran to the end, the status saying "running
            # on 'CT'" over an empty picker, and only then "result discarded"
            self._on_cancel()
            set_status(self._status, f"'{running_on.name}' was removed: {self.task} cancelled")

    def _on_run(self) -> None:
        if self._worker is not None:  # one run at a time (a scripted double click)
            return
        layer = self._image.value
        try:
            # checks what the layer says of itself now; the copy, the checks that read
            # every voxel, and a lazy (dask, zarr) array's reading run in the worker
            volume = volume_from_layer(layer, defer=True)
            card_path = self._model.value
            options = self.options()
            if card_path is None and self.needs_model(options):
                raise MedsegInputError(
                    f"no {self.architecture} model found; train one with "
                    f"'napari-medseg train' or reinstall the bundled weights"
                )
        except MedsegInputError as exc:
            from napari.utils.notifications import show_error

            show_error(f"{self.task}: {exc}")
            # as a refusal in the worker is: the line must not go on showing the result
            # of an earlier run as if it were this image's
            self._status.value = _jobs.said_of(self.task, str(exc), True)
            return
        self._set_running(True)
        self._running_on = layer
        self._status.value = f"{self.task}: running on '{layer.name}'…"
        self._progress.value, self._drawn_at = 0, 0.0
        self._progress.native.setFormat("%p%")
        self._progress.visible = True
        # no napari progress bar: while one exists napari animates an "in progress" image,
        # and under software OpenGL a Segment the user waited for took 2.5–3.4x its
        # headless time with it, 1.4–1.9x without (bench_gui_responsiveness.py --no-scroll
        # [--napari-activity])
        self._worker = _jobs.start_job(
            self._job,
            volume,
            card_path,
            options,
            description=f"{self.task} '{layer.name}'",
            on_result=lambda out, seen=_geometry(layer): self._on_result(out, layer, seen),
            on_finished=self._on_job_finished,
            on_error=lambda message, refused: set_status(
                self._status, _jobs.said_of(self.task, message, refused)),
            on_progress=self._on_progress,
            activity=False,
            viewer=self._viewer,
        )

    def _on_job_finished(self) -> None:
        self._running_on = None
        self._set_running(False)

    def _on_progress(self, report) -> None:
        """The job's progress and message on the bar (the status line may hold what the
        user reads meanwhile, e.g. Detect's threshold count), redrawn at most every
        :data:`REDRAW_S`; a report after Cancel or a closed viewer changes nothing."""
        now = time.monotonic()
        if self._worker is None or now - self._drawn_at < REDRAW_S or widget_closed(self._status):
            return
        self._drawn_at = now
        if report.total:
            self._progress.value = int(min(100.0, 100.0 * report.step / report.total))
        # Qt's format reads %p, %v and %m as codes and has no escape: a message's own %
        # is shown as the full-width sign
        message = str(report.message or "").replace("%", "\uff05")
        self._progress.native.setFormat(f"{message}  %p%" if message else "%p%")

    def _job(self, volume, card_path, options):
        volume = yield from read_deferred(volume)  # a lazy layer is read here
        model, card = load_model(card_path) if self.needs_model(options) else (None, {})
        result = yield from self.core_job(volume, model, card, options)
        # worked out here: its percentiles over the whole scan held napari's thread about
        # 0.1 s after each Detect on a 200 × 512 × 512 CT
        warnings = input_warnings(volume, card) if card else []
        return result, card, options, volume, warnings

    def _on_result(self, out, layer, seen=None) -> None:
        if widget_closed(self._status):  # nowhere to show it
            return
        result, card, options, volume, warnings = out
        if layer not in self._viewer.layers:
            show_warning(f"{self.task}: '{layer.name}' was removed while the model ran; "
                         "the result was discarded")
            self._status.value = "Input layer removed; result discarded"
            return
        if seen is not None and not _same_geometry(seen, _geometry(layer)):
            show_warning(f"{self.task}: '{layer.name}' changed while the model ran (new data, "
                         "shape or position); the result was discarded: run it again")
            self._status.value = "Input layer changed; result discarded"
            return
        # kept: a widget that rewrites its status later (Detect's threshold) shows it again
        self._result_note = note = "\n".join(filter(None, [
            self.missing_note(volume, result, options),
            *(f"Warning: {w}" for w in self._input_warnings(volume, card, warnings))]))
        before = {id(kept) for kept in self._viewer.layers}
        earlier = self._earlier_results(layer)
        _ADDING_ON.append(layer)
        try:
            self.show_result(result, card, layer, volume, options)
        finally:
            _ADDING_ON.pop()
        for added in self._viewer.layers:
            if id(added) not in before:
                _mark_made_on(added, layer)
                _watch_edits(added)
        for old in earlier:  # one result on screen: two drew over each other (see there)
            old.visible = False
        if earlier:
            self._result_note = note = "\n".join(filter(None, [
                f"{counted(len(earlier), 'earlier result')} of this image hidden (tick its "
                "eye to compare)", note]))
        if self.result_layer_type is not None:
            self._watch_result_image(layer)
        if note and not self._status.value.endswith(note):
            self._status.value = f"{self._status.value}\n{note}"

    #: the layer type a run adds (Segment: Labels, Detect: Points): an earlier unedited
    #: result of this kind on the same image is hidden, and a change of the image's data
    #: or placement after the run is said (None: the widget handles both itself)
    result_layer_type: str | None = None

    def _earlier_results(self, image) -> list:
        """The visible results of this widget's kind made on ``image`` that nobody edited:
        a re-run left the first on screen (Detect: a ring of the first run drawn at a
        threshold the status said hid every detection; Segment: two label layers' colours
        stacked). Layers the user corrected (Retrain lists, points added or moved, a
        re-prediction written in) are theirs and stay."""
        kind = self.result_layer_type
        if kind is None:
            return []
        found = []
        for old in list(self._viewer.layers):
            medseg = (getattr(old, "metadata", None) or {}).get("medseg")
            if (type(old).__name__ != kind or not old.visible or made_on(old) is not image
                    or not isinstance(medseg, dict) or not medseg.get("model")
                    or medseg.get("listed_slices") or medseg.get("repredicted_with")):
                continue
            if old in _EDITED_RESULTS:
                continue
            found.append(old)
        return found

    def _watch_result_image(self, image) -> None:
        """Follow ``image``'s data and placement, referred to weakly: a widget must not
        keep a deleted scan in memory."""
        old = getattr(self, "_result_image", None)
        rewatch_geometry(old() if old is not None else None, image,
                         self._on_result_image_changed)
        self._result_image = weakref.ref(image) if image is not None else None
        self._result_geometry = _geometry(image) if image is not None else None

    def _on_result_image_changed(self, _event=None) -> None:
        """The image got new data or another placement after the run: its result stays
        where it was made and its measures (volumes, sizes, go-to entries) are of the
        image before (a spacing corrected after Segment kept the volumes computed at the
        old one, and Go to lesion went to another slice), said once."""
        image = self._result_image() if self._result_image is not None else None
        if image is None or _same_geometry(self._result_geometry, _geometry(image)):
            return
        self._watch_result_image(None)
        self.result_went_stale(image)

    def result_went_stale(self, image) -> None:
        """Hook: the image of the last result changed (see _on_result_image_changed)."""
        set_status(self._status, f"'{image.name}' changed (new data, scale or position) "
                   f"after {self.task}: the result no longer lies on it and its measures "
                   "are of the image before; run it again")

    def _input_warnings(self, volume, card, warnings: list[str]) -> list[str]:
        """Said in a notification and kept on the status line: the job's (core
        input_warnings) and the image's generated slices."""
        if not card:  # a method without a model (interpolation)
            return []
        warnings = list(warnings)
        synthetic = volume.metadata.get("synthetic_slices")
        if synthetic:  # a Generate result (the reader says so of a file, on opening)
            warnings.append(f"{counted(synthetic, 'slice')} of the image "
                            f"{'was' if synthetic == 1 else 'were'} generated "
                            "(synthetic), not acquired: the result there is the model's "
                            "reading of the generator's image, not for diagnosis")
        for warning in warnings:
            show_warning(f"{self.task}: {warning}")
        return warnings

    def _on_cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            # "Cancelled" once it has stopped: a job stops at its next progress report
            # (loading a model or reading a file does not report), and Run stays off till then
            set_status(self._status, "Cancelling…")
            try:
                self._cancel.enabled = False
            except RuntimeError:  # the viewer was closed: its Qt widgets are gone
                pass

    def _set_running(self, running: bool) -> None:
        if not running:
            self._worker = None
        try:
            self._run.enabled = not running
            self._cancel.enabled = running
            if not running:
                self._progress.visible = False
                if self._status.value.startswith("Cancelling"):
                    self._status.value = "Cancelled"
        except RuntimeError:  # the viewer was closed mid-run: its Qt widgets are gone
            pass
