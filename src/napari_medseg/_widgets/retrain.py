"""Dock widget: correct slices, retrain the segmenter on them in seconds, re-predict the rest.

Workflow: pick the image, the Labels layer being corrected and the starting model. Every
paint / erase / fill stroke on the Labels layer adds its slices to the list of annotated
slices ("edited"); "Mark current slice correct" adds a slice as it is ("checked"). A
ticked slice is training data; an unticked one is left out of training but, like every
listed slice, is never overwritten. **Retrain** fine-tunes a copy of the current model
version on the ticked slices only (``core.finetune``), in a worker with a live loss
curve, progress and Cancel (the model versions are only touched when a round finishes,
so a cancel changes nothing); the new version then re-predicts every slice that is not
listed and not missing, written into the same Labels layer as ONE undo step.

Versions v0 (the starting model), v1, v2 … can be reverted to, re-predicted with, and
saved to the user models folder (listed by every widget and the CLI). The labels and the
slice lists are autosaved (in a background thread, crash-safe) to
``$NAPARI_MEDSEG_HOME/sessions/<image>-<shape>/<session>/``; opening the same image
later offers to restore the newest autosave of an earlier session.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import napari
from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, LineEdit, PushButton
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QListWidget, QListWidgetItem

from .. import _jobs
from .._layers import _labels_kwargs, _like_layer, volume_from_layer
from ..core.errors import MedsegInputError
from ..core.finetune import (
    DEFAULT_SECONDS,
    VersionHistory,
    check_annotations,
    finetune_segmenter,
    unannotated_updates,
)
from ..core.inference import segment_volume
from ..core.models.registry import load_model
from ..core.session import (
    AnnotationSession,
    discard_session,
    load_session,
    save_session,
    session_key,
    sessions_dir,
)
from ._loss_curve import LossCurve
from ._model_widget import model_choices

AUTOSAVE_DELAY_MS = 1500


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
            out.update(int(z) for z in np.unique(np.asarray(atom[0][0])))
    return out


class RetrainWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer):
        self._viewer = viewer
        self._worker = None
        self._history: VersionHistory | None = None
        self._history_model: str | None = None
        self._tracked = None  # the Labels layer whose paint events we follow
        self._writing = False  # our own writes are not user annotations
        self._edited: set[int] = set()
        self._checked: set[int] = set()
        self._excluded: set[int] = set()
        # sortable by time, unique across widgets and processes
        self._session_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._save_lock = threading.Lock()
        self._save_thread: threading.Thread | None = None
        self._pending_restore: Path | None = None
        self._result_shown = False

        self._image = ComboBox(label="Image", choices=self._layers_of("Image"), nullable=True)
        self._labels_pick = ComboBox(label="Labels", choices=self._layers_of("Labels"), nullable=True)
        self._new_labels = PushButton(text="New empty annotation layer on the image")
        self._model = ComboBox(label="Model", choices=lambda _w=None: model_choices("RecurrentSegmenter"))
        self._restore_label = Label(value="")
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
        self._mark = PushButton(text="Mark current slice correct")
        self._remove = PushButton(text="Remove selected slice")
        self._seconds = FloatSpinBox(label="Seconds", value=DEFAULT_SECONDS, min=2.0, max=600.0, step=5.0)
        self._run = PushButton(text="Retrain and re-predict")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._curve = LossCurve()
        curve_box = Container(labels=False)
        curve_box.native.layout().addWidget(self._curve)
        self._status = Label(value="Paint corrections on the Labels layer, then Retrain.")
        self._status.native.setWordWrap(True)
        self._versions = ComboBox(label="Version", choices=[])
        self._revert = PushButton(text="Use this version")
        self._predict = PushButton(text="Re-predict with it")
        self._save_name = LineEdit(label="Save as", value="")
        self._save = PushButton(text="Save version")
        super().__init__(widgets=[
            self._image, self._labels_pick, self._new_labels, self._model, self._restore_box,
            Label(value="Annotated slices"), list_box,
            Container(widgets=[self._mark, self._remove], layout="horizontal", labels=False),
            self._seconds,
            Container(widgets=[self._run, self._cancel], layout="horizontal", labels=False),
            curve_box, self._status, self._versions,
            Container(widgets=[self._revert, self._predict], layout="horizontal", labels=False),
            self._save_name, self._save,
        ])
        self._autosave_timer = QTimer()
        self._autosave_timer.setSingleShot(True)
        self._autosave_timer.timeout.connect(self.autosave_now)

        self._image.changed.connect(self._on_image_changed)
        self._labels_pick.changed.connect(self._track_labels)
        self._model.changed.connect(lambda _v: self._reset_history())
        self._new_labels.changed.connect(self._add_empty_labels)
        self._restore.changed.connect(self._on_restore)
        self._discard.changed.connect(self._on_discard)
        self._mark.changed.connect(self._mark_current)
        self._remove.changed.connect(self._remove_selected)
        self._slice_list.itemChanged.connect(self._on_item_changed)
        self._slice_list.itemDoubleClicked.connect(lambda item: self._go_to(item.data(Qt.ItemDataRole.UserRole)))
        self._run.changed.connect(self._on_retrain)
        self._cancel.changed.connect(self._on_cancel)
        self._revert.changed.connect(self._on_revert)
        self._predict.changed.connect(self._on_predict)
        self._save.changed.connect(self._on_save)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self._on_image_changed()
        self._track_labels()

    # -- layers --------------------------------------------------------------------------
    def _layers_of(self, kind: str):
        def choices(_widget=None):
            return [(layer.name, layer) for layer in self._viewer.layers
                    if type(layer).__name__ == kind]
        return choices

    def _refresh_layers(self, _event=None) -> None:
        for combo in (self._image, self._labels_pick):
            combo.reset_choices()
            if combo.value is None and combo.choices:
                combo.value = combo.choices[-1]

    def _on_image_changed(self, _value=None) -> None:
        self._check_for_autosave()

    def _track_labels(self, _value=None) -> None:
        layer = self._labels_pick.value
        if layer is self._tracked:
            return
        if self._tracked is not None:
            self._tracked.events.paint.disconnect(self._on_paint)
        self._tracked = layer
        self._edited.clear()
        self._checked.clear()
        self._excluded.clear()
        self._rebuild_list()
        if layer is not None:
            layer.events.paint.connect(self._on_paint)

    def _add_empty_labels(self) -> None:
        image = self._image.value
        if image is None:
            show_error("Retrain: pick an image first")
            return
        shape = tuple(image.data.shape)
        names = {int(v): n for v, n in self._current_class_names().items()}
        kwargs = {**_labels_kwargs(f"{image.name} annotations", names), **_like_layer(image)}
        layer = self._viewer.add_labels(np.zeros(shape, dtype=np.uint8), **kwargs)
        self._labels_pick.value = layer

    def _current_class_names(self) -> dict[int, str]:
        if self._history is not None:
            card = self._history.versions[self._history.current].card
            return dict(enumerate(card["classes"]))
        path = self._model.value
        if path is None:
            return {0: "background"}
        from ..core.models.registry import read_card

        return dict(enumerate(read_card(path)["classes"]))

    # -- annotated slices --------------------------------------------------------------
    def _on_paint(self, event) -> None:
        if self._writing:
            return
        layer = self._tracked
        zs = {0} if layer is not None and layer.ndim == 2 else painted_slices(event.value)
        if zs - self._edited:
            self._edited |= zs
            self._rebuild_list()
        self._schedule_autosave()

    def annotated_slices(self) -> list[int]:
        """Every listed slice (edited or checked): never overwritten by a re-prediction."""
        return sorted(self._edited | self._checked)

    def training_slices(self) -> list[int]:
        return [z for z in self.annotated_slices() if z not in self._excluded]

    def _rebuild_list(self) -> None:
        self._slice_list.blockSignals(True)
        self._slice_list.clear()
        for z in self.annotated_slices():
            kind = " + ".join(k for k, s in (("edited", self._edited), ("checked correct", self._checked))
                              if z in s)
            item = QListWidgetItem(f"slice {z} · {kind}")
            item.setData(Qt.ItemDataRole.UserRole, z)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Unchecked if z in self._excluded else Qt.CheckState.Checked)
            self._slice_list.addItem(item)
        self._slice_list.blockSignals(False)

    def _on_item_changed(self, item: QListWidgetItem) -> None:
        z = int(item.data(Qt.ItemDataRole.UserRole))
        if item.checkState() == Qt.CheckState.Checked:
            self._excluded.discard(z)
        else:
            self._excluded.add(z)
        self._schedule_autosave()

    def _current_slice(self) -> int | None:
        layer = self._labels_pick.value or self._image.value
        if layer is None:
            return None
        if layer.ndim == 2:
            return 0
        z = int(round(layer.world_to_data(self._viewer.dims.point[-layer.ndim:])[0]))
        return z if 0 <= z < layer.data.shape[0] else None

    def _mark_current(self) -> None:
        z = self._current_slice()
        if z is None:
            show_error("Retrain: the current slice is outside the labels layer")
            return
        self._checked.add(z)
        self._rebuild_list()
        self._schedule_autosave()

    def _remove_selected(self) -> None:
        for item in self._slice_list.selectedItems():
            z = int(item.data(Qt.ItemDataRole.UserRole))
            self._edited.discard(z)
            self._checked.discard(z)
            self._excluded.discard(z)
        self._rebuild_list()
        self._schedule_autosave()

    def _go_to(self, z: int) -> None:
        layer = self._labels_pick.value or self._image.value
        if layer is None or layer.ndim == 2:
            return
        world = layer.data_to_world([int(z), *([0] * (layer.ndim - 1))])
        self._viewer.dims.set_point(self._viewer.dims.ndim - layer.ndim, world[0])

    # -- model versions ----------------------------------------------------------------
    def _reset_history(self) -> None:
        if self._history is not None and len(self._history.versions) > 1:
            show_info("Retrain: model changed; the previous versions were dropped "
                      "(save a version first to keep it)")
        self._history = None
        self._history_model = None
        self._versions.choices = []

    def _refresh_versions(self) -> None:
        history = self._history
        with self._versions.changed.blocked():
            self._versions.choices = [] if history is None else [
                (v.describe(), v.number) for v in history.versions]
            if history is not None:
                self._versions.value = history.current

    def _on_revert(self) -> None:
        if self._history is None or self._versions.value is None:
            show_error("Retrain: no versions yet")
            return
        v = self._history.revert(self._versions.value)
        self._refresh_versions()
        self._status.value = f"Using v{v.number}; Re-predict to apply it to the unannotated slices."

    def _on_save(self) -> None:
        if self._history is None or self._versions.value is None:
            show_error("Retrain: no versions yet")
            return
        name = self._save_name.value.strip()
        number = int(self._versions.value)
        if not name:
            base = str(self._history.versions[0].card.get("name", "segmenter"))
            name = f"{base}-ft-{time.strftime('%Y%m%d-%H%M%S')}-v{number}"
        from ..core.models.registry import user_models_dir

        if (user_models_dir() / f"{name}.json").exists():
            show_error(f"Retrain: a model named '{name}' exists; choose another name")
            return
        try:
            path = self._history.save(number, name)
        except (MedsegInputError, OSError) as exc:
            show_error(f"Retrain: saving failed: {exc}")
            return
        self._status.value = f"Saved v{number} as '{name}' ({path})"
        show_info(f"Saved model '{name}'; it is listed in every model widget")

    # -- running -----------------------------------------------------------------------
    def _inputs(self, need_annotations: bool):
        """Copies of the image and labels and the training slices, checked in the GUI
        thread so bad input gets its message before any worker starts; the model is
        loaded in the worker (reading and hashing weights would stall the GUI)."""
        image, labels_layer = self._image.value, self._labels_pick.value
        volume = volume_from_layer(image)
        if labels_layer is None:
            raise MedsegInputError("no Labels layer picked; segment first or add an empty annotation layer")
        labels = np.array(labels_layer.data, copy=True)
        if labels.shape != tuple(image.data.shape):
            raise MedsegInputError(
                f"'{labels_layer.name}' has shape {labels.shape}, '{image.name}' {tuple(image.data.shape)}; "
                "pick the Labels layer drawn on this image")
        slices = self.training_slices()
        if need_annotations:
            check_annotations(volume, labels, slices)
        path = self._model.value
        if path is None:
            raise MedsegInputError("no segmenter model found; reinstall the bundled weights")
        if self._history_model != path:
            self._reset_history()
        source = (self._history, self._history.current) if self._history is not None else path
        return image, labels_layer, volume, labels, slices, source

    def _on_retrain(self) -> None:
        try:
            image, labels_layer, volume, labels, slices, source = self._inputs(True)
        except MedsegInputError as exc:
            show_error(f"Retrain: {exc}")
            return
        names = self._layer_class_names(labels_layer)
        version = 1 if self._history is None else self._history.next_number
        self._curve.clear()
        self._start(
            self._retrain_job, volume, labels, slices, source, float(self._seconds.value),
            version, names, description=f"Retrain v{version} on {len(slices)} slices",
            on_result=lambda out: self._on_retrained(out, image, labels_layer, volume, source),
        )

    def _on_predict(self) -> None:
        try:
            image, labels_layer, volume, _labels, _slices, source = self._inputs(False)
        except MedsegInputError as exc:
            show_error(f"Retrain: {exc}")
            return
        number = 0 if self._history is None else self._history.current
        self._start(self._predict_job, volume, source, description=f"Re-predict with v{number}",
                    on_result=lambda out: self._on_predicted(out, image, labels_layer, volume, source))

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

    @classmethod
    def _retrain_job(cls, volume, labels, slices, source, seconds, version, names):
        model, card = cls._model_from(source)
        result = yield from finetune_segmenter(volume, model, card, labels, slices, seconds=seconds,
                                               version=version, class_names=names)
        seg = yield from segment_volume(volume, result.model, result.card)
        return result, seg, (model, card)

    @classmethod
    def _predict_job(cls, volume, source):
        model, card = cls._model_from(source)
        seg = yield from segment_volume(volume, model, card)
        return seg, (model, card)

    def _adopt(self, source, base) -> bool:
        """Start the history from the model a first round loaded; False if stale."""
        if isinstance(source, tuple):
            return self._history is source[0]
        if self._model.value != source or self._history is not None:
            return False
        self._history = VersionHistory.start(*base)
        self._history_model = source
        return True

    def _start(self, job, *args, description: str, on_result) -> None:
        self._result_shown = False
        self._set_running(True)
        self._status.value = f"{description}…"
        self._worker = _jobs.start_job(
            job, *args, description=description, on_result=on_result,
            on_finished=lambda: self._set_running(False), on_progress=self._on_progress)

    def _on_progress(self, report) -> None:
        partial = report.partial
        if isinstance(partial, dict) and "loss" in partial:
            self._curve.add(float(partial["loss"]))
        if report.message and self._worker is not None and not self._result_shown:
            self._status.value = report.message  # a late report must not hide the result

    def _on_retrained(self, out, image, labels_layer, volume, source) -> None:
        result, seg, base = out
        if not self._adopt(source, base):  # the model was switched meanwhile
            show_warning("Retrain: the model was changed during the round; result discarded")
            return
        v = self._history.add(result)
        self._refresh_versions()
        r = result.report
        msg = f"v{v.number}: {r.steps} steps in {r.seconds:.1f} s on slices {list(r.slices)}"
        if r.holdout_dice_after is not None:
            msg += (f"; held-out slice {r.holdout_slice}: Dice {r.holdout_dice_before:.2f} → "
                    f"{r.holdout_dice_after:.2f}")
        if r.new_classes:
            msg += f"; learned new: {', '.join(r.new_classes)}"
        self._apply(seg, image, labels_layer, volume, v.number, msg)

    def _on_predicted(self, out, image, labels_layer, volume, source) -> None:
        seg, base = out
        if not self._adopt(source, base):
            show_warning("Retrain: the model was changed meanwhile; prediction discarded")
            return
        self._apply(seg, image, labels_layer, volume, self._history.current)

    def _apply(self, seg, image, labels_layer, volume, number: int, prefix: str = "") -> None:
        """Write the prediction into the unannotated, acquired slices: one undo step."""
        if labels_layer not in self._viewer.layers or image not in self._viewer.layers:
            show_warning("Retrain: a layer was removed meanwhile; the prediction was not written")
            return
        protected = np.zeros(volume.shape[0], dtype=bool)
        protected[self.annotated_slices()] = True  # including slices painted during the run
        protected |= volume.missing
        data = labels_layer.data if labels_layer.ndim == 3 else labels_layer.data[None]
        predicted = seg.labels.astype(data.dtype, copy=False)
        if int(seg.labels.max(initial=0)) > np.iinfo(data.dtype).max:
            show_error(f"Retrain: '{labels_layer.name}' ({data.dtype}) cannot hold the new label values")
            return
        idx, values = unannotated_updates(data, predicted, protected)
        if labels_layer.ndim == 2:
            idx = idx[1:]
        self._writing = True
        try:
            labels_layer.data_setitem(idx, values)
        finally:
            self._writing = False
        changed = len(values)
        self._result_shown = True
        self._status.value = (f"{prefix}\n" if prefix else "") + (
            f"v{number} re-predicted {int((~protected).sum())} slices ({changed} voxels changed; "
            "Ctrl+Z on the layer undoes it)")
        self._schedule_autosave()

    def _on_cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._status.value = "Cancelled: the model versions are unchanged"

    def _set_running(self, running: bool) -> None:
        for button in (self._run, self._predict, self._revert, self._save):
            button.enabled = not running
        self._cancel.enabled = running
        if not running:
            self._worker = None

    # -- autosave ----------------------------------------------------------------------
    def _key_folder(self) -> Path | None:
        image = self._image.value
        if image is None:
            return None
        return sessions_dir() / session_key(image.name, image.data.shape)

    def _schedule_autosave(self) -> None:
        self._autosave_timer.start(AUTOSAVE_DELAY_MS)

    def autosave_now(self, wait: bool = False) -> None:
        """Copy the labels and lists now (GUI thread) and write them in the background."""
        folder, layer, image = self._key_folder(), self._labels_pick.value, self._image.value
        if folder is None or layer is None or tuple(layer.data.shape) != tuple(image.data.shape):
            return
        session = AnnotationSession(
            image_name=image.name, shape=tuple(layer.data.shape),
            labels=np.array(layer.data, copy=True), edited=sorted(self._edited),
            checked=sorted(self._checked), excluded=sorted(self._excluded))
        target = folder / self._session_id

        def write() -> None:
            with self._save_lock:
                try:
                    save_session(target, session)
                except OSError as exc:  # a full disk must not take the GUI down
                    import logging

                    logging.getLogger(__name__).warning("autosave failed: %s", exc)

        self._save_thread = threading.Thread(target=write, name="medseg-autosave", daemon=True)
        self._save_thread.start()
        if wait:
            self._save_thread.join()

    def _check_for_autosave(self) -> None:
        self._pending_restore = None
        folder = self._key_folder()
        candidates = []
        if folder is not None and folder.is_dir():
            candidates = sorted((p for p in folder.iterdir()
                                 if p.name != self._session_id and (p / "session.json").is_file()),
                                key=lambda p: p.name)
        if not candidates:
            self._restore_box.visible = False
            return
        newest = candidates[-1]
        try:
            import json

            meta = json.loads((newest / "session.json").read_text("utf-8"))
            n = len(set(meta.get("edited", [])) | set(meta.get("checked", [])))
            when = meta.get("saved_at", newest.name)
        except (OSError, ValueError):
            n, when = "?", newest.name
        self._pending_restore = newest
        self._restore_label.value = f"Autosaved annotations from {when} ({n} slices). Restore them?"
        self._restore_box.visible = True

    def _on_restore(self) -> None:
        folder, image = self._pending_restore, self._image.value
        if folder is None or image is None:
            return
        try:
            session = load_session(folder)
        except MedsegInputError as exc:
            show_error(f"Retrain: cannot restore: {exc}")
            return
        if tuple(session.shape) != tuple(image.data.shape):
            show_error(f"Retrain: the autosave is {session.shape}, the image {tuple(image.data.shape)}")
            return
        names = self._current_class_names()
        kwargs = {**_labels_kwargs(f"{image.name} annotations (restored {session.saved_at})", names),
                  **_like_layer(image)}
        layer = self._viewer.add_labels(session.labels, **kwargs)
        self._labels_pick.value = layer  # resets the lists, then fill them from the autosave
        self._edited, self._checked = set(session.edited), set(session.checked)
        self._excluded = set(session.excluded)
        self._rebuild_list()
        self._restore_box.visible = False
        self._pending_restore = None
        self._status.value = f"Restored {len(session.annotated)} annotated slices from {session.saved_at}"
        self.autosave_now()

    def _on_discard(self) -> None:
        if self._pending_restore is not None:
            discard_session(self._pending_restore)
        self._check_for_autosave()
