"""Recurrent slice generator: the segmenter's ConvGRU network, trained to regress slices.

:class:`SliceGenerator` is :class:`~.segmenter.RecurrentSegmenter` with 6 input channels
and 1 output channel, at the volume's own in-plane resolution. For every slice z of a
volume where some slices are known and others are to be made, its inputs are

    [nearest known slice below, nearest known slice above, t, known, gap, pixel]

(t = fractional position between the two, 0 on a known slice; gap = their distance in
cm; pixel = the in-plane pixel size in mm: how far a structure may move between the two
depends on both), and its output is the
*residual* over linear interpolation of the two neighbours. The bidirectional ConvGRU
carries what the known slices further above and below look like (h_t = f(W x_t + U h_{t−1}
+ b) in its gated form), so a structure that moves across slices — a rib, a bowel loop, the
body outline — can be placed where it is in between, not drawn twice at half contrast
as linear interpolation does. With a zero residual (:meth:`SliceGenerator.zero_residual_`)
the model *is* linear interpolation.

It is its own architecture (``"SliceGenerator"`` in model cards) so the segmentation
widgets never list it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .segmenter import RecurrentSegmenter

#: input channels, in order
GENERATOR_INPUTS = ("below", "above", "t", "known", "gap_cm", "pixel_mm")


class SliceGenerator(RecurrentSegmenter):
    """Slices (Z, 6, H, W) → residual over linear interpolation (Z, 1, H, W)."""

    def __init__(
        self,
        in_channels: int = len(GENERATOR_INPUTS),
        n_classes: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        hidden: int | None = None,
        dropout: float = 0.0,
        gru_kernel: int = 3,
    ):
        super().__init__(in_channels, n_classes, widths, hidden, dropout, gru_kernel)

    def zero_residual_(self) -> "SliceGenerator":
        """Zero the output head in place: the model then generates exactly linear
        interpolation (a reference point, and a test model with a known output)."""
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
        return self
