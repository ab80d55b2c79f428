"""The npe2 manifest is valid and found, both editable and from a built wheel."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    "widgets": {"Segment organs", "Detect lesions", "Classify slices", "Synthetic phantom",
                "Volume info", "Retrain on my annotations", "Retrain detector on my points",
                "Explain slice classes (Grad-CAM)", "Segmentation uncertainty",
                "Generate slices (upsample, fill gaps)"},
    "readers": {"napari-medseg.get_reader"},
    "writers": {"napari-medseg.write_labels_nifti", "napari-medseg.write_image_nifti",
                "napari-medseg.write_points_csv"},
    "sample_data": {"synthetic_ct"},
}

LIST_CONTRIBUTIONS = """
import json, napari_medseg, npe2
pm = npe2.PluginManager.instance()
pm.discover()
mf = pm.get_manifest("napari-medseg")
c = mf.contributions
print(json.dumps({
    "package_file": napari_medseg.__file__,
    "widgets": [w.display_name for w in c.widgets or []],
    "readers": [r.command for r in c.readers or []],
    "writers": [w.command for w in c.writers or []],
    "sample_data": [s.key for s in c.sample_data or []],
}))
"""


def _check(listing: dict) -> None:
    for key, expected in EXPECTED.items():
        assert expected <= set(listing[key]), (key, listing[key])


def test_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(REPO / "napari.yaml")
    manifest.validate_imports()
    assert manifest.name == "napari-medseg"


def test_editable_install_lists_contributions():
    import json

    out = subprocess.run(
        [sys.executable, "-c", LIST_CONTRIBUTIONS], capture_output=True, text=True, check=True
    )
    _check(json.loads(out.stdout))


@pytest.mark.slow
def test_wheel_install_lists_contributions(tmp_path):
    """Build the wheel, install it alone into a scratch venv, and ask npe2 for the plugin.

    The scratch venv borrows this environment's site-packages for the dependencies (no
    network needed) but not its .pth files, so the editable napari_medseg stays invisible
    and only the wheel's copy (and its napari.yaml) can be found.
    """
    import json

    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
        check=True, capture_output=True,
    )
    wheel = next(dist.glob("napari_medseg-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_medseg/napari.yaml" in names
        assert b"napari-medseg.get_reader" in zf.read("napari_medseg/napari.yaml")
        assert any(n.endswith("licenses/LICENSE") for n in names)  # BSD-3 travels with it
        for model in ("classifier", "segmenter", "detector", "generator"):  # weights ship too
            assert f"napari_medseg/core/weights/{model}.safetensors" in names
            assert f"napari_medseg/core/weights/{model}.json" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    venv_site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )
    # install the wheel by unpacking it: pip would try to resolve dependencies online
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(venv_site)
    (venv_site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [py, "-c", LIST_CONTRIBUTIONS], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert Path(listing["package_file"]).is_relative_to(venv_site), listing["package_file"]
    _check(listing)


def test_the_wheel_ships_the_manifest_where_links_were_not_kept(tmp_path):
    """src/napari_medseg/napari.yaml links to the top-level manifest: a checkout or sdist
    unpacked without links (Windows) holds a 17-byte text file there, which the wheel
    shipped as the plugin's manifest."""
    import shutil

    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "napari.yaml"):
        shutil.copy(REPO / name, tree / name)
    shutil.copytree(REPO / "src", tree / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    link = tree / "src" / "napari_medseg" / "napari.yaml"
    assert link.is_symlink()
    target = os.readlink(link)
    link.unlink()
    link.write_text(target)  # what a checkout without links leaves
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(dist), str(tree)], check=True, capture_output=True)
    with zipfile.ZipFile(next(dist.glob("napari_medseg-*.whl"))) as zf:
        assert zf.read("napari_medseg/napari.yaml") == (REPO / "napari.yaml").read_bytes()
        metadata = next(zf.read(n) for n in zf.namelist() if n.endswith("/METADATA")).decode()
    # PyPI and the napari hub show the README without the repository: no relative link
    import re

    links = re.findall(r"\]\(([^)\s]+)\)", metadata)
    assert any("docs/images/demo.png" in link for link in links)
    relative = [link for link in links if not link.startswith(("https://", "http://", "#"))]
    assert not relative, relative
