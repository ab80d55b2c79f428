"""NIfTI reader/writer: LPS reorientation, round trips, dtypes, 4D refusal, atomic writes."""

from __future__ import annotations

import gzip
import logging

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.io import guess_modality, read_nifti, read_volume, write_nifti
from napari_medseg.core.io import nifti as nifti_module

SPACING = (2.5, 0.8, 0.6)  # (z, y, x) mm, deliberately anisotropic
ORIGIN = (-310.5, 12.25, -180.0)


def ramp(shape, dtype=np.float32) -> np.ndarray:
    return np.arange(np.prod(shape)).reshape(shape).astype(dtype)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("float32", lambda s: ramp(s) * 1.5 - 1000.0),
        ("uint8", lambda s: (ramp(s, np.int64) % 4).astype(np.uint8)),
        ("uint16", lambda s: ramp(s, np.uint16) * 7),
        ("int16", lambda s: ramp(s, np.int16) - 1024),
        ("int32", lambda s: ramp(s, np.int32) * 100_000),
    ],
)
def test_round_trip_keeps_array_spacing_origin_and_dtype(tmp_path, suffix, dtype, values):
    array = values((4, 5, 6))
    assert array.dtype == np.dtype(dtype)
    path = tmp_path / f"vol{suffix}"

    written = write_nifti(path, array, SPACING, ORIGIN)
    vol = read_nifti(written)

    assert written == path
    assert nib.load(path).get_data_dtype() == np.dtype(dtype)  # labels stay integers on disk
    np.testing.assert_array_equal(vol.array, array.astype(np.float32))
    assert vol.spacing == pytest.approx(SPACING)
    assert vol.origin == pytest.approx(ORIGIN)
    assert vol.metadata["source_format"] == "nifti"
    assert vol.metadata["orientation"] == "LPS"
    assert vol.metadata["warnings"] == []


def test_gzip_file_is_really_compressed(tmp_path):
    path = write_nifti(tmp_path / "zeros.nii.gz", np.zeros((8, 16, 16), np.uint8), (1, 1, 1))
    with gzip.open(path) as f:
        assert len(f.read()) > path.stat().st_size


@pytest.mark.parametrize(
    ("given", "stored"),
    [("bool", "uint8"), ("float64", "float32"), ("float16", "float32"), ("int64", "int32")],
)
def test_other_dtypes_are_converted(tmp_path, given, stored):
    array = (ramp((2, 3, 4)) % 2).astype(given)
    path = write_nifti(tmp_path / "x.nii", array, (1, 1, 1))

    assert nib.load(path).get_data_dtype() == np.dtype(stored)
    np.testing.assert_array_equal(read_nifti(path).array, array.astype(np.float32))


def test_ras_file_is_flipped_to_lps_and_transposed(tmp_path):
    data = ramp((4, 3, 2))  # (i, j, k)
    # RAS+ affine: i runs towards the patient's Right, j Anterior, k Superior
    affine = np.array([[2.0, 0, 0, 10.0], [0, 3.0, 0, 20.0], [0, 0, 4.0, 30.0], [0, 0, 0, 1]])
    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    vol = read_nifti(path)

    # LPS wants i towards Left and j Posterior: both flip; then (i, j, k) → (z, y, x)
    np.testing.assert_array_equal(vol.array, data[::-1, ::-1, :].transpose(2, 1, 0))
    assert vol.spacing == pytest.approx((4.0, 3.0, 2.0))
    # new voxel 0 is old voxel (3, 2, 0): RAS (16, 26, 30) = LPS (-16, -26, 30)
    assert vol.origin == pytest.approx((30.0, -26.0, -16.0))


AFFINES = {
    "RAS": np.diag([1.5, 2.0, 3.0, 1.0]),
    "LPS": np.diag([-1.5, -2.0, 3.0, 1.0]),
    "LAS (radiological)": np.diag([-1.5, 2.0, 3.0, 1.0]),
    "sagittal (i=S, j=A, k=R)": np.array(
        [[0, 0, 3.0, -40], [0, 2.0, 0, 5], [1.5, 0, 0, 60], [0, 0, 0, 1]]
    ),
    "coronal (i=L, j=I, k=P)": np.array(
        [[-1.5, 0, 0, 7], [0, 0, -3.0, -9], [0, -2.0, 0, 11], [0, 0, 0, 1]]
    ),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_every_voxel_lands_at_its_world_position(tmp_path, name):
    """Independent check: each output voxel's LPS position maps back to the stored voxel."""
    affine = AFFINES[name]
    data = ramp((5, 4, 3))
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(data, affine), path)

    vol = read_nifti(path)

    z, y, x = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    lps = np.stack(
        [
            vol.origin[2] + x * vol.spacing[2],
            vol.origin[1] + y * vol.spacing[1],
            vol.origin[0] + z * vol.spacing[0],
        ]
    )
    ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None, None]
    ijk = np.einsum("ab,b...->a...", np.linalg.inv(affine)[:3, :3], ras) + np.linalg.inv(
        affine
    )[:3, 3, None, None, None]
    ijk = np.rint(ijk).astype(int)
    np.testing.assert_array_equal(vol.array, data[ijk[0], ijk[1], ijk[2]])


def test_trailing_singleton_4d_is_squeezed(tmp_path):
    data = ramp((4, 3, 2, 1))
    path = tmp_path / "one_volume.nii"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0])), path)

    assert read_nifti(path).shape == (2, 3, 4)


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ((4, 3, 2, 5), "4D NIfTI (5 time points) is not supported; pick one volume"),
        ((4, 3, 2, 1, 3), "5D NIfTI (shape (4, 3, 2, 1, 3)) is not supported; pick one volume"),
    ],
)
def test_multi_volume_files_are_refused(tmp_path, shape, reason):
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(ramp(shape), np.eye(4)), path)

    with pytest.raises(MedsegInputError) as info:
        read_nifti(path)

    assert str(info.value) == f"series.nii.gz: {reason}"


def test_rgb_nifti_is_refused(tmp_path):
    rgb = np.zeros((4, 4, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "colour.nii"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)

    with pytest.raises(MedsegInputError, match="RGB NIfTI is not supported"):
        read_nifti(path)


def _corrupt(tmp_path, kind):
    if kind == "noise":
        path = tmp_path / "noise.nii"
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 800, np.uint8).tobytes())
    elif kind == "not gzip":
        path = tmp_path / "plain.nii.gz"
        path.write_text("hello")
    else:  # truncated: a valid header but half the voxels
        path = tmp_path / "cut.nii"
        nib.save(nib.Nifti1Image(ramp((8, 8, 8)), np.eye(4)), path)
        path.write_bytes(path.read_bytes()[:-1000])
    return path


def test_a_synthetic_record_counts_only_the_slices_the_file_has(tmp_path):
    """A record copied onto a cut-back volume named slices beyond its end: "4 slices of
    this file were generated" on a file of 5 acquired ones."""
    path = tmp_path / "cut.nii.gz"
    write_nifti(path, ramp((5, 4, 4)), (4.0, 1.0, 1.0),
                info={"synthetic": True, "slice_axis": "z", "generated_slices": [1, 3, 5, 7]})
    volume = read_volume(path)
    assert volume.metadata["synthetic_slices"] == 2
    assert any("2 slices of this file were generated" in w for w in volume.metadata["warnings"])


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.nii"])
def test_an_empty_file_is_said_to_be_empty(tmp_path, name):
    """It read "not a readable NIfTI file (Binary block is wrong size)"."""
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(MedsegInputError, match=f"^{name}: the file is empty$"):
        read_volume(tmp_path / name)


@pytest.mark.parametrize("kind", ["noise", "not gzip", "truncated"])
def test_broken_files_raise_one_clear_line(tmp_path, kind):
    path = _corrupt(tmp_path, kind)

    with pytest.raises(MedsegInputError) as info:
        read_volume(path)

    assert str(info.value).startswith(f"{path.name}: ")
    assert "\n" not in str(info.value)


def test_failed_write_leaves_existing_file_and_no_temp(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "labels.nii.gz", np.ones((2, 3, 4), np.uint8), (1, 1, 1))
    before = path.read_bytes()

    def disk_full(img, filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti_module.nib, "save", disk_full)
    with pytest.raises(MedsegInputError, match="could not write the file"):
        write_nifti(path, np.zeros((2, 3, 4), np.uint8), (1, 1, 1))

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.nii.gz"]


@pytest.mark.parametrize(
    ("name", "array", "spacing", "reason"),
    [
        ("x.nrrd", np.zeros((2, 2, 2)), (1, 1, 1), "must end in .nii or .nii.gz"),
        ("missing/x.nii", np.zeros((2, 2, 2)), (1, 1, 1), "folder to write into does not exist"),
        ("x.nii", np.zeros((2, 2, 2, 2)), (1, 1, 1), "expected a non-empty (z, y, x) array"),
        ("x.nii", np.zeros((2, 2, 2)), (1, 0, 1), "spacing must be positive"),
        ("x.nii", np.zeros((2, 2, 2), np.complex64), (1, 1, 1), "cannot write dtype complex64"),
        ("x.nii", np.full((2, 2, 2), 2**40), (1, 1, 1), "do not fit NIfTI's int32 or uint32"),
    ],
)
def test_write_rejects_bad_requests(tmp_path, name, array, spacing, reason):
    with pytest.raises(MedsegInputError) as info:
        write_nifti(tmp_path / name, array, spacing)

    assert reason in str(info.value)
    assert not list(tmp_path.rglob("*.nii*"))


def test_2d_array_is_written_as_one_slice(tmp_path):
    path = write_nifti(tmp_path / "slice.nii", ramp((3, 4)), (1.0, 0.5, 0.5))

    assert read_nifti(path).shape == (1, 3, 4)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.r_[np.full(100, -1000.0), np.linspace(-100, 1500, 900)], "CT"),  # air + tissue
        (np.linspace(0, 4000, 1000), "OT"),  # MR-like: no negative values
        (np.r_[np.full(2, -1000.0), np.linspace(0, 100, 998)], "OT"),  # <0.5 % dark: noise
        (np.full(10, np.nan), "OT"),
        (np.r_[np.full(50, np.nan), np.full(50, -1024.0), np.zeros(50)], "CT"),  # NaN gaps
        (np.zeros(10, dtype=bool), "OT"),
        (np.array([], dtype=np.float32), "OT"),
    ],
)
def test_guess_modality(array, expected):
    assert guess_modality(array) == expected


def test_ct_like_nifti_is_guessed_ct(tmp_path):
    array = np.full((3, 8, 8), -1000.0, np.float32)
    array[:, 2:6, 2:6] = 40.0
    path = write_nifti(tmp_path / "ct.nii.gz", array, (3, 1, 1))

    assert read_nifti(path).modality == "CT"


def test_a_long_legal_file_name_is_written(tmp_path):
    """The temp file's name used to add 21 characters to the output's: a legal
    240-character name failed with a raw 'File name too long' about the temp file."""
    path = tmp_path / ("n" * 233 + ".nii.gz")
    write_nifti(path, np.zeros((2, 3, 4), np.float32), (1, 1, 1))
    assert read_nifti(path).shape == (2, 3, 4)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_file_mode_is_read_without_touching_the_umask(monkeypatch):
    """Setting the umask to 0 and back, from the autosave thread, briefly made other
    threads' new files world-writable; where /proc tells the umask it is only read."""
    import os
    import sys

    from napari_medseg.core.io import _common

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/self/status is Linux's")
    mask = os.umask(0o022)
    os.umask(mask)
    monkeypatch.setattr(os, "umask", lambda *a: (_ for _ in ()).throw(AssertionError("umask set")))
    assert _common.regular_file_mode() == 0o666 & ~mask


@pytest.mark.parametrize("shear", [0.0, np.tan(np.radians(15.0))])
@pytest.mark.parametrize("turn", [0.0, 20.0])
@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "I", "P"), ("A", "S", "R")])
def test_a_result_written_from_a_nifti_lies_where_the_input_does(tmp_path, codes, turn, shear):
    """Whatever the input's orientation (permuted, flipped, oblique, sheared as a gantry
    tilt kept in the affine), each voxel sits where docs/data.md says (origin + index ×
    spacing along axes_lps), and each voxel of what is written from it at the world
    position of the same input voxel. A sheared file's origin was the corner's position
    projected on the skew axes: 100s of mm off, and so were the labels written back."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    c, s = np.cos(np.radians(turn)), np.sin(np.radians(turn))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    base = np.diag([0.8, 1.1, 2.5, 1.0])
    base[:3, 3] = (10.0, -20.0, 30.0)
    tilt = np.array([[1.0, 0, 0], [0, 1.0, shear], [0, 0, 1.0]])  # y moves with k
    base[:3, :3] = rot @ tilt @ base[:3, :3]
    # the same world grid stored with its axes in the order and signs ``codes``
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    affine = base @ inv_ornt_aff(ornt, data.shape)
    stored = apply_orientation(data, ornt)
    nib.save(nib.Nifti1Image(stored, affine), tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    assert any("sheared image (its axes 15.0° off" in w
               for w in vol.metadata["warnings"]) == bool(shear)
    axes = np.asarray(vol.metadata["axes_lps"])
    for idx in [(0, 0, 0), tuple(n - 1 for n in vol.shape), (1, 2, 3)]:
        lps = axes.T @ (np.asarray(vol.origin) + np.asarray(idx) * np.asarray(vol.spacing))
        back = np.linalg.solve(base, [*(lps * [-1.0, -1.0, 1.0]), 1.0])[:3]
        k = np.round(back).astype(int)
        np.testing.assert_allclose(back, k, atol=1e-3, err_msg=f"volume voxel {idx}")
        assert vol.array[idx] == pytest.approx(data[tuple(k)])
    out = write_nifti(tmp_path / "out.nii.gz", vol.array, vol.spacing, vol.origin,
                      vol.metadata.get("axes_lps"))
    written = nib.load(out)
    w_data, w_aff = np.asarray(written.dataobj), written.affine
    for idx in [(0, 0, 0), (4, 0, 0), (0, 5, 0), (0, 0, 6), (4, 5, 6), (2, 3, 1)]:
        world = base @ np.array([*idx, 1.0])  # where the input voxel ``idx`` of ``data`` is
        back = np.linalg.solve(w_aff, world)[:3]
        k = np.round(back).astype(int)
        np.testing.assert_allclose(back, k, atol=1e-3, err_msg=str(idx))
        assert w_data[tuple(k)] == pytest.approx(data[idx])
    # the qform cannot hold a shear (ITK reads only it, and refuses a file without it):
    # its nearest rotation is anchored at the centre voxel, where it was anchored at
    # voxel 0 and the far corner lay up to 27 mm off on a real tilt
    qform, q_code = written.header.get_qform(coded=True)
    _, s_code = written.header.get_sform(coded=True)
    assert (int(q_code), int(s_code)) == (1, 1)
    centre = (np.asarray(written.shape, dtype=float) - 1) / 2
    np.testing.assert_allclose(qform @ [*centre, 1], w_aff @ [*centre, 1], atol=1e-3)
    if not shear:
        np.testing.assert_allclose(qform, w_aff, atol=1e-4)


@pytest.mark.parametrize("shear", [0.0, np.tan(np.radians(15.0))])
@pytest.mark.parametrize("turn", [0.0, 20.0])
@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "I", "P"), ("A", "S", "R"),
                                   ("L", "P", "S")])
def test_a_result_is_stored_in_its_inputs_own_voxel_order(tmp_path, codes, turn, shear):
    """The reader records a NIfTI file's voxel order; written with it, a result has the
    input's shape and affine, so the two raw arrays line up voxel for voxel (a RAS input's
    labels came out with i and j reversed, a sagittal one's with the shape permuted:
    ``input[labels == 2]`` on nibabel's arrays picked other voxels)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    rng = np.random.default_rng(1)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    c, s = np.cos(np.radians(turn)), np.sin(np.radians(turn))
    base = np.diag([0.8, 1.1, 2.5, 1.0])
    base[:3, 3] = (10.0, -20.0, 30.0)
    base[:3, :3] = (np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
                    @ np.array([[1.0, 0, 0], [0, 1.0, shear], [0, 0, 1.0]]) @ base[:3, :3])
    ornt = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    affine = base @ inv_ornt_aff(ornt, data.shape)
    stored = apply_orientation(data, ornt)
    nib.save(nib.Nifti1Image(stored, affine), tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    assert vol.metadata["stored_orientation"] == "".join(codes)

    out = write_nifti(tmp_path / "out.nii.gz", vol.array, vol.spacing, vol.origin,
                      vol.metadata["axes_lps"],
                      stored_orientation=vol.metadata["stored_orientation"])
    written = nib.load(out)
    assert written.shape == stored.shape
    np.testing.assert_array_equal(np.asarray(written.dataobj), stored)
    np.testing.assert_allclose(written.affine, affine, atol=1e-3)
    # and it reads back as the same volume
    again = read_volume(out)
    np.testing.assert_array_equal(again.array, vol.array)
    np.testing.assert_allclose(again.origin, vol.origin, atol=1e-3)


def test_a_voxel_order_that_is_none_is_refused(tmp_path):
    for codes in ("RAR", "XYZ", "RA"):
        with pytest.raises(MedsegInputError, match="not a voxel order"):
            write_nifti(tmp_path / "x.nii", np.zeros((2, 3, 4)), (1, 1, 1),
                        stored_orientation=codes)
    assert not list(tmp_path.iterdir())


def test_slices_named_in_a_file_stored_in_another_voxel_order_are_kept(tmp_path):
    """Generated slices and a series' gaps are recorded by index in the (z, y, x) volume
    the writer was given, with that volume's frame (axes, shape): trusted when the file
    reads back in that frame, whatever voxel order it is stored in, by this writer or
    another tool; not when the frame read differs (a grid turned by a napari rotation
    before saving, a 45° tie read the other way, a crop): there they named other slices."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    array = ramp((6, 4, 5))
    info = {"synthetic": True, "generated_slices": [1, 3], "slice_axis": "z"}
    path = write_nifti(tmp_path / "g.nii.gz", array, (2.0, 1.0, 1.0), info=info,
                       stored_orientation="RAS")
    img = nib.load(path)
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.array, array)
    assert vol.metadata["synthetic_planes"]["indices"] == [1, 3]

    # another tool stores it the other way up along z: read, the same volume
    flip = ornt_transform(io_orientation(img.affine), axcodes2ornt(("R", "A", "I")))
    nib.save(img.as_reoriented(flip), tmp_path / "moved.nii.gz")
    again = read_volume(tmp_path / "moved.nii.gz")
    np.testing.assert_array_equal(again.array, array)
    assert again.metadata["synthetic_planes"]["indices"] == [1, 3]

    # given a volume whose z runs to the feet (a layer rotated 180° before saving): read,
    # z runs to the head, so slices 1 and 3 of what was given are 4 and 2 of what is read
    feet = [[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]
    for order in ("RAS", None):
        path = write_nifti(tmp_path / "feet.nii.gz", array, (2.0, 1.0, 1.0), axes=feet,
                           info=info, stored_orientation=order)
        turned = read_volume(path)
        np.testing.assert_array_equal(turned.array, array[::-1, ::-1])
        assert "synthetic_planes" not in turned.metadata, order
        assert turned.metadata["synthetic_slices"] == 2


def test_the_labels_writer_keeps_a_scans_axes(tmp_path):
    """A Labels layer made from a coronal scan carries the scan's axes in its metadata;
    napari's save writes them into the file (it wrote every layer as axial)."""
    from napari_medseg._writer import write_labels_nifti

    coronal = [[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]]  # z anterior, y down, x left
    meta = {"scale": (2.0, 1.0, 1.0), "translate": (5.0, 6.0, 7.0),
            "metadata": {"medseg": {"source": {"axes_lps": coronal}}}}
    (path,) = write_labels_nifti(str(tmp_path / "l.nii.gz"), np.zeros((2, 3, 4), np.uint8), meta)
    affine = nib.load(path).affine
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(lps @ affine[:3, 2], 2.0 * np.array(coronal[0]))  # k: z
    np.testing.assert_allclose(lps @ affine[:3, 3], 5.0 * np.array(coronal[0])
                               + 6.0 * np.array(coronal[1]) + 7.0 * np.array(coronal[2]))
    (plain,) = write_labels_nifti(str(tmp_path / "p.nii.gz"), np.zeros((2, 3, 4), np.uint8),
                                  {"scale": (2.0, 1.0, 1.0)})
    np.testing.assert_allclose(nib.load(plain).affine[:3, :3], np.diag([-1.0, -1.0, 2.0]))
    # the same metadata copied onto a layer of another shape (another scan's): the axes
    # were applied to it, saving its labels turned away from the scan they were drawn on
    meta["metadata"]["medseg"]["source"]["shape_zyx"] = [2, 3, 4]
    (other,) = write_labels_nifti(str(tmp_path / "o.nii.gz"), np.zeros((5, 3, 4), np.uint8), meta)
    np.testing.assert_allclose(nib.load(other).affine[:3, :3], np.diag([-1.0, -1.0, 2.0]))


def test_overwriting_a_file_keeps_its_permissions(tmp_path):
    import os
    import stat

    from napari_medseg._writer import write_labels_nifti

    path = tmp_path / "private.nii.gz"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    write_labels_nifti(str(path), np.zeros((2, 3, 4), np.uint8), {"scale": (1.0, 1.0, 1.0)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("where", ["srow", "pixdim"])
def test_a_header_with_nan_geometry_is_read_with_a_warning(tmp_path, where):
    path = tmp_path / "nan.nii"
    img = nib.Nifti1Image(ramp((4, 3, 2)).astype(np.int16), np.diag([2.0, 3.0, 4.0, 1.0]))
    img.header.set_sform(np.diag([2.0, 3.0, 4.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    hdr = np.frombuffer(bytes(raw[:348]), dtype=img.header.structarr.dtype).copy()
    if where == "srow":
        hdr["srow_x"][0][0] = np.nan
    else:
        hdr["sform_code"], hdr["pixdim"][0][1] = 0, np.nan
    raw[:348] = hdr.tobytes()
    path.write_bytes(bytes(raw))

    volume = read_volume(path)  # it raised numpy's LinAlgError

    assert volume.shape == (2, 3, 4)
    assert any("NaN or infinite" in w for w in volume.metadata["warnings"])
    assert np.all(np.isfinite(volume.spacing))


def test_nifti_errors_name_the_file_not_its_folders(tmp_path):
    folder = tmp_path / "Patient_JohnDoe_1970"
    folder.mkdir()
    for path in (folder / "garbage.nii", _corrupt(folder, "truncated")):
        if path.name == "garbage.nii":
            path.write_bytes(b"x" * 10)
        with pytest.raises(MedsegInputError) as info:
            read_volume(path)
        assert "JohnDoe" not in str(info.value) and path.name in str(info.value)


def test_the_labels_writer_refuses_values_nifti_cannot_hold(tmp_path):
    from napari_medseg._writer import write_labels_nifti

    labels = np.zeros((2, 3, 4), np.int64)
    labels[0, 0, 0] = 2**32 + 1  # was cast to int32: label 1
    # not a ValueError: napari drops a writer's ValueError as "not a valid writer"
    with pytest.raises(RuntimeError, match="int32"):
        write_labels_nifti(str(tmp_path / "l.nii.gz"), labels, {"scale": (1.0, 1.0, 1.0)})
    with pytest.raises(RuntimeError, match="whole numbers"):
        write_labels_nifti(str(tmp_path / "l.nii.gz"), np.full((2, 3, 4), 4.6),
                           {"scale": (1.0, 1.0, 1.0)})
    assert not list(tmp_path.iterdir())
    labels[0, 0, 0] = 70000  # fits int32: kept
    (path,) = write_labels_nifti(str(tmp_path / "l.nii.gz"), labels, {"scale": (1.0, 1.0, 1.0)})
    assert np.asarray(nib.load(path).dataobj).max() == 70000


def test_quoted_and_windows_paths_in_messages_keep_only_the_file_name():
    from napari_medseg.core.io._common import short_reason

    posix = short_reason(FileNotFoundError(2, "No such file", "/data/John Doe 1970/IM1"))
    windows = short_reason(OSError(2, "No such file", "C:\\Users\\JaneRoe\\Patients\\IM1"))
    for text in (posix, windows):
        assert text.endswith("'IM1'") and "Doe" not in text and "Roe" not in text
    assert short_reason(ValueError("ratio 1/2 and 'a/b' stay")) == "ratio 1/2 and 'a/b' stay"
    # a bytes value's escapes are no path: "Not a gzipped file (b'x02')" was printed
    assert short_reason(OSError("Not a gzipped file (b'\\x01\\x02')")) == \
        "Not a gzipped file (b'\\x01\\x02')"
    assert short_reason(OSError("bad \\\\srv\\Roe\\IM1 here")) == "bad IM1 here"


def test_write_nifti_takes_a_whole_voxel_to_world_matrix(tmp_path):
    """A rotated or sheared layer's transform, not only spacing and origin."""
    angle = np.deg2rad(30)
    matrix = np.eye(4)
    matrix[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, :3] = matrix[:3, :3] @ np.diag([2.0, 0.5, 0.7])
    matrix[:3, 3] = (1.0, -2.0, 3.0)
    path = write_nifti(tmp_path / "m.nii.gz", np.zeros((2, 3, 4), np.uint8), None, matrix=matrix)
    affine = nib.load(path).affine
    for zyx in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        ras = affine @ [zyx[2], zyx[1], zyx[0], 1.0]
        world = matrix @ [*zyx, 1.0]  # axial: z = S, y = P, x = L
        np.testing.assert_allclose([ras[2], -ras[1], -ras[0]], world[:3], atol=1e-5)
    with pytest.raises(MedsegInputError, match="invertible"):
        write_nifti(tmp_path / "s.nii.gz", np.zeros((2, 3, 4), np.uint8), None, matrix=np.zeros((4, 4)))


def test_a_label_map_comes_back_exact_with_its_names(tmp_path):
    """Written with labels=True: read back as integers (no float32 rounding above 2**24)
    with the structure names; a plain integer image stays an image."""
    from napari_medseg.core.io import LabelMap, read_label_map, read_scan_or_labels

    labels = np.zeros((3, 4, 5), np.int32)
    labels[0, 0, 0], labels[1, 2, 3] = 2, 2**24 + 1  # float32 would make it 2**24
    names = {0: "background", 2: "liver", 2**24 + 1: "a name"}
    path = write_nifti(tmp_path / "l.nii.gz", labels, (2.0, 0.5, 0.7), (1.0, 2.0, 3.0),
                       labels=True, label_names=names)
    back = read_label_map(path)
    assert back.labels.dtype == np.int32 and np.array_equal(back.labels, labels)
    assert back.names == names
    assert back.volume.spacing == (2.0, 0.5, 0.7) and back.volume.origin == (1.0, 2.0, 3.0)
    assert isinstance(read_scan_or_labels(path), LabelMap)
    image = write_nifti(tmp_path / "ct.nii.gz", np.full((2, 3, 4), -1000, np.int16), (1, 1, 1))
    assert read_label_map(image) is None
    assert not isinstance(read_scan_or_labels(image), LabelMap)
    with pytest.raises(MedsegInputError, match="integers"):
        write_nifti(tmp_path / "f.nii.gz", np.zeros((2, 3, 4), np.float32), (1, 1, 1), labels=True)


def test_another_tools_segmentation_without_the_label_intent_opens_as_labels(tmp_path):
    """nnU-Net, TotalSegmentator and ITK-SNAP write no label intent: a uint8 file of 0, 1, 2
    opened as a grey image (label 2 saturated, nothing editable). Scans stay images."""
    from napari_medseg.core.io import read_label_map

    seg = np.zeros((4, 6, 5), np.uint8)
    seg[1, 2:4, 1:3], seg[2, 0, 0] = 1, 2
    # (i, j, k) run to the left, back and up: the reader's (z, y, x) is (k, j, i)
    nib.save(nib.Nifti1Image(seg.transpose(2, 1, 0), np.diag([-1.0, -1.0, 2.0, 1.0])),
             tmp_path / "seg.nii.gz")
    back = read_label_map(tmp_path / "seg.nii.gz")
    assert back is not None and np.array_equal(back.labels, seg)
    assert any("opened as a label map" in w for w in back.volume.metadata["warnings"])
    rng = np.random.default_rng(0)
    for name, image in [("mr8", rng.integers(0, 256, (4, 6, 5)).astype(np.uint8)),  # grey levels
                        ("ct", rng.integers(-1000, 400, (4, 6, 5)).astype(np.int16)),
                        ("dark", np.zeros((4, 6, 5), np.uint8) + 3)]:  # no background 0
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / f"{name}.nii.gz")
        assert read_label_map(tmp_path / f"{name}.nii.gz") is None, name


def test_a_malformed_names_extension_still_opens_the_label_map(tmp_path):
    path = write_nifti(tmp_path / "l.nii", np.ones((2, 3, 4), np.uint8), (1, 1, 1), labels=True)
    img = nib.load(path)
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'{"napari-medseg": 3}'))
    path = tmp_path / "named.nii"
    nib.save(img, path)
    from napari_medseg.core.io import read_label_map

    back = read_label_map(path)
    assert back.names == {} and back.labels.sum() == 24


def test_what_nibabel_repairs_in_a_header_is_a_warning_not_a_stray_line(tmp_path, capfd):
    """Zero voxel sizes with no qform / sform: nibabel printed its own line to stderr,
    outside the readers' warnings (the CLI's "COMMAND: warning:", napari's notices)."""
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    img.header["pixdim"][1:4] = 0
    path = tmp_path / "noaff.nii.gz"
    nib.save(img, path)
    capfd.readouterr()
    volume = read_volume(path)
    assert capfd.readouterr().err == ""
    assert "orientation" not in volume.metadata  # the header gives none: none is said
    assert any("pixdim[1,2,3] should be non-zero" in w for w in volume.metadata["warnings"])
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert logging.getLogger("nibabel.global").handlers  # nibabel's own handler is back


@pytest.mark.parametrize(("unit", "factor"), [("meter", 1e-3), ("micron", 1e3), ("mm", 1.0),
                                              ("unknown", 1.0)])
def test_lengths_in_the_headers_unit_are_read_in_mm(tmp_path, unit, factor):
    """xyzt_units was ignored: a header in metres gave 0.0007 mm voxels (and a result that
    could not be written), one in microns 500 mm voxels, without a word."""
    affine = np.diag([0.7 * factor, 0.7 * factor, 2.0 * factor, 1.0])
    affine[:3, 3] = np.array([10.0, 20.0, 30.0]) * factor
    img = nib.Nifti1Image(ramp((6, 5, 4)), affine)
    img.header.set_xyzt_units(unit)
    nib.save(img, tmp_path / "scan.nii")
    volume = read_nifti(tmp_path / "scan.nii")
    np.testing.assert_allclose(volume.spacing, (2.0, 0.7, 0.7))
    # LPS: the flipped x and y axes start at the far voxel (10 + 5 · 0.7, 20 + 4 · 0.7)
    np.testing.assert_allclose(volume.origin, (30.0, -22.8, -13.5))
    converted = [w for w in volume.metadata["warnings"] if "converted to mm" in w]
    assert converted == ([f"the header gives lengths in {unit}s; converted to mm"]
                         if factor != 1.0 else [])
    # a NaN in the affine: the voxel size comes from pixdim, in the same unit
    affine[0, 3] = np.nan
    img = nib.Nifti1Image(ramp((6, 5, 4)), affine)
    img.header.set_xyzt_units(unit)
    nib.save(img, tmp_path / "nan.nii")
    np.testing.assert_allclose(read_nifti(tmp_path / "nan.nii").spacing, (2.0, 0.7, 0.7),
                               rtol=1e-5)


def test_small_voxels_are_read_and_written_not_rounded_to_zero(tmp_path):
    """The spacing was rounded to 6 decimals (a 1e-9 mm voxel read as 0: "spacing must be
    positive" for a header that says 1e-9), and the writer refused any matrix whose
    determinant was below 1e-9 mm³ whatever its scale."""
    img = nib.Nifti1Image(ramp((4, 5, 6)), np.diag([2e-3, 2e-3, 5e-3, 1.0]))
    nib.save(img, tmp_path / "tiny.nii")
    volume = read_nifti(tmp_path / "tiny.nii")
    np.testing.assert_allclose(volume.spacing, (5e-3, 2e-3, 2e-3))
    write_nifti(tmp_path / "out.nii", volume.array, volume.spacing, volume.origin)
    np.testing.assert_allclose(read_nifti(tmp_path / "out.nii").spacing, (5e-3, 2e-3, 2e-3))
    np.testing.assert_allclose(read_nifti(tmp_path / "tiny.nii").spacing, volume.spacing)
    nib.save(nib.Nifti1Image(ramp((4, 5, 6)), np.diag([1e-9, 1.0, 1.0, 1.0])),
             tmp_path / "nano.nii")
    assert read_nifti(tmp_path / "nano.nii").spacing[2] == pytest.approx(1e-9)
    with pytest.raises(MedsegInputError, match="invertible"):
        flat = np.diag([1.0, 1.0, 1.0, 1.0])
        flat[:3, 2] = flat[:3, 1]  # two axes the same direction: no volume
        write_nifti(tmp_path / "flat.nii", ramp((4, 5, 6)), None, matrix=flat)


def test_one_flat_affine_axis_keeps_the_other_axes_and_sizes(tmp_path):
    """A zero k column (a 2D image written with no slice step): the whole orientation was
    dropped, so 0.8 × 0.6 mm RAS pixels read as 1 × 1 mm, mirrored left–right."""
    import struct

    data = np.arange(12, dtype=np.float32).reshape(3, 4, 1)  # (i, j, k)
    affine = np.diag([0.8, 0.6, 2.5, 1.0])  # i → R, j → A
    affine[:3, 3] = [5.0, 6.0, 7.0]
    img = nib.Nifti1Image(data, affine)
    img.set_qform(None, code=0)
    img.set_sform(affine, code=1)
    path = tmp_path / "flat.nii"
    nib.save(img, path)
    raw = bytearray(path.read_bytes())  # nibabel refuses to write a singular sform
    raw[312:328] = struct.pack("<4f", 0.0, 0.0, 0.0, 7.0)  # srow_z: k has no direction
    path.write_bytes(bytes(raw))

    vol = read_nifti(path)

    assert vol.spacing == (2.5, 0.6, 0.8) and vol.metadata["orientation"] == "LPS"
    # LPS: x runs to the left (−i), y to the back (−j); origin in (z, y, x) LPS mm
    assert vol.origin == pytest.approx((7.0, -(6 + 0.6 * 3), -(5 + 0.8 * 2)))
    np.testing.assert_array_equal(vol.array[0], data[::-1, ::-1, 0].T)
    assert vol.metadata["warnings"] == [
        "the header's affine gives axis k no direction; taken perpendicular to the other two,"
        " 2.5 mm"]


def test_a_write_protected_file_is_not_replaced(tmp_path):
    """The atomic write renamed a new file over a read-only one (a rename ignores the
    file's own permissions), defeating the user's protection."""
    import os

    path = tmp_path / "kept.nii.gz"
    write_nifti(path, np.zeros((2, 3, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    os.chmod(path, 0o444)
    before = path.read_bytes()

    with pytest.raises(MedsegInputError, match=r"^kept\.nii\.gz: could not write the file "
                                               r"\(the file is read-only\)$"):
        write_nifti(path, np.ones((2, 3, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))

    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["kept.nii.gz"]


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_one_coronal_or_sagittal_plane_stays_one_plane_and_the_models_refuse_it(tmp_path, plane):
    """A single coronal plane was turned like a volume into 30 one-row "axial slices",
    which segment and classify then ran on: a 2D file, or one slice along P or L, now
    opens as the one plane it is (superior at the top), at its true position."""
    from napari_medseg.core.volume import non_axial_plane

    data = ramp((40, 30))  # (i, j)
    affine = {  # RAS: i → R; j → S; the plane's normal (k) along A or, sagittal, R
        "coronal": np.array([[0.8, 0, 0, -10], [0, 0, 3.0, 20], [0, 0.9, 0, -30], [0, 0, 0, 1]]),
        "sagittal": np.array([[0, 0, 3.0, -10], [0.8, 0, 0, 20], [0, 0.9, 0, -30], [0, 0, 0, 1]]),
    }[plane]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "plane.nii.gz")
    vol = read_volume(tmp_path / "plane.nii.gz")
    assert vol.shape == (1, 30, 40) and non_axial_plane(vol) == plane
    axes = np.asarray(vol.metadata["axes_lps"])
    assert axes[1, 2] == pytest.approx(-1.0)  # rows run inferior: the head at the top
    # as the DICOM reader names such a plane (it was "LPS", the turned volumes' layout)
    assert vol.metadata["orientation"] == {"coronal": "LIP", "sagittal": "PIL"}[plane]
    assert "-0.0" not in str(vol.metadata["axes_lps"])
    for idx in [(0, 0, 0), (0, 29, 39), (0, 7, 3)]:
        lps = axes.T @ (np.asarray(vol.origin) + np.asarray(idx) * np.asarray(vol.spacing))
        ijk = np.linalg.solve(affine, [*(lps * [-1.0, -1.0, 1.0]), 1.0])[:3]
        i, j, k = np.round(ijk).astype(int)
        np.testing.assert_allclose(ijk, (i, j, k), atol=1e-3)
        assert k == 0 and vol.array[idx] == pytest.approx(data[i, j])
    out = write_nifti(tmp_path / "out.nii.gz", vol.array, vol.spacing, vol.origin, axes)
    again = read_volume(out)  # what is written from it opens as the same plane
    np.testing.assert_array_equal(again.array, vol.array)
    np.testing.assert_allclose(again.origin, vol.origin, atol=1e-3)
    np.testing.assert_allclose(again.metadata["axes_lps"], axes, atol=1e-6)


def test_a_compressed_file_whose_data_fail_their_checksum_is_refused(tmp_path):
    """nibabel stops reading after the data and never reaches the gzip trailer: a .nii.gz
    damaged in storage or transfer opened with wrong voxels and no word said."""
    data = ramp((6, 5, 4))
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "a.nii.gz")
    changed = data.copy()
    changed[3, 2, 1] += 4.0
    nib.save(nib.Nifti1Image(changed, np.eye(4)), tmp_path / "b.nii.gz")
    a, b = (tmp_path / "a.nii.gz").read_bytes(), (tmp_path / "b.nii.gz").read_bytes()
    damaged = tmp_path / "damaged.nii.gz"  # b's valid stream, a's CRC and length
    damaged.write_bytes(b[:-8] + a[-8:])
    with pytest.raises(MedsegInputError, match="CRC check failed"):
        read_volume(damaged)
    np.testing.assert_array_equal(read_volume(tmp_path / "b.nii.gz").array,
                                  changed.transpose(2, 1, 0)[:, ::-1, ::-1])


def test_an_sform_and_qform_that_disagree_are_said(tmp_path):
    """The sform won in silence; a viewer that takes the qform (ITK's readers) showed the
    same file 10 mm away."""
    img = nib.Nifti1Image(ramp((4, 5, 6)), np.eye(4))
    moved = np.eye(4)
    moved[:3, 3] = (0.0, 0.0, 10.0)
    img.set_qform(moved, code=1)
    img.set_sform(np.eye(4), code=1)
    nib.save(img, tmp_path / "forms.nii.gz")
    warns = read_volume(tmp_path / "forms.nii.gz").metadata["warnings"]
    assert any("sform and qform place the image up to 10.0 mm apart" in w for w in warns)
    img.set_qform(np.eye(4), code=1)  # the same place: nothing said
    nib.save(img, tmp_path / "same.nii.gz")
    assert not any("qform" in w for w in read_volume(tmp_path / "same.nii.gz").metadata["warnings"])


def test_other_tools_label_maps_open_as_labels(tmp_path):
    """A float32 file marked as a label map (MONAI's SaveImage), 40 structures
    (TotalSegmentator) and values above 255 (FreeSurfer's aparc+aseg) opened as grey
    float images: nothing to correct or retrain on."""
    from napari_medseg.core.io import read_label_map

    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    seg = np.zeros((20, 20, 10), np.uint8)
    seg[2:8, 2:8, 2:6], seg[10:15, 10:15, 3:7] = 1, 2
    marked = nib.Nifti1Image(seg.astype(np.float32), affine)
    marked.header.set_intent("label")
    nib.save(marked, tmp_path / "marked_float.nii.gz")
    many = np.zeros((40, 40, 10), np.uint8)
    for k in range(40):
        many[(k % 8) * 5:(k % 8) * 5 + 4, (k // 8) * 5:(k // 8) * 5 + 4, 2:6] = k + 1
    nib.save(nib.Nifti1Image(many, affine), tmp_path / "totalseg.nii.gz")
    aseg = np.zeros((20, 20, 10), np.int32)
    aseg[2:5, 2:5, 2:5], aseg[8:12, 8:12, 2:5], aseg[14:18, 14:18, 2:5] = 17, 1035, 2035
    nib.save(nib.Nifti1Image(aseg, affine), tmp_path / "aseg.nii.gz")
    for name, values in [("marked_float", {0, 1, 2}), ("totalseg", set(range(41))),
                         ("aseg", {0, 17, 1035, 2035})]:
        back = read_label_map(tmp_path / f"{name}.nii.gz")
        assert back is not None, name
        assert np.issubdtype(back.labels.dtype, np.integer) and set(np.unique(back.labels)) == values
    assert read_label_map(tmp_path / "marked_float.nii.gz").labels.dtype == np.uint8
    half = nib.Nifti1Image(seg.astype(np.float32) + 0.5, affine)  # not whole numbers
    half.header.set_intent("label")
    nib.save(half, tmp_path / "half.nii.gz")
    assert read_label_map(tmp_path / "half.nii.gz") is None


def test_an_uncompressed_file_rewritten_by_another_tool_leaves_the_read_volume_alone(tmp_path):
    """nibabel memory-maps a .nii: a volume read from a file stored as LPS (every file
    this plugin writes) was a view of it, changed when another tool rewrote the file, and
    napari died of SIGBUS when the file was cut short."""
    path = tmp_path / "ct.nii"
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_nifti(path, array, (2.0, 1.0, 1.0))
    volume = read_nifti(path)
    with open(path, "r+b") as f:  # another tool rewrites the voxels in place
        f.seek(352)
        f.write(bytes(array.nbytes))
    np.testing.assert_array_equal(volume.array, array)


def test_a_header_without_orientation_is_said(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), None), tmp_path / "bare.nii")
    warnings = read_nifti(tmp_path / "bare.nii").metadata["warnings"]
    assert any("gives no orientation (qform and sform codes 0)" in w for w in warnings)
    write_nifti(tmp_path / "ours.nii", np.zeros((4, 5, 6), np.float32), (1.0, 1.0, 1.0))
    assert not any("orientation" in w for w in read_nifti(tmp_path / "ours.nii").metadata["warnings"])
    # a result for it is stored in its voxel order too (nibabel's made-up affine is LAS:
    # its j came back reversed)
    raw = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(raw, None), tmp_path / "bare2.nii")
    vol = read_nifti(tmp_path / "bare2.nii")
    out = write_nifti(tmp_path / "result.nii", vol.array, vol.spacing, vol.origin,
                      vol.metadata.get("axes_lps"),
                      stored_orientation=vol.metadata["stored_orientation"])
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), raw)


def test_a_big_endian_label_map_opens_in_native_byte_order(tmp_path):
    """napari drew a big-endian label 1 as 256, a colour no label has."""
    import nibabel as nib

    from napari_medseg.core.io import read_scan_or_labels

    labels = np.zeros((6, 5, 4), dtype=">u2")
    labels[2:4, 1:3, 1:3] = 2
    img = nib.Nifti1Image(labels, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_intent("label")
    nib.save(img, tmp_path / "seg.nii")
    opened = read_scan_or_labels(tmp_path / "seg.nii")
    assert opened.labels.dtype.isnative and opened.labels.max() == 2
    np.save(tmp_path / "seg.npy", labels.transpose(2, 1, 0).copy())
    opened = read_scan_or_labels(tmp_path / "seg.npy")
    assert opened.labels.dtype.isnative and opened.labels.max() == 2


def test_writing_through_a_link_replaces_the_file_it_names(tmp_path):
    """The temporary file was renamed over the link itself: the dataset the link points
    into kept its old labels."""
    real = tmp_path / "data" / "case1.nii.gz"
    real.parent.mkdir()
    write_nifti(real, np.zeros((2, 3, 4), np.uint8), (1.0, 1.0, 1.0), labels=True)
    link = tmp_path / "case1.nii.gz"
    link.symlink_to(real)
    write_nifti(link, np.ones((2, 3, 4), np.uint8), (1.0, 1.0, 1.0), labels=True)
    assert link.is_symlink()
    assert read_nifti(real).array.max() == 1


def test_a_zeroed_sform_beside_a_valid_qform_takes_the_qform(tmp_path):
    """nibabel takes the sform whenever its code is set: a zeroed one lost the spacing
    (1 mm) and the origin, with warnings that named neither form."""
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])
    affine[:3, 3] = (100.0, 120.0, -50.0)
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(np.zeros((4, 4)), code=1)
    nib.save(img, tmp_path / "z.nii")
    volume = read_nifti(tmp_path / "z.nii")
    assert volume.spacing == pytest.approx((3.0, 1.5, 1.5))
    assert any("sform is degenerate" in w and "its qform is used" in w
               for w in volume.metadata["warnings"])
    img.set_qform(affine, code=0)  # nothing better to take
    nib.save(img, tmp_path / "none.nii")
    assert not any("qform is used" in w for w in read_nifti(tmp_path / "none.nii").metadata["warnings"])


def test_a_scaled_integer_image_is_read_without_float64_copies(tmp_path):
    """nibabel scales an int16 image with scl_slope in float64 and the volume's checks
    copied that again: reading peaked at 6.3 times the float32 volume kept."""
    import tracemalloc

    stored = np.random.default_rng(0).integers(-1024, 2000, (96, 96, 40)).astype(np.int16)
    img = nib.Nifti1Image(stored, np.diag([-0.8, -0.8, 2.5, 1.0]))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, tmp_path / "ct.nii.gz")
    tracemalloc.start()
    try:
        volume = read_nifti(tmp_path / "ct.nii.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * volume.array.nbytes, peak / volume.array.nbytes
    expected = nib.load(tmp_path / "ct.nii.gz").get_fdata().astype(np.float32)
    np.testing.assert_array_equal(np.sort(volume.array.ravel()), np.sort(expected.ravel()))


@pytest.mark.parametrize("name", ["mixed.Nii", "UPPER.NII", "mixed.Nii.Gz"])
def test_a_nifti_name_in_mixed_case_opens(tmp_path, name):
    """nibabel knows only all-lower and all-upper names: "scan.Nii" was refused as "no
    such file: scan.nii"."""
    array = ramp((4, 5, 6))
    plain = tmp_path / ("p.nii.gz" if name.lower().endswith(".gz") else "p.nii")
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(plain))
    plain.rename(tmp_path / name)
    vol = read_volume(str(tmp_path / name))
    assert vol.shape == (6, 5, 4)
    np.testing.assert_array_equal(np.sort(vol.array.ravel()), np.sort(array.ravel()))


def test_a_uint64_label_map_of_uint32_values_is_written(tmp_path):
    """Refused as "do not fit int32", though a uint32 map of the same values is written."""
    labels = np.zeros((2, 3, 4), np.uint64)
    labels[0, 0, 0] = 2**31 + 5
    path = write_nifti(tmp_path / "l.nii.gz", labels, (1.0, 1.0, 1.0), labels=True)
    assert int(np.asarray(nib.load(str(path)).dataobj).max()) == 2**31 + 5
