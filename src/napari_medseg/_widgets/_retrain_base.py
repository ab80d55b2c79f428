"""What the two retrain dock widgets share (``retrain.py``: segmenter on a Labels layer;
``retrain_detector.py``: detector on a Points layer): the image / layer / model pickers,
the list of annotated slices, versions (revert, save), running a round or a prediction in
a worker, and the crash-safe autosave with its restore offer.

Both: versions v0 (the starting model), v1, v2 … can be reverted to, re-predicted with
and saved to the user models folder (listed by every widget and the CLI). The
annotations and the slice lists are autosaved (background thread, crash-safe) to
``$NAPARI_MEDSEG_HOME/sessions/<image>-<name hash>-<shape>/<session>/``; picking the
same image later (the same voxels: core.session.image_fingerprint) offers to restore the
most recently written autosave of an earlier session of the same kind. A failed autosave
is said in a warning and the status line.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import napari
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import QListWidget, QListWidgetItem, QSizePolicy
from superqt.utils import ensure_main_thread

from .. import _jobs
from . import _keys
from .._layers import (
    check_image_layer,
    generated_planes,
    image_number_note,
    instance_numbers,
    is_explanation_map,
    read_deferred,
    scan_axes,
    volume_from_layer,
    volume_outline,
)
from ..core.errors import MedsegInputError
from ..core.finetune import (
    DEFAULT_SECONDS,
    VersionHistory,
    label_name_conflicts,
    new_structure_advice,
)
from ..core.models.registry import BUNDLED_DIR, load_model, read_card, user_models_dir
from ..core.io._common import short_reason
from ..core.session import (
    AnnotationSession,
    SessionLock,
    discard_session,
    image_fingerprint,
    load_session,
    read_meta,
    save_session,
    saved_epoch,
    session_in_use,
    session_key,
    sessions_dir,
)
from ..core.text import counted, slice_ranges
from ._loss_curve import LossCurve
from ._navigate import drawn_matrix, go_to_slice, slice_axis_shown, to_viewer_units
from ._model_widget import (
    REDRAW_S,
    DockWatch,
    ScrollableDock,
    _OnLayout,
    KeepingComboBox,
    _geometry,
    _same_geometry,
    LayerNameFollower,
    layer_choices,
    made_on,
    model_picker,
    plain_viewer,
    progress_bar,
    refresh_model_pickers,
    set_status,
    widget_closed,
)

log = logging.getLogger(__name__)


def _did_worse(report: Any) -> bool:
    """Whether a round's held-out slice lost more than :data:`HOLDOUT_DROP_NOT_APPLIED`
    of Dice (its version is listed, not applied)."""
    return (report is not None and report.holdout_dice_after is not None
            and report.holdout_dice_before is not None
            and report.holdout_dice_after < report.holdout_dice_before - HOLDOUT_DROP_NOT_APPLIED)


def _version_label(version: Any) -> str:
    """A version's entry in the list; one that did worse says so first (the list cuts a
    long entry at its end, and Save took it without a word)."""
    text = version.describe()
    if _did_worse(version.report):
        text = text.replace(f"v{version.number} · ", f"v{version.number} (worse) · ", 1)
    return text


def _added(history: VersionHistory, result) -> tuple[Any, bool]:
    """``result`` added to ``history`` as its newest version, and whether it is in use:
    not when its held-out slice's Dice fell by more than :data:`HOLDOUT_DROP_NOT_APPLIED`
    (the version the round started from stays in use; a 2-3 s round could leave the
    segmenter far worse)."""
    started_from = history.current
    version = history.add(result)
    worse = _did_worse(result.report)
    if worse:
        history.revert(started_from)
    return version, not worse


def _content_digest(volume) -> str:
    """What a model's output on ``volume`` depends on: its voxels (NaN included), spacing
    and missing slices, hashed (about 1 GB/s: 0.2 s for 200 × 512 × 512, in a worker)."""
    h = hashlib.blake2b(digest_size=16)
    array = np.ascontiguousarray(volume.array)
    h.update(repr((array.shape, str(array.dtype), tuple(volume.spacing))).encode())
    h.update(memoryview(array).cast("B"))
    h.update(np.packbits(np.asarray(volume.missing, dtype=bool)).tobytes())
    return h.hexdigest()
AUTOSAVE_DELAY_MS = 1500
#: a round whose held-out slice's Dice falls by more than this is listed, not applied: a
#: 2-3 s round (about 25 steps) could leave the segmenter far worse (0.94 -> 0.70 on its
#: held-out slice, the liver nearly gone) and was written into the layer all the same
HOLDOUT_DROP_NOT_APPLIED = 0.05



def history_depths(layer) -> tuple[int, int] | None:
    """Lengths of a Labels layer's undo and redo histories (private in napari 0.9; None
    where they are gone): an undo or redo is the only data change that moves them without
    a paint event."""
    undo, redo = getattr(layer, "_undo_history", None), getattr(layer, "_redo_history", None)
    if undo is None or redo is None:
        return None
    return len(undo), len(redo)


def painted_slices(history_item: Any) -> set[int]:
    """The z indices a Labels paint event's history item touched (3D data)."""
    out: set[int] = set()
    for atom in history_item or []:
        if hasattr(atom, "slice_key"):  # mask-based paint / fill / polygon
            zsl = atom.slice_key[0]
            zs = np.arange(zsl.start or 0, zsl.stop)
            if atom.mask is not None and atom.mask.ndim >= 3:
                zs = zs[atom.mask.reshape(atom.mask.shape[0], -1).any(axis=1)]
            out.update(int(z) for z in zs)
        else:  # (indices, old, new) from data_setitem
            zs = np.asarray(atom[0][0]).ravel()  # a re-prediction's step holds millions: no sort
            out.update(int(z) for z in np.flatnonzero(np.bincount(zs, minlength=1)))
    return out


def _on_scan(image) -> dict:
    """A new labels layer's metadata: the scan's axes, so saving it writes where the scan lies."""
    return {"medseg": {"source": scan_axes(image)}}


def _annotated_count(meta: dict) -> int:
    """Slices an autosave record lists as edited or checked."""
    return len(set(meta.get("edited", [])) | set(meta.get("checked", [])))


#: the slice lists a closed widget left, per annotation layer and image (_image_key):
#: napari opens a NEW widget when the dock is opened again, and it started with empty
#: lists on the same layer, so its next round re-predicted over every slice painted
#: before the close (9000 painted voxels changed)
_LISTS_LEFT: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()

#: the key of a layer's ``metadata["medseg"]`` that holds its listed slices per image
#: (image key → edited, checked, excluded): napari's Duplicate Layer and Convert to …
#: make a new layer object keeping the metadata; the lists, kept by layer object, were
#: left behind and a re-predict wrote over the painted slices of the copy
LISTED_KEY = "listed_slices"


def check_writable(layer: Any) -> None:
    """MedsegInputError unless a prediction can be written into ``layer``'s data: a
    read-only or lazy (dask, zarr) Labels layer failed after the whole round."""
    data = layer.data
    if not (isinstance(data, np.ndarray) and data.flags.writeable):
        kind = "read-only" if isinstance(data, np.ndarray) else f"a lazy {type(data).__name__} array"
        raise MedsegInputError(
            f"'{layer.name}' cannot be written into (its data is {kind}; napari cannot "
            "paint into it either); click New labels layer, or save it and open it again, "
            "for a layer in memory")


def recorded_lists(layer: Any, key: Any) -> tuple[set, set, set] | None:
    """The (edited, checked, excluded) slices ``layer``'s metadata records for the image
    of key ``key``; None when it records none."""
    medseg = (getattr(layer, "metadata", None) or {}).get("medseg")
    listed = medseg.get(LISTED_KEY) if isinstance(medseg, dict) else None
    entry = listed.get(key) if isinstance(listed, dict) and isinstance(key, str) else None
    try:
        lists = tuple({int(z) for z in entry[name]} for name in ("edited", "checked", "excluded"))
    except (TypeError, KeyError, ValueError):
        return None
    return lists if lists[0] | lists[1] else None


def image_list_key(image: Any, fingerprint: str | None = None) -> str:
    """The key an image's lists are recorded under: its content's fingerprint
    (core.session.image_fingerprint; ``fingerprint`` when known), else the layer's id."""
    if fingerprint is None:
        try:
            fingerprint = image_fingerprint(image.data)
        except (TypeError, ValueError, IndexError, AttributeError):
            fingerprint = ""
    return fingerprint or f"layer-{id(image)}"


def annotated_in_viewer(viewer: Any, image: Any) -> set[int]:
    """The slices of ``image`` that some Labels layer's Retrain lists record as edited or
    checked: corrected already, so not worth suggesting again."""
    key = image_list_key(image)
    annotated: set[int] = set()
    for layer in list(viewer.layers):
        if isinstance(layer, napari.layers.Labels):
            lists = recorded_lists(layer, key)
            if lists is not None:
                annotated |= lists[0] | lists[1]
    return annotated


def record_lists(layer: Any, key: Any, lists: tuple) -> None:
    """Write ``lists`` for the image of key ``key`` into ``layer``'s metadata, in a new
    ``medseg`` dict: a copy napari made shares the old one (its metadata is copied one
    level deep), and keeps what it had when it was made."""
    meta = getattr(layer, "metadata", None)
    if not isinstance(meta, dict) or not isinstance(key, str):
        return
    medseg = meta.get("medseg") if isinstance(meta.get("medseg"), dict) else {}
    listed = dict(medseg.get(LISTED_KEY)) if isinstance(medseg.get(LISTED_KEY), dict) else {}
    entry = {name: sorted(int(z) for z in zs)
             for name, zs in zip(("edited", "checked", "excluded"), lists)}
    if entry["edited"] or entry["checked"]:
        if listed.get(key) == entry:
            return
        listed[key] = entry
    elif listed.pop(key, None) is None:
        return
    meta["medseg"] = {**medseg, LISTED_KEY: listed}


#: and the autosave folder it wrote them in, per layer and image: the next widget takes
#: the lists over, so that autosave is its own work, not one to offer for restoring (a
#: Restore made a duplicate layer beside the one being worked on)
_FOLDERS_LEFT: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _merge_lists(into: dict, key: Any, lists: tuple) -> None:
    """Add (edited, checked, excluded) ``lists`` to ``into[key]`` (a union: nothing a
    widget listed is dropped by another's)."""
    before = into.get(key, (set(), set(), set()))
    into[key] = tuple(set(a) | set(b) for a, b in zip(before, lists))


class _RetrainBase(Container):
    """Everything the two retrain widgets share; subclasses say what the annotation
    layer is, how edits are tracked, and how a model learns from and writes to it."""

    architecture = ""
    layer_kind = ""  # "Labels" or "Points"
    task = ""
    edited_word = "edited"
    checked_word = "checked correct"
    mark_text = "Mark current slice correct"
    #: whether a prediction is written into the annotation layer (else into a new layer,
    #: which needs only the image to be there still)
    writes_into_layer = True

    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer = plain_viewer(viewer)
        self._worker = None
        self._history: VersionHistory | None = None
        self._history_model: str | None = None
        #: the versions of models picked earlier (model card path → history)
        self._kept_histories: dict[str | None, VersionHistory] = {}
        # the last whole-volume output of a version on an image, kept so the next round
        # need not compute it again (see _remember_output)
        self._model_output: tuple | None = None
        self._tracked = None  # the annotation layer whose edit events we follow
        self._shut = False  # closed (taken out of its dock): it follows no layer
        # keyed by the layers themselves (they hash by identity), dropped with them
        self._layer_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see _connect
        self._left_atoms: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # _disconnect
        self._left_points: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # (detector)
        # (detector) world z of points edited while no image was picked, per points layer
        # and per image key (_image_key) of the image last picked with it
        self._imageless_edits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._image_left_key: str | None = None  # (detector) the image those edits are on
        self._before_change = None  # (detector) the rows of a move, between its two events
        self._away_slices: set[int] = set()
        self._away_across: set[int] = set()  # of those, from strokes across slices
        # listed slice → why the widget unticked it (a stroke across slices, new data, the
        # threshold or the layer moved), said in the list until the user ticks it
        self._review_notes: dict[int, str] = {}
        self._away_undone: set[int] = set()  # slices whose strokes were undone meanwhile
        self._stroke_slices: set[int] = set()  # (Labels) listed by a stroke; see _connect
        # layer -> {image key (_image_key): name}
        self._session_folders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._session_folder_count = 0
        self._writing = False  # our own writes are not user annotations
        self._edited: set[int] = set()
        self._checked: set[int] = set()
        self._excluded: set[int] = set()
        # the (image, annotation layer) the three lists above belong to (slice numbers are
        # the image's), and the lists of pairs picked earlier, so switching away and back
        # loses nothing: annotation layer -> {image key (_image_key): (edited, checked,
        # excluded)}
        self._pair: tuple[Any, Any] = (None, None)
        self._pair_key: str | None = None  # the pair's image content (_image_key) then
        self._pair_shape: tuple = ()
        self._watched_image: Any = None  # whose data replacement starts another pair
        self._kept_lists: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # the picked layer removed last: its name and autosave folders (image key →
        # folder), and the layer the picker fell back on then
        self._left_pick: tuple[str | None, dict] = (None, {})
        self._fallback_pick: Any = None
        # layer -> {image key: the autosave folder of that pair}, as last written
        self._autosave_targets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # sortable by time, unique across widgets and processes
        self._session_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._save_lock = threading.Lock()
        # the autosave folders this widget writes, locked while it is open (core.session)
        self._folder_locks: dict[Path, SessionLock] = {}
        # autosave snapshots numbered as taken (GUI thread), and the last written per folder
        self._snapshots_taken = 0
        self._snapshot_written: dict[Path, int] = {}
        # the folders of removed layers: written once more if a save is pending, then
        # left unlocked (a lock and an open file per scan annotated all day; and another
        # window could not offer a deleted layer's autosave until this one closed)
        self._let_go: set[Path] = set()
        # a restored autosave, deleted once its content is written into this widget's
        # folder (kept, each restore left a copy behind: the folders only grew)
        self._superseded: dict[Path, Path] = {}
        self._restored: set[Path] = set()  # autosave folders restored into a layer here
        self._said_offers: set[Path] = set()  # autosaves whose offer was said in a toast
        self._undeletable: set[Path] = set()  # discarded here, but the folder refused deletion
        self._save_thread: threading.Thread | None = None
        # snapshots not yet written, the newest per folder, for ONE writer thread: a
        # thread per snapshot queued every 1.5 s behind 3 s writes of a large layer (11
        # threads, 4 GiB, the newest state written 25 s late)
        self._pending: dict[Path, tuple[int, Any, Path]] = {}
        self._pending_lock = threading.Lock()
        self._writing_snapshots = False
        self._autosave_error: str | None = None
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # image -> (data, fp)
        self._pending_restore: Path | None = None
        self._drawn_at = -1e9  # when a job's progress was last drawn
        self._round_started, self._round_budget = 0.0, 1.0  # a round's clock, for its bar
        self._older_autosaves: list[Path] = []  # offered in turn when a newer one fails
        self._said_unreadable: set[Path] = set()
        self._result_shown = False

        self._image = KeepingComboBox(label="Image", choices=self._layers_of("Image"),
                                      nullable=True)
        self._layer_pick = KeepingComboBox(label=self.layer_kind,
                                           choices=self._layers_of(self.layer_kind), nullable=True)
        self._new_layer = PushButton(text=f"New empty {self.layer_kind.lower()} layer on the image")
        self._model = model_picker(self.architecture)
        self._restore_label = Label(value="")
        self._restore_label.native.setWordWrap(True)
        # full width, and never shorter than its text: squeezed under another dock widget
        # it was cut off at its first and last line
        self._restore_label.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                                 QSizePolicy.Policy.Minimum)
        self._restore = PushButton(text="Restore")
        self._discard = PushButton(text="Discard")
        self._restore_box = Container(widgets=[self._restore_label, Container(
            widgets=[self._restore, self._discard], layout="horizontal", labels=False)],
            labels=False, visible=False)
        self._slice_list = QListWidget()
        self._slice_list.setMinimumHeight(110)
        self._slice_list.setToolTip("Annotated slices: ticked = used for training; listed slices are "
                                    "never overwritten. Double-click to go to a slice.")
        list_box = Container(labels=False)
        list_box.native.layout().addWidget(self._slice_list)
        self._mark = PushButton(text=self.mark_text)
        self._remove = PushButton(text="Remove selected slice")
        self._seconds = FloatSpinBox(label="Seconds", value=DEFAULT_SECONDS, min=2.0, max=600.0, step=5.0)
        self._run = PushButton(text=f"Retrain and {self.task}")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._curve = LossCurve()
        curve_box = Container(labels=False)
        curve_box.native.layout().addWidget(self._curve)
        # a round's progress, here rather than in napari's activity dock (see _on_retrain)
        self._round_progress = progress_bar()
        curve_box.native.layout().addWidget(self._round_progress.native)
        self._status = Label(value=f"Correct the {self.layer_kind} layer, then Retrain.")
        self._status.native.setWordWrap(True)
        self._status.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                          QSizePolicy.Policy.Minimum)
        # its own line: the status line belongs to rounds and re-predictions, whose
        # messages a failing autosave would otherwise overwrite (or be overwritten by)
        self._autosave_alert = Label(value="", visible=False)
        self._autosave_alert.native.setWordWrap(True)
        self._style_alert()
        self._autosave_alert.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                                  QSizePolicy.Policy.Minimum)
        # callable choices: napari's reset_choices (on every layer added) re-reads them
        self._versions = ComboBox(label="Version", choices=self._version_choices)
        self._revert = PushButton(text="Use this version")
        self._predict = PushButton(text=f"{self.task.capitalize()} with it")
        self._save_name = LineEdit(label="Save as", value="")
        self._save = PushButton(text="Save version")
        super().__init__(widgets=[
            self._image, self._layer_pick, self._new_layer, self._model, self._restore_box,
            Label(value="Annotated slices"), list_box,
            Container(widgets=[self._mark, self._remove], layout="horizontal", labels=False),
            *self.extra_widgets(),
            self._seconds,
            Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
            curve_box, self._status, self._autosave_alert, self._versions,
            Container(widgets=[self._revert, self._predict], layout="horizontal", labels=False),
            self._save_name, self._save,
            # scrollable: its controls need about 920 px, more than a laptop's window
            # (napari grew the window past the screen to fit them)
        ], scrollable=True)
        # a sideways scroll bar stays for what grows later (a long version entry); the
        # list, not a stretch, takes the height left
        ScrollableDock.fit_width(self, sideways=True, pack=False)
        self._autosave_timer = QTimer(self.native)  # dies with the widget, never fires after
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.timeout.connect(self.autosave_now)
        self._enable_version_buttons()

        self._image.changed.connect(self._on_image_changed)
        self._layer_pick.changed.connect(self._track)
        # napari re-evaluates every picker when a layer is added (reset_choices): only a
        # different model may drop the versions
        self._model.changed.connect(lambda v: v != self._history_model and self._switch_history(v))
        self._versions.changed.connect(self._show_version_tooltip)
        self._new_layer.changed.connect(self._add_empty_layer)
        self._restore.changed.connect(self._on_restore)
        self._discard.changed.connect(self._on_discard)
        self._mark.changed.connect(self._mark_current)
        self._remove.changed.connect(self._remove_selected)
        self._slice_list.itemChanged.connect(self._on_item_changed)
        # a double click, and Return on a listed slice (only a double click went there;
        # both connected, a double click went there twice)
        self._slice_list.itemActivated.connect(
            lambda item: self._go_to(item.data(Qt.ItemDataRole.UserRole)))
        self._run.changed.connect(self._on_retrain)
        self._cancel.changed.connect(self._on_cancel)
        self._revert.changed.connect(self._on_revert)
        self._predict.changed.connect(self._on_predict)
        self._save.changed.connect(self._on_save)
        self._names = LayerNameFollower(viewer, self._refresh_layers)
        self._follow_layer_list()
        self._refresh_layers()
        self._on_image_changed()
        self._track()
        _keys.register(self, viewer)
        self._mark.tooltip = ("The slice on screen checked and right as it is (key K). "
                              + _keys.help_text())
        self._run.tooltip = ("Fine-tune on the ticked slices, then write the new version's "
                             "prediction (key Ctrl+Shift+R)")
        kind = self.layer_kind.lower()
        tips = {
            self._image: "The scan the annotations are drawn on",
            self._layer_pick: (f"The {kind} layer you correct: its listed slices are "
                               "trained on and never overwritten"),
            self._new_layer: f"An empty {kind} layer on the picked image, to annotate from scratch",
            self._model: (f"The {self.architecture} to fine-tune: the bundled one or one you "
                          "saved; its versions are kept while you pick another"),
            self._remove: "Take the selected slice off the list (and off its protection)",
            self._seconds: "The round's time budget (a new structure wants about 300 steps)",
            self._cancel: "Stop the round; the model stays as it was",
            self._restore: "Open the autosaved annotations and lists as a new layer",
            self._discard: "Delete that autosave",
        }
        for control, tip in tips.items():
            control.tooltip = tip
        # the window's close button (or Ctrl+W) quits without removing the layers, and
        # the pending autosave (its timer never fires again) lost the last strokes
        self._dock_watch = DockWatch(self, self._close_down, self._reopen,
                                     on_window_close=self._flush_on_quit)

    # -- closed and docked again --------------------------------------------------------
    def _close_down(self) -> None:
        """Taken out of its dock (napari opens a new instance next time): stop the round,
        autosave what is pending, and follow no layer. It kept tracking and autosaving
        beside the new instance, whose restore offer missed its last strokes. (Closing
        the viewer needs none of this: its layers are removed first, which saves.)"""
        self._on_cancel()
        histories = {id(h): h for h in (self._history, *self._kept_histories.values())
                     if h is not None}
        # each with its model: "v1, v2" read wrong beside a v1 of another model just saved
        # "Retrain v1": "detector v1" read as the bundled detector v1.0
        unsaved = [f"{h.versions[0].card.get('name', 'model')} Retrain v{n}"
                   for h in histories.values() for n in h.unsaved]
        if unsaved:  # the annotations are autosaved; a model version lives in memory only
            many = len(unsaved) > 1
            show_warning(f"Retrain closed: model {'versions' if many else 'version'}"
                         f" {', '.join(unsaved)} {'were' if many else 'was'} never "
                         f"saved and closing the widget lets {'them' if many else 'it'} go "
                         "(your annotations are autosaved); save a version before closing "
                         "to keep it")
        if self._autosave_timer.isActive():
            self._autosave_timer.stop()
            self.autosave_now(wait=True)
        # the lists stay with their layers for the widget napari opens next (and for this
        # one, docked again: its own lists are kept too)
        image, layer = self._pair
        if layer is not None and (self._edited or self._checked or self._excluded):
            key = self._pair_key if image is not None else self._image_left_key
            _merge_lists(_LISTS_LEFT.setdefault(layer, {}), key,
                         (self._edited, self._checked, self._excluded))
        for kept_layer, per_image in list(self._kept_lists.items()):
            for key, lists in per_image.items():
                _merge_lists(_LISTS_LEFT.setdefault(kept_layer, {}), key, lists)
        # and the autosave of every pair whose lists are left: the next widget takes it
        # over with them (a pair left earlier here had its autosave offered for restoring)
        for kept_layer, per_image in list(self._autosave_targets.items()):
            for key, target in per_image.items():
                if key in _LISTS_LEFT.get(kept_layer, {}):
                    _FOLDERS_LEFT.setdefault(kept_layer, {})[key] = target
        if self._tracked is not None:
            self._disconnect(self._tracked)
            self._tracked = None
        if self._watched_image is not None:
            self._watched_image.events.data.disconnect(self._on_image_data)
            self._image_watch(self._watched_image, False)
            self._watched_image = None
        self._shut = True
        self._model_output = None  # a whole volume's prediction, kept to speed up a round
        self._follow_layer_list(False)
        self._release_folders()

    def _follow_layer_list(self, follow: bool = True) -> None:
        """(Stop) refreshing the pickers as layers are added, removed or renamed."""
        for event in (self._viewer.layers.events.inserted, self._viewer.layers.events.removed):
            (event.connect if follow else event.disconnect)(self._refresh_layers)
        self._names.connect(follow)
        theme = getattr(self._viewer.events, "theme", None)
        if theme is not None:
            (theme.connect if follow else theme.disconnect)(self._style_alert)

    #: the autosave alert's red on a light and on a dark background: 4.5:1 or more (one
    #: red for both read 2.26:1 in the light theme, on the one message about losing work)
    ALERT_COLOUR_LIGHT = "#b00020"
    ALERT_COLOUR_DARK = "#ff6b6b"

    def _style_alert(self, _event=None) -> None:
        theme = str(getattr(self._viewer, "theme", "dark"))
        try:  # by the theme's background ("system" resolves to light or dark)
            from napari.utils.theme import get_theme

            light = sum(get_theme(theme).background.as_rgb_tuple()[:3]) / 3 > 128
        except Exception:  # an unknown theme: by its name
            light = theme == "light"
        colour = self.ALERT_COLOUR_LIGHT if light else self.ALERT_COLOUR_DARK
        try:
            self._autosave_alert.native.setStyleSheet(f"color: {colour}; font-weight: bold")
        except RuntimeError:  # closed
            pass

    def _release_folders(self) -> None:
        """This widget writes its autosaves no more: the next one may offer them."""
        with self._save_lock:
            for lock in self._folder_locks.values():
                lock.release()
            self._folder_locks.clear()

    def _flush_on_quit(self) -> None:
        """The window is closing: write a pending autosave now, and wait for it (the
        window deletes this widget's timer next; a closed window may also be the last,
        and the interpreter's exit would stop a write halfway)."""
        if not self._shut and self._autosave_timer.isActive():
            self._autosave_timer.stop()
            self.autosave_now(wait=True)
        self._release_folders()

    def _reopen(self) -> None:
        image, layer = self._pair  # docked again: it holds its lists itself
        if layer is not None:
            _LISTS_LEFT.get(layer, {}).pop(self._pair_key, None)
            _FOLDERS_LEFT.get(layer, {}).pop(self._pair_key, None)
        self._shut = False
        self._follow_layer_list()
        self._refresh_layers()
        self._on_image_changed()
        self._track()

    # -- for subclasses ------------------------------------------------------------------
    def extra_widgets(self) -> list:
        return []

    def _connect(self, layer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _disconnect(self, layer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _empty_layer(self, image):  # pragma: no cover - abstract
        raise NotImplementedError

    def _snapshot(self, layer, image, volume, need_annotations: bool) -> Any:  # pragma: no cover
        """A copy of the annotations on the image's voxel grid, checked."""
        raise NotImplementedError

    def _session(self, layer, image) -> AnnotationSession | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restored_layer(self, session: AnnotationSession, image):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _finetune(volume, model, card, annotation, slices, seconds, version, names,
                  model_output=None):  # pragma: no cover - abstract
        raise NotImplementedError

    #: whether :meth:`_reusable_output` gives anything (the jobs then fingerprint the
    #: volume they read, to tell whether a kept output still belongs to it)
    reuses_output = False

    @staticmethod
    def _reusable_output(prediction):
        """What of a version's prediction a next round can start from
        (``_finetune``'s ``model_output``); None: nothing."""
        return None

    @staticmethod
    def _predict_volume(volume, model, card):  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self, prediction, image, layer, volume, number: int, card: dict,
               prefix: str = "", plan=None, mark=None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # what a widget writing into the layer works out in the job instead of on napari's
    # thread (see the segmenter's): here, nothing
    def _write_target(self, image, layer):
        """What the job needs to plan the write into ``layer`` (taken at the click)."""
        return None

    @staticmethod
    def _write_plan(prediction, volume, target):
        """In the job: the write planned on ``target`` (None: planned at the write)."""
        return None

    def _round_mark(self, layer):
        """Taken at the click: what tells at the write which slices changed since."""
        return None

    # -- layers --------------------------------------------------------------------------
    def _layers_of(self, kind: str):
        def choices(_widget=None):
            return layer_choices(layer for layer in self._viewer.layers
                                 if type(layer).__name__ == kind
                                 and not is_explanation_map(layer))
        return choices

    def _refresh_layers(self, event=None) -> None:
        if self._shut:
            return
        kept = self._model_output
        if kept is not None and kept[2]() not in self._viewer.layers:
            self._model_output = None  # its image is gone: free its prediction
        left = (event.value if getattr(event, "type", None) == "removed"
                and event.value is self._layer_pick.value else None)
        if left is not None:  # followed back if napari puts a converted copy in its place
            self._left_pick = (left.name, dict(self._autosave_targets.get(left, {})))
        for combo in (self._image, self._layer_pick):
            combo.reset_choices()
            if combo.value is None and combo.choices:
                first = self._first_choice(combo)
                if first is not None:
                    combo.value = first
        if left is not None:  # the fallback the picker took: not the user's pick
            self._fallback_pick = self._layer_pick.value
        if getattr(event, "type", None) == "inserted":
            self._follow_new_layer(event.value)
        elif getattr(event, "type", None) == "removed":
            self._let_go_of_autosaves(event.value)  # after the switch that saves its edits

    def _let_go_of_autosaves(self, layer) -> None:
        """A removed layer's autosave folders: no longer locked by this widget."""
        targets = set(self._autosave_targets.get(layer, {}).values())
        if not targets:
            return
        with self._save_lock:
            for target in targets:
                self._let_go.add(target)
                lock = self._folder_locks.pop(target, None)
                if lock is not None:
                    lock.release()
        if self._image.value is not None and not self._shut:
            self._check_for_autosave()  # a layer deleted by mistake: its autosave offered

    def _follow_new_layer(self, layer) -> None:
        """Pick a new layer of the kind this widget corrects, made on the picked image
        (Segment's or Detect's result), while nothing is listed on the layer picked now:
        the user corrects the result they just got, and the picker stayed on the
        sample's ground truth, so their strokes were not listed."""
        old, image = self._layer_pick.value, self._image.value
        if (type(layer).__name__ != self.layer_kind or layer is old or image is None
                or self._worker is not None or not self._fits(layer, image)):
            return
        key = self._image_key(image)
        recorded = recorded_lists(layer, key)
        # the picked layer converted by napari (Convert to …: removed, and a new layer of
        # its name and lists put in its place): followed back, though the picker fell on
        # another layer with lists meanwhile (not when the user picked one since)
        name, folders = self._left_pick
        back = recorded is not None and layer.name == name and old is self._fallback_pick
        if self.annotated_slices() and not back:
            return
        if recorded is None and (made_on(layer) is None
                                 or self._made_on_another(layer, image) is not None):
            # only a model widget's result on this image (or a copy of a layer with slices
            # listed on it): Detect or Segment run on another open scan, another patient's
            # lesions opened from a file, a script's layer fit this image's dimensions as
            # well, and were trained on with its voxels
            return
        left_listed = len(self.annotated_slices())
        self._layer_pick.value = layer
        if back:
            self._left_pick, self._fallback_pick = (None, {}), None
            folder = folders.get(key)
            if folder is not None:
                # the removed layer's autosave is this layer's: not offered for restore
                # (a duplicate of the live layer, and the picker moved onto it), and
                # deleted once this layer's own autosave holds it
                self._restored.add(folder)
                self.autosave_now(supersedes=folder)
                self._check_for_autosave()
            self._status.value = (f"{self.layer_kind}: back on '{layer.name}' (napari made it "
                                  "anew), with its listed slices" + (
                                      f"; '{old.name}' keeps its {counted(left_listed, 'slice')}"
                                      if old is not None and left_listed else ""))
        elif old is not None:
            what = ("made on this image" if recorded is None else
                    f"listing {counted(len(recorded[0] | recorded[1]), 'slice')} of this image")
            self._status.value = (f"{self.layer_kind}: now '{layer.name}', {what} "
                                  f"(nothing was listed on '{old.name}')")

    def _made_on_another(self, layer, image) -> Any:
        """The other scan a model widget made ``layer`` on, or None: made on ``image``, on
        nothing known, or on a scan now closed or of the same content (the same file
        opened again is a new layer object; it was refused as "made on 'A', not on 'A'")."""
        source = made_on(layer)
        if source is None or source is image or image is None:
            return None
        if source not in self._viewer.layers or self._image_key(source) == self._image_key(image):
            return None
        return source

    def _first_choice(self, combo) -> Any:
        """What an empty picker takes by itself: for the image, the newest one shown (a
        hidden scan was taken, and the result layers made on the one in view skipped);
        for the layer, the newest that may fill it (:meth:`_may_fill_with`), a result a
        model made on the picked image first (the sample's ground truth was taken over
        Detect's result)."""
        choices = [c for c in combo.choices if c is not None]
        if combo is self._image:
            # not a Generate result: it is put just above its scan, the newest, and a
            # dock reopened after a Generate took it, its scan's lists and layer unpicked
            # (the one shown first: a hidden scan, maybe another patient's, is not taken
            # over the volume on screen)
            shown = [c for c in choices if getattr(c, "visible", True)]
            pool = ([c for c in shown if generated_planes(c) is None] or shown
                    or [c for c in choices if generated_planes(c) is None] or choices)
            return (pool or [None])[-1]
        usable = [c for c in choices if self._may_fill_with(c)]
        image = self._image.value
        results = [c for c in usable if image is not None and made_on(c) is image]
        return (results or usable or [None])[-1]

    def _may_fill_with(self, layer) -> bool:
        """Whether an empty Labels/Points picker may take ``layer`` by itself: one on the
        picked image's grid that no model widget made on another image. It took the
        newest layer of the kind, whatever it was: Segment run on another scan of the
        same shape filled it, and the round trained this image on that scan's labels."""
        image = self._image.value
        if image is None:
            return True
        return self._fits(layer, image) and self._made_on_another(layer, image) is None

    @staticmethod
    def _fits(layer, image) -> bool:
        """Whether ``layer`` lies on ``image``'s grid: labels of its shape, points of its
        dimensions."""
        if type(layer).__name__ == "Labels":
            return tuple(layer.data.shape) == tuple(image.data.shape)
        return layer.ndim == image.ndim

    def _image_watch(self, image, connect: bool) -> None:
        """Hook: (stop) following the picked image beyond its data."""

    def _on_image_changed(self, _value=None) -> None:
        if self._shut:
            return
        image = self._image.value
        if image is not self._watched_image:
            if self._watched_image is not None:
                self._watched_image.events.data.disconnect(self._on_image_data)
                self._image_watch(self._watched_image, False)
            self._watched_image = image
            if image is not None:
                image.events.data.connect(self._on_image_data)
                self._image_watch(image, True)
        layer = self._layer_pick.value
        if (image is not None and (layer is None or self._made_on_another(layer, image))
                and not self.listed_on_layer(layer)):
            # the layer picked was another scan's result (or none): this scan's newest
            # result, when there is one, instead (the round would be refused)
            with self._layer_pick.changed.blocked():
                self._layer_pick.value = None
                self._layer_pick.value = self._first_choice(self._layer_pick) or layer
        self._switch_pair()
        self._check_for_autosave()

    def _on_image_data(self, _event=None) -> None:
        """The picked image layer got new data (another scan in the same layer): its
        slice numbers are another image's, so the lists and autosave are another pair's."""
        if not widget_closed(self._status) and self._image.value is self._watched_image:
            self._switch_pair()
            self._check_for_autosave()

    def _track(self, _value=None) -> None:
        if self._shut:
            return
        layer = self._layer_pick.value
        if layer is not self._tracked:
            if self._tracked is not None:
                self._disconnect(self._tracked)
            self._tracked = layer
            if layer is not None:
                self._connect(layer)
        self._switch_pair()
        if self._away_slices:  # painted while another layer was picked: the pair's now
            zs, self._away_slices = self._away_slices, set()
            across, self._away_across = self._away_across, set()
            self._list_away(zs, across)
        if self._away_undone:  # … or undone there
            zs, self._away_undone = self._away_undone, set()
            self._unlist(zs)
            self._schedule_autosave()

    def _switch_pair(self) -> None:
        """Keep the slice lists with the (image, layer) pair they were made on: a slice
        number means a slice of that image, and a list must not follow the user to another
        image or layer, nor be lost when they come back."""
        old_image, old_layer = self._pair
        image, layer = self._image.value, self._layer_pick.value
        # the same layers holding another image (its data replaced) are another pair
        key = self._image_key(image) if image is not None else None
        if image is old_image and layer is old_layer and key == self._pair_key:
            return
        if old_image is not None and old_layer is not None:
            if self._autosave_timer.isActive():  # its edits belong to the old pair's session
                self._autosave_timer.stop()
                self.autosave_now(image=old_image, layer=old_layer, image_key=self._pair_key)
            if self._edited or self._checked or self._excluded:
                self._kept_lists.setdefault(old_layer, {})[self._pair_key] = (
                    self._edited, self._checked, self._excluded)
        elif old_layer is not None and (self._edited or self._checked or self._excluded):
            # painted while no image was picked (its layer removed to be opened again):
            # the slices of the image left, listed again when it is back (they were
            # dropped, and the next round overwrote the painting)
            lists = self._kept_lists.setdefault(old_layer, {})
            before = lists.get(self._image_left_key, (set(), set(), set()))
            lists[self._image_left_key] = tuple(
                a | b for a, b in zip(before, (self._edited, self._checked, self._excluded)))
        if image is None and old_image is not None:
            # the scan whose slices the edits made while no image is picked belong to
            self._image_left_key = self._pair_key
        kept, taken_over = None, None
        if image is not None and layer is not None:
            mine = self._kept_lists.get(layer, {})
            left = _LISTS_LEFT.get(layer, {})  # a closed widget's, on this layer
            # and those made before any image was picked: the first one's
            found = [k for k in (mine.pop(key, None), mine.pop(None, None),
                                 left.pop(key, None), left.pop(None, None)) if k is not None]
            kept = tuple(set().union(*parts) for parts in zip(*found)) if found else None
            if kept is None:  # a copy napari made of a layer with lists (see LISTED_KEY)
                kept = recorded_lists(layer, key)
            taken_over = _FOLDERS_LEFT.get(layer, {}).pop(key, None)
        self._edited, self._checked, self._excluded = kept or (set(), set(), set())
        self._pair, self._pair_key = (image, layer), key
        self._pair_shape = () if image is None else tuple(image.data.shape)
        # only the same scan opened again gets them: another image picked meanwhile
        # (another patient's) would list their slice numbers as its own; edits made before
        # any image was picked go to the first one
        away = (self._imageless_edits.get(layer, {})
                if image is not None and layer is not None else {})
        pending = [*away.pop(key, []), *away.pop(None, [])]
        if pending:  # edits made while no image was picked: their slices on this image
            self._edited |= {z for w in pending if (z := self._drawn_point_slice(w)) is not None}
            self._schedule_autosave()
        self._review_notes = {}  # (the previous pair's slice numbers)
        self._rebuild_list()
        self._pair_changed()
        if taken_over is not None:  # the closed widget's autosave of these lists
            self._restored.add(taken_over)  # not offered: its lists are live here
            self.autosave_now(supersedes=taken_over)  # and deleted once saved here

    def _pair_changed(self) -> None:
        """Hook: the (image, layer) pair changed; per-pair results shown must go."""

    def _image_key(self, image: Any) -> str:
        """Lists are kept per annotation layer and per image *content*: an image layer
        removed and opened again is a new object, and its slices must stay protected
        (a re-prediction would otherwise overwrite them)."""
        return image_list_key(image, self._fingerprint(image))

    def _add_empty_layer(self) -> None:
        image = self._image.value
        try:
            check_image_layer(image)
        except MedsegInputError as exc:
            show_error(f"Retrain: {exc}")
            return
        self._layer_pick.value = self._empty_layer(image)

    def _current_class_names(self) -> dict[int, str]:
        if self._history is not None:
            return dict(enumerate(self._history.versions[self._history.current].card["classes"]))
        path = self._model.value
        if path is None:
            return {0: "background"}
        try:
            return dict(enumerate(read_card(path)["classes"]))
        except MedsegInputError as exc:  # a new or restored layer still opens, unnamed
            show_warning(f"Retrain: {exc}; the layer's structures are unnamed")
            return {0: "background"}

    # -- annotated slices --------------------------------------------------------------
    def _add_edited(self, zs: set[int]) -> None:
        if self._writing:
            return
        if zs - self._edited:
            self._edited |= zs
            self._rebuild_list()
        self._schedule_autosave()

    def slices_to_check(self, volume) -> list[int]:
        """The ticked slices the round will train on: those of ``volume`` found missing
        are left out (the round says so), unless every one is (the check then says why)."""
        slices = self.training_slices()
        missing = np.asarray(getattr(volume, "missing", ()), dtype=bool)
        kept = [z for z in slices if not (0 <= z < len(missing) and missing[z])]
        return kept or slices

    def annotated_slices(self) -> list[int]:
        """Every listed slice (edited or checked): never overwritten by a re-prediction."""
        return sorted(self._edited | self._checked)

    def annotated_slices_of(self, image: Any, layer: Any) -> list[int]:
        """The listed slices of that (image, layer) pair, picked now or earlier."""
        if image is self._pair[0] and layer is self._pair[1]:
            return self.annotated_slices()
        kept = (self._kept_lists.get(layer, {}).get(self._image_key(image))
                if image is not None and layer is not None else None)
        return sorted(kept[0] | kept[1]) if kept else []

    def listed_on_layer(self, layer: Any) -> set[int]:
        """Every slice listed for ``layer`` with any image, the pair picked now included:
        no re-prediction into the layer may write them (a scan picked after another of
        the same shape had no list, and its prediction went over the first one's
        corrections)."""
        if layer is None:
            return set()
        listed = set(self.annotated_slices()) if layer is self._pair[1] else set()
        for edited, checked, *_ in self._kept_lists.get(layer, {}).values():
            listed |= set(edited) | set(checked)
        return listed

    def training_slices(self) -> list[int]:
        return [z for z in self.annotated_slices() if z not in self._excluded]

    def _rebuild_list(self) -> None:
        self._record_lists()
        self._slice_list.blockSignals(True)
        self._slice_list.clear()
        numbers = instance_numbers(self._image.value)
        for z in self.annotated_slices():
            item = QListWidgetItem(self._item_text(z, numbers))
            item.setData(Qt.ItemDataRole.UserRole, z)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if z in self._excluded else Qt.CheckState.Checked)
            self._slice_list.addItem(item)
        self._slice_list.blockSignals(False)

    def _item_text(self, z: int, numbers: list | None = None) -> str:
        """``numbers``: the picked image's InstanceNumbers (:func:`instance_numbers`),
        when known already."""
        kind = " + ".join(k for k, s in ((self.edited_word, self._edited),
                                         (self.checked_word, self._checked)) if z in s)
        if numbers is None:
            numbers = instance_numbers(self._image.value)
        note = self._slice_note(z)
        return (f"slice {z} · {kind}{image_number_note(numbers, z)}"
                + (f" · {note}" if note else ""))

    def _slice_note(self, z: int) -> str:
        """Why a listed slice is as it is: unticked by the widget, for review."""
        return self._review_notes.get(z, "") if z in self._excluded else ""

    def _untick_for_review(self, zs: set[int], note: str) -> None:
        """Untick ``zs`` (a round would take every voxel, or every point, there as the
        user's) with ``note`` in the list until the user ticks each again."""
        self._excluded |= zs
        self._review_notes.update(dict.fromkeys(zs, note))

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        z = int(item.data(Qt.ItemDataRole.UserRole))
        if item.checkState() == Qt.CheckState.Checked:
            self._excluded.discard(z)
            # reviewed: why the widget unticked it no longer holds (unticked again by the
            # user, the note came back)
            self._review_notes.pop(z, None)
        else:
            self._excluded.add(z)
        text = self._item_text(z)
        if item.text() != text:  # its note may no longer hold
            self._slice_list.blockSignals(True)
            item.setText(text)
            self._slice_list.blockSignals(False)
        self._schedule_autosave()

    def _image_slice(self, world_z: float) -> int | None:
        """The picked image's slice at ``world_z``, in the viewer's units."""
        image = self._image.value
        if image is None:
            return None
        if image.ndim == 2:
            return 0
        world_z = world_z / to_viewer_units(self._viewer, image)[-3]
        z = image.world_to_data([world_z, 0, 0])[0]
        if not np.isfinite(z):  # a point with a NaN coordinate lies on no slice
            return None
        z = int(round(z))
        return z if 0 <= z < image.data.shape[0] else None

    def _drawn_point_slice(self, world: Any) -> int | None:
        """The picked image's slice holding the point napari draws at ``world`` (viewer
        units, its trailing axes the image's): the point's whole position mapped into the
        image's voxels, as training reads it. On a sheared or rotated image its world z
        alone named another slice than the one its lesion is trained on, or none."""
        image = self._image.value
        world = np.asarray(world, dtype=float).reshape(-1)
        if image is None or not np.isfinite(world).all():
            return None
        if image.ndim == 2:
            return 0
        if len(world) < image.ndim:  # a 2D points layer over a 3D image: its world z is 0
            return self._image_slice(0.0)
        voxel = np.linalg.solve(drawn_matrix(self._viewer, image),
                                [*world[-image.ndim:], 1.0])
        z = int(round(float(voxel[image.ndim - 3])))
        return z if 0 <= z < image.data.shape[image.ndim - 3] else None

    def _mark_current(self) -> None:
        image = self._image.value
        if image is not None and slice_axis_shown(self._viewer, image):
            # the slider then moves along y or x: its position names no slice on screen
            # (it marked the last axial slice shown, never reviewed)
            show_error("Retrain: the image's slices run across the view "
                       "(axes reordered); show axial planes to mark one")
            return
        if image is not None and image.ndim >= 3 and self._viewer.dims.ndisplay == 3:
            # no slider shows which slice the dims point names: one never looked at
            show_error("Retrain: a 3D view shows no single slice; switch to the 2D view "
                       "to mark the slice you reviewed")
            return
        z = self._current_image_slice()
        if z is None:
            show_error("Retrain: the current slice is outside the image")
            return
        self._checked.add(z)
        self._on_checked(z)
        self._rebuild_list()
        self._schedule_autosave()

    # -- keyboard (_keys.SHORTCUTS) -------------------------------------------------------
    def answers_keys_of(self, viewer) -> bool:
        """Whether the shortcuts on ``viewer`` may reach this widget (open, on it)."""
        return not self._shut and self._viewer is viewer

    def _current_image_slice(self) -> int | None:
        return self._image_slice(self._viewer.dims.point[-3] if self._viewer.dims.ndim >= 3
                                 else 0.0)

    def _go_to_listed(self, step: int) -> None:
        listed = self.annotated_slices()
        if not listed:
            show_info("Retrain: no slice is listed yet")
            return
        here = self._current_image_slice()
        if here is None:
            target = listed[0] if step > 0 else listed[-1]
        else:
            after = [z for z in listed if (z > here if step > 0 else z < here)]
            if not after:
                show_info(f"Retrain: no listed slice {'after' if step > 0 else 'before'} "
                          f"slice {here}")
                return
            target = after[0] if step > 0 else after[-1]
        self._go_to(target)

    def _go_to_next_listed(self) -> None:
        self._go_to_listed(+1)

    def _go_to_previous_listed(self) -> None:
        self._go_to_listed(-1)

    def _retrain_by_key(self) -> None:
        if self._worker is not None:
            show_info("Retrain: a round is running already")
            return
        self._run.changed.emit(True)

    def _on_checked(self, z: int) -> None:
        """Hook: slice ``z`` was just marked correct."""

    def _unlist(self, zs: set[int]) -> None:
        """Hook: take ``zs`` off the lists (slices whose only strokes were undone)."""

    def _list_away(self, zs: set[int], across: set[int]) -> None:
        """Hook: list the slices of strokes made while the layer was not tracked."""
        self._stroke_slices |= zs - self._edited
        self._add_edited(zs)

    def _remove_selected(self) -> None:
        for item in self._slice_list.selectedItems():
            z = int(item.data(Qt.ItemDataRole.UserRole))
            self._edited.discard(z)
            self._checked.discard(z)
            self._excluded.discard(z)
        self._rebuild_list()
        self._schedule_autosave()

    def _go_to(self, z: int) -> None:
        go_to_slice(self._viewer, self._image.value, z)

    # -- model versions ----------------------------------------------------------------
    def _switch_history(self, path: str | None) -> None:
        """Another model picked: its own versions (kept from an earlier visit) or none yet.
        The versions trained so far are kept, never dropped, for when it is picked again."""
        if self._history is not None:
            # v0 alone too: a round started from it may still be running, and its version
            # joins this history when it ends (dropped, the round's result was discarded)
            self._kept_histories[self._history_model] = self._history
            last = len(self._history.versions) - 1
            if last:
                show_info(f"Retrain: model changed; versions v1–v{last} of the previous model"
                          " are kept: pick it again to see them")
        self._history = self._kept_histories.pop(path, None)
        self._history_model = None if self._history is None else path
        self._refresh_versions()

    def _version_choices(self, _widget=None) -> list:
        history = self._history
        return [] if history is None else [(_version_label(v), v.number) for v in history.versions]

    native = ScrollableDock.native  # the dock needed the controls' 920 px otherwise

    def _refresh_versions(self) -> None:
        with self._versions.changed.blocked():
            self._versions.reset_choices()
            if self._history is not None:
                self._versions.value = self._history.current
        self._enable_version_buttons()
        self._show_version_tooltip()

    def _show_version_tooltip(self, _value=None) -> None:
        """The picked version's whole entry: a narrow dock cuts it short."""
        self._versions.tooltip = self._versions.native.currentText() or None

    def _enable_version_buttons(self) -> None:
        """Use and Save act on a listed version: off while the list is empty (they only
        said "no versions yet"); re-predicting takes the picked model then (v0)."""
        listed = self._history is not None and bool(self._history.versions)
        running = self._worker is not None
        for widget in (self._revert, self._save, self._save_name):
            widget.enabled = listed and not running
        # why they are off, or what they do (disabled buttons explained nothing)
        why = ("off until a round or a re-prediction lists v0" if not listed else
               "off while a round runs" if running else "")
        self._revert.tooltip = ("The picked version becomes the one the next round starts "
                                "from" + (f" ({why})" if why else ""))
        self._save.tooltip = ("Write the picked version as safetensors + card into your "
                              "model folder" + (f" ({why})" if why else ""))
        self._save_name.tooltip = ("The saved model's name (empty: <model>-ft-<date>-<time>-vN)"
                                   + (f" ({why})" if why else ""))
        self._predict.tooltip = ("Write the picked version's prediction into the unlisted "
                                 "slices (one undo step)" if listed else
                                 "No round yet: predicts with the picked model (v0)")

    def _on_revert(self) -> None:
        if self._history is None or self._versions.value is None:
            show_error("Retrain: no versions yet")
            return
        v = self._history.revert(self._versions.value)
        self._refresh_versions()
        self._status.value = f"Using v{v.number}; '{self._predict.text}' applies it."

    def _on_save(self) -> None:
        if self._history is None or self._versions.value is None:
            show_error("Retrain: no versions yet")
            return
        name = self._save_name.value.strip()
        number = int(self._versions.value)
        if not name:
            base = str(self._history.versions[0].card.get("name", "model"))
            name = f"{base}-ft-{time.strftime('%Y%m%d-%H%M%S')}-v{number}"
        try:
            if (user_models_dir() / f"{name}.json").exists() or (BUNDLED_DIR / f"{name}.json").exists():
                # a bundled name too: found first by name, it would stand in for the bundled
                # model in every script and list that names it
                show_error(f"Retrain: a model named '{name}' exists; choose another name")
                return
            path = self._history.save(number, name)
        except (MedsegInputError, OSError) as exc:  # e.g. a name too long for the file system
            show_error(f"Retrain: saving failed: {exc}")
            return
        self._status.value = f"Saved v{number} as '{name}' ({path})"
        refresh_model_pickers()
        r = self._history.versions[number].report
        if _did_worse(r):
            show_warning(f"Retrain: saved v{number} as '{name}'; it did worse on its held-out "
                         f"slice {r.holdout_slice} (Dice {r.holdout_dice_before:.2f} → "
                         f"{r.holdout_dice_after:.2f}) than the version it started from")
        else:
            show_info(f"Saved model '{name}'; it is listed in every model widget")

    # -- running -----------------------------------------------------------------------
    def _inputs(self, need_annotations: bool, writes: bool = True):
        """Copies of the image and annotations and the training slices, checked in the
        GUI thread so bad input gets its message before any worker starts, as far as
        that needs no pass over every voxel; the model is loaded in the worker (reading
        and hashing weights would stall the GUI)."""
        image, layer = self._image.value, self._layer_pick.value
        # the image's Volume is made in the worker (:func:`volume_from_layer`); the checks
        # here see its outline, and the core checks again on the data
        volume = volume_from_layer(image, defer=True)
        if not need_annotations and not self.writes_into_layer:
            # a prediction into a new layer needs only the image: the picked layer (none,
            # or one of another dimension) refused "Re-detect" for nothing
            annotation = None
        elif layer is None:
            raise MedsegInputError(f"no {self.layer_kind} layer picked")
        else:
            source = self._made_on_another(layer, image)
            if source is not None:
                # the Image picker moved to another scan of the same shape, the layer
                # stayed: that scan's prediction was written over this one's corrections
                raise MedsegInputError(
                    f"'{layer.name}' was made on '{source.name}', not on '{image.name}': "
                    f"pick a {self.layer_kind} layer of this image (or the image it was "
                    "made on)")
            if writes and self.writes_into_layer and not getattr(layer, "multiscale", False):
                check_writable(layer)  # said before the round, not by a traceback after it
            annotation = self._snapshot(layer, image, volume_outline(image), need_annotations)
        path = self._model.value
        if path is None:
            raise MedsegInputError(f"no {self.architecture} model found; reinstall the bundled weights")
        if self._history_model != path:
            self._switch_history(path)
        source = (self._history, self._history.current) if self._history is not None else path
        return image, layer, volume, annotation, source

    def _inputs_for_a_button(self, need_annotations: bool, writes: bool = True):
        """:meth:`_inputs` for a button's job: None when a job runs already (a scripted
        double click) or the input is refused (said in a notification)."""
        if self._worker is not None:
            return None
        if need_annotations and self.annotated_slices() and not self.training_slices():
            # "no annotated slices: correct or mark one" read wrong beside a full list
            show_error("Retrain: every listed slice is unticked; tick at least one to "
                       "train on")
            return None
        try:
            return self._inputs(need_annotations, writes)
        except MedsegInputError as exc:
            show_error(f"Retrain: {exc}")
            # and on the status line: the toast was cut off and went, the line kept
            # saying "Correct the Labels layer, then Retrain"
            set_status(self._status, f"Retrain refused: {exc}")
            return None

    def _on_retrain(self) -> None:
        inputs = self._inputs_for_a_button(True)
        if inputs is None:
            return
        image, layer, volume, annotation, source = inputs
        slices = self.training_slices()
        names = self._layer_class_names(layer)
        if names and isinstance(annotation, np.ndarray):
            classes = self._current_class_names()
            wrong = label_name_conflicts(names, [classes[i] for i in range(len(classes))],
                                         annotation, slices)
            if wrong:  # the CLI refused this; a round trained it silently (liver as spleen)
                said = "; ".join(f"{v} is '{mine}' in the layer, '{theirs}' in the model"
                                 for v, mine, theirs in wrong[:4])
                message = (f"'{layer.name}' numbers its structures otherwise than the model "
                           f"({said}): pick the model the layer was made with, or paint "
                           "with the model's numbers")
                show_error(f"Retrain: {message}")
                set_status(self._status, f"Retrain refused: {message}")
                return
        planes = generated_planes(image)
        made = sorted(set(slices) & set(planes["indices"])) if planes and planes["axis"] == "z" else []
        if made:  # said, not refused (as by the CLI): the user may mean it
            show_warning(f"Retrain: {counted(len(made), 'ticked slice')} ({slice_ranges(made)}) "
                         f"{'was' if len(made) == 1 else 'were'} generated (synthetic), not "
                         "acquired: the model learns from the generator's image there")
        names = self._layer_class_names(layer)
        version = 1 if self._history is None else self._history.next_number
        # what the round trains on, for its report (points; a label volume is not kept)
        self._round_annotation = None if self.writes_into_layer else annotation
        self._curve.clear()
        self._round_progress.value = 0
        self._round_progress.visible = True
        self._round_started = time.monotonic()
        self._round_budget = max(float(self._seconds.value), 1e-3)
        # no napari progress bar for a round: while one exists napari animates an "in
        # progress" image, which cost a time-budgeted round half its training steps under
        # software OpenGL (_jobs.start_job); the bar above and the loss curve show it
        self._start(
            self._retrain_job, volume, annotation, slices, source, float(self._seconds.value),
            version, names, self._output_for(image, source), self._write_target(image, layer),
            description=f"Retrain v{version} on {counted(len(slices), 'slice')}",
            on_result=lambda out, seen=self._placement(image, layer), mark=self._round_mark(
                layer): self._on_retrained(out, image, layer, source, seen, mark),
            activity=False,
        )

    def _on_predict(self) -> None:
        inputs = self._inputs_for_a_button(False)
        if inputs is None:  # refused: the version in use stays the one in use
            return
        image, layer, volume, _annotation, source = inputs
        # the version picked in the list, as Save takes it (it predicted with the version
        # in use, whatever the list showed): picking and predicting makes it the one in
        # use, once its prediction came (an input the worker refuses changes nothing)
        if self._history is not None and self._versions.value is not None:
            source = (self._history, int(self._versions.value))
        number = source[1] if isinstance(source, tuple) else 0
        self._start(self._predict_job, volume, source, self._write_target(image, layer),
                    description=f"{self.task.capitalize()} with v{number}",
                    on_result=lambda out, seen=self._placement(image, layer), mark=self._round_mark(
                        layer): self._on_predicted(out, image, layer, source, seen, mark))

    @staticmethod
    def _layer_class_names(layer) -> dict[int, str]:
        try:
            features = layer.features
            return {int(i): str(n) for i, n in zip(features["index"], features["name"])}
        except (KeyError, TypeError, ValueError):
            return {}

    @staticmethod
    def _model_from(source):
        """(model, card) of a history version, or loaded from a card path (first round)."""
        if isinstance(source, tuple):
            history, number = source
            return history.model(number)
        return load_model(source)

    def _retrain_job(self, volume, annotation, slices, source, seconds, version, names,
                     output=None, into=None):
        volume = yield from read_deferred(volume)
        # a listed slice found missing (no finite voxel) is left out, as a point off the
        # image is: it blocked every round until the user found it and unticked it. All
        # of them missing: the core says so.
        left_out = [z for z in slices if 0 <= z < volume.shape[0] and volume.missing[z]]
        if left_out and len(left_out) < len(slices):
            slices = [z for z in slices if z not in left_out]
        else:
            left_out = []
        model, card = self._model_from(source)
        digest = _content_digest(volume) if self.reuses_output else None
        if output is not None and output[0] != digest:
            output = None  # made on other voxels (replaced, edited in place), gaps or spacing
        result = yield from self._finetune(volume, model, card, annotation, slices, seconds,
                                           version, names, None if output is None else output[1])
        prediction = yield from self._predict_volume(volume, result.model, result.card)
        plan = self._write_plan(prediction, volume, into)
        return result, prediction, (model, card), volume, digest, left_out, plan

    def _predict_job(self, volume, source, into=None):
        volume = yield from read_deferred(volume)
        model, card = self._model_from(source)
        prediction = yield from self._predict_volume(volume, model, card)
        digest = _content_digest(volume) if self.reuses_output else None
        return prediction, (model, card), volume, digest, self._write_plan(prediction, volume, into)

    def _adopt(self, source, base) -> bool:
        """Start the history from the model a first round loaded; False if stale."""
        if isinstance(source, tuple):
            return self._history is source[0]
        if self._model.value != source or self._history is not None:
            return False
        self._history = VersionHistory.start(*base)
        self._history_model = source
        self._refresh_versions()  # v0 listed at once (after a first re-predict it was not)
        return True

    def _start(self, job, *args, description: str, on_result, activity: bool = True) -> None:
        self._result_shown = False
        self._set_running(True)
        self._status.value = f"{description}…"
        self._worker = _jobs.start_job(
            job, *args, description=description, on_result=self._unless_closed(on_result),
            on_finished=lambda: self._set_running(False),
            on_progress=self._unless_closed(self._on_progress),
            on_error=lambda message, refused: set_status(
                self._status, _jobs.said_of(description, message, refused)),
            activity=activity, viewer=self._viewer)

    def _unless_closed(self, callback):
        """``callback``, skipped once the viewer holding this widget is closed (its Qt
        objects are deleted; a round finishing then has nowhere to go)."""
        def guarded(*args):
            return None if widget_closed(self._status) else callback(*args)
        return guarded

    def _on_progress(self, report) -> None:
        # bar, curve and status line redrawn at most every REDRAW_S: each redraw of a dock
        # widget re-composites napari's canvas (costly under software OpenGL)
        now = time.monotonic()
        redraw = now - self._drawn_at >= REDRAW_S or report.step >= report.total
        if redraw:
            self._drawn_at = now
        if redraw and not self._round_progress.native.isHidden():
            # the round's time against its budget: one bar from 0 to the end, whatever
            # phase reports (each counts its own steps); 99 % while it re-predicts
            elapsed = now - self._round_started
            self._round_progress.value = int(min(99.0, 100.0 * elapsed / self._round_budget))
        partial = report.partial
        if isinstance(partial, dict) and "loss" in partial:
            self._curve.add(float(partial["loss"]), redraw=redraw)
        if redraw and report.message and self._worker is not None and not self._result_shown:
            self._status.value = report.message  # a late report must not hide the result

    def _on_retrained(self, out, image, layer, source, seen=None, mark=None) -> None:
        result, prediction, base, volume, digest, left_out, plan = out
        if left_out:
            show_warning(f"Retrain: listed slice{'s' if len(left_out) > 1 else ''} "
                         f"{slice_ranges(left_out)} {'are' if len(left_out) > 1 else 'is'} "
                         "missing from the image (not acquired): left out of the round "
                         "(untick or remove it from the list)")
        if not self._adopt(source, base):  # the model was switched meanwhile
            kept = self._keep_for_its_model(source, base, result)
            show_warning("Retrain: the model was changed during the round; "
                         + (f"v{kept.number} was kept with the model it started from (pick that"
                            " model again to use it); the layer was not changed"
                            if kept is not None else "result discarded"))
            return
        started_from = self._history.current
        v, applied = _added(self._history, result)
        self._refresh_versions()
        r = result.report
        msg = (f"v{v.number}: {counted(r.steps, 'step')} in {r.seconds:.1f} s on slices "
               f"{slice_ranges(r.slices)}")
        if r.holdout_dice_after is not None:
            msg += (f"; held-out slice {r.holdout_slice}: Dice {r.holdout_dice_before:.2f} → "
                    f"{r.holdout_dice_after:.2f}")
        if r.new_classes:
            msg += f"; learned new: {', '.join(r.new_classes)}"
            advice = new_structure_advice(r)
            if advice:
                msg += f" ({advice})"
        if not applied:  # the kept output of the version in use stays for its next round
            said = (f"v{v.number} did worse on the held-out slice than v{started_from}: "
                    f"listed, not applied; the layer is unchanged and v{started_from} stays "
                    f"in use (a longer round usually helps; pick v{v.number} and "
                    f"'{self._predict.text}' to apply it anyway)")
            show_warning(f"Retrain: {said}")
            set_status(self._status, f"{msg}\n{said}")
            self._result_shown = True
            return
        self._remember_output(image, v.number, prediction, digest)
        # the round's slices and annotations, not the lists and layer as they are now
        # (edited meanwhile): its report must describe what it trained on
        self._round_basis = (list(r.slices), getattr(self, "_round_annotation", None))
        try:
            self._apply_checked(prediction, image, layer, volume, v.number, result.card, msg,
                                seen, plan, mark)
        finally:
            self._round_basis = self._round_annotation = None

    def _keep_for_its_model(self, source, base, result):
        """A round that finished after another model was picked: its version joins the
        kept versions of the model it started from (a new history on a first round), in
        use there only if a round that finished in place would have been applied."""
        if isinstance(source, tuple):
            history = source[0]
            if not any(h is history for h in self._kept_histories.values()):
                return None
        else:
            history = self._kept_histories.setdefault(source, VersionHistory.start(*base))
        return _added(history, result)[0]

    def _on_predicted(self, out, image, layer, source, seen=None, mark=None) -> None:
        prediction, base, volume, digest, plan = out
        if not self._adopt(source, base):
            show_warning("Retrain: the model was changed meanwhile; prediction discarded")
            return
        number = source[1] if isinstance(source, tuple) else self._history.current
        if number != self._history.current:
            self._history.revert(number)
            self._refresh_versions()
        self._remember_output(image, number, prediction, digest)
        self._apply_checked(prediction, image, layer, volume, number,
                            self._history.versions[number].card, seen=seen, plan=plan, mark=mark)

    def _remember_output(self, image, number: int, prediction, digest: str | None) -> None:
        """Keep what version ``number`` predicted on ``image`` (the volume of content
        ``digest`` the job read): a next round from that version on that image starts
        from it instead of a pass over the whole volume (the longest wait of a round on a
        long series, after training). The next round's worker compares the digest with
        the volume it reads: whatever changed meanwhile (data replaced or edited in
        place, gaps, spacing), a prediction of other voxels is never used."""
        output = self._reusable_output(prediction)
        self._model_output = None if output is None or digest is None else (
            self._history, number, weakref.ref(image), digest, output)

    def _output_for(self, image, source):
        """(digest, output) kept by :meth:`_remember_output` for the version ``source``
        names on the layer ``image``; None when there is none."""
        kept = self._model_output
        if kept is None or not isinstance(source, tuple):
            return None
        history, number, layer, digest, output = kept
        same = history is source[0] and number == source[1] and layer() is image
        return (digest, output) if same else None

    def _placement(self, image, layer) -> tuple:
        """What a prediction's place depends on: the image's data object, shape and world
        transform, and the same for the layer it is written into (painting changes a
        Labels layer's data in place, which is allowed; a replaced array is not)."""
        return tuple(_geometry(x) for x in [image] + ([layer] if self.writes_into_layer else []))

    def _apply_checked(self, prediction, image, layer, volume, number, card, prefix="",
                       seen=None, plan=None, mark=None) -> None:
        if self._shut:  # closed while the write waited for a stroke to end: closing said
            # its unsaved versions were let go, and then one wrote into the layer
            show_warning("Retrain was closed; its prediction was not written")
            return
        gone = image not in self._viewer.layers or (self.writes_into_layer
                                                    and layer not in self._viewer.layers)
        if gone:
            show_warning("Retrain: a layer was removed meanwhile; the prediction was not written")
            set_status(self._status, (f"{prefix}\n" if prefix else "")
                       + "A layer was removed meanwhile; prediction not written")
            self._result_shown = True
            return
        now = self._placement(image, layer)
        if seen is not None and not all(_same_geometry(a, b) for a, b in zip(seen, now)):
            show_warning("Retrain: the image or labels layer changed meanwhile (new data, shape "
                         "or position); the prediction was not written: re-predict")
            set_status(self._status, (f"{prefix}\n" if prefix else "")
                       + "A layer changed meanwhile; prediction not written")
            self._result_shown = True
            return
        if self.writes_into_layer and getattr(layer, "_block_history", False):
            # the user is mid-stroke (napari stages a drag as one undo step): writing now
            # would land inside their stroke; write once they let go
            QTimer.singleShot(50, lambda: self._apply_checked(prediction, image, layer, volume,
                                                             number, card, prefix, seen, plan,
                                                             mark))
            return
        self._apply(prediction, image, layer, volume, number, card, prefix, plan, mark)
        self._result_shown = True
        self._schedule_autosave()

    def _on_cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._status.value = "Cancelled: the model versions are unchanged"

    def _set_running(self, running: bool) -> None:
        # the pickers too: the listed (protected) slices belong to the picked pair, and a
        # round's re-prediction must be checked against the pair it was started on
        for button in (self._run, self._predict, self._revert, self._save, self._image,
                       self._layer_pick, self._new_layer,
                       *([self._suggest] if hasattr(self, "_suggest") else [])):
            try:
                button.enabled = not running
            except RuntimeError:  # the viewer was closed mid-run: its Qt widgets are gone
                break
        else:
            self._cancel.enabled = running
        if not running:
            self._worker = None
            try:
                self._enable_version_buttons()
            except RuntimeError:  # the viewer was closed mid-run
                pass
            try:
                self._round_progress.visible = False
            except RuntimeError:  # the viewer was closed mid-run
                pass

    # -- autosave ----------------------------------------------------------------------
    def _key_folder(self, image: Any = None) -> Path | None:
        image = self._image.value if image is None else image
        if image is None:
            return None
        return sessions_dir() / session_key(image.name, image.data.shape)

    def _record_lists(self) -> None:
        """The pair's lists into its layer's metadata too (see LISTED_KEY)."""
        image, layer = self._pair
        if image is not None and layer is not None and not self._shut:
            record_lists(layer, self._pair_key, (self._edited, self._checked, self._excluded))

    def _schedule_autosave(self) -> None:
        self._record_lists()
        # a pending save is not pushed back: restarting the timer on every change saved
        # nothing for as long as the user kept painting (a crash then lost it all)
        if not self._autosave_timer.isActive():
            self._autosave_timer.start(AUTOSAVE_DELAY_MS)
            watch = getattr(self, "_dock_watch", None)  # None while __init__ runs
            if watch is not None:
                watch.watch_window()  # its close must write what is pending

    def autosave_now(self, wait: bool = False, image: Any = None, layer: Any = None,
                     image_key: str | None = None, supersedes: Path | None = None) -> None:
        """Copy the annotations and lists now (GUI thread), write them in the background.
        ``image`` and ``layer``: the pair the current lists belong to (default: the picked
        ones; :meth:`_switch_pair` passes the pair being left, and ``image_key`` when the
        image's data were replaced: the lists belong to the content it held).
        ``supersedes``: the autosave folder just restored into this pair, deleted once a
        save of this pair succeeds (its content is then in this widget's own folder)."""
        image = self._image.value if image is None else image
        layer = self._layer_pick.value if layer is None else layer
        folder = self._key_folder(image)
        if folder is None or layer is None:
            return
        if (image_key is not None and image_key != self._image_key(image)
                and (image_key.startswith("layer-")
                     or self._pair_shape != tuple(image.data.shape))):
            # edits of the last moments on content now gone that no record could place
            # (never fingerprinted, or its shape unknown now): they stay in the layer
            return
        try:
            session = self._session(layer, image)
        except MedsegInputError as exc:  # listed strokes with no autosave must be said
            self._autosave_failed(exc.reason, str(folder))
            return
        if image_key is not None:
            session.image_fingerprint = "" if image_key.startswith("layer-") else image_key
        else:
            image_key = self._image_key(image)
        session.edited, session.checked = sorted(self._edited), sorted(self._checked)
        session.excluded = sorted(self._excluded)
        target = folder / self._session_folder_name(layer, image_key)
        self._autosave_targets.setdefault(layer, {})[image_key] = target
        if target in self._let_go and layer in self._viewer.layers:
            with self._save_lock:  # its layer is back: locked again once written
                self._let_go.discard(target)
        if supersedes is not None and supersedes != target:
            with self._save_lock:
                self._superseded[target] = supersedes
        self._snapshots_taken += 1
        with self._pending_lock:
            # a snapshot of this folder not yet written is replaced by this newer one
            self._pending[target] = (self._snapshots_taken, session, folder)
            start = not self._writing_snapshots
            self._writing_snapshots = True
        if start:
            # not a daemon: the interpreter waits for a write under way rather than cut it off
            self._save_thread = threading.Thread(target=self._write_pending,
                                                 name="medseg-autosave")
            self._save_thread.start()
        if wait and self._save_thread is not None:
            self._save_thread.join()

    def _write_pending(self) -> None:
        """The writer thread: the pending snapshots, newest per folder, until none is left."""
        while True:
            with self._pending_lock:
                if not self._pending:
                    self._writing_snapshots = False
                    return
                target, (taken, session, folder) = self._pending.popitem()
            self._write_snapshot(target, taken, session, folder)

    def _write_snapshot(self, target: Path, taken: int, session: Any, folder: Path) -> None:
        with self._save_lock:
            # a snapshot older than the one this folder last got is stale: not written over it
            if taken < self._snapshot_written.get(target, 0):
                return
            try:
                save_session(target, session)
                self._snapshot_written[target] = taken
                if target not in self._let_go:
                    self._folder_locks.setdefault(target, SessionLock(target)).acquire()
                self._drop_superseded(target)
            except Exception as exc:  # a full disk, no memory: said, never silent
                log.warning("autosave failed: %s", exc)
                reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                          else short_reason(exc) if isinstance(exc, MedsegInputError)
                          else f"{type(exc).__name__}: {exc}".rstrip(": "))
                self._autosave_failed(reason, str(folder))
            else:
                self._autosave_ok()

    def _drop_superseded(self, target: Path) -> None:
        """Delete the autosave restored into ``target``'s pair, now that ``target`` holds
        it (called under the save lock). One reopened meanwhile in another window is kept."""
        source = self._superseded.pop(target, None)
        if source is None:
            return
        try:
            discard_session(source)
        except (OSError, MedsegInputError) as exc:  # kept: it is merely a second copy
            log.info("restored autosave %s kept: %s", source, exc)

    def _fingerprint(self, image: Any) -> str:
        """The image's fingerprint (core.session.image_fingerprint), computed once per
        data array: every autosave carries it."""
        kept = self._fingerprints.get(image)
        if kept is None or kept[0] is not image.data:
            try:
                fingerprint = image_fingerprint(image.data)
            except (TypeError, ValueError, IndexError, AttributeError):
                fingerprint = ""  # data this widget cannot use anyway (multiscale, RGB …)
            kept = self._fingerprints[image] = (image.data, fingerprint)
        return kept[1]

    @ensure_main_thread
    def _autosave_failed(self, reason: str, folder: str) -> None:
        """A failed autosave is said, on the GUI thread, once per new reason, and a line
        under the status keeps saying it until a save succeeds: the user must not believe
        their work is kept when it is not."""
        try:
            if reason != self._autosave_error:
                show_warning(f"Retrain: autosave FAILED ({reason}) in {folder}; your "
                             "annotations are not being saved")
            self._autosave_error = reason
            self._autosave_alert.value = f"⚠ Autosave failed ({reason}): annotations not saved"
            self._autosave_alert.visible = True
        except RuntimeError:  # the widget was closed meanwhile
            pass

    @ensure_main_thread
    def _autosave_ok(self) -> None:
        try:
            if self._autosave_error is not None:
                self._autosave_error = None
                self._autosave_alert.value = ""
                self._autosave_alert.visible = False
                show_info("Retrain: autosave works again")
        except RuntimeError:
            pass

    def _session_folder_name(self, layer: Any, image_key: str) -> str:
        """One autosave folder per annotation layer and image content: two layers on one
        image must not overwrite each other's autosave, nor one layer's lists on another
        scan loaded into the same image layer (the first keeps the plain session id)."""
        names = self._session_folders.setdefault(layer, {})
        name = names.get(image_key)
        if name is None:
            self._session_folder_count += 1
            n = self._session_folder_count
            name = names[image_key] = (self._session_id if n == 1
                                       else f"{self._session_id}-{n}")
        return name

    def _check_for_autosave(self, annotated_only: bool = False) -> None:
        """Offer the newest autosave of the picked image (``annotated_only``: only one
        that holds annotated slices, else none)."""
        self._pending_restore = None
        folder = self._key_folder()
        candidates = []
        if folder is not None:
            fingerprint = self._fingerprint(self._image.value)
            # the image's folder follows its layer name: autosaves made before a rename
            # lie in another folder of the same shape, and count when their voxels match
            shape = folder.name.rsplit("-", 1)[-1]
            try:
                folders = [folder, *(f for f in sorted(folder.parent.glob(f"*-{shape}"))
                                     if f != folder)] if fingerprint else [folder]
                listed = [(f, sorted(f.iterdir())) for f in folders if f.is_dir()]
            except OSError as exc:  # an unreadable sessions folder: said, not a traceback
                show_warning(f"Retrain: cannot look for autosaves in {folder.parent} "
                             f"({exc.strerror or exc}); none is offered")
                listed = []
            # a closed widget's autosaves whose lists stay with a layer still open: taken
            # over when that layer is picked, not offered for restoring into a copy
            left_by_closed = {f for layer, per in list(_FOLDERS_LEFT.items())
                              if layer in self._viewer.layers for f in per.values()}
            for key_folder, entries in listed:
                for p in entries:
                    # this widget's own autosaves (but those of a layer removed since: a
                    # deleted annotation layer came back only in another window), and those
                    # it restored (deleted once their content is saved again in its own)
                    if ((p.name.startswith(self._session_id) and p not in self._let_go)
                            or p in self._restored or p in self._undeletable):
                        continue
                    if p in left_by_closed:  # a layer's lists wait for this widget
                        continue
                    if session_in_use(p):  # another open window's live autosave
                        continue
                    try:
                        meta = read_meta(p)
                    except MedsegInputError as exc:
                        # a damaged record beside intact data of this image's name and
                        # shape must not vanish in silence: the labels may be in there
                        if (key_folder == folder and (p / "session.json").exists()
                                and p not in self._said_unreadable):
                            self._said_unreadable.add(p)
                            show_warning(f"Retrain: an autosave of '{self._image.value.name}'"
                                         f" cannot be read ({exc.reason}), so it is not "
                                         f"offered; its annotations file in {p} may still "
                                         "hold your work")
                        continue
                    # another scan of the same name and shape (another patient's "ct") is
                    # not this one; under another name only the same voxels count
                    seen = meta.get("image_fingerprint",
                                    fingerprint if key_folder == folder else None)
                    if meta.get("kind") == self.layer_kind.lower() and seen == fingerprint:
                        candidates.append((saved_epoch(p, meta), p, meta))
        candidates.sort(key=lambda c: c[0])  # the last written, not the last started
        # the newest that holds annotated slices: a later one without any (a Predict, then
        # quit) was offered instead, and the work behind it reachable only by Discard
        offered = next((c for c in reversed(candidates) if _annotated_count(c[2])),
                       candidates[-1] if candidates and not annotated_only else None)
        self._older_autosaves = [c[1] for c in candidates if c is not offered]
        self._offer(offered[1] if offered else None, offered[2] if offered else {})

    def _offer(self, newest: Path | None, meta: dict) -> None:
        """Show the restore box for autosave ``newest`` (None: hide it)."""
        if newest is None:
            self._pending_restore = None
            self._restore_box.visible = False
            return
        n = _annotated_count(meta)
        self._pending_restore = newest
        others = len(self._older_autosaves)
        self._restore_label.value = (
            f"Autosaved {self.layer_kind.lower()} from {meta.get('saved_at', newest.name)} "
            f"({n} slice{'' if n == 1 else 's'}). Restore them?"
            + (f" ({others} other autosave{'s' if others > 1 else ''} of this image kept in "
               f"{newest.parent.parent})" if others else ""))
        self._restore_box.visible = True
        if newest not in self._said_offers:  # the box may be scrolled out of a short dock
            self._said_offers.add(newest)
            image = self._image.value
            show_info(f"Retrain: annotations of '{getattr(image, 'name', 'this image')}' "
                      f"autosaved {meta.get('saved_at', '')} ({n} slice{'' if n == 1 else 's'})"
                      " can be restored: Restore in the Retrain dock")

    def _on_restore(self) -> None:
        folder, image = self._pending_restore, self._image.value
        if folder is None or image is None:
            return
        try:
            session = load_session(folder)
        except MedsegInputError as exc:
            # the damaged one stays on disk (the user may recover it by hand); the next
            # older autosave of this image is offered instead of nothing
            older = None
            while self._older_autosaves and older is None:
                candidate = self._older_autosaves.pop()
                try:
                    older = (candidate, read_meta(candidate))
                except MedsegInputError:
                    continue
            show_error(f"Retrain: cannot restore: {exc}"
                       + ("; the next older autosave is offered" if older else ""))
            self._offer(*(older or (None, {})))
            return
        if tuple(session.shape) != tuple(image.data.shape):
            show_error(f"Retrain: the autosave is {session.shape}, the image {tuple(image.data.shape)}")
            return
        if session.image_fingerprint and session.image_fingerprint != self._fingerprint(image):
            show_error(f"Retrain: that autosave was made on another image named '{image.name}'")
            return
        self._layer_pick.value = self._restored_layer(session, image)  # resets the lists …
        self._edited, self._checked = set(session.edited), set(session.checked)
        self._excluded = set(session.excluded)  # … which the autosave fills again
        self._rebuild_list()
        self._restore_box.visible = False
        self._pending_restore = None
        self._status.value = (f"Restored {counted(len(session.annotated), 'annotated slice')} "
                              f"from {session.saved_at}")
        self._restored.add(folder)
        self.autosave_now(supersedes=folder)
        # another layer's autosave of this image (each layer has its own): offered next,
        # or the restored one, saved again newer, would hide it on every later start
        self._check_for_autosave(annotated_only=True)

    def _on_discard(self) -> None:
        if self._pending_restore is not None:
            try:
                discard_session(self._pending_restore)
            except MedsegInputError as exc:  # opened meanwhile in another window: kept
                show_warning(f"Retrain: not discarded: {exc}")
            except OSError as exc:  # e.g. a sessions folder left by another user: read-only
                self._undeletable.add(self._pending_restore)
                show_warning(f"Retrain: the autosave in {self._pending_restore} could not be "
                             f"deleted ({exc.strerror or exc}); it is no longer offered in "
                             "this window")
        self._check_for_autosave()
