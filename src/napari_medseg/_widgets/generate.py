"""Dock widget: upsample thick slices and fill missing ones (interpolation or the generator).

The result is a NEW Image layer on the same world grid (the slice axis' scale divided by
the factor: z, or y / x for a coronal / sagittal scan),
named "… synthetic" and marked in its metadata (``medseg.synthetic``, the generated and
acquired slice indices); the input layer is never changed. Linear and cubic
interpolation are offered next to the model (and linear is the default, as measured) so
the user can compare on their own scan.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, ComboBox

from .._layers import _like_layer, _result_metadata, scan_axes
from ..core.generation import generate_slices, interpolation_job
from ._model_widget import ModelRunWidget, provenance, slice_ranges

# along the slice axis: z, or y / x for a coronal / sagittal scan (core.generation.slice_axis)
FACTORS = [("fill missing slices only (×1)", 1), ("×2 between slices", 2),
           ("×3 between slices", 3)]
# linear first: on held-out phantoms the generator measured equal to it (−0.02 dB) and on
# real MR far worse (docs/generation-and-explainability.md), so it is the sensible default
METHODS = [("linear interpolation", "linear"), ("cubic interpolation", "cubic"),
           ("recurrent generator (model)", "model")]


class GenerateWidget(ModelRunWidget):
    architecture = "SliceGenerator"
    task = "Generate"
    unmeasured_effect = None

    def extra_widgets(self) -> list:
        self._factor = ComboBox(label="Upsample", choices=FACTORS, value=2)
        self._fill = CheckBox(text="Fill slices missing from the series", value=True)
        self._method = ComboBox(label="Method", choices=METHODS, value="linear")
        self._factor.tooltip = ("Slices made per acquired interval: ×2 puts one between "
                                "each pair (×1: only fill gaps)")
        self._fill.tooltip = "Fill the slices the series lacks (its gaps), marked synthetic"
        self._method.tooltip = ("linear (measured as good as the generator on held-out "
                                "phantoms), cubic, or the recurrent generator (model)")
        # the model picker only matters for the model method: live beside interpolation,
        # it read as if the model took part
        self._method.changed.connect(self._enable_model)
        self._enable_model()
        return [self._factor, self._fill, self._method]

    def _enable_model(self, _value=None) -> None:
        self._model.enabled = self._method.value == "model"
        # why it is off: the picker greyed out beside interpolation said nothing
        self._model.tooltip = ("The slice generator the 'model' method runs" if
                               self._model.enabled else "Used by the 'model' method only: "
                               "linear and cubic interpolation need no model")

    def options(self) -> dict:
        options = {"factor": int(self._factor.value), "fill": bool(self._fill.value),
                   "method": self._method.value, "exact": None}
        layer = self._image.value
        if layer is not None and layer.ndim == 3 and not np.can_cast(
                np.dtype(layer.data.dtype), np.float32, casting="safe"):
            # float64 or wide integers lose digits in the float32 volume: the acquired
            # slices are copied into the result from the data the layer held at Run,
            # copied in the worker (core_job) as the image is (0.55 s of napari's thread
            # for a 100 x 512² float64 scan here)
            options["exact"] = layer.data
        return options

    def needs_model(self, options: dict) -> bool:
        return options["method"] == "model"

    def core_job(self, volume, model, card, options):
        factor, fill, method = options["factor"], options["fill"], options["method"]
        if options["exact"] is not None:  # in the worker: the copy (a lazy layer's read)
            options["exact"] = np.array(options["exact"], dtype=np.float64, copy=True)
        if method != "model":
            return interpolation_job(volume, factor, fill, method)
        return generate_slices(volume, model, card, factor=factor, fill_missing=fill)

    def show_result(self, result, card, image_layer, volume, options) -> None:
        out = result.volume
        method = options["method"]
        made_by = card.get("name") if method == "model" else f"{method} interpolation"
        prov = provenance(card, image_layer.name) if method == "model" else {
            "model": None, "input_layer": image_layer.name,
            "created": provenance(card, image_layer.name)["created"]}
        geometry = _like_layer(image_layer)
        data = out.array
        if options["exact"] is not None:  # the acquired slices exactly as they were
            data = data.astype(np.float64)
            acquired = np.flatnonzero(result.acquired)
            at = [slice(None)] * 3
            at[result.axis] = acquired
            data[tuple(at)] = np.take(options["exact"], acquired // result.factor,
                                      axis=result.axis)
        if image_layer.ndim == 3:
            scale = list(geometry["scale"])
            scale[result.axis] = scale[result.axis] / result.factor
            geometry["scale"] = tuple(scale)
        else:  # a 2D image has nothing between slices; the core refused it already
            data = data[0]
        generated = [int(z) for z in np.flatnonzero(result.generated)]
        # output slices neither acquired nor made (gaps not filled, or beyond the last
        # known slice), along the slice axis; a turned coronal / sagittal scan's are
        # recorded as the reader records its gap planes (missing_slices index z)
        left = [int(i) for i in np.flatnonzero(~(result.acquired | result.generated))]
        source = scan_axes(image_layer, shape=data.shape)
        if data.ndim == 3:  # the shape the slice records are for, with or without axes:
            # cut back to its acquired slices (data[::2]) the layer is no longer synthetic
            source["shape_zyx"] = [int(n) for n in data.shape]
        if result.axis:
            source["slice_axis"] = result.axis_name
            if left:
                source["missing_planes"] = {"axis": result.axis_name, "indices": left}
        # "synthetic" first: napari's layer list cuts a long name in the middle
        name = (f"synthetic ×{result.factor} · {image_layer.name} ({made_by})"
                if result.factor > 1 else f"synthetic, gaps filled · {image_layer.name} ({made_by})")
        layer = self._viewer.add_image(
            data,
            name=name,
            colormap=image_layer.colormap.name,
            contrast_limits=tuple(image_layer.contrast_limits),
            rgb=False,  # slices generated along x may number 3 or 4: not colour channels
            **geometry,
            metadata=_result_metadata(
                prov, synthetic=True, method=method, factor=result.factor,
                slice_axis=result.axis_name,
                generated_slices=generated,
                acquired_slices=[int(z) for z in np.flatnonzero(result.acquired)],
                missing_slices=[int(z) for z in np.flatnonzero(out.missing)]
                if result.axis else left,
                modality=out.modality,
                # the scan's axes: labels drawn on this layer, or segmented from it, are
                # saved where the scan lies (an oblique scan's were saved as axial)
                # (recorded for this layer's shape: more slices than the input's)
                source=source,
                note="generated slices are synthetic: not acquired, not for diagnosis"),
        )
        # just above its scan, not on top: labels and points drawn on the scan stay
        # visible over it
        if image_layer in self._viewer.layers:
            self._viewer.layers.move(self._viewer.layers.index(layer),
                                     self._viewer.layers.index(image_layer) + 1)
        self._status.value = (f"{result.summary()}; new layer '{name}'. Generated slices are"
                              " synthetic (see the layer's metadata).")

    def missing_note(self, volume, result, options: dict) -> str:
        planes = volume.metadata.get("missing_planes") or {}
        if result.axis and planes.get("axis") == result.axis_name:
            # a turned coronal / sagittal series: its gaps are planes along its slice axis
            gaps = np.asarray(planes.get("indices", []), dtype=int)
            gaps = gaps[(gaps >= 0) & (gaps < volume.shape[result.axis])]
            along = f" (along {result.axis_name})"
        else:
            gaps, along = np.flatnonzero(volume.missing), ""
            if gaps.size and result.axis:  # slices made along y or x fill no z gap
                return (f"Missing input slices {slice_ranges(gaps)}: left missing (this"
                        f" scan's slices lie along {result.axis_name})")
        if not gaps.size:
            return ""
        filled = result.generated[gaps * result.factor]
        parts = [f"{slice_ranges(gaps[filled])}: filled (synthetic)" if filled.any() else "",
                 f"{slice_ranges(gaps[~filled])}: left missing" if (~filled).any() else ""]
        return f"Missing input slices{along} " + "; ".join(p for p in parts if p)
