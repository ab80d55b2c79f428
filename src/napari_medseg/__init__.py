"""napari-medseg: deep learning for medical images inside napari."""

__version__ = "0.1.0"
