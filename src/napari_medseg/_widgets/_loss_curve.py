"""A small live plot of the training loss (one point per step), newest round in colour."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from ..core.text import counted


class LossCurve(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._losses: list[float] = []
        self._fit_to_font()
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Training loss per step of the current retrain (log scale)")

    def _fit_to_font(self) -> None:
        """Tall enough for the caption in the widget's font (napari's font size setting,
        a larger system font): at a fixed 60 px and y 11 a 14 pt caption was cut off."""
        self.setMinimumHeight(max(60, 3 * self.fontMetrics().height() + 8))

    def changeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        from qtpy.QtCore import QEvent

        if event.type() == QEvent.Type.FontChange:
            self._fit_to_font()
        super().changeEvent(event)

    def clear(self) -> None:
        self._losses = []
        self.update()

    def add(self, loss: float, redraw: bool = True) -> None:
        """Append one step's loss; ``redraw=False`` leaves the repaint to a later call."""
        if math.isfinite(loss) and loss > 0:
            self._losses.append(float(loss))
            if redraw:
                self.update()

    @property
    def losses(self) -> list[float]:
        return list(self._losses)

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setFont(self.font())
        metrics = painter.fontMetrics()
        top = metrics.height() + 2  # the caption's line, then the curve below it
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        values = [math.log10(v) for v in self._losses]
        if len(values) >= 2:
            lo, hi = min(values), max(values)
            span = max(hi - lo, 1e-6)
            w, h = self.width() - 4, self.height() - top - 2
            points = [QPointF(2 + w * i / (len(values) - 1), top + h * (hi - v) / span)
                      for i, v in enumerate(values)]
            painter.setPen(QPen(QColor(240, 180, 60), 1.5))
            painter.drawPolyline(QPolygonF(points))
        painter.setPen(QColor(200, 200, 200))
        painter.drawText(4, 1 + metrics.ascent(), self.caption())
        painter.end()

    def caption(self) -> str:
        if not self._losses:
            return "loss: no retrain yet"
        # the means of the first and last fifth: one noisy step at either end read as
        # "got worse" (0.281 → 0.432) while the held-out Dice held
        k = max(1, len(self._losses) // 5)
        first, last = (sum(part) / len(part) for part in (self._losses[:k], self._losses[-k:]))
        return (f"loss {first:.3f} → {last:.3f} (first / last fifth) · "
                f"{counted(len(self._losses), 'step')}")
