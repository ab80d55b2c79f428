"""The synthetic CT phantom: geometry, ground truth, HU, determinism, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from napari_medseg.core.errors import MedsegInputError
from napari_medseg.core.phantom import (
    LABEL_NAMES,
    LESION_HOSTS,
    SLICE_CLASSES,
    Lesion,
    Phantom,
    generate_phantom,
)

# The default field of view (64 x 256 x 256 at 2.5 x 0.8 x 0.8 mm = 160 x 205 x 205 mm),
# sampled coarsely so the tests stay fast.
FOV_SHAPE, FOV_SPACING = (32, 96, 96), (5.0, 2.1333, 2.1333)
CLEAN = dict(noise_hu=0.0, blur_sigma_mm=0.0, nonuniformity_hu=0.0)

LIVER, SPLEEN, KID_L, KID_R, SPINE, AORTA, LESION = 2, 3, 4, 5, 6, 7, 8


def _clean(seed, **kw):
    return generate_phantom(FOV_SHAPE, FOV_SPACING, seed, **{**CLEAN, **kw})


def _centroid_mm(mask, spacing):
    idx = np.argwhere(mask)
    return idx.mean(axis=0) * np.asarray(spacing)


# ------------------------------------------------------------------ API and geometry


def test_public_names():
    assert LABEL_NAMES == {
        0: "background", 1: "body", 2: "liver", 3: "spleen", 4: "kidney_left",
        5: "kidney_right", 6: "spine", 7: "aorta", 8: "lesion",
    }
    assert SLICE_CLASSES == ("no_body", "normal", "lesion")


@pytest.mark.parametrize(
    "shape, spacing",
    [
        ((1, 32, 32), (2.5, 0.8, 0.8)),
        ((7, 48, 40), (2.5, 0.8, 0.8)),
        ((7, 48, 40), (5.0, 4.0, 4.0)),
        ((2, 33, 47), (5.0, 0.7, 0.7)),
        ((12, 40, 56), (1.0, 1.0, 1.0)),
        ((20, 64, 64), (8.0, 3.2, 3.2)),
        ((5, 24, 80), (3.0, 8.0, 2.5)),
    ],
)
def test_any_shape_and_spacing(shape, spacing):
    p = generate_phantom(shape, spacing, seed=3)
    assert isinstance(p, Phantom)
    vol = p.volume
    assert vol.shape == shape and vol.array.dtype == np.float32
    assert vol.spacing == tuple(float(s) for s in spacing)
    assert vol.modality == "CT"
    assert vol.metadata["source_format"] == "phantom" and vol.metadata["phantom_seed"] == 3
    assert np.isfinite(vol.array).all()
    assert vol.array.min() >= -1024 and vol.array.max() <= 3071
    assert p.labels.shape == shape and p.labels.dtype == np.uint8
    assert set(np.unique(p.labels)) <= set(LABEL_NAMES)
    assert p.slice_classes.shape == (shape[0],) and p.slice_classes.dtype == np.int64
    assert len(p.slice_class_names()) == shape[0]
    for les in p.lesions:  # whatever the grid, each lesion is visible at its centre
        z, y, x = (int(round(c)) for c in les.center_zyx)
        assert p.labels[z, y, x] == LESION


def test_deterministic_same_seed_bit_identical():
    a = generate_phantom((8, 48, 48), (5.0, 4.0, 4.0), seed=11)
    b = generate_phantom((8, 48, 48), (5.0, 4.0, 4.0), seed=11)
    assert a.volume.array.tobytes() == b.volume.array.tobytes()
    assert np.array_equal(a.labels, b.labels)
    assert a.lesions == b.lesions
    assert np.array_equal(a.slice_classes, b.slice_classes)
    assert (a.phase, a.noise_hu, a.blur_sigma_mm) == (b.phase, b.noise_hu, b.blur_sigma_mm)


def test_global_random_state_is_left_alone():
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    generate_phantom((4, 32, 32), (5.0, 6.0, 6.0), seed=1)
    assert np.random.random() == before


def test_different_seeds_differ_visibly():
    a = _clean(1, n_lesions=0)
    b = _clean(2, n_lesions=0)
    # more than a tenth of the body voxels change label
    body = (a.labels > 0) | (b.labels > 0)
    assert np.mean(a.labels[body] != b.labels[body]) > 0.1
    assert np.abs(a.volume.array - b.volume.array).mean() > 20


def test_noise_blur_do_not_change_ground_truth():
    clean = _clean(5)
    noisy = generate_phantom(FOV_SHAPE, FOV_SPACING, 5, noise_hu=20.0, blur_sigma_mm=1.0)
    assert np.array_equal(clean.labels, noisy.labels)
    assert clean.lesions == noisy.lesions
    # the noise has the requested standard deviation (measured away from clipping)
    diff = (noisy.volume.array - clean.volume.array)[clean.labels == LIVER]
    assert 0.8 * 20 < diff.std() < 1.3 * 20


# ------------------------------------------------------------------ HU per structure


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_hu_ranges_per_structure(seed):
    p = _clean(seed)
    a, lab = p.volume.array, p.labels

    def med(label):
        return float(np.median(a[lab == label]))

    assert 50 <= med(LIVER) <= 70
    assert 40 <= med(SPLEEN) <= 60
    for label in (LIVER, SPLEEN):  # homogeneous parenchyma
        lo, hi = np.percentile(a[lab == label], [2, 98])
        assert hi - lo < 25
    kid = np.concatenate([a[lab == KID_L], a[lab == KID_R]])
    cortex = np.percentile(kid, 90)
    aorta = med(AORTA)
    if p.phase == "unenhanced":
        assert 25 <= cortex <= 50
        assert 35 <= aorta <= 50
    else:
        assert 140 <= cortex <= 225
        assert 150 <= aorta <= 300
    spine = a[lab == SPINE]
    assert np.percentile(spine, 5) >= 140 and spine.max() <= 1300
    assert np.percentile(spine, 99) >= 300  # dense cortical bone is there
    body = a[lab == 1]
    assert np.sum((body > -125) & (body < -75)) > 0.1 * body.size  # fat
    assert np.sum((body > 15) & (body < 60)) > 0.1 * body.size  # muscle, bowel wall
    air = a[lab == 0]
    assert np.median(air) == -1000
    # the hu_means table matches what was drawn
    assert abs(p.hu_means["liver"] - med(LIVER)) < 3
    assert 50 <= p.hu_means["liver"] <= 70 and 40 <= p.hu_means["spleen"] <= 60


def test_contrast_scale_flattens_organs_and_lesions():
    full = _clean(7, n_lesions=3)
    flat = _clean(7, n_lesions=3, contrast_scale=0.0)
    assert np.array_equal(full.labels, flat.labels)
    for name in ("liver", "spleen", "kidney_cortex", "aorta"):
        assert flat.hu_means[name] == pytest.approx(40.0)
    assert all(les.contrast_hu == 0 for les in flat.lesions)
    # the kind of each lesion as drawn (a hypodense one's -0.0 was called "hyperdense")
    assert [les.kind for les in flat.lesions] == [les.kind for les in full.lesions]
    half = _clean(7, n_lesions=3, contrast_scale=0.5)
    for lf, lh in zip(full.lesions, half.lesions):
        assert lh.contrast_hu == pytest.approx(0.5 * lf.contrast_hu)


# ------------------------------------------------------------------ lesions


@pytest.mark.parametrize("n", [0, 1, 4])
def test_exact_lesion_count(n):
    p = generate_phantom(FOV_SHAPE, FOV_SPACING, seed=2, n_lesions=n)
    assert len(p.lesions) == n == len(p.lesion_table())
    if n == 0:
        assert not (p.labels == LESION).any()
        assert not (p.slice_classes == 2).any()


def test_default_lesion_count_and_properties():
    counts, radii, contrasts, organs = [], [], [], []
    for seed in range(12):
        p = generate_phantom((16, 64, 64), (10.0, 3.2, 3.2), seed, **CLEAN)
        counts.append(len(p.lesions))
        for les in p.lesions:
            assert isinstance(les, Lesion) and les.label == LESION
            assert les.organ in LESION_HOSTS
            radii.append(les.radius_mm)
            contrasts.append(les.contrast_hu)
            organs.append(les.organ)
            assert les.radius_mm == pytest.approx(np.prod(les.radii_mm_zyx) ** (1 / 3))
            assert max(les.radii_mm_zyx) / min(les.radii_mm_zyx) < 1.6  # roundish
    assert all(1 <= c <= 6 for c in counts) and len(set(counts)) > 2
    radii, contrasts = np.array(radii), np.array(contrasts)
    assert radii.min() >= 2.0 - 1e-9 and radii.max() <= 15.0 + 1e-9
    assert (radii < 4).any() and (radii > 8).any()
    assert (contrasts < 0).any() and (contrasts > 0).any()
    assert np.all((np.abs(contrasts) >= 10 - 1e-9) & (np.abs(contrasts) <= 60 + 1e-9))
    assert organs.count("liver") > len(organs) / 2


def test_lesion_centres_labels_radius_and_contrast():
    # fine-ish isotropic grid so blob volumes measure the radius well
    p = generate_phantom((40, 96, 96), (4.0, 2.1333, 2.1333), seed=21, n_lesions=4,
                         lesion_radius_mm=(6.0, 12.0), **CLEAN)
    lab, a = p.labels, p.volume.array
    comps, _ = ndimage.label(lab == LESION)
    voxel_mm3 = float(np.prod(p.volume.spacing))
    host_label = {"liver": LIVER, "spleen": SPLEEN, "kidney_left": KID_L, "kidney_right": KID_R}
    for les, row in zip(p.lesions, p.lesion_table()):
        assert set(row) >= {"z", "y", "x", "radius_mm"}
        z, y, x = (int(round(c)) for c in les.center_zyx)
        assert (row["z"], row["y"], row["x"]) == les.center_zyx
        assert lab[z, y, x] == LESION
        blob = comps == comps[z, y, x]
        r_blob = (3 * blob.sum() * voxel_mm3 / (4 * math.pi)) ** (1 / 3)
        assert r_blob == pytest.approx(les.radius_mm, rel=0.2)
        # the blob sits in its host organ: its shell is mostly host
        shell = ndimage.binary_dilation(blob, iterations=1) & ~blob
        assert np.mean(lab[shell] == host_label[les.organ]) > 0.5
        measured = a[blob].mean() - p.hu_means[
            "kidney_cortex" if les.organ.startswith("kidney") else les.organ]
        assert measured == pytest.approx(les.contrast_hu, abs=6.0)


def test_lesions_that_cannot_fit_raise():
    with pytest.raises(MedsegInputError, match="lesions"):
        generate_phantom((8, 32, 32), (5.0, 6.0, 6.0), seed=0, n_lesions=40,
                         lesion_radius_mm=(14.0, 15.0))


def test_a_slab_too_thin_for_a_lesion_says_so():
    """The advice was "a larger field of view": more rows or columns never help a slab
    thinner than the smallest lesion."""
    with pytest.raises(MedsegInputError, match=r"spans 2\.5 mm along z \(1 of the 1 slices × 2\.5 mm"):
        generate_phantom((1, 128, 128), (2.5, 2.0, 2.0), seed=0, n_lesions=1,
                         lesion_radius_mm=(2.0, 3.0))
    # the body holds only some slices: said, as 48 × 2.5 mm read as 120 mm against 107.5
    with pytest.raises(MedsegInputError, match=r"spans 107\.5 mm along z \(43 of the 48 slices"):
        generate_phantom((48, 128, 128), (2.5, 1.0, 1.0), seed=0, n_lesions=1,
                         lesion_radius_mm=(50.0, 50.0))
    thick = generate_phantom((1, 128, 128), (20.0, 2.0, 2.0), seed=0, n_lesions=1,
                             lesion_radius_mm=(2.0, 3.0))
    assert len(thick.lesions) == 1
    # 5 mm holds a 4 mm lesion only exactly centred and round: it said "a larger field
    # of view", which never helps
    with pytest.raises(MedsegInputError, match="spans 5 mm along z .* more or thicker slices"):
        generate_phantom((2, 192, 192), (2.5, 1.0, 1.0), seed=0, n_lesions=1,
                         lesion_radius_mm=(2.0, 15.0))


def test_a_slab_that_held_some_lesions_is_not_called_too_thin():
    """One 20 mm slice with 30 lesions asked: 24 placed, then "the volume is 20 mm thick,
    less than the smallest lesion needs (about 24.9 mm); give thicker slices" (a thicker
    slice raises that need by as much). The organs were full, not the slab too thin."""
    with pytest.raises(MedsegInputError, match=r"\(placed \d+\); use a larger field of view"):
        generate_phantom((1, 128, 128), (20.0, 1.5, 1.5), seed=0, n_lesions=30)


def test_a_body_too_thin_for_a_lesion_names_body_z_fraction():
    """The body on one slice of ten (body_z_fraction=0.1): the advice was a larger
    in-plane field of view; without the option, the same volume holds two lesions."""
    with pytest.raises(MedsegInputError, match=r"body spans 2\.5 mm along z.*larger body_z_fraction"):
        generate_phantom((10, 128, 128), (2.5, 1.5, 1.5), seed=0, n_lesions=2,
                         body_z_fraction=0.1)
    assert len(generate_phantom((10, 128, 128), (2.5, 1.5, 1.5), seed=0, n_lesions=2).lesions) == 2
    with pytest.raises(MedsegInputError, match="thick") as refused:  # at its maximum already
        generate_phantom((1, 128, 128), (2.0, 1.5, 1.5), seed=0, n_lesions=1, body_z_fraction=1.0)
    assert "body_z_fraction" not in str(refused.value)


def test_extra_structures_may_be_any_iterable():
    """A generator was used up by the check, and no mask came back, silently."""
    made = generate_phantom((4, 64, 64), (5.0, 3.0, 3.0), seed=1, n_lesions=0,
                            extra_structures=(n for n in ["stomach"]))
    assert set(made.structure_masks) == {"stomach"}


def test_thick_slices_of_a_large_matrix_are_refused_before_allocating():
    """Each noise field keeps a table of its z lattice planes by every (y, x) voxel: 256
    slices of 1024² at 100 mm passed the check, then needed about 20 GiB for it (a
    1 GiB image); the widget's 1024 slices of 512² at 20 mm, about 7 GiB."""
    with pytest.raises(MedsegInputError, match=r"tissue texture would take about \d+ GiB"):
        generate_phantom((256, 1024, 1024), (100.0, 0.5, 0.5), seed=0, n_lesions=0)
    with pytest.raises(MedsegInputError, match="too large"):
        generate_phantom((1024, 512, 512), (20.0, 0.8, 0.8), seed=0, n_lesions=0)


def test_a_field_of_view_of_metres_is_refused_before_allocating():
    """8 x 256 x 256 voxels of 100 mm: "internal error: MemoryError … 27.9 GiB"."""
    with pytest.raises(MedsegInputError, match=r"field of view, \(800, 25600, 25600\) mm"):
        generate_phantom((8, 256, 256), (100.0, 100.0, 100.0), seed=0, n_lesions=0)


def test_tiny_field_of_view_is_best_effort():
    # a 25 mm crop through the middle of the abdomen: lesions only where an organ is
    for seed in range(4):
        p = generate_phantom((1, 32, 32), (2.5, 0.8, 0.8), seed)
        assert len(p.lesions) <= 6
        assert p.slice_classes[0] in (0, 1, 2)


# ------------------------------------------------------------------ slice classes


@pytest.mark.parametrize("seed", [0, 3, 8])
def test_slice_classes_match_labels(seed):
    p = generate_phantom((24, 64, 64), (6.6667, 3.2, 3.2), seed)
    for z in range(p.labels.shape[0]):
        plane = p.labels[z]
        expected = 2 if (plane == LESION).any() else 1 if plane.any() else 0
        assert p.slice_classes[z] == expected
    assert p.slice_class_names() == [SLICE_CLASSES[c] for c in p.slice_classes]
    body = np.flatnonzero(p.slice_classes > 0)
    assert body.size and np.all(np.diff(body) == 1)  # body slices are contiguous


def test_body_z_fraction():
    assert not (generate_phantom((20, 32, 32), (8.0, 6.4, 6.4), 1, body_z_fraction=1.0)
                .slice_classes == 0).any()
    half = generate_phantom((20, 32, 32), (8.0, 6.4, 6.4), 1, body_z_fraction=0.5)
    assert (half.slice_classes > 0).sum() == 10
    n_empty = [
        int((generate_phantom((20, 32, 32), (8.0, 6.4, 6.4), s).slice_classes == 0).sum())
        for s in range(12)
    ]
    assert sum(n > 0 for n in n_empty) >= 6  # most volumes have empty end slices
    assert max(n_empty) <= 7


# ------------------------------------------------------------------ anatomy


def test_physical_consistency_across_spacings():
    kw = dict(n_lesions=0, **CLEAN)
    coarse = generate_phantom((32, 96, 96), (5.0, 2.0, 2.0), seed=9, **kw)
    fine = generate_phantom((64, 192, 192), (2.5, 1.0, 1.0), seed=9, **kw)
    for label in (LIVER, SPLEEN, KID_L, KID_R, SPINE, AORTA):
        v_coarse = (coarse.labels == label).sum() * 5.0 * 2.0 * 2.0
        v_fine = (fine.labels == label).sum() * 2.5 * 1.0 * 1.0
        assert v_coarse == pytest.approx(v_fine, rel=0.1), LABEL_NAMES[label]
    # and the same place: liver centroids within 3 mm
    c1 = _centroid_mm(coarse.labels == LIVER, (5.0, 2.0, 2.0)) + np.array([2.5, 1.0, 1.0])
    c2 = _centroid_mm(fine.labels == LIVER, (2.5, 1.0, 1.0)) + np.array([1.25, 0.5, 0.5])
    assert np.linalg.norm(c1 - c2) < 3.0


@pytest.mark.parametrize("seed", [0, 5, 13])
def test_organs_anatomically_placed(seed):
    p = _clean(seed, n_lesions=0)
    lab, sp = p.labels, p.volume.spacing
    c = {k: _centroid_mm(lab == k, sp) for k in (LIVER, SPLEEN, KID_L, KID_R, SPINE, AORTA)}
    body_c = _centroid_mm(lab > 0, sp)
    z, y, x = 0, 1, 2
    assert c[LIVER][x] < body_c[x] - 15  # patient right = image left
    assert c[SPLEEN][x] > body_c[x] + 20 and c[SPLEEN][y] > body_c[y]  # left posterior
    assert abs(c[SPINE][x] - body_c[x]) < 8 and c[SPINE][y] > body_c[y] + 10  # posterior
    assert c[AORTA][y] < c[SPINE][y] - 10 and c[AORTA][x] > c[SPINE][x]  # left-anterior
    assert c[KID_L][x] > c[SPINE][x] + 15 and c[KID_R][x] < c[SPINE][x] - 15
    assert c[LIVER][z] < c[KID_R][z] and c[SPLEEN][z] < c[KID_L][z]  # cranial to kidneys
    # organs do not overlap: one label per voxel, and every organ touches only body/organs
    liver = lab == LIVER
    assert liver.sum() > 2 * (lab == SPLEEN).sum()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_all_structures_in_many_slices_of_default_fov(seed):
    p = generate_phantom((32, 128, 128), (5.0, 1.6, 1.6), seed, n_lesions=0, **CLEAN)
    n_body = int((p.slice_classes > 0).sum())
    per_slice = p.labels.reshape(p.labels.shape[0], -1)
    for label in (LIVER, SPLEEN, KID_L, KID_R, SPINE, AORTA):
        n = int((per_slice == label).any(axis=1).sum())
        assert n >= 0.25 * n_body, LABEL_NAMES[label]


def test_variety_across_seeds():
    vols, centres, phases = [], [], set()
    for seed in range(10):
        p = generate_phantom((16, 64, 64), (10.0, 3.2, 3.2), seed, n_lesions=0, **CLEAN)
        liver = p.labels == LIVER
        vols.append(liver.sum() * np.prod(p.volume.spacing))
        centres.append(_centroid_mm(liver, p.volume.spacing))
        phases.add(p.phase)
    vols, centres = np.array(vols), np.array(centres)
    assert vols.std() / vols.mean() > 0.08
    assert np.all(centres.std(axis=0)[1:] > 2.0)  # in-plane position varies (mm)
    assert len(phases) >= 2


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shape=(0, 32, 32)),
        dict(shape=(32, 32)),
        dict(shape=(4, 32, 32, 1)),
        dict(shape=(1.5, 32, 32)),
        dict(shape=(True, 32, 32)),
        dict(shape=(2000, 32, 32)),
        dict(shape="abc"),
        dict(spacing=(0.0, 1.0, 1.0)),
        dict(spacing=(-1.0, 1.0, 1.0)),
        dict(spacing=(float("nan"), 1.0, 1.0)),
        dict(spacing=(1.0, 1.0)),
        dict(spacing=(1.0, 1.0, 1e6)),
        dict(spacing=(1e-9, 1.0, 1.0)),  # passed, then took 24 GB for the blur kernels
        dict(seed=-1),
        dict(seed=1.5),
        dict(n_lesions=-1),
        dict(n_lesions=2.5),
        dict(lesion_radius_mm=(5.0, 2.0)),
        dict(lesion_radius_mm=(0.0, 2.0)),
        dict(lesion_radius_mm=(-1.0, 2.0)),
        dict(lesion_radius_mm=(2.0,)),
        dict(lesion_radius_mm=(2.0, float("inf"))),
        dict(noise_hu=-1.0),
        dict(blur_sigma_mm=-0.5),
        dict(blur_sigma_mm=(1.0, 1.0)),
        dict(contrast_scale=-0.1),
        dict(blur_sigma_mm=20.0, spacing=(0.01, 0.01, 0.01)),  # 2000 voxels: minutes to hours
        dict(body_z_fraction=0.0),
        dict(body_z_fraction=1.5),
        dict(spacing="123"),  # was read as (1, 2, 3)
        dict(lesion_radius_mm="25"),  # was read as (2, 5)
        dict(extra_structures=None),  # these three were TypeErrors
        dict(extra_structures=5),
        dict(extra_structures=[["x"]]),
        dict(noise_hu=True),  # these two were read as 1.0 and 1.5
        dict(contrast_scale="1.5"),
    ],
)
def test_bad_arguments_raise(kwargs):
    args = dict(shape=(4, 32, 32), spacing=(5.0, 6.0, 6.0))
    args.update(kwargs)
    with pytest.raises(MedsegInputError):
        generate_phantom(**args)


def _try_place_one_batch_at_a_time(rng, anat, host, boxes, semi, rot, placed, fov_lo, fov_hi,
                                   lo_c, sp, n_c):
    """The lesion placement as it was before its candidate batches were classified at
    once: the phantoms a seed gave then (the bundled models were trained on them)."""
    from napari_medseg.core.phantom import _HOST_TISSUES, _SPHERE, _Points

    extent = float(np.max(semi))
    lo = np.max(np.stack([boxes[:, 0, :].min(axis=1), fov_lo + extent]), axis=0)
    hi = np.min(np.stack([boxes[:, 1, :].max(axis=1), fov_hi - extent]), axis=0)
    bad = hi < lo
    if bad.any():
        lo = np.where(bad, np.maximum(boxes[:, 0, :].min(axis=1), fov_lo), lo)
        hi = np.where(bad, np.minimum(boxes[:, 1, :].max(axis=1), fov_hi), hi)
        if np.any(hi < lo):
            return None
    host_t = np.array(_HOST_TISSUES[host])
    offsets = (_SPHERE * semi) @ rot
    for _batch in range(8):
        cand = rng.uniform(lo, hi, size=(128, 3))
        idx = np.clip(np.round((cand - lo_c) / sp), 0, n_c - 1)
        cand = lo_c + idx * sp
        if placed:
            ok = np.ones(len(cand), dtype=bool)
            for p in placed:
                d = np.linalg.norm(cand - p["center_mm"], axis=1)
                ok &= d > extent + float(np.max(p["semi"])) + 1.5
            cand = cand[ok]
        tis = anat.classify(_Points(cand[:, 0], cand[:, 1], cand[:, 2]))
        cand = cand[np.isin(tis, host_t)][:24]
        if not len(cand):
            continue
        pts = cand[:, None, :] + offsets[None, :, :]
        tis = anat.classify(_Points(pts[..., 0], pts[..., 1], pts[..., 2])).reshape(pts.shape[:2])
        good = np.isin(tis, host_t).all(axis=1)
        if good.any():
            return cand[int(np.argmax(good))], host
    return None


@pytest.mark.parametrize("shape,spacing,seed,n_lesions", [
    ((8, 64, 64), (2.5, 2.0, 2.0), 0, 12),  # crowded: many batches fail, organs fill up
    ((16, 96, 96), (2.5, 2.0, 2.0), 7, None),
    ((6, 80, 80), (5.0, 1.5, 1.5), 3, 3),
])
def test_batched_lesion_placement_gives_each_seed_its_phantom(monkeypatch, shape, spacing, seed,
                                                              n_lesions):
    """The candidates' centres are classified in one pass (a crowded organ took seconds
    per lesion); a seed must still give the same phantom, lesion for lesion."""
    import napari_medseg.core.phantom as phantom_module

    now = generate_phantom(shape, spacing, seed, n_lesions=n_lesions)
    monkeypatch.setattr(phantom_module, "_try_place", _try_place_one_batch_at_a_time)
    before = generate_phantom(shape, spacing, seed, n_lesions=n_lesions)
    assert len(now.lesions) == len(before.lesions) > 0
    np.testing.assert_array_equal(now.labels, before.labels)
    np.testing.assert_array_equal(now.volume.array, before.volume.array)


def test_a_long_field_of_view_keeps_the_body_from_end_to_end():
    """The body's size trend along z was unbounded: over 2.56 m the body filled the image
    at one end and shrank to a sliver (and then to nothing) at the other."""
    ph = generate_phantom((256, 32, 32), (10.0, 8.0, 8.0), 1, n_lesions=0,
                          body_z_fraction=1.0, noise_hu=0)
    widths = (ph.labels.max(axis=1) > 0).sum(axis=1)
    assert (ph.slice_classes != 0).all()
    assert widths.max() <= 1.5 * widths.min(), (widths.min(), widths.max())


def test_a_phantom_too_large_for_the_memory_left_is_refused_before_it_starts(monkeypatch):
    """The largest phantom (1024 × 512 × 512) took 4.4 GB with no word first; beyond the
    size limit the message gave a bare voxel count."""
    from napari_medseg.core import memory
    from napari_medseg.core.errors import MedsegInputError
    from napari_medseg.core.phantom import phantom_job

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10_000_000)
    job = phantom_job((64, 128, 128), (2.5, 1.0, 1.0), 0)
    with pytest.raises(MedsegInputError, match=r"a 64 × 128 × 128 phantom needs about .* GB"):
        next(job)
    with pytest.raises(MedsegInputError, match=r"1074 million voxels, at most 268 million"):
        next(phantom_job((1024, 1024, 1024), (1.0, 1.0, 1.0), 0))


def test_the_largest_phantom_is_not_refused_with_the_memory_it_takes(monkeypatch):
    """It took 4.4 GB; an estimate from a small phantom's bytes per voxel refused it with
    5 GB free."""
    from napari_medseg.core import memory
    from napari_medseg.core.phantom import phantom_job

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 5 * 1024 ** 3)
    job = phantom_job((1024, 512, 512), (1.0, 1.0, 1.0), 0)
    assert next(job) is not None  # its first progress report: checks passed
    job.close()
