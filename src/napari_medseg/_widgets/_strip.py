"""A one-line plot of a per-slice probability along z: click a slice to go there."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget


class ProbabilityStrip(QWidget):
    """Probability (0–1) per slice as a filled curve, the current slice as a line.

    ``slice_clicked(int)`` is emitted with the slice under the mouse.
    """

    slice_clicked = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._values = np.zeros(0)
        self._flags = np.zeros(0, dtype=bool)
        self._current = -1
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Lesion probability per slice (click to go to a slice)")

    def set_values(self, values, flags=None) -> None:
        # NaN (a missing slice) is kept: drawn as a grey band, not as probability 0
        self._values = np.asarray(values, dtype=float).reshape(-1)
        n = len(self._values)
        self._flags = np.zeros(n, bool) if flags is None else np.asarray(flags, bool)
        self.update()

    @staticmethod
    def _finite_runs(missing: np.ndarray) -> list[np.ndarray]:
        """Index runs of consecutive non-missing slices (the curve breaks at a gap)."""
        index = np.arange(len(missing))[~missing]
        if not len(index):
            return []
        return np.split(index, np.flatnonzero(np.diff(index) > 1) + 1)

    def set_current(self, index: int) -> None:
        self._current = int(index)
        self.update()

    def _x(self, index: float) -> float:
        n = max(len(self._values), 1)
        return (index + 0.5) * self.width() / n

    def mousePressEvent(self, event) -> None:  # noqa: N802 (Qt API)
        n = len(self._values)
        if n:
            x = event.position().x() if hasattr(event, "position") else event.x()
            self.slice_clicked.emit(int(np.clip(x * n / max(self.width(), 1), 0, n - 1)))

    def paintEvent(self, _event) -> None:  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(38, 41, 48))
        n, h = len(self._values), self.height() - 4
        if n:
            width = self.width() / n
            for i in np.flatnonzero(self._flags):  # flagged slices: a red band
                painter.fillRect(int(i * width), 0, max(int(width), 1), self.height(),
                                 QColor(200, 60, 60, 90))
            missing = ~np.isfinite(self._values)
            for i in np.flatnonzero(missing):  # missing slices: grey, no curve
                painter.fillRect(int(i * width), 0, max(int(width), 1), self.height(),
                                 QColor(110, 110, 110, 110))
            painter.setPen(QPen(QColor(120, 220, 140), 1.5))
            painter.setBrush(QColor(120, 220, 140, 70))
            for run in self._finite_runs(missing):
                if len(run) == 1:  # one slice alone (a 2D image): a bar of its width
                    v = self._values[run[0]]
                    top = 2 + h * (1 - v)
                    painter.drawRect(int(run[0] * width) + 1, int(top),
                                     max(int(width) - 2, 1), max(int(h + 2 - top), 1))
                    continue
                points = [QPointF(self._x(run[0]), h + 2)]
                points += [QPointF(self._x(i), 2 + h * (1 - self._values[i])) for i in run]
                points.append(QPointF(self._x(run[-1]), h + 2))
                painter.drawPolygon(QPolygonF(points))
            if 0 <= self._current < n:
                painter.setPen(QPen(QColor(255, 255, 255), 1.0, Qt.PenStyle.DashLine))
                x = int(self._x(self._current))
                painter.drawLine(x, 0, x, self.height())
        painter.end()
