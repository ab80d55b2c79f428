"""Dock widget *Retrain detector on my points*: like *Retrain on my annotations*, with a
Points layer of lesions. Adding, moving or deleting a point lists its slice (old and new slice for a move) as "edited"; the
points are taken as the complete set of lesions on the listed slices, so deleting a false
positive teaches "no lesion here". The new version's detections go into a NEW Points
layer (napari has no undo for points data, and the user's edited layer stays as it is).

Shared with the segmenter's widget (versions, autosave, restore): ``_retrain_base.py``.
"""

from __future__ import annotations

import weakref

import numpy as np
from napari.utils.notifications import show_warning

from .._layers import (_ROWS_BEFORE_ADD, ADDED_POINT_FEATURES, _added_rows, _like_layer,
                       _points_kwargs, detection_labels,
                       account_rows, detection_layer_data, hide_unshown, marker_sizes,
                       point_rows, rows_when_watched, scale_mm, unmatched_rows,
                       unwatch_shown, watch_detection_edits, watch_shown)
from ..core.errors import MedsegInputError
from ._navigate import drawn_matrix
from ..core.evaluation import match_detections
from ..core.finetune import DEFAULT_DIAMETER_MM, check_points, finetune_detector
from ..core.inference import card_peak_threshold, detect_lesions
from ..core.session import AnnotationSession
from ..core.text import counted, slice_ranges
from ._model_widget import connect_layer_events, provenance

#: a points layer's placement in the world
PLACEMENT_EVENTS = ("scale", "translate", "rotate", "shear", "affine", "units")
from ._retrain_base import _RetrainBase
from .detect import KEEP_SCORE


class RetrainDetectorWidget(_RetrainBase):
    """Retrain the lesion detector on added, moved and deleted points."""

    architecture = "LesionDetector"
    layer_kind = "Points"
    task = "re-detect"
    edited_word = "points edited"
    checked_word = "reviewed"
    mark_text = "Mark current slice reviewed"
    writes_into_layer = False

    def _connect(self, layer) -> None:
        # a detection layer (maybe opened again from a file), or one with diameters: an
        # added point must not take the selected one's diameter and score as its own, nor
        # a row deleted by a script shift the others' diameters
        # edits made before this widget saw the layer (Detect run, points corrected, then
        # Retrain opened): listed, as those made while another layer was picked are below
        made = rows_when_watched(layer)
        if {"score", "diameter_mm"} & set(layer.features.columns):
            watch_detection_edits(layer)
        layer.events.data.connect(self._on_points)
        layer.events.size.connect(self._on_sizes)
        watch_shown(layer, self._on_shown_changed)
        self._catch_table_edits(layer)  # the rows a features-table edit is compared with
        # moved or rescaled, every point lies on another slice of the image
        self._placed_at = self._z_map(layer)
        connect_layer_events(layer, PLACEMENT_EVENTS, self._on_moved)
        image = self._image.value
        if image is not None and layer.ndim != image.ndim:
            show_warning(f"Retrain: '{layer.name}' is {layer.ndim}D, '{image.name}' {image.ndim}D: "
                         "its points can be neither trained on nor autosaved; pick or make a "
                         "points layer on this image")
        left = self._left_points.pop(layer, made)
        if left is not None:  # edits made on it while another layer was picked (or before)
            self._away_slices = {z for row in _changed_rows(left, self._point_rows(layer))
                                 if (z := self._point_slice(layer, row[:layer.ndim]))
                                 is not None}

    def _disconnect(self, layer) -> None:
        layer.events.data.disconnect(self._on_points)
        layer.events.size.disconnect(self._on_sizes)
        unwatch_shown(layer, self._on_shown_changed)
        connect_layer_events(layer, PLACEMENT_EVENTS, self._on_moved, False)
        self._left_points[layer] = self._point_rows(layer)
        account_rows(layer)  # another widget must not list again what this one had

    @staticmethod
    def _point_rows(layer) -> np.ndarray:
        """Each point's coordinates and diameter, to tell what changed meanwhile (a ring
        resized meanwhile was not listed)."""
        return point_rows(layer)

    def _point_slice(self, layer, point) -> int | None:
        # where napari draws it, in the viewer's units (napari converts a layer in cm
        # beside one in mm)
        world = (drawn_matrix(self._viewer, layer) @ [*np.asarray(point, dtype=float), 1.0])[:-1]
        if self._image.value is None and np.isfinite(world).all():
            # edited while no image is picked (its layer removed to be opened again): the
            # slice is known once an image is back (_switch_pair)
            self._imageless_edits.setdefault(layer, {}).setdefault(
                self._image_left_key, []).append(world)
        return self._drawn_point_slice(world)

    def _catch_table_edits(self, layer) -> None:
        """A diameter typed into napari's features table: the table writes in place and
        emits no event, so the point's slice was not listed (the round ignored the
        edit) and its ring kept the old size. Compared with the rows seen last (when an
        event came, a round started or an autosave was taken): same place, another
        diameter."""
        if layer is None:
            return
        seen = self.__dict__.setdefault("_rows_seen", weakref.WeakKeyDictionary())
        now, before = point_rows(layer), seen.get(layer)
        seen[layer] = now
        if before is None or before.shape != now.shape or not len(now):
            return
        same_place = np.all(np.isclose(before[:, :-1], now[:, :-1], equal_nan=True), axis=1)
        rows = np.flatnonzero(same_place & ~np.isclose(before[:, -1], now[:, -1],
                                                       equal_nan=True))
        if not len(rows):
            return
        sizes = np.array(layer.size, dtype=float, copy=True)
        sizes[rows] = marker_sizes(now[rows, -1], scale_mm(layer))
        selected = set(layer.selected_data)
        self._redrawing = True
        try:  # nothing selected: napari's size event then resizes no selected point
            layer.selected_data = set()
            layer.size = sizes
        finally:
            layer.selected_data = selected
            self._redrawing = False
        self._add_edited({z for r in rows
                          if (z := self._point_slice(layer, now[r, :-1])) is not None})

    def _on_points(self, event) -> None:
        """Slices of added, changed (before and after a move) and removed points."""
        self._catch_table_edits(self._tracked)  # (before this change shifts the rows)
        action = str(getattr(event, "action", ""))
        if action == "adding" and self._tracked is not None:
            _ROWS_BEFORE_ADD[self._tracked] = len(self._tracked.data)
        if action not in ("added", "changed", "changing", "removing"):
            return
        layer, value = self._tracked, np.asarray(event.value)
        indices = [i for i in getattr(event, "data_indices", ()) if -len(value) <= i < len(value)]
        if action == "added" and layer is not None:  # napari < 0.6 names only the last row
            indices = _added_rows(layer, event, len(value))
        if layer is None or not len(value) or not indices:
            return
        if action == "changing":  # the slices are known at "changed", from what changed
            self._before_change = (layer, np.array(value, copy=True))
            return
        points = value[indices]
        if action == "changed":
            before, self._before_change = self._before_change, None
            if before is not None and before[0] is layer:
                # napari reports every row when a script sets the whole data: only the
                # points that moved, appeared or went (old and new slices) were edited
                points = _changed_rows(before[1].reshape(-1, layer.ndim),
                                       value.reshape(-1, layer.ndim))
        zs = {z for p in points if (z := self._point_slice(layer, p)) is not None}
        self._add_edited(zs)

    def _on_shown_changed(self, rows: np.ndarray) -> None:
        """Detect's score threshold showed or hid points: on a ticked slice that changes
        what a round trains on (a detection the user reviewed and kept, hidden, was taught
        as "no lesion here"; one never seen, shown, as a lesion), silently. Those slices
        are unticked, noted in the list, until the user reviews them again."""
        layer = self._tracked
        if layer is None:
            return
        data = np.asarray(layer.data, dtype=float).reshape(-1, layer.ndim)
        zs = {z for r in rows if 0 <= r < len(data)
              and (z := self._point_slice(layer, data[r])) is not None}
        changed = zs & ((self._edited | self._checked) - self._excluded)
        if not changed:
            return
        self._untick_for_review(changed, "threshold changed: review, tick")
        self._rebuild_list()
        self._schedule_autosave()
        show_warning(
            f"Retrain: the score threshold showed or hid points on "
            f"{counted(len(changed), 'reviewed slice')} ({slice_ranges(changed)}); unticked, "
            "as a round takes the shown points there as every lesion: review each and tick it")

    def _z_map(self, layer=None) -> np.ndarray | None:
        """How the points layer's coordinates map to the image's slice number (the z row
        of layer → image), or None (no image, or 2D: no slices)."""
        layer = self._tracked if layer is None else layer
        image = self._image.value
        if layer is None or image is None or image.ndim < 3 or layer.ndim != image.ndim:
            return None
        to_image = np.linalg.inv(drawn_matrix(self._viewer, image)) @ drawn_matrix(
            self._viewer, layer)
        return to_image[-4]  # the image's z (its third axis from the end)

    def _image_watch(self, image, connect: bool) -> None:
        # the image moved instead of the points: the same change of slices
        connect_layer_events(image, PLACEMENT_EVENTS, self._on_moved, connect)
        self._placed_at = self._z_map()

    def _pair_changed(self) -> None:
        self._placed_at = self._z_map()

    def _on_moved(self, _event=None) -> None:
        """The points layer or the image moved, rescaled or turned so that the points lie
        on other slices of the image: a round trained them there (the listed slices said
        "no lesion here"). The ticked slices are unticked, noted, until the user reviews
        them. A move within the slices (in-plane; a 2D image) changes no slice."""
        layer = self._tracked
        now = self._z_map()
        before = getattr(self, "_placed_at", None)
        self._placed_at = now
        if layer is None or now is None or before is None or np.allclose(now, before):
            return
        ticked = (self._edited | self._checked) - self._excluded
        if not ticked:
            return
        self._untick_for_review(ticked, "layer moved: review, tick")
        self._rebuild_list()
        self._schedule_autosave()
        show_warning(f"Retrain: '{layer.name}' or its image was moved or rescaled: its points "
                     f"now lie on other slices of the image; {counted(len(ticked), 'listed slice')} "
                     f"({slice_ranges(ticked)}) unticked: review each and tick it")


    def _on_sizes(self, _event=None) -> None:
        """A ring resized (the selected points' size set): its diameter is what a round
        trains on (``mark_resized_points``), so its slice is edited."""
        layer = self._tracked
        if layer is None or getattr(self, "_redrawing", False):
            return
        if "diameter_mm" not in layer.features.columns:
            # napari's own New points layer: its rings are drawn, not lesion sizes (a
            # ring drawn 30 mm wide trained as 10 mm, silently)
            said = self.__dict__.setdefault("_said_no_sizes", weakref.WeakSet())
            if layer not in said:
                said.add(layer)
                show_warning(f"Retrain: '{layer.name}' holds no lesion sizes: its points "
                             f"train as {DEFAULT_DIAMETER_MM:g} mm lesions whatever their rings; "
                             "for sizes, use New empty points layer on the image")
            return
        data = np.asarray(layer.data, dtype=float).reshape(-1, layer.ndim)
        rows = [int(i) for i in layer.selected_data if 0 <= int(i) < len(data)]
        self._add_edited({z for r in rows if (z := self._point_slice(layer, data[r])) is not None})

    def _empty_layer(self, image):
        return self._viewer.add_points(
            np.zeros((0, image.ndim)), name=f"lesion points · {image.name}", border_color="lime",
            face_color="transparent", size=8, features={"diameter_mm": np.zeros(0)},
            **_like_layer(image))

    def _points_on_image(self, layer, image, every: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The SHOWN points' centres in the image's voxel coordinates and their diameters
        (mm). Hidden points are not lesions: the Detect widget keeps weak detections in
        its layer, hidden below the score threshold (``every``: hidden ones too)."""
        shown = np.asarray(layer.shown, dtype=bool).reshape(-1)
        if every:
            shown = np.ones_like(shown)
        data = np.asarray(layer.data, dtype=float).reshape(-1, layer.ndim)[shown]
        if layer.ndim == image.ndim:
            # where napari draws them: a points layer in mm over an image in cm lies where
            # it belongs (napari converts; the raw numbers differ tenfold), unless a
            # pixel-unit layer is open (napari then draws raw numbers)
            to_image = (np.linalg.inv(drawn_matrix(self._viewer, image))
                        @ drawn_matrix(self._viewer, layer))
            voxels = (data @ to_image[:-1, :-1].T + to_image[:-1, -1]).reshape(-1, image.ndim)
        else:
            world = np.array([layer.data_to_world(p) for p in data]).reshape(-1, layer.ndim)
            voxels = np.array([image.world_to_data(p) for p in world]).reshape(-1, image.ndim)
        if image.ndim == 2:
            voxels = np.column_stack([np.zeros(len(voxels)), voxels])
        try:
            diam = np.asarray(layer.features["diameter_mm"], dtype=float)[shown]
        except (KeyError, TypeError, ValueError, IndexError):
            diam = np.full(len(voxels), np.nan)
        if len(diam) != len(voxels):
            diam = np.full(len(voxels), np.nan)
        return voxels, diam

    def _snapshot(self, layer, image, volume, need_annotations: bool):
        self._catch_table_edits(layer)
        if layer.ndim != image.ndim:
            raise MedsegInputError(f"'{layer.name}' is {layer.ndim}D, '{image.name}' {image.ndim}D")
        points, diam = self._points_on_image(layer, image)
        finite = np.all(np.isfinite(points), axis=1)
        if not finite.all():  # said apart: "outside the image at nan, nan, nan" found none
            shown = np.flatnonzero(np.asarray(layer.shown, dtype=bool).reshape(-1))
            first = np.asarray(layer.data, dtype=float).reshape(-1, layer.ndim)[
                shown[np.flatnonzero(~finite)[0]]]
            show_warning(f"Retrain: {int((~finite).sum())} point(s) of '{layer.name}' have a "
                         "coordinate that is not a number and were left out (the first at "
                         f"{', '.join(f'{v:.0f}' for v in first)} in the layer's own "
                         "coordinates)")
            points, diam = points[finite], diam[finite]
        upper = np.asarray(volume.shape) - 0.5
        inside = np.all((points >= -0.5) & (points <= upper), axis=1)
        if not inside.all():  # a stray point off the scan must not block every round
            first = points[~inside][0]
            show_warning(f"Retrain: {int((~inside).sum())} point(s) of '{layer.name}' lie "
                         f"outside the image and were left out (the first at z, y, x = "
                         f"{', '.join(f'{v:.0f}' for v in first)})")
            points, diam = points[inside], diam[inside]
        if need_annotations:
            points, diam, _ = check_points(volume, points, diam, self.slices_to_check(volume))
        return points, diam

    def _session(self, layer, image) -> AnnotationSession:
        self._catch_table_edits(layer)
        if layer.ndim != image.ndim:
            raise MedsegInputError(f"the Points layer is {layer.ndim}D, the image {image.ndim}D")
        # every point, hidden ones too (a weak detection hidden by the threshold now may
        # be shown later): the autosave must give back the layer as it was
        points, diam = self._points_on_image(layer, image, every=True)
        scores = None
        if "score" in layer.features.columns and len(layer.features) == len(points):
            scores = np.asarray(layer.features["score"], dtype=float)
        return AnnotationSession(image_name=image.name, shape=tuple(image.data.shape),
                                 points=points, diameters=diam, scores=scores,
                                 shown=np.asarray(layer.shown, dtype=bool).reshape(-1).copy(),
                                 image_fingerprint=self._fingerprint(image))

    def _restored_layer(self, session, image):
        points = session.points if image.ndim == 3 else session.points[:, 1:]
        diam = np.asarray(session.diameters, dtype=float)  # NaN: unknown, stays unknown
        shown = (np.ones(len(points), dtype=bool) if session.shown is None
                 else np.asarray(session.shown, dtype=bool))
        name = f"lesion points · {image.name} (restored {session.saved_at})"
        if session.scores is None:
            return self._viewer.add_points(
                points, name=name, border_color="lime", face_color="transparent",
                size=marker_sizes(diam, scale_mm(image)) if len(points) else 8,
                shown=shown, features={"diameter_mm": diam}, **_like_layer(image))
        # a detection layer: as Detect made it, each point with its score and text
        scores = np.asarray(session.scores, dtype=float)
        kwargs = _points_kwargs(name, diam, scale_mm(image), {
            "score": scores, "label": detection_labels(scores, diam)}, "{label}")
        layer = self._viewer.add_points(
            points, shown=shown, **kwargs, **_like_layer(image),
            feature_defaults=dict(ADDED_POINT_FEATURES))
        hide_unshown(layer)  # its weak detections hidden in the 3D view too
        return layer

    @staticmethod
    def _finetune(volume, model, card, annotation, slices, seconds, version, names,
                  model_output=None):
        points, diam = annotation
        return finetune_detector(volume, model, card, points, diam, slices, seconds=seconds,
                                 version=version)

    @staticmethod
    def _predict_volume(volume, model, card):
        # keep weak peaks too (hidden below the card's threshold), as the Detect widget does
        return detect_lesions(volume, model, card,
                              threshold=min(KEEP_SCORE, card_peak_threshold(card)))

    def _apply(self, result, image, layer, volume, number, card, prefix="", plan=None,
               mark=None) -> None:
        """A NEW Points layer with the version's detections (the edited layer stays)."""
        prov = {**provenance(card, image.name), "model": f"{card.get('name')}, Retrain v{number}"}
        data, kwargs, _ = detection_layer_data(result, image, prov, card_peak_threshold(card))
        # orange: drawn over the lime detections the user edited, the two looked alike
        kwargs["border_color"] = VERSION_COLOUR
        if "text" in kwargs:
            kwargs["text"] = {**kwargs["text"], "color": VERSION_COLOUR}
        found = self._viewer.add_points(data, **kwargs)
        hide_unshown(found)  # weak detections hidden in the 3D view too
        watch_detection_edits(found)
        shown = int(np.sum(kwargs["shown"])) if len(data) else 0
        threshold = kwargs["metadata"]["medseg"]["threshold"]
        self._status.value = (f"{prefix}\n" if prefix else "") + (
            f"v{number}: {counted(shown, 'detection')} at score ≥ {threshold:.2f} in a new "
            f"layer ({len(data) - shown} weaker ones kept there, hidden); your points layer "
            "is unchanged") + self._agreement(
                result, image, layer, volume, threshold)

    def _agreement(self, result, image, layer, volume, threshold: float) -> str:
        """How the version's detections agree with the user's points on the slices the
        round trained on: a round could bring back a false positive the user deleted, or
        miss the lesion they added, and nothing said so. Not a held-out measure."""
        # a listed slice missing from the image was left out of the round: its points
        # are no lesion the version could find
        missing = np.asarray(volume.missing, dtype=bool)
        # after a round: its slices and points (they were edited meanwhile: the line said
        # "on the 2 slices it trained on … 3 points" of a round on 1 slice and 1 point)
        basis = getattr(self, "_round_basis", None)
        trained = basis[0] if basis is not None else self.training_slices()
        reviewed = {z for z in trained if not (0 <= z < len(missing) and missing[z])}
        if not reviewed or image.ndim != 3:
            return ""
        if basis is not None and basis[1] is not None:
            points, diam = basis[1]
        else:
            try:
                points, diam = self._points_on_image(layer, image)
            except MedsegInputError:
                return ""
        on = [i for i, p in enumerate(points) if int(round(p[0])) in reviewed]
        lesions = [{"center": points[i], "radius_mm": 0.5 * (
            diam[i] if np.isfinite(diam[i]) and diam[i] > 0 else DEFAULT_DIAMETER_MM)} for i in on]
        found = [{"z": d.z, "y": d.y, "x": d.x, "score": d.score} for d in result.detections
                 if d.score >= threshold and int(round(d.z)) in reviewed]
        hits = match_detections(found, lesions, volume.spacing)
        matched = len({h for h in hits if h >= 0})
        others = sum(h < 0 for h in hits)
        return (f"\nOn the {counted(len(reviewed), 'slice')} it trained on: it finds {matched} of "
                f"your {counted(len(lesions), 'point')}, and "
                f"{counted(others, 'detection')} you did not keep (not a held-out score)")


#: ring and text of a retrained version's detections
VERSION_COLOUR = "orange"


def _changed_rows(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The rows (points) in one array and not the other, counted as a multiset."""
    return np.concatenate([before[unmatched_rows(after, before)],
                           after[unmatched_rows(before, after)]]).reshape(-1, after.shape[1])
