"""The docs name things that exist: the bundled models' training commands, test names."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
WEIGHTS = ROOT / "src" / "napari_medseg" / "core" / "weights"


@pytest.mark.parametrize("name", ["classifier", "segmenter", "detector", "generator"])
def test_models_page_repeats_each_bundled_cards_training_command(name):
    # the defaults are quick runs, not the bundled recipes: the page must give the real one
    command = json.loads((WEIGHTS / f"{name}.json").read_text())["training"]["command"]
    assert command in (ROOT / "docs" / "models.md").read_text()


def test_every_test_the_docs_cite_exists():
    cited = set()
    for doc in DOCS:
        cited |= set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", doc.read_text()))
    assert cited  # the pattern still matches how the docs cite tests
    missing = [f"{path}::{name}" for path, name in sorted(cited)
               if not (ROOT / path).exists()
               or not re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(), re.M)]
    assert not missing, missing
