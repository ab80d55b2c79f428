import numpy as np
import pytest

from napari_medseg.core import MedsegInputError, Volume
from napari_medseg.core.volume import CT_WINDOW


def test_volume_normalises_dtype_and_geometry():
    vol = Volume(np.ones((2, 3, 4), dtype=np.int16), spacing=[2, 0.5, 0.5], origin=(1, 2, 3))
    assert vol.array.dtype == np.float32
    assert vol.spacing == (2.0, 0.5, 0.5)
    assert vol.origin == (1.0, 2.0, 3.0)
    assert vol.missing.shape == (2,) and not vol.has_gaps
    assert vol.shape == (2, 3, 4)


def test_metadata_drops_identifiers():
    vol = Volume(
        np.zeros((1, 2, 2)),
        metadata={"PatientName": "Doe^John", "patient_id": "123", "manufacturer": "ACME"},
    )
    assert dict(vol.metadata) == {"manufacturer": "ACME"}
    assert "Doe" not in repr(vol.summary())


@pytest.mark.parametrize(
    "array, spacing, match",
    [
        (np.zeros((4, 4)), (1, 1, 1), "3D"),
        (np.zeros((2, 3, 4, 5)), (1, 1, 1), "3D"),
        (np.zeros((0, 4, 4)), (1, 1, 1), "empty"),
        (np.zeros((2, 4, 4)), (1, 0, 1), "positive"),
        (np.zeros((2, 4, 4)), (1, 1), "three numbers"),
        (np.zeros((2, 4, 4)), (1, float("nan"), 1), "finite"),
        (np.array([[["a"]]]), (1, 1, 1), "numbers"),
        (np.full((2, 4, 4), np.nan), (1, 1, 1), "no finite voxel"),
        (np.where(np.eye(4)[None] > 0, np.inf, 0.0), (1, 1, 1), "infinite values in 4 voxels"),
        (np.full((1, 2, 2), 1e300), (1, 1, 1), "outside the float32 range"),
    ],
)
def test_bad_volumes_raise_clear_errors(array, spacing, match):
    with pytest.raises(MedsegInputError, match=match):
        Volume(array, spacing=spacing)


def test_missing_mask_shape_is_checked():
    with pytest.raises(MedsegInputError, match="missing-slice mask"):
        Volume(np.zeros((3, 2, 2)), missing=[True, False])


def test_from_array_2d_is_one_slice_and_rgb_is_refused():
    vol = Volume.from_array(np.zeros((8, 9)), spacing=(0.7, 0.7))
    assert vol.shape == (1, 8, 9) and vol.spacing == (1.0, 0.7, 0.7)
    with pytest.raises(MedsegInputError, match="RGB"):
        Volume.from_array(np.zeros((32, 32, 3)))


@pytest.mark.parametrize("array, kwargs, match", [
    (np.zeros((2, 2, 2)), {"spacing": "abc"}, "three numbers"),
    (np.zeros((2, 2)), {"spacing": 1.0}, "three numbers"),
    (np.zeros((2, 2)), {"origin": 5}, "three numbers"),
    (np.zeros((2, 2)), {"spacing": np.array(1.0)}, "three numbers"),
    (np.zeros((2, 2)), {"origin": np.array(0.0)}, "three numbers"),
    ([[1, 2], [3]], {}, "not an image array"),
])
def test_from_array_refuses_bad_geometry_with_one_clear_message(array, kwargs, match):
    with pytest.raises(MedsegInputError, match=match):
        Volume.from_array(array, **kwargs)


def test_metadata_none_is_no_metadata():
    assert dict(Volume(np.zeros((1, 2, 2)), metadata=None).metadata) == {}


def test_value_range_ignores_missing_and_nan():
    array = np.arange(3 * 2 * 2, dtype=float).reshape(3, 2, 2)
    array[1] = np.nan
    vol = Volume(array, missing=[False, True, False])
    assert vol.value_range() == (0.0, 11.0)
    assert vol.missing_slices() == [1]
    with pytest.raises(MedsegInputError, match="no finite voxel"):  # refused when made
        Volume(np.full((2, 2, 2), np.nan))


def test_display_window_ct_and_other():
    assert Volume(np.zeros((1, 4, 4)), modality="ct").display_window() == CT_WINDOW
    rng = np.random.default_rng(0)
    lo, hi = Volume(rng.normal(100, 10, (2, 50, 50)), modality="MR").display_window()
    assert 60 < lo < 90 and 110 < hi < 140


@pytest.mark.parametrize("value", [0.0, -5.0, 1e12, 3e30])
def test_a_constant_images_window_is_never_empty(value):
    """+ 1e-6 vanished at 1e12: napari refused the window (low == high) with a traceback."""
    lo, hi = Volume(np.full((2, 4, 4), value, np.float32), modality="MR").display_window()
    assert hi > lo and lo <= np.float32(value) <= hi


def test_non_axial_plane_names_only_a_clearly_coronal_or_sagittal_slice_axis():
    from napari_medseg.core.volume import non_axial_plane

    def plane(z_axis):
        v = Volume.from_array(np.zeros((1, 4, 4), np.float32), spacing=(1.0, 1.0, 1.0),
                              metadata={"axes_lps": [z_axis, [0, 1, 0], [1, 0, 0]]})
        return non_axial_plane(v)

    r = np.sqrt(0.5)
    assert plane([0, 0, 1]) is None and plane([0, 0, -1]) is None
    assert plane([0, r, r]) is None  # a 45° tilt: the readers keep such slices as axial
    assert plane([0, 1, 0]) == "coronal" and plane([-1, 0, 0]) == "sagittal"
    assert plane([0, np.cos(0.7), np.sin(0.7)]) == "coronal"  # 50° from axial
    assert non_axial_plane(Volume.from_array(np.zeros((1, 4, 4), np.float32),
                                             spacing=(1.0, 1.0, 1.0))) is None


def test_counts_in_messages_agree_with_their_noun():
    from napari_medseg.core.text import counted

    assert [counted(n, "slice") for n in (0, 1, 2)] == ["0 slices", "1 slice", "2 slices"]
    assert counted(1, "lesion slice") == "1 lesion slice"
    assert counted(3, "series", "series") == "3 series"
