"""Dock widgets: thin magicgui containers over the core (DESIGN.md §1)."""
