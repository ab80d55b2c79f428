"""The oracle segmenter of benchmarks/lesion_segmentability.py on spheres of known contrast."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def oracle(benchmark_module):
    return benchmark_module("lesion_segmentability")


def _sphere(oracle, contrast: float, noise: float, seed: int = 0):
    """(difference image, labels, lesion mask, spacing): a 6 mm-radius sphere of
    ``contrast`` HU plus white noise in a liver-labelled block."""
    spacing = (2.0, 1.0, 1.0)
    zz, yy, xx = np.mgrid[:20, :48, :48]
    sphere = ((zz - 10) * 2.0) ** 2 + (yy - 24.0) ** 2 + (xx - 24.0) ** 2 <= 6.0 ** 2
    diff = np.where(sphere, contrast, 0.0).astype(np.float32)
    diff += np.random.default_rng(seed).normal(0.0, noise, size=diff.shape).astype(np.float32)
    labels = np.full(diff.shape, oracle.LABEL_OF["liver"], dtype=np.uint8)
    labels[sphere] = oracle.LESION_LABEL
    return diff, labels, sphere, spacing


def test_a_noise_free_lesion_is_segmented_exactly_at_half_its_contrast(oracle):
    for contrast in (-20.0, 15.0):  # hypo- and hyperdense
        diff, labels, mask, spacing = _sphere(oracle, contrast, noise=0.0)
        found = oracle.oracle_lesion(diff, labels, mask, oracle.LABEL_OF["liver"], contrast, spacing)
        assert found["oracle"]["dice"] == 1.0
        assert found["oracle"]["sigma_mm"] == 0.0  # smoothing only blurs a noise-free edge


def test_noise_lowers_the_oracle_and_smoothing_wins_some_of_it_back(oracle):
    dice = {}
    for noise in (5.0, 20.0, 60.0):
        diff, labels, mask, spacing = _sphere(oracle, -20.0, noise)
        found = oracle.oracle_lesion(diff, labels, mask, oracle.LABEL_OF["liver"], -20.0, spacing)
        dice[noise] = found["oracle"]["dice"]
        # picking the threshold too can only match or beat half the contrast
        assert found["oracle_any_threshold"]["dice"] >= found["oracle"]["dice"]
        if noise >= 20.0:
            assert found["oracle"]["sigma_mm"] > 0.0
    # contrast-to-noise 4, 1, 1/3: near-perfect, a blurred edge, a faint lesion's half-miss
    assert dice[5.0] > 0.97 > dice[20.0] > 0.8 > dice[60.0] > 0.5


def test_the_oracle_never_labels_outside_the_host_organ(oracle):
    diff, labels, mask, spacing = _sphere(oracle, 30.0, noise=0.0)
    labels[:, :, :24][~mask[:, :, :24]] = oracle.LABEL_OF["spleen"]  # half the shell is another organ
    diff[:, :, :24] += 30.0  # as bright as the lesion there: still not the host
    found = oracle.oracle_lesion(diff, labels, mask, oracle.LABEL_OF["liver"], 30.0, spacing)
    assert found["oracle"]["predicted"] == found["oracle"]["tp"] == mask.sum()
