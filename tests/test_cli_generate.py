"""napari-medseg generate: a finer volume with acquired slices unchanged; bad input → exit 2."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from napari_medseg.cli import main
from napari_medseg.core.io import read_nifti, write_nifti
from napari_medseg.core.models import SliceGenerator, save_model
from napari_medseg.core.phantom import generate_phantom

PERCENTILE = {"type": "percentile", "low_percentile": 0.5, "high_percentile": 99.5}


@pytest.fixture(scope="module")
def zero_model(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(SliceGenerator(widths=(8, 16, 16)).zero_residual_(), tmp_path_factory.mktemp("m"),
                      "gen", {"classes": ["intensity"], "input_spacing_mm": [1, 1, 1],
                              "normalisation": PERCENTILE})


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    ph = generate_phantom((5, 40, 36), (4.0, 1.0, 1.2), seed=2, n_lesions=0)
    path = tmp_path_factory.mktemp("data") / "thick.nii.gz"
    write_nifti(path, ph.volume.array, ph.volume.spacing, ph.volume.origin)
    return path


@pytest.mark.parametrize("method", ["model", "linear", "cubic"])
def test_generate_writes_the_finer_grid(tmp_path, zero_model, image, method, capsys):
    out, status = tmp_path / "fine.nii.gz", tmp_path / "slices.csv"
    args = ["generate", str(image), str(out), "--factor", "2", "--method", method,
            "--slices-csv", str(status), "--quiet"]
    if method == "model":
        args += ["--model", str(zero_model)]
    assert main(args) == 0
    src, fine = read_nifti(image), read_nifti(out)
    assert fine.shape == (9, 40, 36)
    assert fine.spacing == pytest.approx((2.0, 1.0, 1.2))
    assert fine.origin == pytest.approx(src.origin)
    np.testing.assert_array_equal(fine.array[::2], src.array)
    with open(status, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["acquired", "generated"] * 4 + ["acquired"]
    assert "synthetic" in capsys.readouterr().out
    # the file itself says so, in other viewers (descrip) and slice by slice (extension)
    import json

    import nibabel as nib

    header = nib.load(out).header
    assert b"SYNTHETIC" in header["descrip"].tobytes()
    (ext,) = header.extensions
    info = json.loads(ext.get_content())["napari-medseg"]
    assert info["synthetic"] is True and info["generated_slices"] == [1, 3, 5, 7]


@pytest.mark.parametrize("extra, message", [
    (["--factor", "4"], "factor"),
    (["--factor", "0"], "factor"),  # argparse's own refusal printed its usage block
    (["--factor", "-2"], "factor"),
    (["--factor", "1"], "nothing to generate"),
    (["--method", "linear"], "--model applies to --method model"),  # it was ignored
])
def test_bad_requests_exit_2_and_write_nothing(tmp_path, zero_model, image, extra, message,
                                               capsys):
    out = tmp_path / "fine.nii.gz"
    assert main(["generate", str(image), str(out), "--method", "model", "--model", str(zero_model),
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_single_slice_cannot_be_upsampled(tmp_path, zero_model, capsys):
    one = tmp_path / "one.npy"
    np.save(one, np.zeros((1, 16, 16), np.float32))
    out = tmp_path / "fine.nii.gz"
    assert main(["generate", str(one), str(out), "--method", "model", "--model", str(zero_model),
                 "--factor", "2"]) == 2
    assert "two acquired slices" in capsys.readouterr().err
    assert not out.exists()


def test_generate_prints_the_readers_warnings(tmp_path, capsys):
    """An .npy has no geometry: the output's spacing is then made up, and says so."""
    np.save(tmp_path / "v.npy", np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8))
    assert main(["generate", str(tmp_path / "v.npy"), str(tmp_path / "f.nii.gz"),
                 "--method", "linear", "--factor", "2", "-q"]) == 0
    assert "generate: warning: .npy files carry no geometry" in capsys.readouterr().err


def test_a_sagittal_scan_is_upsampled_between_its_slices(tmp_path, zero_model, capsys):
    """10 sagittal slices 4 mm apart with 0.5 mm pixels: ×2 doubled a 0.5 mm axis."""
    import nibabel as nib

    data = np.random.default_rng(1).normal(size=(10, 24, 20)).astype(np.float32)  # (i=x, j, k)
    path = tmp_path / "sag.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([4.0, 0.5, 0.5, 1.0])), path)
    out = tmp_path / "sag_x2.nii.gz"
    assert main(["generate", str(path), str(out), "--factor", "2", "--method", "model",
                 "--model", str(zero_model), "-q"]) == 0
    back = nib.load(out)
    assert back.shape == (19, 24, 20)
    np.testing.assert_allclose(back.header.get_zooms(), (2.0, 0.5, 0.5), rtol=1e-5)
    # on the readers' (z, y, x) = (S, P, L) grid the slices lie along x: every 2nd is acquired
    np.testing.assert_array_equal(read_nifti(out).array[:, :, ::2], read_nifti(path).array)
    assert "along x" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["model", "linear"])
def test_generated_slices_are_not_generated_from_again(tmp_path, zero_model, image, method,
                                                       capsys):
    """A ×2 of a ×2 listed the first run's synthetic slices as acquired (in the file, its
    CSV and the summary), fed them to the model as real, and got past the ×3 limit."""
    x2, x4 = tmp_path / "x2.nii.gz", tmp_path / "x4.nii.gz"
    extra = ["--model", str(zero_model)] if method == "model" else []
    assert main(["generate", str(image), str(x2), "--method", method, "--factor", "2", "-q",
                 *extra]) == 0
    assert read_nifti(x2).metadata["synthetic_slices"] == 4
    capsys.readouterr()
    assert main(["generate", str(x2), str(x4), "--method", method, "--factor", "2", "-q",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert "4 slices of this file were generated by napari-medseg" in err
    assert "already holds 4 generated (synthetic) slices" in err
    assert not x4.exists()


@pytest.mark.parametrize("command", [["generate", "{in}", "{tmp}/g.nii.gz", "--method", "linear"],
                                     ["segment", "{in}", "{tmp}/s.nii.gz"],
                                     ["train", "classifier", "--out", "{tmp}/m"]])
def test_a_negative_thread_count_is_refused_as_the_arguments_are_read(tmp_path, capsys,
                                                                      command):
    """Interpolation runs no model: --threads -3 was taken in silence there."""
    src = tmp_path / "scan.nii.gz"
    src.write_bytes(b"not read")
    argv = [a.format(**{"in": str(src), "tmp": str(tmp_path)}) for a in command]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--threads", "-3"])
    assert exit_.value.code == 2
    assert "argument --threads: expected a whole number, 0 or more" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_a_label_map_is_said_to_get_values_that_are_no_structure(tmp_path, capsys):
    """A mask upsampled beside its scan: structure 1 beside 3 became a "2" (cubic: also
    negatives), with no word said."""
    import nibabel as nib

    labels = np.zeros((8, 8, 5), np.uint8)
    labels[2:6, 2:6, 1:4] = 1
    labels[3:5, 3:5, 2] = 3
    img = nib.Nifti1Image(labels, np.diag([1.0, 1.0, 3.0, 1.0]))
    img.header.set_intent("label")
    nib.save(img, tmp_path / "mask.nii.gz")
    assert main(["generate", str(tmp_path / "mask.nii.gz"), str(tmp_path / "up.nii.gz"),
                 "--factor", "2", "--quiet"]) == 0
    assert "holds a label map" in capsys.readouterr().err
    write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).normal(size=(5, 8, 8)),
                (3.0, 1.0, 1.0))
    assert main(["generate", str(tmp_path / "scan.nii.gz"), str(tmp_path / "up2.nii.gz"),
                 "--factor", "2", "--quiet"]) == 0
    assert "label map" not in capsys.readouterr().err


def test_a_generated_file_opens_saying_which_slices_are_synthetic(tmp_path, capsys):
    """Reopened, a generated file said how many slices were synthetic, not which (the
    Generate widget's own layer says which)."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    write_nifti(tmp_path / "scan.nii.gz", rng.normal(size=(5, 8, 8)).astype(np.float32),
                (3.0, 1.0, 1.0))
    out, status = tmp_path / "up.nii.gz", tmp_path / "status.csv"
    assert main(["generate", str(tmp_path / "scan.nii.gz"), str(out), "--factor", "2",
                 "--slices-csv", str(status), "-q"]) == 0
    rows = list(csv.reader(status.open()))[1:]
    made = [int(z) for z, kind, *_ in rows if kind == "generated"]
    volume = read_nifti(out)
    assert volume.metadata["synthetic_planes"] == {"axis": "z", "indices": made,
                                                  "method": "linear"}
    # the same file stored the other way up by another tool, which kept our extension:
    # read, it is the same volume, so the indices still name its generated slices
    img = nib.load(out)
    flipped = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, ::-1],
                              img.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0],
                                                     [0, 0, -1, 8], [0, 0, 0, 1.0]]),
                              img.header)
    nib.save(flipped, tmp_path / "flipped.nii.gz")
    again = read_nifti(tmp_path / "flipped.nii.gz")
    np.testing.assert_array_equal(again.array, volume.array)  # turned back as read
    assert again.metadata["synthetic_planes"]["indices"] == made
    # cropped by another tool (the first slice gone): the indices would name other slices
    cropped = nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 1:],
                              img.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0],
                                                     [0, 0, 1, 1], [0, 0, 0, 1.0]]),
                              img.header)
    nib.save(cropped, tmp_path / "cropped.nii.gz")
    again = read_nifti(tmp_path / "cropped.nii.gz")
    assert "synthetic_planes" not in again.metadata and again.metadata["synthetic_slices"] == 4


def test_a_dicom_series_is_read_once(tmp_path, monkeypatch):
    """The label-map check read every non-CT input a second time, DICOM series included
    (which can hold no label map): twice the reading time and memory."""
    import pydicom

    import napari_medseg.core.io as io
    from tests.core.test_io_dicom import write_series

    write_series(tmp_path / "mr", [0.0, 2.5, 5.0])
    for path in (tmp_path / "mr").iterdir():  # an MR series: not CT
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    reads = []
    real = io.read_scan_or_labels
    monkeypatch.setattr(io, "read_scan_or_labels", lambda p: reads.append(p) or real(p))
    assert main(["generate", str(tmp_path / "mr"), str(tmp_path / "out.nii.gz"),
                 "--factor", "2", "--method", "linear", "--quiet"]) == 0
    assert reads == []
