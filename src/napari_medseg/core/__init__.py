"""napari-medseg core: volumes, phantoms, I/O and models. Imports neither napari nor Qt."""

from .errors import MedsegInputError
from .volume import Volume

__all__ = ["MedsegInputError", "Volume"]
