"""segment / detect / classify on the command line: outputs written, bad input → exit 2."""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medseg.cli import main
from napari_medseg.core.io import read_nifti, write_nifti
from napari_medseg.core.models import (
    LesionDetector,
    RecurrentSegmenter,
    SliceClassifier,
    save_model,
)
from napari_medseg.core.phantom import LABEL_NAMES, SLICE_CLASSES, generate_phantom

WINDOW = {"type": "window", "low": -200.0, "high": 300.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random-init models saved like bundled ones (card + safetensors)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    paths = {}
    for name, model, card in [
        ("segmenter", RecurrentSegmenter(n_classes=len(LABEL_NAMES), widths=(8, 16, 16), hidden=8),
         {"classes": list(LABEL_NAMES.values()), "input_spacing_mm": [2.5, 1.5, 1.5]}),
        ("detector", LesionDetector(widths=(8, 16, 16)),
         {"classes": ["lesion"], "input_spacing_mm": [2.5, 1.5, 1.5], "peak_threshold": 0.05,
          "min_distance_mm": 6.0, "context_slices": 1}),
        ("classifier", SliceClassifier(filters=(8, 16, 16), hidden=16),
         {"classes": list(SLICE_CLASSES), "input_spacing_mm": [5.0, 2.0, 2.0]}),
    ]:
        paths[name] = save_model(model, d, name, {**card, "normalisation": WINDOW,
                                                  "resample_axes": "yx"})
    return paths


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    ph = generate_phantom((6, 48, 40), (2.5, 1.0, 1.2), seed=1, n_lesions=1)
    path = tmp_path_factory.mktemp("data") / "image.nii.gz"
    write_nifti(path, ph.volume.array, ph.volume.spacing, ph.volume.origin)
    return path


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_segment_writes_labels_on_the_input_grid(tmp_path, models, image, capsys):
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(image), str(out), "--model", str(models["segmenter"]),
                 "--chunk", "4"]) == 0
    labels = read_nifti(out)
    assert labels.shape == (6, 48, 40)
    np.testing.assert_allclose(labels.spacing, (2.5, 1.0, 1.2), rtol=1e-5)
    assert labels.array.min() >= 0 and labels.array.max() < len(LABEL_NAMES)
    from napari_medseg.core.io import read_label_map

    label_map = read_label_map(out)  # opens in napari as Labels, structures named
    assert label_map.names == LABEL_NAMES
    captured = capsys.readouterr()
    assert "wrote labels.nii.gz" in captured.out and "100%" in captured.err


def test_detect_writes_a_csv(tmp_path, models, image):
    out, heat = tmp_path / "lesions.csv", tmp_path / "heat.nii.gz"
    assert main(["detect", str(image), str(out), "--model", str(models["detector"]), "-q",
                 "--heatmap", str(heat)]) == 0
    heatmap, src = read_nifti(heat), read_nifti(image)
    assert heatmap.shape == src.shape and heatmap.spacing == pytest.approx(src.spacing)
    assert 0.0 <= heatmap.array.min() and heatmap.array.max() <= 1.0
    with open(out) as handle:
        assert handle.readline().strip() == ("z,y,x,score,diameter_mm,patient_x_mm,"
                                             "patient_y_mm,patient_z_mm,instance_number")
    for row in _rows(out):
        assert 0 <= float(row["z"]) < 6 and 0 <= float(row["score"]) <= 1
        assert float(row["diameter_mm"]) > 0


def test_detect_leaves_no_heatmap_when_the_csv_cannot_be_written(tmp_path, models, image,
                                                                 monkeypatch, capsys):
    import napari_medseg.cli as cli

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_write_csv_atomic", disk_full)
    out, heat = tmp_path / "lesions.csv", tmp_path / "heat.nii.gz"
    old = tmp_path / "old.nii.gz"
    old.write_bytes(b"the user's file")
    assert main(["detect", str(image), str(out), "--model", str(models["detector"]), "-q",
                 "--heatmap", str(heat)]) != 0
    assert not heat.exists() and not out.exists()
    assert main(["detect", str(image), str(out), "--model", str(models["detector"]), "-q",
                 "--heatmap", str(old), "--overwrite"]) != 0
    # a file that was there before is back as it was, and nothing else is left
    assert old.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.nii.gz"]
    capsys.readouterr()


@pytest.mark.parametrize("command,outputs", [
    ("segment", ["labels.nii.gz"]), ("classify", ["classes.csv"]),
    ("detect", ["lesions.csv", "--heatmap", "heat.nii.gz"]),
    ("generate", ["fine.nii.gz", "--factor", "2", "--slices-csv", "slices.csv"])])
def test_an_existing_output_is_kept_unless_overwrite_is_given(tmp_path, models, image, capsys,
                                                              command, outputs):
    model = {"segment": "segmenter", "classify": "classifier", "detect": "detector"}.get(command)
    paths = [tmp_path / name if "." in name else name for name in outputs]
    args = [command, str(image), *map(str, paths), "-q",
            *(["--model", str(models[model])] if model else [])]
    corrected = paths[-1]  # e.g. a label map corrected by hand since the last run
    corrected.write_bytes(b"corrected by hand")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"napari-medseg: error: {corrected.name}: the output exists; pass --overwrite to replace it"
    assert corrected.read_bytes() == b"corrected by hand"
    assert sorted(p.name for p in tmp_path.iterdir()) == [corrected.name]  # nothing else written
    assert main([*args, "--overwrite"]) == 0
    assert corrected.read_bytes() != b"corrected by hand"
    capsys.readouterr()


@pytest.mark.parametrize("command,suffix", [("classify", ".csv"), ("segment", ".nii.gz"),
                                            ("detect", ".csv")])
def test_an_output_made_by_something_else_while_the_command_ran_is_kept(
        tmp_path, models, image, capsys, monkeypatch, command, suffix):
    """--overwrite was checked only at the start: a file saved under the output's name
    while the model ran (a second run into the same name, a file the user saved) was
    replaced, and the command said "wrote"."""
    import napari_medseg.cli_infer as cli_infer

    model = {"segment": "segmenter", "classify": "classifier", "detect": "detector"}[command]
    out = tmp_path / f"result{suffix}"
    run = cli_infer._run

    def meanwhile(job, *args, **kwargs):
        result = run(job, *args, **kwargs)
        out.write_bytes(b"saved meanwhile")
        return result

    monkeypatch.setattr(cli_infer, "_run", meanwhile)
    assert main([command, str(image), str(out), "-q", "--model", str(models[model])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("not replaced (pass --overwrite to replace it)"), err
    assert out.read_bytes() == b"saved meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert main([command, str(image), str(out), "-q", "--overwrite",
                 "--model", str(models[model])]) == 0
    assert out.read_bytes() != b"saved meanwhile"


@pytest.mark.parametrize("name", ["classes.csv", "labels.nii.gz"])
def test_a_write_protected_output_is_refused_before_computing(tmp_path, models, image, capsys,
                                                               name, monkeypatch):
    import os

    import napari_medseg.cli_infer as cli_infer

    out = tmp_path / name
    out.write_bytes(b"protected")
    os.chmod(out, 0o444)
    monkeypatch.setattr(cli_infer, "_load", lambda *a: pytest.fail("computed first"))
    command = "classify" if name.endswith(".csv") else "segment"
    assert main([command, str(image), str(out), "--overwrite", "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"napari-medseg: error: {name}: the file is read-only; not replaced")
    assert out.read_bytes() == b"protected"
    # the CSV writer itself refuses too (a rename ignores the file's permissions)
    from napari_medseg.cli import _write_csv_atomic
    from napari_medseg.core.errors import MedsegInputError

    with pytest.raises(MedsegInputError, match="read-only"):
        _write_csv_atomic(out, ["a"], [[1]])
    assert out.read_bytes() == b"protected"


def test_a_csv_that_cannot_be_created_is_named_not_its_temp_file(tmp_path, monkeypatch):
    import tempfile

    import napari_medseg.cli as cli
    from napari_medseg.core.errors import MedsegInputError

    def unwritable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".x.csv.abc.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", unwritable)
    with pytest.raises(MedsegInputError, match=r"^x\.csv: could not write the file \(Permission"):
        cli._write_csv_atomic(tmp_path / "x.csv", ["a"], [[1]])


def test_classify_writes_one_row_per_slice(tmp_path, models, image):
    out = tmp_path / "classes.csv"
    assert main(["classify", str(image), str(out), "--model", str(models["classifier"])]) == 0
    rows = _rows(out)
    assert len(rows) == 6 and [int(r["slice"]) for r in rows] == list(range(6))
    for row in rows:
        probs = [float(row[f"p_{name}"]) for name in SLICE_CLASSES]
        assert row["class_name"] in SLICE_CLASSES and sum(probs) == pytest.approx(1, abs=1e-3)
        assert row["class_name"] == SLICE_CLASSES[int(np.argmax(probs))]


@pytest.mark.parametrize("command,suffix", [("segment", ".nii.gz"), ("detect", ".csv"),
                                            ("classify", ".csv")])
def test_a_real_dicom_file_as_input(tmp_path, models, command, suffix):
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm")  # one 128 × 128 CT slice, 0.66 mm, in HU
    kind = {"segment": "segmenter", "detect": "detector", "classify": "classifier"}[command]
    model = models[kind]
    out = tmp_path / f"out{suffix}"
    assert main([command, src, str(out), "--model", str(model), "-q"]) == 0
    if command == "segment":
        labels = read_nifti(out)
        assert labels.shape == (1, 128, 128) and labels.spacing[1] == pytest.approx(0.661, abs=1e-3)
    elif command == "classify":
        assert [int(r["slice"]) for r in _rows(out)] == [0]
    else:
        assert all(float(r["z"]) == 0 for r in _rows(out))


def test_npy_input(tmp_path, models, capsys):
    src = tmp_path / "slice.npy"
    np.save(src, np.random.default_rng(0).normal(0, 100, size=(30, 26)).astype(np.float32))
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(src), str(out), "--model", str(models["segmenter"]), "-q"]) == 0
    assert read_nifti(out).shape == (1, 30, 26)
    # one slice: areas, as the widget says (ml needed a slice thickness it made up)
    said = capsys.readouterr().out
    assert " ml" not in said and ("cm²" in said or "no structures found" in said), said


def test_reader_warnings_reach_stderr(tmp_path, models, capsys, monkeypatch):
    """What `info` warns about (two series in a folder, gaps …) is said by every command."""
    from napari_medseg.core import Volume, io

    src = tmp_path / "ct.npy"
    np.save(src, np.zeros((6, 32, 32), np.float32))
    real = io.read_volume

    def read_with_warning(path):  # as the DICOM reader does for a folder of two series
        v = real(path)
        return Volume(v.array, spacing=v.spacing,
                      metadata={**v.metadata, "warnings": ["folder holds 2 series; opened the largest"]})

    monkeypatch.setattr(io, "read_volume", read_with_warning)
    assert main(["classify", str(src), str(tmp_path / "c.csv"), "--model",
                 str(models["classifier"]), "--quiet"]) == 0
    assert "classify: warning: folder holds 2 series" in capsys.readouterr().err


def test_outputs_name_the_input_s_missing_slices(tmp_path, models):
    """0 on a missing slice read as background (or no evidence) in another viewer."""
    import nibabel as nib

    data = np.full((6, 32, 32), 40.0, np.float32)
    data[:, :4] = -1000.0
    data[4] = np.nan
    src = tmp_path / "ct.npy"
    np.save(src, data)
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(src), str(out), "--model", str(models["segmenter"]), "-q"]) == 0
    (extension,) = nib.load(out).header.extensions
    assert json.loads(extension.get_content())["napari-medseg"]["missing_slices"] == [4]


@pytest.mark.parametrize("command, effect", [
    ("segment", "left without a result"),
    ("classify", "each slice's class is read from its measured voxels only"),
])
def test_nan_slices_and_masked_patches_are_said(tmp_path, models, capsys, command, effect):
    """A NIfTI or .npy volume's NaN slices and masked patches went unsaid by every
    command (the widgets named them): organ volumes with part of the scan never seen."""
    data = np.full((6, 32, 32), 40.0, np.float32)
    data[:, :4] = -1000.0
    data[4] = np.nan
    data[1, :10, :10] = np.nan
    src = tmp_path / "ct.npy"
    np.save(src, data)
    out = tmp_path / ("out.nii.gz" if command == "segment" else "out.csv")
    model = models["segmenter" if command == "segment" else "classifier"]
    assert main([command, str(src), str(out), "--model", str(model), "-q"]) == 0
    err = capsys.readouterr().err
    assert (f"{command}: warning: 1 slice without any value (NaN), at z=4: taken as missing, "
            "left without a result") in err, err
    assert f"{command}: warning: 100 voxels without a value (NaN) on slice 1: {effect}" in err


@pytest.mark.parametrize("keep", [False, True])
def test_generate_says_what_it_does_with_nan_slices_and_voxels(tmp_path, capsys, keep):
    """generate said a NaN slice was "left without a result", then filled it."""
    data = np.full((6, 32, 32), 40.0, np.float32)
    data[4] = np.nan
    data[1, :10, :10] = np.nan
    src, out = tmp_path / "ct.npy", tmp_path / "g.nii.gz"
    np.save(src, data)
    assert main(["generate", str(src), str(out), "-q", "--factor", "2",
                 *(["--keep-missing"] if keep else [])]) == 0
    err = capsys.readouterr().err
    effect = "kept missing (NaN) in the output" if keep else "filled in the output"
    assert ("generate: warning: 1 slice without any value (NaN), at z=4: taken as missing, "
            f"{effect}") in err, err
    assert ("100 voxels without a value (NaN) on slice 1: kept without a value, as on the "
            "generated slices beside them") in err, err
    result = read_nifti(out).array
    assert len(result) == 11 and np.isnan(result[8]).all() == keep  # slice 4 is now 8


def _corrupt_weights(tmp_path, models):
    bad = tmp_path / "bad"
    bad.mkdir()
    card = models["segmenter"]
    (bad / card.name).write_text(card.read_text())
    weights = card.with_suffix(".safetensors").read_bytes()
    (bad / card.with_suffix(".safetensors").name).write_bytes(weights[: len(weights) // 2])
    return bad / card.name


@pytest.mark.parametrize("command,suffix", [("segment", ".nii.gz"), ("detect", ".csv"),
                                            ("classify", ".csv")])
@pytest.mark.parametrize("problem", ["missing", "4d", "weights", "wrong_model", "bad_output"])
def test_bad_input_exits_2_with_one_line_and_no_output(
    tmp_path, models, image, capsys, command, suffix, problem
):
    src, model = str(image), str(models[{"segment": "segmenter", "detect": "detector",
                                         "classify": "classifier"}[command]])
    out = tmp_path / f"out{suffix}"
    if problem == "missing":
        src = str(tmp_path / "nope.nii.gz")
    elif problem == "4d":
        src = str(tmp_path / "four.npy")
        np.save(src, np.zeros((2, 3, 8, 8), np.float32))
    elif problem == "weights":
        model = str(_corrupt_weights(tmp_path, models))
    elif problem == "wrong_model":
        model = str(models["classifier" if command != "classify" else "segmenter"])
    elif problem == "bad_output":
        out = tmp_path / "no_such_folder" / f"out{suffix}"
    capsys.readouterr()
    assert main([command, src, str(out), "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-medseg: error: ") and err.count("\n") == 1
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".out")]  # no temp files


def test_explain_commands_write_maps_on_the_input_grid(tmp_path, capsys):
    from napari_medseg.core.io import read_volume

    p = generate_phantom((6, 64, 64), (4.0, 2.0, 2.0), seed=8, n_lesions=1)
    src = tmp_path / "ct.nii.gz"
    write_nifti(src, p.volume.array, p.volume.spacing, p.volume.origin)
    assert main(["gradcam", str(src), str(tmp_path / "cam.nii.gz"), "--class", "lesion", "-q"]) == 0
    cam = read_volume(tmp_path / "cam.nii.gz").array
    assert cam.shape == p.volume.shape and 0 <= cam.min() and cam.max() <= 1
    assert main(["uncertainty", str(src), str(tmp_path / "u.nii.gz"), "--samples", "2",
                 "--slices-csv", str(tmp_path / "u.csv"), "-q"]) == 0
    assert read_volume(tmp_path / "u.nii.gz").array.shape == p.volume.shape
    assert len((tmp_path / "u.csv").read_text().splitlines()) == 7
    # marked as maps, not scans (the plugin opens them as maps, offered by no image picker)
    assert read_volume(tmp_path / "cam.nii.gz").metadata["explanation_map"] == "Grad-CAM lesion"
    assert read_volume(tmp_path / "u.nii.gz").metadata["explanation_map"] == "uncertainty"
    capsys.readouterr()
    # a class index works as in the core (it was looked up as a name and refused)
    assert main(["gradcam", str(src), str(tmp_path / "cam2.nii.gz"), "--class", "2", "-q"]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "cam2.nii.gz").array, cam)
    assert "Grad-CAM of lesion per slice" in capsys.readouterr().out  # named, not "of 2"
    # the explanations run fp32 only: --precision is not offered (it was taken and ignored)
    for command in ("gradcam", "uncertainty"):
        with pytest.raises(SystemExit) as stop:
            main([command, str(src), str(tmp_path / "p.nii.gz"), "--precision", "bf16"])
        assert stop.value.code == 2 and not (tmp_path / "p.nii.gz").exists()
    capsys.readouterr()
    assert main(["gradcam", str(src), str(tmp_path / "x.nii.gz"), "--class", "tumour"]) == 2
    assert "unknown class" in capsys.readouterr().err and not (tmp_path / "x.nii.gz").exists()
    assert main(["uncertainty", str(src), str(tmp_path / "y.nii.gz"), "--samples", "1"]) == 2
    assert not (tmp_path / "y.nii.gz").exists()


@pytest.mark.parametrize("argv", [
    ["segment", "{in}", "{in}", "--model", "{segmenter}"],
    ["segment", "{in}", "{link}", "--model", "{segmenter}"],  # another name for the input
    ["detect", "{in}", "{tmp}/o.csv", "--heatmap", "{in}", "--model", "{detector}"],
    ["generate", "{in}", "{in}", "--factor", "2"],
])
def test_an_output_that_is_the_input_is_refused_and_the_input_kept(tmp_path, models, image,
                                                                   capsys, argv):
    src = tmp_path / "scan.nii.gz"
    src.write_bytes(image.read_bytes())
    (tmp_path / "link.nii.gz").symlink_to(src)
    before = src.read_bytes()
    fill = {"in": str(src), "link": str(tmp_path / "link.nii.gz"), "tmp": str(tmp_path),
            **{k: str(v) for k, v in models.items()}}
    capsys.readouterr()
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "overwrite the input" in err and err.count("\n") == 1
    assert src.read_bytes() == before
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("key,value,command", [
    ("peak_threshold", "x", "detect"),
    ("min_distance_mm", None, "detect"),
    ("context_slices", "abc", "detect"),
    ("classes", 5, "classify"),
    ("normalisation", {"type": "window", "low": 1}, "segment"),
])
def test_a_damaged_card_value_is_one_line_not_a_traceback(tmp_path, models, image, capsys,
                                                          key, value, command):
    import json
    import shutil

    name = {"detect": "detector", "classify": "classifier", "segment": "segmenter"}[command]
    card_path = models[name]
    for f in card_path.parent.glob(f"{card_path.stem}*"):
        shutil.copy(f, tmp_path / f.name)
    card = json.loads((tmp_path / card_path.name).read_text())
    card[key] = value
    (tmp_path / card_path.name).write_text(json.dumps(card))
    out = tmp_path / ("o.nii.gz" if command == "segment" else "o.csv")
    capsys.readouterr()
    assert main([command, str(image), str(out), "--model", str(tmp_path / card_path.name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("napari-medseg: error: ") and key in err and err.count("\n") == 1
    assert not out.exists()


def test_an_unforeseen_error_is_one_line(monkeypatch, capsys, image, tmp_path):
    from napari_medseg import cli_infer

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_infer, "_load", broken)
    monkeypatch.delenv("NAPARI_MEDSEG_DEBUG", raising=False)
    assert main(["segment", str(image), str(tmp_path / "o.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("napari-medseg: internal error: ZeroDivisionError: a bug")
    assert err.count("\n") == 1
    monkeypatch.setenv("NAPARI_MEDSEG_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["segment", str(image), str(tmp_path / "o.nii.gz")])
    monkeypatch.setenv("NAPARI_MEDSEG_DEBUG", "0")  # "0" turned the tracebacks on
    assert main(["segment", str(image), str(tmp_path / "o.nii.gz")]) == 1
    capsys.readouterr()


class _Panic(BaseException):
    """As pyo3's PanicException (a panic in safetensors' Rust code): no Exception."""


@pytest.mark.parametrize("raised, rc, said", [
    (_Panic("PyObject pointer is null"), 1,
     "napari-medseg: internal error: _Panic: PyObject pointer is null"),
    (BrokenPipeError(32, "Broken pipe"), 141, ""),  # `| head`: quiet, as cat is
])
def test_a_panic_is_one_line_and_a_closed_pipe_is_quiet(monkeypatch, capsys, image, tmp_path,
                                                         raised, rc, said):
    from napari_medseg import cli_infer

    def broken(*a, **k):
        raise raised

    monkeypatch.setattr(cli_infer, "_load", broken)
    monkeypatch.delenv("NAPARI_MEDSEG_DEBUG", raising=False)
    assert main(["segment", str(image), str(tmp_path / "o.nii.gz")]) == rc
    err = capsys.readouterr().err
    assert err.split(" (set")[0].strip() == said


def test_no_model_means_the_bundled_one_even_if_a_user_model_shares_its_name(
        tmp_path, models, image, monkeypatch):
    """A user model saved as "segmenter" is found first by that name; the default of
    `segment` without --model must still be the bundled model, as its help says."""
    import shutil

    import napari_medseg.core.models as core_models
    from napari_medseg.core.models import BUNDLED_DIR

    monkeypatch.setenv("NAPARI_MEDSEG_HOME", str(tmp_path / "home"))
    user = core_models.user_models_dir()
    user.mkdir(parents=True)
    card = models["segmenter"]
    for f in card.parent.glob(card.stem + "*"):
        shutil.copy(f, user / f.name.replace(card.stem, "segmenter", 1))
    asked = []
    real = core_models.load_model
    monkeypatch.setattr(core_models, "load_model", lambda p, *a, **k: asked.append(p) or real(p, *a, **k))
    assert main(["segment", str(image), str(tmp_path / "l.nii.gz"), "-q"]) == 0
    assert asked == [str(BUNDLED_DIR / "segmenter.json")]


def test_an_empty_model_argument_is_refused_not_read_as_the_bundled_model(tmp_path, image,
                                                                         capsys):
    out = tmp_path / "x.nii.gz"
    assert main(["segment", str(image), str(out), "--model", ""]) == 2
    assert "--model is empty" in capsys.readouterr().err and not out.exists()


def test_raw_stored_ct_values_run_with_a_warning(tmp_path, models, capsys):
    """Raw uint16 values (no rescale to HU) gave organ volumes with no word said."""
    phantom = generate_phantom((4, 48, 48), (2.5, 1.5, 1.5), seed=3, n_lesions=0)
    src = tmp_path / "raw.npy"
    np.save(src, np.clip(phantom.volume.array + 1024, 0, None).astype(np.uint16))
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(src), str(out), "--model", str(models["segmenter"]), "-q"]) == 0
    err = capsys.readouterr().err
    assert "segment: warning: the image is not known to be CT in Hounsfield units (modality OT" in err


@pytest.mark.parametrize("command,suffix", [("segment", ".nii.gz"), ("classify", ".csv")])
def test_an_output_that_is_a_link_writes_the_file_it_names(tmp_path, models, image, command,
                                                          suffix):
    """The temporary file was renamed over the link: the dataset it points into kept its
    old file, and the link became a plain file."""
    kind = {"segment": "segmenter", "classify": "classifier"}[command]
    real = tmp_path / "dataset" / f"case1{suffix}"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / f"out{suffix}"
    link.symlink_to(real)
    assert main([command, str(image), str(link), "--model", str(models[kind]), "-q",
                 "--overwrite"]) == 0
    assert link.is_symlink() and real.read_bytes() != b"old"
    if command == "classify":
        assert len(_rows(real)) == 6
    else:
        assert read_nifti(real).shape[0] == 6


def test_links_that_lead_outputs_astray_are_refused_before_any_computing(tmp_path, models,
                                                                       image, capsys):
    """A link named like an output to a slice of the DICOM input replaced that slice; two
    outputs linked to one file left only the second; a link into a missing folder was
    refused only after the computing."""
    series = tmp_path / "series"
    series.mkdir()
    slice_file = series / "s0.dcm"
    slice_file.write_bytes(b"DICM slice")
    (tmp_path / "evil.nii.gz").symlink_to(slice_file)
    (tmp_path / "y.csv").symlink_to(tmp_path / "x.nii.gz")  # dangling: x.nii.gz is to come
    (tmp_path / "lost.nii.gz").symlink_to(tmp_path / "missing" / "seg.nii.gz")
    seg = str(models["segmenter"])
    cases = [
        (["segment", str(image), str(tmp_path / "evil.nii.gz"), "--model", seg, "--overwrite"],
         "not a .nii.gz or .nii file"),
        (["uncertainty", str(image), str(tmp_path / "x.nii.gz"), "--slices-csv",
          str(tmp_path / "y.csv"), "--samples", "2", "--model", seg], "the same file as"),
        (["segment", str(image), str(tmp_path / "lost.nii.gz"), "--model", seg],
         "the folder to write into does not exist"),
    ]
    for argv, said in cases:
        capsys.readouterr()
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert said in captured.err and captured.err.count("\n") == 1, captured.err
        assert "%" not in captured.err + captured.out  # refused before any progress
    assert slice_file.read_bytes() == b"DICM slice"
    assert not (tmp_path / "x.nii.gz").exists()


def test_outputs_name_the_model_that_made_them(tmp_path, models, image, capsys):
    """A segmentation, a heatmap or a map named no model, in the file or in the line
    printed: which of two models made it could not be told."""
    from napari_medseg.core.models import read_card

    card = read_card(models["segmenter"])
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(image), str(out), "--model", str(models["segmenter"]), "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote seg.nii.gz ({card['name']} {card['version']}):" in printed
    (extension,) = nib.load(out).header.extensions
    ours = json.loads(extension.get_content())["napari-medseg"]
    assert ours["model"] == card["name"] and ours["model_sha256"] == card["sha256"]
    assert ours["model_version"] == card["version"]
    heat, csv_out = tmp_path / "heat.nii.gz", tmp_path / "d.csv"
    assert main(["detect", str(image), str(csv_out), "--model", str(models["detector"]),
                 "--heatmap", str(heat), "-q"]) == 0
    det = read_card(models["detector"])
    assert f"({det['name']} {det['version']})" in capsys.readouterr().out
    (extension,) = nib.load(heat).header.extensions
    ours = json.loads(extension.get_content())["napari-medseg"]
    assert ours["model_sha256"] == det["sha256"] and ours["explanation_map"] == "lesion heatmap"


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("A", "S", "R")])
def test_nifti_results_are_stored_in_the_inputs_own_voxel_order(tmp_path, models, codes):
    """A result of a NIfTI input has the input's shape and affine, so the raw arrays line
    up voxel for voxel in any tool: a RAS input's labels came out with i and j reversed
    (``input[labels == 2]`` on nibabel's arrays read fat and air as liver), a sagittal
    one's with its shape permuted. Read through the plugin, they are what it shows."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    from napari_medseg.core.io import read_volume

    ph = generate_phantom((6, 40, 36), (2.5, 1.0, 1.2), seed=3, n_lesions=1)
    written = write_nifti(tmp_path / "lps.nii.gz", ph.volume.array, ph.volume.spacing,
                          ph.volume.origin)
    lps = nib.load(written)  # the plugin's own order: (x, y, z) = L, P, S
    turn = ornt_transform(axcodes2ornt(("L", "P", "S")), axcodes2ornt(codes))
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(apply_orientation(np.asarray(lps.dataobj), turn),
                             lps.affine @ inv_ornt_aff(turn, lps.shape)), src)
    stored = nib.load(src)
    for argv, out in [
        (["segment", str(src), str(tmp_path / "seg.nii.gz"), "--model",
          str(models["segmenter"])], tmp_path / "seg.nii.gz"),
        (["detect", str(src), str(tmp_path / "d.csv"), "--heatmap", str(tmp_path / "h.nii.gz"),
          "--model", str(models["detector"])], tmp_path / "h.nii.gz"),
    ]:
        assert main([*argv, "-q"]) == 0
        result = nib.load(out)
        assert result.shape == stored.shape, argv[0]
        np.testing.assert_allclose(result.affine, stored.affine, atol=1e-4)
        # the same voxels as the plugin's own reading of both files
        raw = np.asarray(result.dataobj)
        turned_back = apply_orientation(raw, ornt_transform(axcodes2ornt(codes),
                                                            axcodes2ornt(("L", "P", "S"))))
        np.testing.assert_array_equal(turned_back.transpose(2, 1, 0), read_volume(out).array)
    # generated slices: the input's i and j, twice the slices along the slice axis
    assert main(["generate", str(src), str(tmp_path / "up.nii.gz"), "--factor", "2", "-q"]) == 0
    up = nib.load(tmp_path / "up.nii.gz")
    slice_axis = "".join(codes).index("S")
    assert [n for a, n in enumerate(up.shape) if a != slice_axis] == \
        [n for a, n in enumerate(stored.shape) if a != slice_axis]
    assert up.shape[slice_axis] == 2 * stored.shape[slice_axis] - 1
    np.testing.assert_array_equal(
        np.take(np.asarray(up.dataobj), [0], axis=slice_axis),
        np.take(np.asarray(stored.dataobj), [0], axis=slice_axis).astype(np.float32))
    assert read_volume(tmp_path / "up.nii.gz").metadata["synthetic_planes"]["indices"] == \
        list(range(1, 2 * 6 - 1, 2))


def test_csv_rows_say_where_they_lie_in_the_patient(tmp_path, models, capsys):
    """detect's and classify's rows gave only indices on the reoriented grid: a series the
    scanner numbers from the head put "slice 111" 55 mm from image 111. They now give the
    DICOM patient position (LPS mm) and the slice's InstanceNumber too."""
    from tests.core.test_io_dicom import write_series

    zs = [30.0, 27.5, 25.0, 22.5, 20.0, 15.0, 12.5, 10.0]  # instance 1 at the head; a gap
    write_series(tmp_path / "ct", zs, shape=(40, 36), pixel_spacing=(1.0, 1.2))
    out = tmp_path / "classes.csv"
    assert main(["classify", str(tmp_path / "ct"), str(out), "--model",
                 str(models["classifier"]), "-q"]) == 0
    rows = _rows(out)
    assert [r["patient_z_mm"] for r in rows] == [f"{10.0 + 2.5 * z:.2f}" for z in range(9)]
    assert [r["instance_number"] for r in rows] == ["8", "7", "6", "", "5", "4", "3", "2", "1"]
    assert rows[3]["class_name"] == "missing"

    out = tmp_path / "lesions.csv"
    assert main(["detect", str(tmp_path / "ct"), str(out), "--model", str(models["detector"]),
                 "--threshold", "0.0", "-q"]) == 0
    rows = _rows(out)
    assert rows, "a threshold of 0 keeps the detector's peaks"
    for r in rows:
        z, y, x = float(r["z"]), float(r["y"]), float(r["x"])
        assert float(r["patient_x_mm"]) == pytest.approx(-100.0 + 1.2 * x, abs=0.01)
        assert float(r["patient_y_mm"]) == pytest.approx(-120.0 + 1.0 * y, abs=0.01)
        assert float(r["patient_z_mm"]) == pytest.approx(10.0 + 2.5 * z, abs=0.01)
        numbers = {0: "8", 1: "7", 2: "6", 3: "", 4: "5", 5: "4", 6: "3", 7: "2", 8: "1"}
        assert r["instance_number"] == numbers[round(z)]
    # uncertainty's slice list too, and its printed slices name their images
    u = tmp_path / "u.csv"
    assert main(["uncertainty", str(tmp_path / "ct"), str(tmp_path / "u.nii.gz"), "--model",
                 str(models["segmenter"]), "--samples", "2", "--slices-csv", str(u),
                 "-q"]) == 0
    assert [r["instance_number"] for r in _rows(u)] == ["8", "7", "6", "", "5", "4", "3", "2", "1"]
    assert [r["patient_z_mm"] for r in _rows(u)] == [f"{10.0 + 2.5 * z:.2f}" for z in range(9)]
    assert "(image " in capsys.readouterr().out
    # generate's slice list: an acquired slice is the image it was; a made one is none
    g = tmp_path / "g.csv"
    assert main(["generate", str(tmp_path / "ct"), str(tmp_path / "g.nii.gz"), "--factor", "2",
                 "--slices-csv", str(g), "-q"]) == 0
    rows = _rows(g)
    assert [(r["status"], r["instance_number"]) for r in rows[:8]] == [
        ("acquired", "8"), ("generated", ""), ("acquired", "7"), ("generated", ""),
        ("acquired", "6"), ("generated", ""), ("generated", ""), ("generated", "")]
    assert rows[-1] == {"slice": "16", "status": "acquired", "instance_number": "1"}
    # no patient geometry in a .npy file: empty cells, not voxel indices called mm
    np.save(tmp_path / "plain.npy", np.zeros((4, 40, 36), np.float32) - 1000)
    assert main(["classify", str(tmp_path / "plain.npy"), str(out.with_name("n.csv")),
                 "--model", str(models["classifier"]), "-q"]) == 0
    assert {(r["patient_z_mm"], r["instance_number"])
            for r in _rows(out.with_name("n.csv"))} == {("", "")}


def test_a_killed_runs_hidden_files_go_at_the_next_write(tmp_path, models, image):
    """SIGKILL (the kernel's out-of-memory killer, for one) cleans up nothing: each killed
    run left a hidden temporary file as large as its output, or the kept previous
    content, beside the output for good. The next write to that output deletes those of
    processes no longer running; a running process's, and other names', stay."""
    import subprocess
    import sys

    from napari_medseg.core.io._common import machine_token, temp_prefix

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id no process has now
    dead, alive, me = gone.pid, os.getppid(), machine_token()
    other = "0f0f0f" if me != "0f0f0f" else "1e1e1e"  # another host's or container's
    out, csv_out = tmp_path / "seg.nii.gz", tmp_path / "lesions.csv"
    left = [f".seg.nii.gz.{me}.{dead}-a1b2c3d4.tmp.nii.gz", f".seg.nii.gz.{me}.{dead}-0.previous",
            f".lesions.csv.{me}.{dead}-x_y1z2w3.tmp"]
    kept = [f".seg.nii.gz.{me}.{alive}-a1b2c3d4.tmp.nii.gz",
            f".lesions.csv.{me}.{alive}-0.previous",
            f".seg.nii.gz.{other}.{dead}-a1b2c3d4.tmp.nii.gz",  # its ids are not ours
            f".seg.nii.gz.{me}.{dead}-a1b2c3d4.tmp.nii.gz.bak",
            f".other.nii.gz.{me}.{dead}-0.previous", "notes.txt"]
    for name in left + kept:
        (tmp_path / name).write_bytes(b"half")
    assert main(["segment", str(image), str(out), "--model", str(models["segmenter"]),
                 "-q"]) == 0
    assert main(["detect", str(image), str(csv_out), "--model", str(models["detector"]),
                 "-q"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"seg.nii.gz", "lesions.csv", *kept}, names
    assert temp_prefix(out) == f".seg.nii.gz.{me}.{os.getpid()}-"


def test_a_2d_nifti_inputs_result_is_2d_too(tmp_path, models):
    """One plane stored as a 2D NIfTI array came back as (x, y, 1): `input[labels == k]`
    on the raw arrays raised IndexError. Stored as its input is now, in napari's Save too."""
    ph = generate_phantom((1, 48, 40), (2.5, 1.0, 1.2), seed=2, n_lesions=0)
    raw = ph.volume.array[0].T[::-1, ::-1].copy()  # (i, j) = R, A
    nib.save(nib.Nifti1Image(raw, np.diag([1.2, 1.0, 2.5, 1.0])), tmp_path / "plane.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(tmp_path / "plane.nii.gz"), str(out), "--model",
                 str(models["segmenter"]), "-q"]) == 0
    result = nib.load(out)
    assert result.shape == raw.shape
    np.testing.assert_allclose(result.affine, nib.load(tmp_path / "plane.nii.gz").affine,
                               atol=1e-4)
    assert np.asarray(result.dataobj)[raw > -500].size == (raw > -500).sum()
    assert read_nifti(out).shape == (1, 48, 40)  # and it reads back as it was
