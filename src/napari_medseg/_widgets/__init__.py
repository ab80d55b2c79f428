"""Dock widgets: thin magicgui containers over the core (docs/architecture.md)."""

import torch

# Ask for the GUI thread's torch thread count now, when napari imports the plugin: a
# thread that first asks while a job has pinned the count (OpenMP's default for threads
# that have not asked yet) keeps that job's count for good.
torch.get_num_threads()
