"""The oracle observer of benchmarks/lesion_detectability.py against white-noise theory."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def oracle(benchmark_module):
    return benchmark_module("lesion_detectability")


def _sphere_d(oracle, contrast: float, seed: int) -> tuple[float, float]:
    """(d, the white-noise theory's d) for a 4 mm-radius sphere of ``contrast`` HU in an
    organ of white noise (sigma 10 HU)."""
    rng = np.random.default_rng(seed)
    spacing = (2.0, 1.0, 1.0)
    image = rng.normal(50.0, 10.0, size=(24, 56, 56)).astype(np.float32)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[1:23, 2:54, 2:54] = oracle.LABEL_OF["liver"]
    zz, yy, xx = np.mgrid[:24, :56, :56]
    sphere = ((zz - 12) * 2.0) ** 2 + (yy - 28.0) ** 2 + (xx - 28.0) ** 2 <= 4.0 ** 2
    image[sphere] += contrast
    labels[sphere] = oracle.LESION_LABEL
    footprint = oracle.ellipsoid_footprint(spacing, oracle.SHELL_MM)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(sphere))
    mask = sphere[box]
    shape_mask, shell, corner = oracle.placement(box, mask, footprint)
    d, n_null = oracle.oracle_d(image, labels == oracle.LABEL_OF["liver"], shape_mask, shell, corner,
                                (box, mask), -1.0 if contrast < 0 else 1.0, rng)
    assert n_null == oracle.NULL_PLACEMENTS
    return d, abs(contrast) / (10.0 * np.sqrt(1 / mask.sum() + 1 / shell.sum()))


@pytest.mark.parametrize("contrast", [0.0, 6.0, -6.0])
def test_oracle_d_matches_the_white_noise_snr(oracle, contrast):
    """The mean inside minus the mean of the shell has the standard deviation
    sigma * sqrt(1/n_in + 1/n_shell) in white noise, so d is the contrast over that: 0 for
    no contrast, and as high for a hypodense lesion as for a hyperdense one (the oracle
    knows the sign). Over 12 noise draws d's mean is within 1 of it (its spread is 1)."""
    pairs = [_sphere_d(oracle, contrast, seed) for seed in range(12)]
    d = np.array([p[0] for p in pairs])
    expected = pairs[0][1]
    assert abs(d.mean() - expected) < 1.0
    assert 0.5 < d.std() < 1.6
    if contrast:
        assert expected > 5


def test_slice_recall_is_certain_for_a_strong_lesion_and_alpha_for_none(oracle):
    strong = [{"host_voxels": 1000, "cross_sections": [{"voxels": 10, "d": 20.0}]}]
    none = [{"host_voxels": 1000, "cross_sections": [{"voxels": 10, "d": 0.0}]}]
    assert oracle.slice_recall(strong, 0.05) == pytest.approx(1.0)
    # no signal: found as often as a normal slice is called lesion, alpha / N per place
    assert oracle.slice_recall(none, 0.05) == pytest.approx(0.05 / 100, rel=0.05)
