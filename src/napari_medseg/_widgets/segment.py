"""Dock widget: segment organs on an image layer into a new Labels layer."""

from __future__ import annotations

import numpy as np

from .._layers import pixel_area_mm2, segmentation_layer_data, voxel_size_mm
from ..core.inference import format_measure, segment_volume
from ..core.text import counted
from ._model_widget import ModelRunWidget, provenance, slice_ranges


class SegmentWidget(ModelRunWidget):
    architecture = "RecurrentSegmenter"
    task = "Segment"
    unmeasured_effect = None  # said with the volumes it leaves out (missing_note)
    result_layer_type = "Labels"

    def core_job(self, volume, model, card, options):
        return segment_volume(volume, model, card)

    def missing_note(self, volume, result, options) -> str:
        note = super().missing_note(volume, result, options)
        unmeasured = result.unmeasured_voxels
        planes = volume.metadata.get("missing_planes")
        if unmeasured is None or not unmeasured.any() or planes:  # planes: said above
            return note
        # a masked region (NaN voxels on acquired slices) was left unlabelled, and the
        # volumes silently covered only the rest
        where = slice_ranges(np.flatnonzero(unmeasured))
        line = (f"{counted(int(unmeasured.sum()), 'voxel')} without a value (NaN) on slices "
                f"{where}: left unlabelled, not counted in any volume")
        return f"{note}\n{line}" if note else line

    def show_result(self, result, card, image_layer, volume, options) -> None:
        data, kwargs, _ = segmentation_layer_data(result, image_layer, provenance(card, image_layer.name))
        self._viewer.add_labels(data, **kwargs)
        # one slice (a 2D image, or one opened as a one-slice volume): areas, as the CLI
        # gives; a volume would need a thickness the image may not have (.npy: made up)
        # a sheared layer's voxels and pixels are smaller than their spacings say
        amount, unit = ((result.area_cm2(pixel_area_mm2(image_layer)), "cm²")
                        if volume.shape[0] == 1
                        else (result.volume_ml(voxel_size_mm(image_layer)), "ml"))
        found = [f"{name} {format_measure(amount[name])} {unit}" for name in result.class_names[1:]
                 if amount[name] > 0]
        # named: the line outlives the pick (another image, a refused run, an edited or
        # removed result), and one scan's volumes were read as the next one's
        source = f"'{image_layer.name}' ({card.get('name')})"
        self._status.value = (f"{source}: " + " · ".join(found) if found
                              else f"No structure found in {source}")
