"""core/ must stay usable headless: no napari, Qt or magicgui, directly or indirectly."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import napari_medseg.core

FORBIDDEN = ("napari", "qtpy", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy")
CORE_DIR = Path(napari_medseg.core.__file__).parent


def _core_modules():
    return [
        info.name
        for info in pkgutil.walk_packages([str(CORE_DIR)], prefix="napari_medseg.core.")
    ]


def test_core_source_has_no_gui_imports():
    offenders = []
    for path in CORE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_every_core_module_loads_no_gui_package():
    modules = ["napari_medseg.core", *_core_modules()]
    assert len(modules) > 3
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"core pulled in: {out.stdout.strip()}"
