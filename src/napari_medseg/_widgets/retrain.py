"""Dock widget: correct the segmenter's output, retrain it on the corrections in seconds.

*Retrain on my annotations* (segmenter): pick the image, the Labels layer being corrected
and the starting model. Every paint / erase / fill stroke adds its slices to the list of
annotated slices ("edited"), and undoing the last stroke on a slice takes it off again;
"Mark current slice correct" adds a slice as it is ("checked"). A ticked slice is
training data; an unticked one is left out of training but, like every listed slice,
is never overwritten. **Retrain** fine-tunes a copy of the current model version on the
ticked slices only (``core.finetune``), in a worker with a live loss curve, progress and
Cancel (versions are only touched when a round finishes, so a cancel changes nothing);
the new version then re-predicts every slice that is not listed and not missing, written
into the same Labels layer as ONE undo step.

Shared with the detector widget (versions, autosave, restore): ``_retrain_base.py``.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, PushButton
from napari.utils.notifications import show_error, show_warning

from .._layers import _labels_kwargs, _like_layer, read_deferred, volume_outline
from ..core.errors import MedsegInputError
from ..core.finetune import (
    check_annotations, finetune_segmenter, plan_updates, planned_updates, unannotated_updates)
from ..core.inference import segment_volume
from ..core.session import AnnotationSession, SliceStack
from ..core.text import counted, slice_ranges
# painted_slices and history_depths are re-exported: scripts and tests import them from here
from ._retrain_base import (  # noqa: F401
    _RetrainBase, _on_scan, _same_geometry, history_depths, painted_slices)
from ._navigate import drawn_matrix, slice_axis_shown


#: added to the status line while the widget's last write is undone
UNDONE_NOTE = "\n(undone with Ctrl+Z: the layer shows what it held before this write)"
#: said instead when the write on the status line changed no voxel (no undo step): the
#: Ctrl+Z undid an earlier re-prediction
EARLIER_UNDONE_NOTE = ("\n(Ctrl+Z undid an earlier re-prediction: the one above changed "
                       "nothing)")


#: layer -> {id: atom} of every undo-history atom a Retrain widget wrote into it (any
#: widget, closed ones too): a widget picking the layer for the first time does not take
#: another's re-prediction for the user's strokes. The atoms are held, so ids stay theirs.
_WRITTEN: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _across_only(items: list) -> set[int]:
    """The slices of steps across slices (``items``: each step's slices) that no step of
    one slice touched (an axial stroke there is a slice looked at)."""
    single = {z for zs in items if len(zs) == 1 for z in zs}
    return {z for zs in items if len(zs) > 1 for z in zs} - single


def _slices_copy(data, zs) -> np.ndarray:
    """A copy of a Labels layer's array holding only the slices ``zs`` (zeros elsewhere,
    never written: the pages are not even allocated). A round trains on those slices
    alone; copying the whole layer held napari's thread 0.1 s at each Retrain click on a
    200 × 512 × 512 scan."""
    if np.ndim(data) != 3:
        return np.array(data, copy=True)
    out = np.zeros(tuple(data.shape), dtype=data.dtype)
    for z in sorted({int(z) for z in zs if 0 <= int(z) < out.shape[0]}):
        out[z] = np.asarray(data[z])
    return out


def _history_places(layer) -> dict[int, tuple[str, Any]] | None:
    """id → ("undo" | "redo", atom) of every atom in a Labels layer's histories (the atom
    is held: its id stays its own); None on a napari without these histories."""
    undo, redo = getattr(layer, "_undo_history", None), getattr(layer, "_redo_history", None)
    if undo is None or redo is None:
        return None
    return {id(atom): (place, atom) for place, items in (("undo", undo), ("redo", redo))
            for item in items for atom in item}


class _RoundMark:
    """Taken when a job that writes into a Labels layer starts: at the write, the slices
    whose voxels may have changed since (strokes, undo, redo), or None when any may have
    (the same array assigned again after a script's edit in place, or no histories).

    The histories are followed at every paint and set_data event (napari's undo and redo
    emit set_data at once): compared only at the click and at the write, a step undone
    and then dropped from the redo history (a new stroke clears it), or undone and redone
    around the moment the job read the layer, looked untouched. An edit in place with no
    history step and no data event (a script's ``layer.data[...] = v``) is not seen."""

    def __init__(self, layer) -> None:
        self._places = _history_places(layer)
        self._ends = self._history_ends(layer)
        self._assigned = False
        self._touched: set[int] = set()
        self._flat = layer.ndim == 2
        # held weakly by napari: gone with the job's result callback
        layer.events.data.connect(self._on_assigned)
        layer.events.paint.connect(self._on_change)
        layer.events.set_data.connect(self._on_change)

    @staticmethod
    def _history_ends(layer) -> tuple:
        """The histories' lengths and newest atoms: unchanged, no step moved (scrolling
        emits set_data too, so the full comparison is skipped then)."""
        undo, redo = getattr(layer, "_undo_history", None), getattr(layer, "_redo_history", None)
        if undo is None or redo is None:
            return ()
        return (len(undo), len(redo), undo[-1][0] if undo and undo[-1] else None,
                redo[-1][0] if redo and redo[-1] else None)

    def _on_assigned(self, _event=None) -> None:
        self._assigned = True

    def _on_change(self, event=None) -> None:
        layer = getattr(event, "source", None)
        if layer is not None:
            self._follow(layer)

    def _follow(self, layer) -> None:
        if self._places is None:
            return
        ends = self._history_ends(layer)
        if (ends and self._ends and ends[:2] == self._ends[:2]
                and ends[2] is self._ends[2] and ends[3] is self._ends[3]):
            return
        now = _history_places(layer)
        if now is None:
            self._places = None
            return
        # a step undone is in the redo history now, a stroke or a redo in the undo one;
        # a step that only left a history (pushed out, redo cleared) changed no voxel
        # since the last event (an undo before it was counted then)
        moved = [atom for key, (place, atom) in now.items()
                 if self._places.get(key, (None,))[0] != place]
        if moved:
            self._touched |= {0} if self._flat else painted_slices(moved)
        self._places, self._ends = now, ends

    def touched(self, layer) -> set[int] | None:
        layer.events.data.disconnect(self._on_assigned)
        layer.events.paint.disconnect(self._on_change)
        layer.events.set_data.disconnect(self._on_change)
        self._follow(layer)
        if self._assigned or self._places is None:
            return None
        return set(self._touched)


class RetrainWidget(_RetrainBase):
    """Retrain the segmenter on corrected slices of a Labels layer."""

    architecture = "RecurrentSegmenter"
    layer_kind = "Labels"
    task = "re-predict"
    _status_write_stepped = True  # whether the write the status line reports made an undo step

    @property
    def _labels_pick(self):  # the Labels picker (name kept for scripts and tests)
        return self._layer_pick

    def extra_widgets(self) -> list:
        # per Labels layer, its labels as last autosaved (each autosave copies only the
        # slices changed since); dropped with the layer
        self._autosaved_labels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # layer → its data array when last seen (weakly): a new one put in is reviewed
        self._data_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # layer → slices painted since _autosaved_labels' copy of it
        self._painted_since_copy: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._suggest = PushButton(text="Suggest slices to correct (most uncertain)")
        self._suggest.changed.connect(self._on_suggest)
        self._suggest_items: list = []
        self._suggestions = ComboBox(label="Correct next", enabled=False,
                                     choices=lambda _w=None: self._suggest_items)
        self._suggestions.changed.connect(lambda z: z is not None and self._go_to(z))
        # picking the entry already shown (the top suggestion) emits no `changed`, and the
        # user still expects to be taken there (as in the Uncertainty widget)
        self._suggestions.native.activated.connect(
            lambda _i: self._suggestions.value is not None
            and self._go_to(self._suggestions.value))
        self._suggest_ranking: list[tuple[int, float]] = []  # (slice, uncertainty), all ranked
        return [self._suggest, self._suggestions]

    def _on_suggest(self) -> None:
        """MC-dropout uncertainty of the current version; unlisted slices, most uncertain first."""
        inputs = self._inputs_for_a_button(False, writes=False)  # it writes no layer
        if inputs is None:
            return
        volume, source, pair = inputs[2], inputs[4], self._pair
        seen = self._placement(*pair) if pair[0] is not None else None
        self._start(self._suggest_job, volume, source, description="Uncertainty for suggestions",
                    on_result=lambda out: self._on_suggested(out, source, pair, seen))

    def _suggest_job(self, volume, source):
        from ..core.explain import segmentation_uncertainty

        volume = yield from read_deferred(volume)
        model, card = self._model_from(source)
        result = yield from segmentation_uncertainty(volume, model, card, samples=6)
        return result, (model, card)

    def _on_suggested(self, out, source, pair=None, seen=None) -> None:
        result, base = out
        if not self._adopt(source, base):
            return
        if pair is not None and (pair[0] is not self._pair[0] or pair[1] is not self._pair[1]):
            # slice numbers of the scan it ran on: not to be offered on another one
            self._status.value = "Suggestions discarded: another image or layer was picked meanwhile"
            return
        if seen is not None and not all(
                _same_geometry(a, b) for a, b in zip(seen, self._placement(*pair))):
            # another scan loaded into the same layer (or it was moved): the same objects,
            # and the ranking of the scan before was offered for it
            self._status.value = ("Suggestions discarded: the image or labels layer changed "
                                  "meanwhile (new data, shape or position)")
            return
        self._suggest_ranking = [(z, float(result.per_slice[z]))
                                 for z in result.most_uncertain(len(result.per_slice))]
        self._result_shown = True
        self._show_suggestions(say=True)

    #: how many suggestions the list offers
    SUGGESTIONS = 8

    def _show_suggestions(self, say: bool = False) -> None:
        """The ranking less the slices annotated now: a slice the user corrects leaves the
        list (it stayed first, sending them back to a slice already done)."""
        annotated = set(self.annotated_slices())
        ranked = [(z, u) for z, u in self._suggest_ranking if z not in annotated]
        ranked = ranked[: self.SUGGESTIONS]
        items = [(f"slice {z} · uncertainty {u:.3g}", z) for z, u in ranked]
        changed = items != self._suggest_items
        if changed:
            with self._suggestions.changed.blocked():
                self._suggest_items = items
                self._suggestions.reset_choices()
            self._suggestions.enabled = bool(items)
        # said on a run, and kept true while the status line still shows it (another
        # message there, e.g. a round's, is left alone)
        prefix = "Most uncertain unannotated slices: "
        if say or (changed and (not items or str(self._status.value).startswith(prefix))):
            self._status.value = (prefix + ", ".join(str(z) for z, _ in ranked) if ranked
                                  else "No unannotated slice with a structure to suggest")

    def _rebuild_list(self) -> None:
        super()._rebuild_list()
        if getattr(self, "_suggest_ranking", None):
            self._show_suggestions()

    def _pair_changed(self) -> None:
        self._suggest_ranking = []  # slice numbers of the previous pair
        if getattr(self, "_suggest_items", None):
            with self._suggestions.changed.blocked():
                self._suggest_items = []
                self._suggestions.reset_choices()
            self._suggestions.enabled = False

    def _connect(self, layer) -> None:
        # per layer, kept while another layer is picked (a redo of our write after
        # switching back must still be known as ours)
        first = layer not in self._layer_state
        state = self._layer_state.setdefault(layer, (set(), {}, {}, set(), {}))
        (self._stroke_slices, self._slices_of_item, self._own_atoms, self._settled,
         self._across_atoms) = state
        # _stroke_slices: listed because of a stroke seen here; _slices_of_item: the ids
        # of a history step's atoms → (those atoms, its slices); _own_atoms: id → atom of
        # the widget's own re-predictions (napari moves an item's atoms into a new list on
        # every undo and redo, so atoms keep their identity). Both hold the atoms
        # themselves until pruned: keyed by the id of an object napari had freed, a new
        # stroke took over a re-prediction's cached slices, and an undo unlisted a slice
        # that still held the user's paint (the next re-predict overwrote it).
        # _settled: slices of the user's strokes that fell off napari's bounded undo
        # history (their paint stays for good: no undo can take it away)
        self._depths = history_depths(layer)
        self._oldest = self._oldest_item(layer)
        away = self._left_atoms.pop(layer, None)
        if away is not None:  # strokes made on it while another layer was picked
            self._away_slices, self._away_across = self._strokes_since(
                layer, {id(atom) for step in away for atom in step})
            self._away_undone = self._undone_since(layer, away)  # … or undone
            self._settle_gone(layer, away)  # … pushed steps out of its undo history
        elif first:
            # strokes made before this widget ever tracked the layer (painted before it
            # was picked, or before the widget opened): the user's corrections all the
            # same (unlisted, the next round's re-prediction wrote over them); not what a
            # Retrain widget wrote into it
            written = _WRITTEN.get(layer, {})
            items = [self._item_slices(layer, item)
                     for item in (getattr(layer, "_undo_history", None) or ())
                     if not any(id(atom) in written for atom in item)]
            self._away_slices = {z for zs in items for z in zs}
            # a 3D fill made before the layer was picked came out ticked
            self._away_across = _across_only(items)
        self._data_seen[layer] = _weak_or_none(layer.data)
        layer.events.paint.connect(self._on_paint)
        # napari's undo and redo emit no paint event, only set_data (as scrolling does)
        layer.events.set_data.connect(self._on_set_data)
        # ``layer.data = …`` alone emits ``data`` (a stroke, an undo and scrolling do not)
        layer.events.data.connect(self._on_data_assigned)

    def _disconnect(self, layer) -> None:
        layer.events.paint.disconnect(self._on_paint)
        layer.events.set_data.disconnect(self._on_set_data)
        layer.events.data.disconnect(self._on_data_assigned)
        # its steps now, as lists of their atoms (references: ids must not be reused)
        undo = getattr(layer, "_undo_history", None)
        if undo is not None:
            self._left_atoms[layer] = [list(item) for item in undo]

    def _strokes_since(self, layer, seen: set[int]) -> tuple[set[int], set[int]]:
        """Slices of the undo steps on ``layer`` holding an atom not in ``seen``: the
        user's strokes (or redos) made while the widget was not tracking it; and those of
        them from steps across slices."""
        undo = getattr(layer, "_undo_history", None) or ()
        # not the widget's own re-predict redone meanwhile: it listed every slice it wrote
        items = [self._item_slices(layer, item) for item in undo
                 if any(id(atom) not in seen for atom in item) and not self._is_own(item)]
        return {z for zs in items for z in zs}, _across_only(items)

    def _undone_since(self, layer, steps: list[list]) -> set[int]:
        """Slices to unlist for the user's ``steps`` undone while the widget was not
        tracking ``layer`` (in its redo history now): what an undo seen here unlists."""
        redo = {id(atom) for item in layer._redo_history for atom in item}
        undone = [step for step in steps if step and not self._is_own(step)
                  and all(id(atom) in redo for atom in step)]
        zs = {z for step in undone for z in self._item_slices(layer, step)}
        zs = (zs & self._stroke_slices) - self._settled
        for item in layer._undo_history if zs else ():  # still painted by a user's step
            if not self._is_own(item):
                zs -= self._item_slices(layer, item)
        return zs

    def _is_own(self, item) -> bool:
        """Whether a history step is one of the widget's re-predictions."""
        return any(id(atom) in self._own_atoms for atom in item)

    def _unlist(self, zs: set[int]) -> None:
        """Take slices only the user's undone strokes had listed off the lists."""
        if zs:
            self._edited -= zs
            self._stroke_slices -= zs
            self._excluded -= zs - self._checked
            self._rebuild_list()

    def _on_checked(self, z: int) -> None:
        """A slice marked correct changes no data, so napari keeps its redo history: a
        re-predict undone before, redone, wrote over the slice. The widget's undone
        re-predicts that touch it leave the redo history (the user's strokes stay)."""
        layer = self._tracked
        redo = getattr(layer, "_redo_history", None)
        if not redo:
            return
        kept = [item for item in redo
                if not (self._is_own(item) and z in self._item_slices(layer, item))]
        if len(kept) != len(redo):
            redo.clear()
            redo.extend(kept)
            self._prune(layer)

    @staticmethod
    def _oldest_item(layer) -> list | None:
        """The atoms of the oldest undo step (napari moves an item's atoms into a new list
        on every undo and redo: atoms keep their identity, items do not)."""
        undo = getattr(layer, "_undo_history", None)
        return list(undo[0]) if undo else None

    def _note_fallen(self, layer) -> None:
        """napari keeps the last 100 undo steps: a stroke pushed out of them keeps its
        paint with no undo left to remove it, so its slices stay listed whatever is
        undone later (they were unlisted, then overwritten by a re-predict)."""
        oldest, self._oldest = self._oldest, self._oldest_item(layer)
        if oldest and not (self._oldest and self._oldest[0] is oldest[0]):
            self._settle_gone(layer, [oldest])

    def _settle_gone(self, layer, steps: list[list]) -> None:
        """The user's ``steps`` that napari no longer holds: their paint stays for good."""
        undo, redo = layer._undo_history, layer._redo_history
        live = {id(atom) for item in (*undo, *redo) for atom in item}
        gone = [step for step in steps if step and not any(id(atom) in live for atom in step)]
        for step in gone:
            if not self._is_own(step):
                self._settled |= self._item_slices(layer, step)
        if gone:
            self._prune(layer)  # their ids may be reused by new atoms from now on

    def _prune(self, layer) -> None:
        """Forget the history steps and atoms napari no longer holds."""
        undo, redo = layer._undo_history, layer._redo_history
        live = {tuple(map(id, item)) for item in (*undo, *redo)}
        for key in [k for k in self._slices_of_item if k not in live]:
            del self._slices_of_item[key]
        atoms = {id(atom) for item in (*undo, *redo) for atom in item}
        for kept in (self._own_atoms, self._across_atoms):
            for key in [k for k in kept if k not in atoms]:
                del kept[key]

    def _on_paint(self, event) -> None:
        layer = self._tracked
        if layer is not None and history_depths(layer) is not None:
            self._note_fallen(layer)
        self._depths = history_depths(layer)
        if self._writing:
            return
        zs = {0} if layer is not None and layer.ndim == 2 else painted_slices(event.value)
        if layer is not None:
            self._painted_since_copy.setdefault(layer, set()).update(zs)
        # in the 3D view no single slice is on screen either (a dab there lands on a slice
        # never looked at); remembered with the step, for its redo
        across = layer is not None and layer.ndim >= 3 and (
            slice_axis_shown(self._viewer, layer) or self._viewer.dims.ndisplay == 3)
        if across:  # by atom: napari keeps a step's atoms, in reverse order, on undo/redo
            self._across_atoms.update((id(atom), atom) for atom in event.value or ())
        self._list_stroke(zs, across=across)

    def _list_away(self, zs: set[int], across: set[int]) -> None:
        """Strokes made while the layer was not tracked: those across slices as a stroke
        across slices is listed (unticked), the rest as any stroke."""
        if across:
            self._list_stroke(set(across), across=True)
        rest = zs - across
        self._stroke_slices |= rest - self._edited
        self._add_edited(rest)

    def _list_stroke(self, zs: set[int], across: bool = False) -> None:
        """List a user stroke's slices. A ticked slice trains as correct in every voxel;
        a stroke across slices (painted in a sagittal or coronal view, or with a 3D
        brush or fill) touches a few voxels of each, the rest never looked at: those
        slices are listed unticked until the user reviews them (one sagittal stroke
        listed 8 axial slices, hundreds of wrong voxels each, as reviewed)."""
        fresh = zs - self._edited - self._checked
        if fresh and (across or len(zs) > 1) and not self._writing:
            self._untick_for_review(fresh, ACROSS_NOTE)  # in the list too: the toast goes
            image = self._image.value
            recorded = ((getattr(image, "metadata", None) or {}).get("medseg") or {}).get(
                "missing_slices") if image is not None and image.ndim >= 3 else None
            # checked against the data (a whole-volume scan: 33 ms a stroke at 300 × 512²)
            # only when the stroke touches a recorded gap
            gaps = (fresh & {int(z) for z in np.flatnonzero(volume_outline(image).missing)}
                    if isinstance(recorded, list) and fresh & set(recorded) else set())
            show_warning(
                f"Retrain: a stroke across slices touched {counted(len(fresh), 'slice')} "
                f"({slice_ranges(fresh)}); listed unticked, as a round trains on every voxel "
                "of a ticked slice: tick each once you have reviewed it in an axial view"
                + (f" ({'slice' if len(gaps) == 1 else 'slices'} {slice_ranges(gaps)} "
                   f"{'was' if len(gaps) == 1 else 'were'} not acquired: a round leaves "
                   f"{'it' if len(gaps) == 1 else 'them'} out)" if gaps else ""))
        self._stroke_slices |= zs - self._edited
        self._add_edited(zs)

    def _item_across(self, item) -> bool:
        """Whether a history step was painted across slices (see :meth:`_on_paint`)."""
        return any(id(atom) in self._across_atoms for atom in item)

    def _item_slices(self, layer, item) -> frozenset[int]:
        atoms = tuple(item)
        key = tuple(map(id, atoms))  # unique while the entry holds the atoms
        kept = self._slices_of_item.get(key)
        if kept is None:
            kept = self._slices_of_item[key] = (
                atoms, frozenset({0} if layer.ndim == 2 else painted_slices(atoms)))
        return kept[1]

    def _on_set_data(self, _event=None) -> None:
        """An undo or redo on the tracked layer: autosave it and keep the list true.

        Redo lists the slices of the redone stroke again; undo drops a slice that only a
        stroke seen here had listed once no remaining step touches it (a slice restored
        from an autosave or marked correct stays)."""
        layer = self._tracked
        if layer is None:
            return
        depths = history_depths(layer)
        if depths is None:  # a napari without these histories: save on every change to be safe
            self._schedule_autosave()
            return
        before, self._depths = self._depths, depths
        if depths == before or self._writing:
            return  # scrolling or a style change; or our own write
        undo, redo = layer._undo_history, layer._redo_history
        self._note_fallen(layer)
        self._prune(layer)
        if before is not None and depths[0] > before[0] and undo and self._is_own(undo[-1]):
            self._status.value = (self._status.value.replace(UNDONE_NOTE, "")  # redone
                                  .replace(EARLIER_UNDONE_NOTE, ""))
        if before is not None and depths[0] < before[0] and redo:  # an undo
            note = UNDONE_NOTE if self._status_write_stepped else EARLIER_UNDONE_NOTE
            if self._is_own(redo[-1]) and note not in self._status.value:
                # the line above said "re-predicted …": no longer what the layer shows
                self._status.value += note
            undone = self._item_slices(layer, redo[-1]) & self._stroke_slices
            dropped = undone - self._settled
            for item in undo if dropped else ():  # the user's remaining strokes, not our writes
                if not self._is_own(item):
                    dropped -= self._item_slices(layer, item)
            self._unlist(dropped)
        elif (before is not None and depths[0] > before[0] and undo
              and not self._is_own(undo[-1])):  # a user's redo
            self._list_stroke(set(self._item_slices(layer, undo[-1])),
                              across=self._item_across(undo[-1]))
            return
        self._schedule_autosave()

    def _on_data_assigned(self, _event=None) -> None:
        """``layer.data = …``, a new array or the same one edited in place: no undo step
        and no paint event, so nothing else would save it before the next stroke."""
        if not self._writing:
            if self._tracked is not None:
                self._review_replaced(self._tracked)
            self._schedule_autosave()

    def _review_replaced(self, layer) -> None:
        """Ticked slices whose voxels the new data changed are unticked: a round trains on
        every voxel of a ticked slice, and they may no longer hold the user's corrections
        (a script or plugin putting another array into the layer kept them ticked). Each
        is compared with the last autosave (one painted since then is unticked too: the
        safe side); without one, or with another shape, every ticked slice is."""
        data = layer.data
        previous, self._data_seen[layer] = self._data_seen.get(layer), _weak_or_none(data)
        same = previous is not None and previous() is data
        ticked = (self._edited | self._checked) - self._excluded
        if same:
            # the same array put back (napari's refresh idiom, maybe after a script's edit
            # in place): only the slices not painted since the last copy can tell (a
            # stroke not yet autosaved was unticked for nothing)
            ticked -= self._painted_since_copy.get(layer, set())
        if not ticked:
            return
        before = self._autosaved_labels.get(layer)
        comparable = (before is not None and isinstance(data, np.ndarray)
                      and tuple(data.shape) == before.shape)
        if same and not comparable:
            return  # nothing to compare with: the refresh idiom is not new data
        changed = {z for z in ticked if not comparable or z >= data.shape[0]
                   or not np.array_equal(data[z], before.slices[z])}
        if isinstance(data, np.ndarray) and data.ndim >= 2:
            self._labels_copy(layer)  # compared with this data next time (a re-tick stays)
        if not changed:
            return
        self._untick_for_review(changed, "new data: review, tick")
        self._rebuild_list()
        show_warning(
            f"Retrain: '{layer.name}' got new data; {counted(len(changed), 'listed slice')} "
            f"({slice_ranges(changed)}) unticked, as their voxels may no longer be your "
            "corrections and a round trains on every voxel of a ticked slice: review each "
            "and tick it again")

    def _empty_layer(self, image):
        kwargs = {**_labels_kwargs(f"annotations · {image.name}", self._current_class_names()),
                  **_like_layer(image), "metadata": _on_scan(image)}
        return self._viewer.add_labels(np.zeros(image.data.shape, dtype=np.uint8), **kwargs)

    def _snapshot(self, layer, image, volume, need_annotations: bool) -> np.ndarray:
        if getattr(layer, "multiscale", False):
            raise MedsegInputError(f"'{layer.name}' is multiscale; pick a single-scale "
                                   f"{self.layer_kind} layer drawn on '{image.name}'")
        shape = tuple(layer.data.shape)
        if shape != tuple(image.data.shape):
            raise MedsegInputError(
                f"'{layer.name}' has shape {shape}, '{image.name}' {tuple(image.data.shape)}; "
                "pick the Labels layer drawn on this image")
        # where napari draws them: a layer saved in mm from a cm image lies on it beside
        # it (napari converts), a pixel-unit layer with the image's numbers too (it does not)
        if not np.allclose(drawn_matrix(self._viewer, layer), drawn_matrix(self._viewer, image)):
            raise MedsegInputError(
                f"'{layer.name}' does not lie on '{image.name}' (another scale, translate, "
                "rotation, shear or affine): its slice numbers would not be the image's; pick the "
                "Labels layer drawn on this image")
        if not need_annotations:
            return None  # a re-prediction or suggestion trains on no label
        labels = _slices_copy(layer.data, self.training_slices())
        check_annotations(volume, labels, self.slices_to_check(volume))
        return labels

    def _session(self, layer, image) -> AnnotationSession:
        if tuple(layer.data.shape) != tuple(image.data.shape):
            raise MedsegInputError(f"the Labels layer's shape {tuple(layer.data.shape)} is not "
                                   f"the image's {tuple(image.data.shape)}")
        return AnnotationSession(image_name=image.name, shape=tuple(layer.data.shape),
                                 labels=self._labels_copy(layer),
                                 image_fingerprint=self._fingerprint(image),
                                 label_names=self._layer_class_names(layer))

    def _labels_copy(self, layer) -> np.ndarray | SliceStack:
        """The layer's labels as they are now, for an autosave: the slices that changed
        since its last autosave are copied, the others shared with it (napari's thread
        compares, which costs a fraction of copying the whole volume)."""
        data = layer.data
        if not isinstance(data, np.ndarray) or data.ndim < 2:  # lazy or odd data: copied
            return np.array(data, copy=True)
        stack = SliceStack.updated(data, self._autosaved_labels.get(layer))
        self._autosaved_labels[layer] = stack
        self._painted_since_copy.pop(layer, None)
        return stack

    def _restored_layer(self, session, image):
        names = {**self._current_class_names(), **(session.label_names or {})}
        kwargs = {**_labels_kwargs(f"annotations · {image.name} (restored {session.saved_at})",
                                   names), **_like_layer(image),
                  "metadata": _on_scan(image)}
        return self._viewer.add_labels(session.labels, **kwargs)

    @staticmethod
    def _finetune(volume, model, card, labels, slices, seconds, version, names,
                  model_output=None):
        return finetune_segmenter(volume, model, card, labels, slices, seconds=seconds,
                                  version=version, class_names=names, model_labels=model_output)

    reuses_output = True

    @staticmethod
    def _reusable_output(prediction):
        return prediction.labels

    @staticmethod
    def _predict_volume(volume, model, card):
        return segment_volume(volume, model, card)

    def _protected(self, image, labels_layer, nz: int) -> np.ndarray:
        """(z,) the slices a write must not change: the annotated ones of the pair, and
        what is listed on this layer with another image (the pickers moved apart)."""
        protected = np.zeros(nz, dtype=bool)
        protected[[z for z in (*self.annotated_slices_of(image, labels_layer),
                               *self.listed_on_layer(labels_layer)) if 0 <= z < nz]] = True
        return protected

    def _write_target(self, image, layer):
        # the layer's own array (read by the job while the user may paint: the slices
        # changed meanwhile are compared again at the write) and the slices protected now
        if not isinstance(layer.data, np.ndarray) or layer.ndim not in (2, 3):
            return None  # lazy data: compared at the write, as before
        return layer.data, self._protected(image, layer, 1 if layer.ndim == 2 else len(layer.data))

    @staticmethod
    def _write_plan(prediction, volume, target):
        """The voxels the prediction changes, worked out in the job: on napari's thread the
        comparison held it 50-90 ms after each round on a 200 × 512 × 512 scan."""
        if target is None:
            return None
        data, protected = target
        data = data if data.ndim == 3 else data[None]
        if data.shape != prediction.labels.shape:
            return None
        return plan_updates(data, prediction.labels, protected | volume.missing)

    def _round_mark(self, layer):
        return _RoundMark(layer)

    def _apply(self, seg, image, labels_layer, volume, number, card, prefix="", plan=None,
               mark=None) -> None:
        """Write the prediction into the unannotated, acquired slices: one undo step."""
        # including slices painted during the run
        protected = self._protected(image, labels_layer, volume.shape[0]) | volume.missing
        data = labels_layer.data if labels_layer.ndim == 3 else labels_layer.data[None]
        touched = None if mark is None else mark.touched(labels_layer)
        if plan is not None and len(plan.protected) != len(protected):
            plan = None
        top = plan.max_label if plan is not None else int(seg.labels.max(initial=0))
        if top > np.iinfo(data.dtype).max:
            show_error(f"Retrain: '{labels_layer.name}' ({data.dtype}) cannot hold the new label values")
            return
        if plan is None or touched is None:
            idx, values = unannotated_updates(data, seg.labels, protected)
        else:
            flags = np.zeros(len(protected), dtype=bool)
            flags[[z for z in touched if 0 <= z < len(flags)]] = True
            idx, values = planned_updates(data, seg.labels, protected, plan, flags)
        values = values.astype(data.dtype, copy=False)
        if labels_layer.ndim == 2:
            idx = idx[1:]
        undo = getattr(labels_layer, "_undo_history", None)
        last = undo[-1] if undo else None  # (a bounded deque: its length may not grow)
        self._writing = True
        try:
            labels_layer.data_setitem(idx, values)
        finally:
            self._writing = False
        # a redo of this write is the model's output again, not the user's annotation;
        # only when it made an undo step: with no voxel changed, napari adds none, and the
        # last step is the user's stroke (taken for ours, its slice was unlisted and the
        # next re-predict overwrote it)
        undo = getattr(labels_layer, "_undo_history", None)
        if undo and undo[-1] is not last:  # (the layer may not be tracked now: see below)
            state = self._layer_state.get(labels_layer)
            if state is not None:
                state[2].update({id(atom): atom for atom in undo[-1]})
            written = _WRITTEN.setdefault(labels_layer, {})
            written.update({id(atom): atom for atom in undo[-1]})
            live = {id(atom) for item in (*undo, *labels_layer._redo_history) for atom in item}
            for key in [k for k in written if k not in live]:  # fallen off napari's history
                del written[key]
            if labels_layer in self._left_atoms:
                self._left_atoms[labels_layer].append(list(undo[-1]))
        self._status_write_stepped = bool(undo and undo[-1] is not last)
        if len(values):
            _log_write(labels_layer, card, number, int((~protected).sum()))
        _name_new_structures(labels_layer, card.get("classes", ()))
        self._status.value = (f"{prefix}\n" if prefix else "") + (
            f"v{number} re-predicted {counted(int((~protected).sum()), 'slice')} ({counted(len(values), 'voxel')} changed"
            + ("; Ctrl+Z on the layer undoes it)" if len(values) else ")"))  # no step: no undo


def _weak_or_none(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # an array type without weak references
        return None


#: the list's note on a slice a stroke across slices listed unticked
ACROSS_NOTE = "across slices: review, tick"

#: how many of a layer's re-predictions its metadata keeps
WRITES_KEPT = 20


def _log_write(layer, card, number: int, slices: int) -> None:
    """Record in the layer's metadata which version wrote into it: a Segment result
    re-predicted by Retrain v2 still named only the model that made it, in the layer
    and in the file saved from it (the writer carries this log)."""
    meta = layer.metadata
    medseg = dict(meta.get("medseg") or {}) if isinstance(meta.get("medseg"), dict) else {}
    log = [w for w in medseg.get("repredicted_with", []) if isinstance(w, dict)]
    log.append({"model": card.get("name"), "retrain_version": int(number),
                "model_sha256": card.get("sha256"), "slices": slices,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    meta["medseg"] = {**medseg, "repredicted_with": log[-WRITES_KEPT:]}


def _name_new_structures(layer, classes) -> None:
    """Give the layer's features table a row for each class of the version that it
    does not name yet (a structure the model learnt from the user's painting): the value
    showed unnamed on hover, in the autosave and in the saved file."""
    import pandas as pd

    try:
        table = layer.features
        named = {int(i) for i in table["index"]} if "index" in table else set()
    except (TypeError, ValueError):
        return
    rows = [(i, str(c)) for i, c in enumerate(classes)
            if i not in named and not str(c).startswith("unused_")]
    if not rows or ("index" not in table and len(table)):
        return  # nothing to add, or a table this plugin did not make (not ours to extend)
    added = pd.DataFrame({"index": [i for i, _ in rows], "name": [n for _, n in rows]})
    layer.features = pd.concat([table, added], ignore_index=True)

