""".npy reader, and the read_volume / is_supported_path dispatch shared by all formats."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.io import (
    SUPPORTED_SUFFIXES,
    is_supported_path,
    read_npy,
    read_volume,
    write_nifti,
)

CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


@pytest.mark.parametrize(
    ("array", "shape"),
    [
        (np.zeros((7, 9), np.float64), (1, 7, 9)),
        (np.zeros((3, 7, 9), np.int16), (3, 7, 9)),
        (np.zeros((4, 7, 3), np.uint8), (4, 7, 3)),  # x = 3 but z too small for RGB
        (np.zeros((2, 5, 5), bool), (2, 5, 5)),
    ],
)
def test_shapes(tmp_path, array, shape):
    path = tmp_path / "a.npy"
    np.save(path, array)

    vol = read_npy(path)

    assert vol.shape == shape
    assert vol.array.dtype == np.float32
    assert vol.spacing == (1.0, 1.0, 1.0)
    assert vol.origin == (0.0, 0.0, 0.0)
    assert vol.metadata["source_format"] == "npy"
    assert vol.metadata["source_name"] == "a.npy"
    assert any("no geometry" in w for w in vol.metadata["warnings"])


def test_values_and_modality_guess(tmp_path):
    ct = np.full((2, 8, 8), -1000, np.int16)
    ct[:, 2:6, 2:6] = 50
    np.save(tmp_path / "ct.npy", ct)
    np.save(tmp_path / "mr.npy", np.linspace(0, 900, 128).reshape(2, 8, 8))

    vol = read_npy(tmp_path / "ct.npy")

    np.testing.assert_array_equal(vol.array, ct.astype(np.float32))
    assert vol.modality == "CT"
    assert read_npy(tmp_path / "mr.npy").modality == "OT"


def _pickled(path: Path) -> None:
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _raw_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps([1, 2, 3]))


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (_pickled, "holds pickled Python objects"),
        (_raw_pickle, "holds pickled Python objects"),
        (lambda p: p.write_text("hello"), "not a .npy file (no NumPy header)"),
        (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage"), "not a readable .npy file"),
        (lambda p: np.save(p, np.zeros((32, 32, 3), np.uint8)), "looks like an RGB(A) image"),
        (lambda p: np.save(p, np.zeros((5, 32, 32, 4))), "looks like an RGB(A) image"),
        (lambda p: np.save(p, np.zeros((2, 5, 6, 7))), "expected a 2D (y, x) or 3D (z, y, x)"),
        (lambda p: np.save(p, np.zeros(5)), "expected a 2D (y, x) or 3D (z, y, x)"),
        (lambda p: np.save(p, np.zeros((0, 4))), "the volume is empty"),
        (lambda p: np.save(p, np.array([["a", "b"]])), "expected a numeric array"),
        (lambda p: np.save(p, np.zeros((2, 2), np.complex64)), "complex-valued"),
        # NumPy counts timedelta64 as an integer: it got past the check (internal error)
        (lambda p: np.save(p, np.zeros((4, 8, 8), "m8[s]")), "expected a numeric array"),
    ],
)
def test_bad_arrays_raise_one_clear_line(tmp_path, write, reason):
    path = tmp_path / "bad.npy"
    write(path)

    with pytest.raises(MedsegInputError) as info:
        read_volume(path)

    assert reason in str(info.value)
    assert str(info.value).startswith("bad.npy: ")
    assert "\n" not in str(info.value)


def test_npz_renamed_to_npy_is_refused(tmp_path):
    np.savez(tmp_path / "arch.npz", a=np.zeros((2, 2)))
    path = (tmp_path / "arch.npz").rename(tmp_path / "arch.npy")

    with pytest.raises(MedsegInputError, match=r"\.npz archive"):
        read_npy(path)


# --------------------------------------------------------------------------- dispatch


@pytest.fixture
def files(tmp_path):
    """One file per format, plus DICOM copies named the ways PACS exports name them."""
    np.save(tmp_path / "arr.npy", np.zeros((2, 4, 4), np.float32))
    write_nifti(tmp_path / "img.nii", np.zeros((2, 4, 4), np.float32), (1, 1, 1))
    write_nifti(tmp_path / "img.NII.GZ", np.zeros((2, 4, 4), np.float32), (1, 1, 1))
    for name in ("ct.dcm", "CT.DICOM", "ct.ima", "IM0001", "1.2.840.113619.2.55.37"):
        shutil.copy(CT_SMALL, tmp_path / name)
    shutil.copy(CT_SMALL, tmp_path / "scan.bin")  # wrong suffix, but the DICM header shows
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "series").mkdir()
    shutil.copy(CT_SMALL, tmp_path / "series" / "a.dcm")
    return tmp_path


@pytest.mark.parametrize(
    ("name", "source_format", "shape"),
    [
        ("arr.npy", "npy", (2, 4, 4)),
        ("img.nii", "nifti", (2, 4, 4)),
        ("img.NII.GZ", "nifti", (2, 4, 4)),
        ("ct.dcm", "dicom", (1, 128, 128)),
        ("CT.DICOM", "dicom", (1, 128, 128)),
        ("ct.ima", "dicom", (1, 128, 128)),
        ("IM0001", "dicom", (1, 128, 128)),
        ("1.2.840.113619.2.55.37", "dicom", (1, 128, 128)),
        ("scan.bin", "dicom", (1, 128, 128)),
        ("series", "dicom", (1, 128, 128)),
    ],
)
def test_read_volume_dispatches(files, name, source_format, shape):
    assert is_supported_path(files / name)

    vol = read_volume(files / name)

    assert vol.metadata["source_format"] == source_format
    assert vol.shape == shape


def test_unsupported_suffix_names_the_supported_ones(files):
    assert not is_supported_path(files / "notes.txt")

    with pytest.raises(MedsegInputError) as info:
        read_volume(files / "notes.txt")

    message = str(info.value)
    assert message.startswith("notes.txt: unsupported file type '.txt'")
    assert all(suffix in message for suffix in SUPPORTED_SUFFIXES)


def test_missing_path(tmp_path):
    with pytest.raises(MedsegInputError) as info:
        read_volume(tmp_path / "gone.nii.gz")

    assert str(info.value) == "gone.nii.gz: no such file or folder"


@pytest.mark.parametrize(
    ("name", "supported"),
    [("a.nii.gz", True), ("a.NPY", True), ("a.dcm", True), ("a.png", False), ("a.gz", False)],
)
def test_is_supported_path_by_suffix_without_touching_disk(tmp_path, name, supported):
    assert is_supported_path(tmp_path / name) is supported


def test_only_folders_and_suffixless_files_holding_dicom_are_claimed(files, tmp_path):
    """napari hands a path to the first reader that claims it: a zarr store, a folder of
    PNGs or a text file named without a suffix must go to other readers."""
    zarr = tmp_path / "x.zarr"
    (zarr / "0").mkdir(parents=True)
    (zarr / ".zgroup").write_text('{"zarr_format": 2}')
    (zarr / "0" / ".zarray").write_text("{}")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "a.png").write_bytes(b"\x89PNG" + bytes(300))
    (tmp_path / "README").write_text("notes" * 100)
    for path in (zarr, pngs, tmp_path / "README"):
        assert not is_supported_path(path), path.name
    assert is_supported_path(files / "series") and is_supported_path(files / "IM0001")
    nested = tmp_path / "study"
    (nested / "sub").mkdir(parents=True)
    (nested / "sub" / "IM1").write_bytes((files / "IM0001").read_bytes())
    assert is_supported_path(nested)


def test_a_dicom_subfolder_beside_many_other_files_is_found(files, tmp_path):
    study = tmp_path / "study"
    (study / "DICOM").mkdir(parents=True)
    for i in range(250):
        (study / f"preview{i:03d}.jpg").write_bytes(b"\xff\xd8" + bytes(200))
    (study / "DICOM" / "IM1").write_bytes((files / "IM0001").read_bytes())
    assert is_supported_path(study)


def test_a_pipe_with_a_supported_name_is_refused_not_read(tmp_path):
    """Reading a named pipe blocks until something writes to it: napari froze."""
    import os

    fifo = tmp_path / "scan.npy"
    os.mkfifo(fifo)
    assert not is_supported_path(fifo)
    with pytest.raises(MedsegInputError, match="not a regular file or folder"):
        read_volume(fifo)


def test_a_saved_mask_or_label_map_opens_as_labels_in_napari(tmp_path):
    """np.save of a segmentation opened as a grey float image, while the same array in a
    .nii.gz opened as Labels."""
    from napari_medseg.core.io import LabelMap, read_scan_or_labels

    seg = np.zeros((6, 16, 16), np.uint8)
    seg[2:4, 4:9, 4:9], seg[3:5, 10:14, 10:14] = 1, 2
    np.save(tmp_path / "seg.npy", seg)
    np.save(tmp_path / "mask.npy", seg > 0)
    np.save(tmp_path / "ct.npy", np.random.default_rng(0).integers(-1000, 400, (4, 8, 8))
            .astype(np.int16))
    np.save(tmp_path / "float.npy", seg.astype(np.float32))
    opened = read_scan_or_labels(tmp_path / "seg.npy")
    assert isinstance(opened, LabelMap) and np.array_equal(opened.labels, seg)
    assert any("opened as a label map" in w for w in opened.volume.metadata["warnings"])
    mask = read_scan_or_labels(tmp_path / "mask.npy")
    assert isinstance(mask, LabelMap) and np.array_equal(mask.labels, seg > 0)
    # a smooth 8-bit image of fewer than 128 grey levels, its background masked to 0
    # (an upsampled MR slice quantised to 7 bits): grey levels, not 119 structures
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from scipy.ndimage import zoom

    mr = zoom(dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(float), 4, order=1)
    grey = np.round(mr / mr.max() * 127).astype(np.uint8)
    grey[grey < 10] = 0
    np.save(tmp_path / "grey.npy", grey)
    for name in ("ct", "float", "grey"):
        assert not isinstance(read_scan_or_labels(tmp_path / f"{name}.npy"), LabelMap), name
    assert read_npy(tmp_path / "seg.npy").array.dtype == np.float32  # the models: an image


def test_a_low_count_image_with_few_values_is_no_label_map():
    """A low-count SPECT-like frame (integers 0-27, each voxel independent) was opened
    as a Labels layer by the few-values rule; a label map with a vessel two voxels wide
    still is one."""
    from napari_medseg.core.io._common import looks_like_label_map

    counts = np.random.default_rng(0).poisson(3.0, (8, 64, 64)).astype(np.int16)
    counts[:, :4] = 0
    assert 0 < counts.max() <= 27 and not looks_like_label_map(counts)
    vessel = np.zeros((8, 64, 64), np.uint8)
    vessel[:, 10:54, 30:32] = 1  # two voxels wide, running across the rows
    vessel[:, 40:42, 5:60] = 2
    assert looks_like_label_map(vessel)


@pytest.mark.parametrize("shape", [(1, 4, 5, 6), (4, 5, 6, 1), (1, 4, 5, 6, 1)])
def test_a_volume_saved_with_a_batch_or_channel_axis_of_one_reads_as_the_volume(tmp_path,
                                                                                 shape):
    """(1, z, y, x) from PyTorch was refused as 4D, while a NIfTI's trailing 1 is dropped."""
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) - 500.0
    np.save(tmp_path / "v.npy", data)
    volume = read_npy(tmp_path / "v.npy")
    assert volume.shape == (4, 5, 6)
    np.testing.assert_array_equal(volume.array, data.reshape(4, 5, 6))
    np.save(tmp_path / "one.npy", np.zeros((1, 5, 6, 1), np.float32))  # one 2D image
    assert read_npy(tmp_path / "one.npy").shape == (1, 5, 6)
    np.save(tmp_path / "t.npy", np.zeros((2, 4, 5, 6), np.float32))  # a real 4D: refused
    with pytest.raises(MedsegInputError, match="expected a 2D"):
        read_npy(tmp_path / "t.npy")
