"""DICOM reader: pydicom's bundled files plus synthetic CT series written in tmp_path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.io import read_dicom, read_volume

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PHI = ("Doe^Jane", "Doe", "PID-SECRET-123")


def bundled(name: str) -> Path:
    """A pydicom test file, found on disk (get_testdata_file would try to download)."""
    path = TEST_FILES / name
    if not path.exists():
        pytest.skip(f"pydicom does not bundle {name}")
    return path


def _save(ds: Dataset, path: Path) -> None:
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pragma: no cover - pydicom 2.x
        ds.save_as(path, write_like_original=False)


def _base(sop_class: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PHI[0]
    ds.PatientID = PHI[2]
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.Manufacturer = "Phantom Inc"
    ds.BodyPartExamined = "ABDOMEN"
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def expected_hu(z: float, shape=(6, 5)) -> np.ndarray:
    """A ramp plus 20 × the slice's z (even integers: exact with slope 2), so order shows."""
    return 2.0 * np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape) + 20.0 * z


def write_ct_slice(
    path: Path,
    z: float,
    *,
    series_uid: str,
    instance: int,
    shape=(6, 5),
    iop=AXIAL,
    ipp=None,
    positions=True,
    pixel_spacing=(0.5, 0.75),
    slope=2.0,
    intercept=-1024.0,
    thickness=2.0,
    between=None,
    description="ABDOMEN",
) -> None:
    """One CT slice at z (mm along the normal); HU = expected_hu(z), stored as (HU-b)/m."""
    ds = _base(CTImageStorage, series_uid)
    ds.SeriesDescription = description
    ds.InstanceNumber = instance
    if positions:
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = list(ipp) if ipp is not None else [-100.0, -120.0, z]
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = thickness
    if between is not None:
        ds.SpacingBetweenSlices = between
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = shape
    raw = (expected_hu(z, shape) - intercept) / slope
    ds.PixelData = raw.round().astype("<u2").tobytes()
    _save(ds, path)


def write_series(folder: Path, zs, *, shuffle=True, name="s", **kwargs) -> str:
    """Write slices at positions zs with file names in random order; return the series UID."""
    uid = kwargs.pop("series_uid", None) or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    numbers = list(range(len(zs)))
    if shuffle:
        random.Random(0).shuffle(numbers)
    for k, z in enumerate(zs):
        write_ct_slice(
            folder / f"{name}{numbers[k]:03d}.dcm", z, series_uid=uid, instance=k + 1, **kwargs
        )
    return uid


def assert_clean_error(exc: MedsegInputError, path: Path) -> None:
    message = str(exc)
    assert "\n" not in message
    assert message.startswith(f"{path.name}: ")
    assert exc.path is not None and exc.path.name == path.name
    assert "Traceback" not in message


# --------------------------------------------------------------------------- bundled files


def test_ct_small_in_hounsfield_units():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    vol = read_dicom(path)

    assert vol.shape == (1, ds.Rows, ds.Columns)
    assert vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], hu.astype(np.float32))
    assert vol.spacing == pytest.approx(
        (float(ds.SliceThickness), float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    )
    ipp = [float(v) for v in ds.ImagePositionPatient]
    assert vol.origin == pytest.approx((ipp[2], ipp[1], ipp[0]))  # axial: LPS (z, y, x)
    assert vol.modality == "CT"
    assert vol.metadata["source_format"] == "dicom"
    assert vol.metadata["source_name"] == "CT_small.dcm"
    assert vol.metadata["rescale_type"] == "HU"
    assert vol.metadata["orientation"] == "LPS"
    assert not vol.has_gaps


def test_mr_small_raw_values_and_geometry():
    path = bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)

    vol = read_dicom(path)

    assert vol.modality == "MR"
    np.testing.assert_array_equal(vol.array[0], ds.pixel_array.astype(np.float32))
    assert vol.spacing == pytest.approx((0.8, 0.3125, 0.3125))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_padded.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
    ],
)
def test_encodings_of_mr_small_read_the_same(name):
    ds = pydicom.dcmread(bundled(name))
    try:
        from pydicom.pixels import get_decoder

        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_compressed and not get_decoder(syntax).is_available:
            pytest.skip(f"no decoder for {syntax.name}")
    except ImportError:  # pragma: no cover - pydicom 2.x
        pass

    reference = read_dicom(bundled("MR_small.dcm"))
    vol = read_dicom(bundled(name))

    np.testing.assert_array_equal(vol.array, reference.array)
    assert vol.spacing == reference.spacing


def test_classic_multiframe_rt_dose_frames_become_z():
    path = bundled("rtdose.dcm")
    ds = pydicom.dcmread(path)

    vol = read_dicom(path)

    assert vol.shape[0] == int(ds.NumberOfFrames) == 15
    # GridFrameOffsetVector steps 5 mm; dose grids hold integers scaled to Gy
    assert vol.spacing == pytest.approx((5.0, 10.0, 10.0))
    np.testing.assert_allclose(
        vol.array, ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6
    )
    assert vol.origin[0] == pytest.approx(float(ds.ImagePositionPatient[2]))


def test_enhanced_file_geometry_from_functional_groups():
    vol = read_dicom(bundled("liver_1frame.dcm"))  # enhanced SEG: no top-level geometry

    assert vol.shape == (1, 512, 512)
    assert vol.spacing == pytest.approx((1.0, 0.810547, 0.810547))
    assert vol.origin == pytest.approx((-128.69, -226.8, -235.2))


def _decoder_missing(path: Path) -> bool:
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pragma: no cover - pydicom 2.x
        return False
    try:
        return not get_decoder(syntax).is_available
    except NotImplementedError:
        return True


def test_compressed_without_decoder_names_syntax_and_fix():
    candidates = [
        TEST_FILES / n
        for n in (
            "MR_small_jpeg_ls_lossless.dcm",
            "JPEGLSNearLossless_16.dcm",
            "MR_small_jp2klossless.dcm",
            "693_J2KI.dcm",
        )
    ]
    missing = [p for p in candidates if p.exists() and _decoder_missing(p)]
    if not missing:
        pytest.skip("every compressed test file has a decoder here")
    path = missing[0]
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID

    with pytest.raises(MedsegInputError) as info:
        read_dicom(path)

    assert_clean_error(info.value, path)
    assert f"compressed ({syntax.name}) and no decoder is installed" in str(info.value)
    assert "pip install pylibjpeg" in str(info.value)


def _random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    return path


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.dcm"
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("no_meta.dcm", "not a DICOM file"),
        ("rtplan.dcm", "holds no image (RT Plan Storage)"),
        ("rtplan_truncated.dcm", "holds no image"),
        ("waveform_ecg.dcm", "holds no image"),
        ("MR_truncated.dcm", "pixel data could not be decoded"),
        ("badVR.dcm", "invalid NumberOfFrames"),
        ("meta_missing_tsyntax.dcm", "malformed DICOM image"),
        ("SC_rgb_small_odd.dcm", "colour (RGB) DICOM is not supported; expected grayscale CT/MR"),
        ("examples_ybr_color.dcm", "colour (YBR_FULL_422) DICOM is not supported"),
        ("examples_palette.dcm", "colour (PALETTE COLOR) DICOM is not supported"),
        (_random_bytes, "not a DICOM file"),
        (_text_file, "not a DICOM file"),
        (_empty, "the file is empty"),
    ],
)
def test_bad_files_raise_one_clear_line(tmp_path, make, reason):
    path = make(tmp_path) if callable(make) else bundled(make)

    with pytest.raises(MedsegInputError) as info:
        read_volume(path)

    assert_clean_error(info.value, path)
    assert reason in str(info.value)


# --------------------------------------------------------------------------- synthetic series


def test_series_sorted_by_position_not_file_or_instance_order(tmp_path):
    zs = [30.0, 27.5, 25.0, 22.5, 20.0]  # InstanceNumber runs head → feet
    write_series(tmp_path / "ct", zs, between=2.5)

    vol = read_dicom(tmp_path / "ct")

    expected = np.stack([expected_hu(z) for z in sorted(zs)])
    np.testing.assert_array_equal(vol.array, expected)
    assert vol.spacing == pytest.approx((2.5, 0.5, 0.75))
    assert vol.origin == pytest.approx((20.0, -120.0, -100.0))
    assert vol.metadata["slice_spacings_mm"] == pytest.approx([2.5] * 4)
    assert vol.metadata["n_files"] == 5
    assert vol.metadata["source_name"] == "ct"
    assert vol.metadata["series_description"] == "ABDOMEN"
    assert vol.metadata["body_part"] == "ABDOMEN"
    assert vol.metadata["manufacturer"] == "Phantom Inc"
    assert vol.metadata["kvp"] == 120.0
    assert vol.metadata["slice_thickness_mm"] == 2.0
    assert vol.metadata["warnings"] == []
    assert not vol.has_gaps


def test_folder_is_searched_recursively_and_junk_is_skipped(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "a" / "b", [0.0, 2.0], series_uid=uid, name="x")
    write_series(tmp_path / "c", [4.0, 6.0], series_uid=uid, name="y")
    (tmp_path / "README.txt").write_text("hello")
    (tmp_path / "DICOMDIR_like.dcm").write_bytes(b"\0" * 200)

    vol = read_volume(tmp_path)

    assert vol.shape == (4, 6, 5)
    np.testing.assert_array_equal(vol.array[:, 0, 0], [0.0, 40.0, 80.0, 120.0])
    assert "skipped 2 non-DICOM files" in vol.metadata["warnings"]


def test_gap_becomes_nan_slices_marked_missing(tmp_path):
    zs = [0.0, 2.0, 4.0, 10.0, 12.0]  # 6 and 8 mm were never acquired
    write_series(tmp_path, zs)

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 7
    assert vol.spacing[0] == pytest.approx(2.0)
    assert vol.missing_slices() == [3, 4]
    assert np.isnan(vol.array[3:5]).all()
    for z_index, z in zip([0, 1, 2, 5, 6], zs):
        np.testing.assert_array_equal(vol.array[z_index], expected_hu(z))
    assert "2 missing slices (gaps at z=3–4)" in vol.metadata["warnings"]


def test_largest_series_is_opened_with_a_warning(tmp_path):
    write_series(tmp_path, [0.0, 2.0, 4.0, 6.0], name="big", description="ABDOMEN")
    write_series(tmp_path, [0.0, 5.0], name="small", description="SCOUT")
    write_series(tmp_path, [1.0], name="tiny", description="DOSE REPORT")

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 4
    assert vol.metadata["n_files"] == 4
    assert "folder holds 3 series; opened the largest (4 slices, 'ABDOMEN')" in (
        vol.metadata["warnings"]
    )


def test_the_scan_is_opened_not_a_larger_dose_grid_beside_it(tmp_path):
    """An RT dose grid (15 frames) beside a 4-slice CT was opened instead of the CT."""
    import shutil

    write_series(tmp_path, [0.0, 2.0, 4.0, 6.0], name="ct", description="ABDOMEN")
    shutil.copy(bundled("rtdose.dcm"), tmp_path / "dose.dcm")

    vol = read_dicom(tmp_path)

    assert vol.shape == (4, 6, 5) and vol.modality == "CT"
    assert ("folder holds 2 series; opened the largest CT series, not the RTDOSE beside it"
            " (4 slices, 'ABDOMEN')") in vol.metadata["warnings"]
    shutil.copy(bundled("rtdose.dcm"), tmp_path / "dose2.dcm")  # alone, a dose grid opens
    for f in tmp_path.glob("ct*.dcm"):
        f.unlink()
    assert read_dicom(tmp_path).modality == "RTDOSE"


def test_a_segmentation_is_ranked_below_the_scan():
    from napari_medseg.core.io.dicom import _series_rank

    seg, ct, capture = Dataset(), Dataset(), Dataset()
    seg.SOPClassUID, seg.Modality = "1.2.840.10008.5.1.4.1.1.66.4", "SEG"
    ct.SOPClassUID, ct.Modality = CTImageStorage, "CT"
    capture.SOPClassUID, capture.Modality = "1.2.840.10008.5.1.4.1.1.7", "OT"
    assert _series_rank(ct) < _series_rank(capture) < _series_rank(seg)


def test_a_stray_file_with_an_empty_rows_tag_is_skipped_not_fatal(tmp_path):
    """int(None) in the series grouping failed the whole folder over one odd file."""
    write_series(tmp_path, [0.0, 2.0, 4.0], name="ct")
    stray = pydicom.dcmread(next(tmp_path.glob("ct*.dcm")))
    stray.Rows = None
    del stray.SeriesInstanceUID
    _save(stray, tmp_path / "stray.dcm")

    vol = read_dicom(tmp_path)

    assert vol.shape == (3, 6, 5)
    assert "skipped 1 truncated or malformed image file" in vol.metadata["warnings"]
    with pytest.raises(MedsegInputError, match="invalid Rows/Columns") as info:
        read_dicom(tmp_path / "stray.dcm")
    assert_clean_error(info.value, tmp_path / "stray.dcm")


def _tag_files(folder: Path, prefix: str, **tags) -> None:
    for f in folder.glob(f"{prefix}*.dcm"):
        ds = pydicom.dcmread(f)
        for key, value in tags.items():
            setattr(ds, key, value(ds) if callable(value) else value)
        _save(ds, f)


def test_two_phases_at_the_same_positions_are_not_mixed_slice_by_slice(tmp_path):
    """One slice per position was kept by InstanceNumber: with the venous phase numbered
    backwards the volume held arterial slices at one end and venous at the other."""
    zs = [0.0, 2.0, 4.0, 6.0, 8.0]
    uid = write_series(tmp_path, zs, name="art", intercept=-1024.0)
    write_series(tmp_path, zs, name="ven", series_uid=uid, intercept=-1124.0)  # 100 HU more
    _tag_files(tmp_path, "art", AcquisitionNumber=1)
    _tag_files(tmp_path, "ven", AcquisitionNumber=2,
               InstanceNumber=lambda ds: 6 - int(ds.InstanceNumber))  # 5, 4 … 1

    vol = read_dicom(tmp_path)

    assert vol.shape == (5, 6, 5)
    offsets = [float(vol.array[k, 0, 0]) - expected_hu(z)[0, 0] for k, z in enumerate(zs)]
    assert offsets in ([0.0] * 5, [100.0] * 5), offsets  # one phase, whichever
    assert any("series holds 2 acquisitions at the same positions (they differ in "
               "AcquisitionNumber); opened one (AcquisitionNumber" in w
               for w in vol.metadata["warnings"])


def test_overlapping_slabs_of_a_step_and_shoot_scan_stay_one_volume(tmp_path):
    """Acquisitions that each cover part of the range are not one of several phases:
    all their positions are kept, one slice per position."""
    uid = write_series(tmp_path, [0.0, 2.0, 4.0, 6.0], name="a")
    write_series(tmp_path, [6.0, 8.0, 10.0, 12.0], name="b", series_uid=uid)
    _tag_files(tmp_path, "a", AcquisitionNumber=1)
    _tag_files(tmp_path, "b", AcquisitionNumber=2)

    vol = read_dicom(tmp_path)

    assert vol.shape == (7, 6, 5)
    assert any("1 slice at an earlier slice's position" in w for w in vol.metadata["warnings"])
    assert not any("acquisitions" in w for w in vol.metadata["warnings"])


def test_a_monochrome1_image_is_shown_with_white_for_its_lowest_values(tmp_path):
    """MONOCHROME1 (low = white) opened in a plain gray colormap: shown inverted."""
    from napari_medseg._reader import read_layers

    write_series(tmp_path, [0.0], name="cr")
    _tag_files(tmp_path, "cr", PhotometricInterpretation="MONOCHROME1")
    (data, kwargs, _), = read_layers(str(next(tmp_path.glob("cr*.dcm"))))
    assert kwargs["colormap"] == "gray_r"
    np.testing.assert_array_equal(data[0], expected_hu(0.0))  # the values as stored
    write_series(tmp_path / "ct", [0.0])
    assert read_layers(str(tmp_path / "ct"))[0][1]["colormap"] == "gray"


def test_series_without_uid_grouped_by_geometry(tmp_path):
    write_series(tmp_path, [0.0, 2.0, 4.0], name="a", series_uid="1.2.3")
    write_series(tmp_path, [0.0, 2.0], name="b", shape=(4, 4), series_uid="1.2.3")
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(f)
        del ds.SeriesInstanceUID
        _save(ds, f)

    vol = read_dicom(tmp_path)

    assert vol.shape == (3, 6, 5)
    assert any("folder holds 2 series" in w for w in vol.metadata["warnings"])


def test_uneven_spacing_warns_and_uses_median(tmp_path):
    write_series(tmp_path, [0.0, 2.0, 4.2, 6.0, 8.0])

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 5 and not vol.has_gaps
    assert vol.spacing[0] == pytest.approx(2.0)
    assert any(w.startswith("uneven slice spacing") for w in vol.metadata["warnings"])
    assert vol.metadata["slice_spacings_mm"] == pytest.approx([2.0, 2.2, 1.8, 2.0])


def test_duplicate_positions_keep_one_slice(tmp_path):
    uid = write_series(tmp_path, [0.0, 2.0, 4.0], name="a")
    write_series(tmp_path, [2.0], name="dup", series_uid=uid)

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 3
    assert any("at an earlier slice's position" in w for w in vol.metadata["warnings"])


def test_positions_absent_sorted_by_instance_number(tmp_path):
    write_series(tmp_path, [0.0, 1.0, 2.0, 3.0], positions=False, between=3.0)

    vol = read_dicom(tmp_path)

    # instance k+1 holds the k-th z; the file names are shuffled
    np.testing.assert_array_equal(vol.array[:, 0, 0], [0.0, 20.0, 40.0, 60.0])
    assert vol.spacing[0] == 3.0  # SpacingBetweenSlices wins over SliceThickness (2.0)
    assert vol.origin == (0.0, 0.0, 0.0)
    assert "slice positions missing; sorted by InstanceNumber" in vol.metadata["warnings"]


def test_sagittal_series_sorted_along_the_normal_and_turned_to_spl(tmp_path):
    """Sorted along the normal, then turned like a NIfTI file: z up (+S), y to the back
    (+P), x to the left (+L); the slices lie along x."""
    # row_dir +P, col_dir -S (head at the top); normal = row × col = (-1, 0, 0), towards R
    iop = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    xs = [10.0, 20.0, 30.0]
    uid = generate_uid()
    for k, x in enumerate(xs):
        write_ct_slice(
            tmp_path / f"{k}.dcm", x, series_uid=uid, instance=k + 1, iop=iop, ipp=(x, -50.0, 80.0)
        )

    vol = read_dicom(tmp_path)

    assert vol.shape == (6, 5, 3) and vol.spacing == pytest.approx((0.5, 0.75, 10.0))
    for i, x in enumerate(xs):  # x grows to the left; z grows up (the rows ran down)
        np.testing.assert_array_equal(vol.array[:, :, i], expected_hu(x)[::-1])
    # voxel (0, 0, 0): the slice at x = 10, its bottom row (80 − 5 × 0.5), first column
    assert vol.origin == pytest.approx((77.5, -50.0, 10.0))
    assert vol.metadata["orientation"] == "LPS" and not vol.missing.any()
    assert "-0.0" not in str(vol.metadata["axes_lps"])  # flipped zeros shown as -0.0


_C, _S = np.cos(np.radians(10.0)), np.sin(np.radians(10.0))


@pytest.mark.parametrize(
    ("iop", "orientation", "oblique"),
    [
        (AXIAL, "LPS", False),
        ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), "LPS", False),  # rotated 180° in plane: turned back
        ((_C, _S, 0.0, -_S, _C, 0.0), "LPS", True),  # rotated 10° about the z axis
    ],
)
def test_origin_is_first_position_along_the_image_axes(tmp_path, iop, orientation, oblique):
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    first = np.array([-100.0, -120.0, 40.0])
    uid = generate_uid()
    for k in range(3):
        ipp = first + 2.0 * k * normal
        write_ct_slice(tmp_path / f"{k}.dcm", k, series_uid=uid, instance=k + 1, iop=iop, ipp=ipp)

    vol = read_dicom(tmp_path)

    axes = np.asarray(vol.metadata["axes_lps"])
    # the first voxel: the first slice's own, or (turned) its last row's last column
    flipped = orientation == "LPS" and iop[0] < 0
    corner = first + (5 * 0.5 * col + 4 * 0.75 * row if flipped else 0.0)
    assert vol.origin == pytest.approx(tuple(axes @ corner))
    assert vol.spacing[0] == pytest.approx(2.0)
    assert vol.metadata["orientation"] == orientation
    assert any(w.startswith("oblique slices") for w in vol.metadata["warnings"]) is oblique


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        (dict(shape=(4, 4)), "slices in one series differ in size (4×4 and 6×5)"),
        (dict(pixel_spacing=(0.9, 0.9)), "different pixel spacings"),
    ],
)
def test_inconsistent_series_is_refused(tmp_path, second, reason):
    uid = write_series(tmp_path, [0.0, 2.0], name="a")
    # as many of each: no majority tells which is the series
    write_series(tmp_path, [4.0, 6.0], name="b", series_uid=uid, **second)

    with pytest.raises(MedsegInputError) as info:
        read_dicom(tmp_path)

    assert_clean_error(info.value, tmp_path)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("populate", "reason"),
    [
        (lambda d: None, "folder holds no files"),
        (
            lambda d: [(d / n).write_text("x") for n in ("a.txt", "b.dcm")],
            "no DICOM images among 2 files",
        ),
        (
            lambda d: (d / "plan.dcm").write_bytes(bundled("rtplan.dcm").read_bytes()),
            "no DICOM images among 1 file",
        ),
    ],
)
def test_folders_without_images(tmp_path, populate, reason):
    folder = tmp_path / "study"
    folder.mkdir()
    populate(folder)

    with pytest.raises(MedsegInputError) as info:
        read_volume(folder)

    assert_clean_error(info.value, folder)
    assert reason in str(info.value)


def test_gantry_tilt_shear_is_reported(tmp_path):
    uid = generate_uid()
    for k in range(3):
        z = 5.0 * k
        ipp = (-100.0, -120.0 + 2.0 * k, z)  # y drifts 2 mm per slice: tilted gantry
        write_ct_slice(tmp_path / f"{k}.dcm", z, series_uid=uid, instance=k + 1, ipp=ipp)

    vol = read_dicom(tmp_path)

    assert any("gantry tilt" in w for w in vol.metadata["warnings"])


def _enhanced_ct(path: Path, zs, slopes) -> None:
    ds = _base(EnhancedCTImageStorage, generate_uid())
    ds.NumberOfFrames = len(zs)
    ds.Rows, ds.Columns = 6, 5
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.6, 0.7]
    measures.SliceThickness = 1.5
    shared.PixelMeasuresSequence = Sequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    shared.PlaneOrientationSequence = Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, raw = [], []
    for z, slope in zip(zs, slopes):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [-10.0, -20.0, z]
        item.PlanePositionSequence = Sequence([pos])
        lut = Dataset()
        lut.RescaleSlope = slope
        lut.RescaleIntercept = -1024
        lut.RescaleType = "HU"
        item.PixelValueTransformationSequence = Sequence([lut])
        frames.append(item)
        raw.append(((expected_hu(z) + 1024) / slope).round())
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack(raw).astype("<u2").tobytes()
    _save(ds, path)


@pytest.mark.parametrize("step_tags", [{"SpacingBetweenSlices": 4.0, "SliceThickness": 3.0},
                                       {"SliceThickness": 4.0}])
def test_a_classic_multiframe_without_frame_offsets_keeps_its_position(tmp_path, step_tags):
    """An NM-style file (one ImagePositionPatient, no GridFrameOffsetVector): its position
    and orientation were thrown away (origin 0, "slice positions missing")."""
    ds = _base("1.2.840.10008.5.1.4.1.1.20", generate_uid())  # NM Image Storage
    ds.Modality = "NM"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [10.0, -20.0, 30.0], list(AXIAL)
    ds.PixelSpacing = [2.0, 2.0]
    for tag, value in step_tags.items():
        setattr(ds, tag, value)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 5, 3
    ds.PixelData = np.stack([np.full((4, 5), k) for k in range(3)]).astype("<u2").tobytes()
    path = tmp_path / "nm.dcm"
    _save(ds, path)

    vol = read_dicom(path)

    assert vol.shape == (3, 4, 5) and vol.spacing == (4.0, 2.0, 2.0)
    assert vol.origin == pytest.approx((30.0, -20.0, 10.0))  # (z, y, x) of the first frame
    assert vol.metadata["orientation"] == "LPS"
    np.testing.assert_array_equal(vol.array[:, 0, 0], [0, 1, 2])  # frame k at z = 30 + 4k
    assert vol.metadata["warnings"] == ["frames placed 4 mm apart along the slice normal from"
                                        " the file's one position (it has no GridFrameOffsetVector)"]


def test_enhanced_multiframe_sorted_with_per_frame_rescale(tmp_path):
    path = tmp_path / "enhanced.dcm"
    _enhanced_ct(path, zs=[6.0, 0.0, 4.0, 2.0], slopes=[1.0, 2.0, 1.0, 2.0])

    vol = read_dicom(path)

    assert vol.shape == (4, 6, 5)
    np.testing.assert_array_equal(
        vol.array, np.stack([expected_hu(z) for z in (0.0, 2.0, 4.0, 6.0)])
    )
    assert vol.spacing == pytest.approx((2.0, 0.6, 0.7))
    assert vol.origin == pytest.approx((0.0, -20.0, -10.0))
    assert vol.metadata["rescale_type"] == "HU"
    assert vol.metadata["slice_thickness_mm"] == 1.5


def test_no_patient_data_in_metadata_warnings_or_summary(tmp_path):
    uid = write_series(tmp_path, [0.0, 2.0, 8.0], series_uid="1.2.826.0.99")
    write_series(tmp_path, [0.0], name="other")

    vol = read_dicom(tmp_path)

    text = repr(vol.metadata) + repr(vol.summary())
    for secret in (*PHI, uid, "1.2.3.4", str(tmp_path.parent)):
        assert secret not in text


def test_short_reason_keeps_a_decoders_later_lines_on_one_line():
    from napari_medseg.core.io._common import short_reason

    exc = RuntimeError("Unable to decode as exceptions were raised by all plugins:\n"
                       "  pillow: Pillow does not support 'JPEG Extended'\n")
    text = short_reason(exc, limit=200)
    assert "\n" not in text and "Pillow does not support" in text


def test_a_truncated_image_file_is_named_alone_and_counted_in_a_folder(tmp_path):
    uid = write_series(tmp_path / "series", [0.0, 2.0, 4.0])
    cut = _base(CTImageStorage, uid)  # an image file cut off before its image header
    _save(cut, tmp_path / "series" / "zz_cut.dcm")
    vol = read_volume(tmp_path / "series")
    assert vol.shape[0] == 3
    assert "skipped 1 truncated or malformed image file" in vol.metadata["warnings"]
    with pytest.raises(MedsegInputError, match="truncated or malformed image") as err:
        read_volume(tmp_path / "series" / "zz_cut.dcm")
    assert_clean_error(err.value, tmp_path / "series" / "zz_cut.dcm")


@pytest.mark.parametrize(
    "iop",
    [
        AXIAL,
        (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # coronal
        (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),  # sagittal
        (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # rows flipped
        (_C, _S, 0.0, -_S, _C, 0.0),  # oblique, 10° about z
    ],
)
def test_a_result_written_as_nifti_lies_where_its_dicom_voxels_lie(tmp_path, iop):
    """Every voxel of a NIfTI written from a DICOM series (what segment, detect --heatmap,
    gradcam, uncertainty and generate write) maps to the patient position of the same
    DICOM voxel (found by its value): coronal, sagittal, flipped and oblique outputs
    landed elsewhere. Every series is turned to (S, P, L), as NIfTI files are."""
    import nibabel as nib

    from napari_medseg.core.io import write_nifti

    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    first = np.array([-100.0, -120.0, 40.0])
    uid = generate_uid()
    ipps = [first + 2.0 * k * normal for k in range(3)]
    for k, ipp in enumerate(ipps):
        # values 2000 apart per slice: every voxel's value is its own
        write_ct_slice(tmp_path / f"{k}.dcm", 100 * k, series_uid=uid, instance=k + 1, iop=iop,
                       ipp=ipp)
    vol = read_dicom(tmp_path)
    assert vol.metadata["orientation"] == "LPS"
    out = write_nifti(tmp_path / "out.nii.gz", vol.array, vol.spacing, vol.origin,
                      vol.metadata["axes_lps"])
    affine = nib.load(out).affine
    lps = np.diag([-1.0, -1.0, 1.0])
    dy, dx = 0.5, 0.75  # PixelSpacing: between rows, between columns
    for k, j, i in [(0, 0, 0), (2, 0, 0), (0, 5, 0), (0, 0, 4), (2, 5, 4)]:
        want = ipps[k] + j * dy * col + i * dx * row  # the DICOM voxel's LPS position
        z, y, x = (int(v[0]) for v in np.nonzero(vol.array == expected_hu(100 * k)[j, i]))
        got = lps @ (affine @ np.array([x, y, z, 1.0]))[:3]
        np.testing.assert_allclose(got, want, atol=1e-3, err_msg=f"DICOM voxel {(k, j, i)}")


def test_a_file_cut_to_its_first_bytes_is_counted_as_truncated(tmp_path):
    """A slice file cut to 300 bytes keeps only its file meta header: it was dropped
    silently and showed only as a gap; the meta header's SOP class names it an image."""
    write_series(tmp_path / "series", [0.0, 2.0, 4.0, 6.0], shuffle=False)
    victim = tmp_path / "series" / "s002.dcm"
    victim.write_bytes(victim.read_bytes()[:300])
    vol = read_volume(tmp_path / "series")
    assert "skipped 1 truncated or malformed image file" in vol.metadata["warnings"]
    with pytest.raises(MedsegInputError, match="truncated or malformed image"):
        read_volume(victim)


def test_a_short_series_with_a_gap_keeps_its_spacing_and_marks_the_gap(tmp_path):
    write_series(tmp_path, [0.0, 2.0, 3.0])  # the slice at 1 mm was lost; the median is 1.5

    vol = read_dicom(tmp_path)

    assert vol.spacing[0] == pytest.approx(1.0)
    assert vol.missing_slices() == [1]
    np.testing.assert_array_equal(vol.array[[0, 2, 3], 0, 0], [0.0, 40.0, 60.0])


def test_one_slice_without_a_position_is_left_out_not_every_position(tmp_path):
    write_series(tmp_path, [0.0, 1.0, 2.0, 3.0], thickness=5.0)
    victim = sorted(tmp_path.iterdir())[0]
    ds = pydicom.dcmread(victim)
    lost_z = float(ds.ImagePositionPatient[2])
    del ds.ImagePositionPatient
    _save(ds, victim)

    vol = read_dicom(tmp_path)

    assert vol.spacing[0] == pytest.approx(1.0)  # not SliceThickness's 5
    assert vol.origin != (0.0, 0.0, 0.0) or lost_z != 0.0
    assert any("without a position" in w and "left out" in w for w in vol.metadata["warnings"])
    assert vol.shape[0] == (4 if 0.0 < lost_z < 3.0 else 3)


def test_spacing_from_slice_thickness_is_said(tmp_path):
    write_series(tmp_path, [0.0, 1.0, 2.0], positions=False, thickness=5.0)

    vol = read_dicom(tmp_path)

    assert vol.spacing[0] == 5.0
    assert any("from SliceThickness" in w for w in vol.metadata["warnings"])


def test_a_stray_file_with_a_bad_frame_count_is_skipped_not_fatal(tmp_path):
    write_series(tmp_path, [0.0, 2.0, 4.0, 6.0])
    ds = pydicom.dcmread(sorted(tmp_path.iterdir())[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = -1
    ds.save_as(tmp_path / "zz.dcm", enforce_file_format=True)

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 4
    assert any("skipped 1 truncated or malformed" in w for w in vol.metadata["warnings"])


def test_a_slice_whose_pixels_are_cut_short_becomes_missing_not_fatal(tmp_path):
    write_series(tmp_path, [0.0, 2.0, 4.0, 6.0], shuffle=False)
    victim = tmp_path / "s001.dcm"  # the slice at 2 mm
    victim.write_bytes(victim.read_bytes()[:-20])  # header intact, pixel data short

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 4 and vol.missing_slices() == [1]
    assert np.isnan(vol.array[1]).all()
    np.testing.assert_array_equal(vol.array[[0, 2, 3]], [expected_hu(z) for z in (0.0, 4.0, 6.0)])
    assert any("could not be decoded left missing (z=1)" in w for w in vol.metadata["warnings"])
    with pytest.raises(MedsegInputError) as err:  # on its own, the file is refused
        read_dicom(victim)
    assert_clean_error(err.value, victim)


@pytest.mark.parametrize("zs, shape, dz", [
    ([5.0 * k for k in range(40)] + [197.5], 41, 5.0),  # a range ending off the grid
    # a short series ending off the grid: a 2.5 mm volume with every other slice missing
    ([0.0, 5.0, 10.0, 15.0, 17.5], 5, 5.0),
    ([0.0, 2.5, 7.5, 12.5, 17.5], 5, 5.0),  # ... or starting off it
    # odd by the count of slices (rint's halves go to even): the same series
    ([5.0 * k for k in range(39)] + [192.5], 40, 5.0),
    ([0.0, 5.0, 10.0, 15.0, 20.0, 22.5], 6, 5.0),
])
def test_one_odd_step_does_not_turn_a_series_into_gaps(tmp_path, zs, shape, dz):
    write_series(tmp_path, zs)

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == shape and vol.spacing[0] == pytest.approx(dz)
    assert not vol.has_gaps
    assert any(w.startswith("uneven slice spacing") for w in vol.metadata["warnings"])


@pytest.mark.parametrize("zs, dz, missing, left_out", [
    # 2.5 mm steps among 5 mm ones: counted as whole 5 mm steps, every later slice sat
    # 5 mm off (no gap said); a 2.5 mm grid holds each slice where it was acquired
    ([0.0, 2.5, 5.0] + [10.0 + 5 * k for k in range(7)], 2.5, [3, 5, 7, 9, 11, 13, 15], []),
    ([0.0, 2.5, 5.0] + [10.0 + 5 * k for k in range(3)], 2.5, [3, 5, 7], []),  # short
    # a near-duplicate (0.05 mm) beside a real gap: the gap went onto an acquired slice
    ([0.0, 2.5, 5.0, 5.05, 7.5, 12.5, 15.0, 17.5], 2.5, [4], [5.05]),
    ([2.5 * k for k in range(40)] + [50.05], 2.5, [], [50.05]),
])
def test_every_slice_lies_where_it_was_acquired(tmp_path, zs, dz, missing, left_out):
    write_series(tmp_path, zs)

    vol = read_dicom(tmp_path)

    assert vol.spacing[0] == pytest.approx(dz) and vol.missing_slices() == missing
    kept = sorted(set(zs) - set(left_out))
    acquired = [k for k in range(vol.shape[0]) if not vol.missing[k]]
    assert len(acquired) == len(kept)
    for k, z in zip(acquired, kept):  # at its own position, holding its own pixels
        assert vol.origin[0] + k * dz == pytest.approx(z, abs=0.06)
        np.testing.assert_array_equal(vol.array[k], expected_hu(z))
    said = " ".join(vol.metadata["warnings"])
    assert ("left out" in said) == bool(left_out)


@pytest.mark.parametrize("zs", [
    [round(-200.333 + 0.625 * k, 2) for k in range(400)],  # positions kept to 2 decimals
    [round(-123.456 + 1.25 * k, 1) for k in range(300)],  # ... to 1
])
def test_positions_rounded_in_the_file_make_no_gaps_and_lose_no_slice(tmp_path, zs):
    """Placed by the nearest grid position of the median step, rounded positions made
    3 false gaps in 400 slices, or left 11 of 300 slices out as near-duplicates."""
    write_series(tmp_path, zs)

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == len(zs) and not vol.has_gaps
    # the spacing fitted through the positions, not the median step (1.3 mm for 1.25:
    # the last slice 15 mm from its place)
    last = vol.origin[0] + (len(zs) - 1) * vol.spacing[0]
    assert abs(last - zs[-1]) < 0.1


def test_a_scout_filed_in_the_series_is_left_out(tmp_path):
    """A coronal localizer (another size too) with the axial slices' SeriesInstanceUID
    made the series unreadable ("different orientations"); beside a second series the
    folder opened that one instead."""
    uid = write_series(tmp_path, [2.5 * k for k in range(6)])
    scout = tmp_path / "scout.dcm"
    write_ct_slice(scout, 0.0, series_uid=uid, instance=99, shape=(8, 7),
                   iop=(1, 0, 0, 0, 0, -1), ipp=(-100.0, 0.0, 200.0))
    ds = pydicom.dcmread(scout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    _save(ds, scout)
    write_series(tmp_path, [300.0 + 5 * k for k in range(3)], name="other")

    vol = read_dicom(tmp_path)

    assert vol.shape == (6, 6, 5) and vol.origin[0] == pytest.approx(0.0)
    assert any("1 localizer (scout) image in the series left out" in w
               for w in vol.metadata["warnings"])
    np.testing.assert_array_equal(vol.array[2], expected_hu(5.0))


def test_a_slice_in_another_orientation_not_marked_a_scout_is_left_out(tmp_path):
    """A coronal scout (another size too) filed under the axial series' UID without
    LOCALIZER in its ImageType made the series unreadable ("different orientations"), and
    the folder opened a smaller series beside it instead."""
    uid = write_series(tmp_path, [2.5 * k for k in range(6)])
    write_ct_slice(tmp_path / "scout.dcm", 0.0, series_uid=uid, instance=99, shape=(8, 7),
                   iop=(1, 0, 0, 0, 0, -1), ipp=(-100.0, 0.0, 200.0))
    write_series(tmp_path, [300.0 + 5 * k for k in range(3)], name="other")

    vol = read_dicom(tmp_path)

    assert vol.shape == (6, 6, 5) and vol.origin[0] == pytest.approx(0.0)
    assert any("1 slice in another orientation than the series' other 6 (a scout or a "
               "reformat filed with it) left out" in w for w in vol.metadata["warnings"])
    np.testing.assert_array_equal(vol.array[2], expected_hu(5.0))


def test_a_series_split_evenly_between_two_orientations_is_refused(tmp_path):
    uid = write_series(tmp_path, [0.0, 2.0], name="a")
    write_series(tmp_path, [4.0, 6.0], name="b", series_uid=uid, iop=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))

    with pytest.raises(MedsegInputError) as info:
        read_dicom(tmp_path)

    assert_clean_error(info.value, tmp_path)
    assert "different orientations (2 and 2 slices) and none holds most of them" in str(info.value)


def test_many_slices_without_a_position_are_sorted_by_instance_number(tmp_path):
    write_series(tmp_path, [float(z) for z in range(20)], shuffle=False)
    for path in sorted(tmp_path.iterdir())[2:]:  # only two keep their position
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        _save(ds, path)

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 20
    assert "slice positions missing; sorted by InstanceNumber" in vol.metadata["warnings"]


def test_when_the_largest_series_cannot_be_stacked_the_next_opens_with_a_warning(tmp_path):
    uid = write_series(tmp_path, [0.0, 2.0, 4.0], name="main", description="ABDOMEN")
    write_series(tmp_path, [3.0], name="odd", series_uid=uid, pixel_spacing=(0.9, 0.9))
    write_series(tmp_path, [10.0, 12.0], name="other", description="DELAYED")

    vol = read_dicom(tmp_path)

    assert vol.shape[0] == 2
    warnings = vol.metadata["warnings"]
    assert any("opened the largest that could be opened (2 slices, 'DELAYED')" in w
               for w in warnings)
    assert any(w.startswith("a series of 4 slices could not be opened (slices in one series "
                            "have different pixel spacings") for w in warnings)


def test_a_slice_of_another_size_is_left_out_of_its_series(tmp_path):
    """One key image or reformat of another size filed under the series' UID made the
    whole series unreadable ("differ in size"), as one in another orientation did."""
    uid = write_series(tmp_path, [2.5 * k for k in range(5)])
    write_series(tmp_path, [12.5], name="key", series_uid=uid, shape=(4, 4))

    vol = read_dicom(tmp_path)

    assert vol.shape == (5, 6, 5)
    assert any("1 slice of another size (4×4) than the series' other 5 (6×5; a key image or "
               "a reformat filed with it) left out" in w for w in vol.metadata["warnings"])


def test_a_12_bit_jpeg_pillow_cannot_read_names_the_decoder_to_install():
    path = TEST_FILES / "JPGExtended.dcm"
    try:
        read_dicom(path)
    except MedsegInputError as exc:
        assert_clean_error(exc, path)
        # it said "could not be decoded (Unable to decode … Pillow does not support 'JPEG Ex…"
        assert "compressed (JPEG Extended" in str(exc) and "pip install" in str(exc)
    else:
        pytest.skip("a decoder for 12-bit JPEG is installed here")


def test_a_siemens_mosaic_is_said_to_be_one():
    import nibabel.testing

    vol = read_dicom(Path(nibabel.testing.data_path) / "0.dcm")
    assert any(w.startswith("Siemens mosaic") for w in vol.metadata["warnings"])


# --------------------------------------------------------------------------- from a review


def test_positions_without_orientation_are_sorted_by_position_as_axial(tmp_path):
    """Without ImageOrientationPatient every slice fell back to InstanceNumber order: the
    positions (and so the gap) were thrown away, and a warning called them missing."""
    folder = tmp_path / "noiop"
    folder.mkdir()
    zs = [0.0, 4.0, 2.0, 10.0, 8.0]
    for k, z in enumerate(zs):
        path = folder / f"s{k}.dcm"
        write_ct_slice(path, z, series_uid="1.2.9", instance=5 - k)
        ds = pydicom.dcmread(path)
        del ds.ImageOrientationPatient
        _save(ds, path)
    volume = read_dicom(folder)
    assert volume.spacing[0] == pytest.approx(2.0) and volume.shape[0] == 6
    assert volume.missing.tolist() == [False, False, False, True, False, False]  # z = 6 mm
    for z_index, z in [(0, 0.0), (1, 2.0), (5, 10.0)]:
        np.testing.assert_allclose(volume.array[z_index], expected_hu(z))
    assert any("ImageOrientationPatient missing" in w for w in volume.metadata["warnings"])


@pytest.mark.parametrize("tags, expect", [
    ({"RescaleSlope": None}, "invalid RescaleSlope"),  # empty: named, not a TypeError
    ({"RescaleIntercept": "DELETE"}, "slope alone"),  # a slope without intercept applies
])
def test_rescale_tags_odd_or_alone(tmp_path, tags, expect):
    path = tmp_path / "one.dcm"
    write_ct_slice(path, 3.0, series_uid="1.2.8", instance=1)
    ds = pydicom.dcmread(path)
    for tag, value in tags.items():
        if value == "DELETE":
            delattr(ds, tag)
        else:
            setattr(ds, tag, value)
    _save(ds, path)
    if expect == "slope alone":  # stored (HU + 1024) / 2: with the slope and no intercept
        np.testing.assert_allclose(read_dicom(path).array[0], expected_hu(3.0) + 1024.0)
        return
    with pytest.raises(MedsegInputError, match=expect) as info:
        read_dicom(path)
    assert_clean_error(info.value, path)


def test_a_ct_without_rescale_tags_is_said_to_be_taken_as_stored(tmp_path):
    """Both tags dropped (an anonymiser, a converter): stored values, often HU + 1024,
    were called HU, and the models read them so with no word said."""
    path = tmp_path / "one.dcm"
    write_ct_slice(path, 3.0, series_uid="1.2.8", instance=1)
    said = "CT without a rescale slope or intercept: values taken as stored"
    assert not any(said in w for w in read_dicom(path).metadata["warnings"])
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept
    _save(ds, path)
    volume = read_dicom(path)
    assert any(w.startswith(said) for w in volume.metadata["warnings"])
    np.testing.assert_allclose(volume.array[0], (expected_hu(3.0) + 1024.0) / 2.0)


def test_a_named_pipe_in_a_folder_does_not_hang_the_reader(tmp_path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "with_fifo"
    write_series(folder, [0.0, 2.0])
    os.mkfifo(folder / "a_pipe")
    code = ("from napari_medseg.core.io import is_supported_path, read_volume;"
            f"print(is_supported_path({str(folder)!r}), read_volume({str(folder)!r}).shape)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("True (2,"), run.stderr


def test_unreadable_files_are_named_not_called_non_dicom(tmp_path, monkeypatch):
    folder = tmp_path / "p"
    write_series(folder, [0.0, 2.0, 4.0], shuffle=False)
    real = pydicom.dcmread

    def no_permission(path, *args, **kwargs):
        if Path(path).name == "s001.dcm":
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", no_permission)
    volume = read_dicom(folder)
    warning = " ".join(volume.metadata["warnings"])
    assert "could not read 1 file" in warning and "s001.dcm" in warning
    assert "non-DICOM" not in warning
    with pytest.raises(MedsegInputError, match="could not read the file") as info:
        read_dicom(folder / "s001.dcm")
    assert_clean_error(info.value, folder / "s001.dcm")


def test_a_folder_opened_as_dot_has_a_name(tmp_path, monkeypatch):
    folder = tmp_path / "e6"
    folder.mkdir()
    monkeypatch.chdir(folder)
    with pytest.raises(MedsegInputError) as info:
        read_volume(".")
    assert str(info.value).startswith("e6: ")


@pytest.mark.parametrize("steps", ["along x", "none"])
def test_without_orientation_a_stack_not_along_z_keeps_every_slice(tmp_path, steps):
    """Taken as axial, a sagittal stack (positions stepping along x) or a cine series
    (one position) collapsed onto one slice; they keep the InstanceNumber order."""
    folder = tmp_path / steps.replace(" ", "_")
    folder.mkdir()
    for k in range(4):
        path = folder / f"s{k}.dcm"
        ipp = [-100.0 + (2.0 * k if steps == "along x" else 0.0), -120.0, 7.0]
        write_ct_slice(path, 7.0, series_uid="1.2.7", instance=k + 1, ipp=ipp)
        ds = pydicom.dcmread(path)
        del ds.ImageOrientationPatient
        _save(ds, path)
    volume = read_dicom(folder)
    assert volume.shape[0] == 4
    assert not any("taken as axial" in w for w in volume.metadata["warnings"])


def test_a_dot_inside_a_linked_folder_is_named_as_the_user_sees_it(tmp_path, monkeypatch):
    from napari_medseg.core.io import named_path

    store = tmp_path / "store" / "ab12cd"
    store.mkdir(parents=True)
    link = tmp_path / "patient_042"
    link.symlink_to(store)
    monkeypatch.chdir(link)
    monkeypatch.setenv("PWD", str(link))
    assert named_path(".").name == "patient_042"
    assert named_path("..") == tmp_path


@pytest.mark.parametrize("iop", [(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)])
def test_labels_drawn_on_a_coronal_series_reopen_where_they_were_drawn(tmp_path, iop):
    """The DICOM reader kept a coronal series' slices along z while the NIfTI reader turns
    every file to (S, P, L): saved labels reopened transposed, off the image."""
    from napari_medseg._reader import read_layers
    from napari_medseg._writer import write_labels_nifti

    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    uid = generate_uid()
    for k in range(4):
        write_ct_slice(tmp_path / f"{k}.dcm", k, series_uid=uid, instance=k + 1, iop=iop,
                       ipp=np.array([-100.0, -120.0, 40.0]) + 3.0 * k * normal)
    (data, kwargs, kind), = read_layers(str(tmp_path))
    assert kind == "image"
    labels = np.zeros(data.shape, np.uint8)
    labels[1, 2, 3] = labels[4, 0, 1] = 7
    meta = {"scale": kwargs["scale"], "translate": kwargs["translate"],
            "metadata": {"medseg": {"source": kwargs["metadata"]["medseg"]["source"]}}}
    (path,) = write_labels_nifti(str(tmp_path / "labels.nii.gz"), labels, meta)
    (back, back_kwargs, back_kind), = read_layers(path)
    assert back_kind == "labels"
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(back_kwargs["scale"], kwargs["scale"])
    np.testing.assert_allclose(back_kwargs["translate"], kwargs["translate"], atol=1e-4)


@pytest.mark.parametrize("iop, axis, at", [((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 0, 4),  # normal −S
                                           ((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), 2, 4)])  # sagittal
def test_an_undecodable_slice_is_named_where_it_lies_after_turning(tmp_path, iop, axis, at):
    """The warning kept the file's place in the series (z=1) while its NaN slice lay at
    z=4 of a flipped series; a sagittal series' lost plane was not in missing_planes."""
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    uid = generate_uid()
    for k in range(6):
        write_ct_slice(tmp_path / f"s{k:03d}.dcm", 100 * k, series_uid=uid, instance=k + 1,
                       iop=iop, ipp=np.array([10.0, -20.0, 30.0]) + 2.0 * k * normal)
    victim = tmp_path / "s001.dcm"  # the second slice along the normal
    victim.write_bytes(victim.read_bytes()[:-10])

    vol = read_dicom(tmp_path)

    lost = np.isnan(vol.array).all(axis=tuple(a for a in range(3) if a != axis))
    assert np.flatnonzero(lost).tolist() == [at]
    said = [w for w in vol.metadata["warnings"] if "could not be decoded" in w]
    if axis == 0:
        assert vol.missing_slices() == [at] and said == [
            f"1 slice whose pixel data could not be decoded left missing (z={at})"]
    else:
        assert not vol.missing.any()
        assert vol.metadata["missing_planes"] == {"axis": "x", "indices": [at]}
        assert said == [f"1 slice whose pixel data could not be decoded left missing"
                        f" (NaN planes at x={at})"]


@pytest.mark.parametrize("iop, axis", [((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "z"),  # normal −S
                                       ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), "y")])  # coronal
def test_a_turned_series_says_its_gaps_where_they_now_lie(tmp_path, iop, axis, capsys):
    """The gap warning and the slice spacings kept the layout before turning: a z-flipped
    series' gaps were named at z=3–4 while they lay at 1–2; a coronal one's along 'z'."""
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    uid = generate_uid()
    for k, step in enumerate([0, 1, 2, 5]):  # slices 3 and 4 (along the normal) were lost
        write_ct_slice(tmp_path / f"{k}.dcm", 100 * step, series_uid=uid, instance=k + 1,
                       iop=iop, ipp=np.array([-100.0, -120.0, 40.0]) + 3.0 * step * normal)
    vol = read_dicom(tmp_path)
    gaps = [w for w in vol.metadata["warnings"] if "missing slice" in w]
    assert vol.metadata["slice_spacings_mm"] == ([9.0, 3.0, 3.0] if axis == "z" else [3.0, 3.0, 9.0])
    if axis == "z":  # flipped: the lost slices are 1 and 2 counted from the top
        assert vol.missing_slices() == [1, 2] and gaps == ["2 missing slices (gaps at z=1–2)"]
        assert np.isnan(vol.array[[1, 2]]).all()
        return
    assert not vol.missing.any() and vol.metadata["missing_planes"] == {"axis": "y",
                                                                        "indices": [3, 4]}
    assert vol.metadata["slice_axis"] == "y"
    # generation makes slices between the series' own, filling its gap planes
    from napari_medseg.core.generation import interpolate_slices

    made = interpolate_slices(vol, 1)
    assert made.axis == 1 and np.isfinite(made.volume.array).all()
    from napari_medseg.cli import main

    capsys.readouterr()
    assert main(["info", str(tmp_path)]) == 0  # it said "gaps: none"
    assert "gaps:     2 missing planes along y [3, 4]" in capsys.readouterr().out
    assert main(["info", "--json", str(tmp_path)]) == 0  # it said no gap at all
    said = json.loads(capsys.readouterr().out)
    assert said["missing_slices"] == [] and said["missing_planes"] == {"axis": "y",
                                                                     "indices": [3, 4]}
    assert len(gaps) == 1 and "NaN planes at y=3–4" in gaps[0]
    assert np.isnan(vol.array[:, [3, 4]]).all() and not np.isnan(vol.array[:, [0, 1, 2, 5]]).any()


def test_a_coronal_series_of_thin_slices_is_generated_along_its_own_slices(tmp_path):
    """1 mm coronal slices of 2 mm pixels: the spacing rule picked z (the pixels' rows),
    left the series' gap planes NaN and said 'nothing to generate'."""
    from napari_medseg.core.generation import interpolate_slices, slice_axis

    iop = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    uid = generate_uid()
    for k, step in enumerate([0, 1, 3, 4]):
        write_ct_slice(tmp_path / f"{k}.dcm", 100 * step, series_uid=uid, instance=k + 1, iop=iop,
                       ipp=(-100.0, -120.0 + 1.0 * step, 40.0), pixel_spacing=(2.0, 2.0))
    vol = read_dicom(tmp_path)
    assert vol.spacing == pytest.approx((2.0, 1.0, 2.0)) and slice_axis(vol) == 1
    made = interpolate_slices(vol, 1)  # fill the gap plane only
    assert made.axis == 1 and made.generated.tolist() == [False, False, True, False, False]
    assert np.isfinite(made.volume.array).all()


def test_an_axial_series_of_thin_slices_and_oblong_pixels_is_generated_along_z(tmp_path):
    """0.5 mm axial slices of 0.6 × 1.0 mm pixels: the spacing rule took x for the slice
    axis, refused to fill the series' gap ("no missing slices") and, upsampled, halved x."""
    from napari_medseg.core.generation import interpolate_slices, slice_axis
    from napari_medseg.core.volume import Volume

    uid = generate_uid()
    for k, z in enumerate([0.0, 0.5, 1.0, 2.0, 2.5, 3.0]):  # 1.5 lost
        write_ct_slice(tmp_path / f"{k}.dcm", z, series_uid=uid, instance=k + 1,
                       pixel_spacing=(0.6, 1.0))
    vol = read_dicom(tmp_path)
    assert vol.missing_slices() == [3] and vol.metadata["slice_axis"] == "z"
    assert slice_axis(vol) == 0
    made = interpolate_slices(vol, 1)
    assert made.axis == 0 and made.generated.tolist() == [False] * 3 + [True] + [False] * 3
    # the same volume with nothing to say where its slices lie (a NIfTI, a .npy): the rule
    # takes x, and the refusal now says so instead of "no missing slices" alone
    bare = Volume(vol.array, spacing=vol.spacing, missing=vol.missing)
    with pytest.raises(MedsegInputError, match=r"taken to lie along x .* missing z slices 3"):
        interpolate_slices(bare, 1)
    with pytest.raises(MedsegInputError) as other:  # another refusal: said as it is
        interpolate_slices(bare, 0)
    assert "taken to lie" not in str(other.value)


@pytest.mark.parametrize("iop, plane", [((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), "coronal"),
                                        ((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "sagittal")])
def test_one_coronal_or_sagittal_image_is_refused_by_the_models_a_series_is_not(
        tmp_path, iop, plane):
    """A single coronal image stays as acquired (it cannot be turned to axial slices) and
    was classified as if it were an axial slice, with no word said."""
    from napari_medseg.core.inference import classify_volume
    from napari_medseg.core.models import SliceClassifier
    from napari_medseg.core.progress import run_to_completion

    model = SliceClassifier(n_classes=3, filters=(8, 16, 16), hidden=16).eval()
    card = {"classes": ["no_body", "normal", "lesion"], "input_spacing_mm": [5.0, 2.0, 2.0],
            "normalisation": {"type": "window", "low": -200.0, "high": 300.0}}
    normal = np.cross(iop[:3], iop[3:])
    (tmp_path / "one").mkdir()
    write_ct_slice(tmp_path / "one" / "0.dcm", 0, series_uid=generate_uid(), instance=1,
                   iop=iop, ipp=[-100.0, -120.0, 40.0])
    with pytest.raises(MedsegInputError, match=f"axial slices.*{plane} planes"):
        run_to_completion(classify_volume(read_dicom(tmp_path / "one"), model, card))
    uid = generate_uid()
    (tmp_path / "series").mkdir()
    for k in range(3):
        write_ct_slice(tmp_path / "series" / f"{k}.dcm", k, series_uid=uid, instance=k + 1,
                       iop=iop, ipp=np.array([-100.0, -120.0, 40.0]) + 3.0 * k * normal)
    turned = read_dicom(tmp_path / "series")
    assert run_to_completion(classify_volume(turned, model, card)).predicted.shape == (turned.shape[0],)


@pytest.mark.parametrize("iop", [(1, 0, 0, 1, 0, 0), (0, 1, 0, 0, -1, 0)])
@pytest.mark.parametrize("n_slices", [1, 3])
def test_parallel_row_and_column_directions_are_named_as_such(tmp_path, iop, n_slices):
    """Parallel row and column directions were refused as "a zero vector", naming
    neither of the two (non-zero) vectors the header holds."""
    write_series(tmp_path, [2.0 * k for k in range(n_slices)], iop=iop)
    with pytest.raises(MedsegInputError, match="row and column directions are parallel"):
        read_dicom(tmp_path)


def _bare(ds: Dataset, path: Path, implicit: bool, little: bool = True) -> None:
    """``ds`` written as a bare dataset: no preamble, no 'DICM', no file meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    if not little:  # pixel data are written as stored: store them big endian too
        ds = Dataset(ds)
        ds.PixelData = np.frombuffer(ds.PixelData, "<i2").astype(">i2").tobytes()
    write_dataset(fp, ds)
    path.write_bytes(fp.getvalue())


@pytest.mark.parametrize("implicit, little", [(True, True), (False, True), (False, False)])
def test_a_dataset_without_file_header_is_read_with_a_warning(tmp_path, implicit, little):
    """ACR-NEMA-era files and some PACS exports hold the bare dataset (no preamble,
    'DICM' or file meta): refused as "not a DICOM file"."""
    source = bundled("CT_small.dcm")
    reference = read_dicom(source)
    _bare(pydicom.dcmread(source), tmp_path / "1.2.840.113619.2.1", implicit, little)  # no suffix
    volume = read_volume(tmp_path / "1.2.840.113619.2.1")
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.spacing == reference.spacing and volume.origin == reference.origin
    assert any("no DICOM file header" in w for w in volume.metadata["warnings"])
    # a series of them in a folder
    folder = tmp_path / "series"
    write_series(folder, [0.0, 2.0, 4.0])
    for f in sorted(folder.iterdir()):
        _bare(pydicom.dcmread(f), f, implicit, little)
    series = read_dicom(folder)
    assert series.shape[0] == 3
    assert any("3 files without a DICOM file header" in w for w in series.metadata["warnings"])


def test_a_file_that_only_starts_like_a_dataset_gets_a_clear_message(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\x08\x00\x05\x00" + bytes(range(256)) * 4)
    with pytest.raises(MedsegInputError) as err:
        read_dicom(path)
    assert str(err.value).startswith("x.dcm: ") and "\n" not in str(err.value)


def test_binary_files_that_start_like_a_dataset_are_not_taken_for_one(tmp_path):
    """An int32 array of 8, 0, 1, 2 starts with the bytes of a group-0008 element: it was
    claimed as DICOM ("holds no image (unknown type)"), and counted in a series folder as
    a DICOM object rather than skipped."""
    from napari_medseg.core.io import is_supported_path

    blob = tmp_path / "labels.bin"
    blob.write_bytes(np.array([8, 0, 1, 2] * 64, "<i4").tobytes())
    assert not is_supported_path(blob)
    folder = tmp_path / "series"
    write_series(folder, [0.0, 2.0])
    (folder / "notes.bin").write_bytes(blob.read_bytes())
    (folder / "readme.txt").write_text("scan notes")
    warns = read_dicom(folder).metadata["warnings"]
    assert "skipped 2 non-DICOM files" in warns, warns


def test_sniffing_a_bare_dataset_reads_element_headers_only(tmp_path, monkeypatch):
    """The sniff parsed the whole file with pydicom (force=True): a mostly-zero 100 MB
    file, which starts like a group-0008 element, took 40 s, and napari sniffs every file
    dropped on it. It now walks element headers and never calls pydicom."""
    from napari_medseg.core.io import dicom as dicom_module

    def no_parse(*args, **kwargs):
        raise AssertionError("the sniff parsed the file")

    zeros = tmp_path / "volume.raw"
    array = np.zeros(1_000_000, "<i4")
    array[0] = 8
    zeros.write_bytes(array.tobytes())
    bare = tmp_path / "bare"
    _bare(pydicom.dcmread(bundled("CT_small.dcm")), bare, implicit=True)
    monkeypatch.setattr(dicom_module.pydicom, "dcmread", no_parse)
    assert not dicom_module.is_bare_dataset(zeros)
    assert dicom_module.is_bare_dataset(bare)


def test_a_bare_dataset_led_by_its_file_meta_is_recognised(tmp_path):
    """File meta (group 0002) is explicit VR little endian whatever the dataset after it:
    the header walk kept one encoding for the whole file and missed an implicit-VR
    dataset that kept its meta but lost its preamble and 'DICM'."""
    import io

    from pydicom.uid import ImplicitVRLittleEndian

    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=True)
    except TypeError:  # pragma: no cover - pydicom 2.x
        pytest.skip("pydicom 3 writes this")
    (tmp_path / "IM0001").write_bytes(buffer.getvalue()[132:])
    volume = read_volume(tmp_path / "IM0001")
    np.testing.assert_array_equal(volume.array, read_dicom(bundled("CT_small.dcm")).array)


def test_files_without_positions_are_placed_by_slice_location(tmp_path):
    """Sorted by InstanceNumber and stacked back to back, a missing file went unnoticed:
    the 10 mm slice sat where 7.5 mm belongs, and every later one a slice off."""
    zs = [0.0, 2.5, 5.0, 10.0, 12.5, 15.0]  # the file at 7.5 mm is missing
    write_series(tmp_path, zs)
    for path in tmp_path.iterdir():
        ds = pydicom.dcmread(path)
        ds.SliceLocation = float(ds.ImagePositionPatient[2])
        del ds.ImagePositionPatient
        _save(ds, path)

    vol = read_dicom(tmp_path)

    assert vol.spacing[0] == pytest.approx(2.5) and vol.missing_slices() == [3]
    for k, z in zip([0, 1, 2, 4, 5, 6], zs):
        np.testing.assert_array_equal(vol.array[k], expected_hu(z))
    assert any("placed along their normal by SliceLocation" in w for w in vol.metadata["warnings"])


def _nm_frames(tmp_path, n, pointers, **vectors):
    """A classic multi-frame NM file of ``n`` 4 × 5 frames, frame k filled with k, whose
    FrameIncrementPointer names ``pointers``."""
    from pydicom.tag import Tag

    ds = _base("1.2.840.10008.5.1.4.1.1.20", generate_uid())  # NM Image Storage
    ds.Modality = "NM"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [10.0, -20.0, 30.0], list(AXIAL)
    ds.PixelSpacing, ds.SpacingBetweenSlices = [2.0, 2.0], 4.0
    ds.FrameIncrementPointer = [Tag(p) for p in pointers]
    for name, values in vectors.items():
        setattr(ds, name, values)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 4, 5, n
    ds.PixelData = np.stack([np.full((4, 5), k) for k in range(n)]).astype("<u2").tobytes()
    path = tmp_path / "nm.dcm"
    _save(ds, path)
    return path


def test_frames_that_step_through_time_are_not_stacked_as_slices(tmp_path):
    """A cine file's time points were placed one slice step apart: a made-up volume."""
    path = _nm_frames(tmp_path, 6, ["FrameTime"], FrameTime=40.0)

    vol = read_dicom(path)

    assert vol.shape == (1, 4, 5)
    np.testing.assert_array_equal(vol.array[0], 0)
    assert any("frames are not slices (they step through FrameTime): only the first is "
               "opened" in w for w in vol.metadata["warnings"])


def test_gated_frames_keep_the_first_gate_placed_by_their_slice_numbers(tmp_path):
    """A gated NM tomogram (4 slices × 2 time slots) was stacked as 8 slices, the second
    gate on top of the first."""
    path = _nm_frames(tmp_path, 8, ["SliceVector", "TimeSlotVector"],
                      SliceVector=[1, 2, 3, 4] * 2, TimeSlotVector=[1] * 4 + [2] * 4)

    vol = read_dicom(path)

    assert vol.shape == (4, 4, 5) and vol.spacing[0] == 4.0
    np.testing.assert_array_equal(vol.array[:, 0, 0], [0, 1, 2, 3])
    assert any("4 frames of later TimeSlotVector left out" in w
               for w in vol.metadata["warnings"])


def test_a_multiframe_file_is_rescaled_frame_by_frame_not_copied_whole(tmp_path):
    """The whole file was rescaled in float64, then copied to float32, then into the
    volume: a multi-frame file peaked at 5 times the volume it made."""
    import tracemalloc

    n, rows, cols = 40, 128, 128
    ds = _base("1.2.840.10008.5.1.4.1.1.20", generate_uid())
    ds.Modality = "NM"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 0.0], list(AXIAL)
    ds.PixelSpacing, ds.GridFrameOffsetVector = [1.0, 1.0], [2.0 * k for k in range(n)]
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024.0
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n
    raw = np.random.default_rng(0).integers(0, 4000, (n, rows, cols)).astype("<u2")
    ds.PixelData = raw.tobytes()
    path = tmp_path / "frames.dcm"
    _save(ds, path)

    tracemalloc.start()
    try:
        vol = read_dicom(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(vol.array[:, 0, 0], raw[:, 0, 0] * 0.5 - 1024.0)
    assert peak < 3.0 * vol.array.nbytes, peak / vol.array.nbytes


def test_a_radiograph_without_pixel_spacing_takes_its_imager_pixel_spacing(tmp_path):
    """CR/DX give ImagerPixelSpacing (at the detector) and often no PixelSpacing: the
    image opened at 1 mm with "pixel spacing unknown"."""
    path = tmp_path / "dx.dcm"
    write_ct_slice(path, 0.0, series_uid=generate_uid(), instance=1)
    ds = pydicom.dcmread(path)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.15, 0.2]
    _save(ds, path)

    vol = read_dicom(path)

    assert vol.spacing[1:] == pytest.approx((0.15, 0.2))
    assert any("ImagerPixelSpacing" in w for w in vol.metadata["warnings"])
    assert not any("pixel spacing unknown" in w for w in vol.metadata["warnings"])


def test_frames_whose_pointer_names_their_offsets_are_still_stacked_by_step(tmp_path):
    """A pointer naming a spatial vector the file lacks is no time series."""
    path = _nm_frames(tmp_path, 3, ["GridFrameOffsetVector"])

    vol = read_dicom(path)

    assert vol.shape == (3, 4, 5) and vol.spacing[0] == 4.0


def test_one_slice_of_a_series_says_where_the_volume_is(tmp_path):
    """Every slice picked in a file dialog opened as its own 2D image, with no hint that
    its folder holds the volume (napari hands the reader one file at a time)."""
    write_series(tmp_path / "series", [0.0, 2.5, 5.0, 7.5], shuffle=False)
    # another series: not counted
    write_ct_slice(tmp_path / "series" / "other.dcm", 0.0, series_uid=generate_uid(), instance=1)
    (tmp_path / "series" / "notes.txt").write_text("not DICOM")
    one = read_dicom(tmp_path / "series" / "s000.dcm")
    assert one.shape[0] == 1
    assert any("one slice of a series of 4 files in its folder" in w
               for w in one.metadata["warnings"]), one.metadata["warnings"]
    alone = read_dicom(tmp_path / "series" / "other.dcm")
    assert not any("series of" in w for w in alone.metadata["warnings"])


def test_a_study_folder_of_linked_series_folders_is_read(tmp_path):
    """rglob and os.walk do not follow linked folders: 'folder holds no files', and the
    napari reader did not claim it."""
    from napari_medseg.core.io import is_supported_path

    write_series(tmp_path / "store" / "ct", [0.0, 2.5, 5.0])
    study = tmp_path / "study"
    study.mkdir()
    (study / "series1").symlink_to(tmp_path / "store" / "ct")
    (study / "series1" / "up").symlink_to(study)  # a link back up: no loop
    volume = read_dicom(study)
    assert volume.shape[0] == 3
    assert is_supported_path(study)


def test_a_dicomdir_says_to_open_its_folder():
    """A CD's DICOMDIR was refused as holding "no image", with no word on what to open."""
    path = Path(pydicom.data.get_testdata_file("DICOMDIR"))
    with pytest.raises(MedsegInputError) as info:
        read_dicom(path)
    assert_clean_error(info.value, path)
    assert "DICOMDIR" in str(info.value) and "open the folder it lies in" in str(info.value)


def test_files_picked_together_read_as_their_folder(tmp_path):
    """read_dicom_files: the given files as one series (napari's Open Files as Stack)."""
    from napari_medseg.core.io.dicom import read_dicom_files

    write_series(tmp_path / "a", [0.0, 2.5, 5.0, 7.5])
    files = sorted((tmp_path / "a").glob("*.dcm"))
    whole = read_dicom(tmp_path / "a")
    picked = read_dicom_files([str(f) for f in files[::-1]])
    np.testing.assert_array_equal(picked.array, whole.array)
    assert picked.spacing == whole.spacing
    three = read_dicom_files(files[:3])  # the files given, not the folder's others
    assert three.shape[0] == 3
    with pytest.raises(MedsegInputError, match="no such file"):
        read_dicom_files([*files, tmp_path / "gone.dcm"])


def test_each_slice_keeps_its_instance_number(tmp_path):
    """A PACS shows a slice by its InstanceNumber; a series numbered from the head, with a
    gap, keeps each slice's number by z (None at the gap): results can name the image a
    radiologist goes to, not an index on the reoriented grid."""
    write_series(tmp_path / "s", [20.0, 17.5, 15.0, 12.5, 7.5, 5.0])  # 1 at the head
    vol = read_dicom(tmp_path / "s")
    assert vol.missing_slices() == [2]
    assert vol.metadata["instance_numbers"] == [6, 5, None, 4, 3, 2, 1]
    assert vol.instance_number(0) == 6 and vol.instance_number(2) is None
    assert vol.instance_number(5.6) == 1
    # patient coordinates: each slice at its ImagePositionPatient
    np.testing.assert_allclose(vol.patient_mm([[0, 0, 0], [6, 1, 2]]),
                               [[-100.0, -120.0, 5.0], [-100.0 + 2 * 0.75, -120.0 + 0.5, 20.0]])
    # a multi-frame file numbers frames, not instances: no list; one image has its own
    assert "instance_numbers" not in read_dicom(bundled("rtdose.dcm")).metadata
    single = pydicom.dcmread(bundled("CT_small.dcm"))
    assert read_dicom(bundled("CT_small.dcm")).metadata["instance_numbers"] == [
        int(single.InstanceNumber)]
    # numbers shared by two slices name no one slice
    write_series(tmp_path / "t", [0.0, 2.5, 5.0])
    for path in (tmp_path / "t").iterdir():
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 1
        ds.save_as(path)
    assert "instance_numbers" not in read_dicom(tmp_path / "t").metadata


def test_a_tilted_series_gives_no_patient_position(tmp_path):
    """A gantry-tilted series is shown unsheared: its voxels' patient positions were
    given on that grid, up to the tilt's whole drift off (35 mm over 40 slices at 20°).
    The reader records the drift, and no position is given."""
    zs = [2.5 * k for k in range(12)]
    shift = np.tan(np.radians(20.0))
    folder = tmp_path / "tilt"
    folder.mkdir()
    from pydicom.uid import generate_uid

    uid = generate_uid()
    for k, z in enumerate(zs):
        write_ct_slice(folder / f"t{k:03d}.dcm", z, series_uid=uid, instance=k + 1,
                       ipp=[-100.0, -120.0 + shift * z, z])
    vol = read_dicom(folder)
    assert vol.metadata["sideways_shift_mm"] == pytest.approx(shift * zs[-1], abs=0.1)
    assert np.isnan(vol.patient_mm([[5, 1, 1]])).all()
    assert vol.instance_number(5) == 6  # the image is still the image
