"""benchmarks/segmenter_inference_variants.py: its plain arm is the product's segmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medseg.core.inference import labels_from_logits, segment_volume
from napari_medseg.core.models.registry import load_model
from napari_medseg.core.phantom import generate_phantom
from napari_medseg.core.progress import run_to_completion


@pytest.fixture(scope="module")
def variants(benchmark_module):
    return benchmark_module("segmenter_inference_variants")


def test_plain_arm_equals_segment_volume_and_the_ensemble_of_one_model_too(variants):
    model, card = load_model("segmenter")
    volume = generate_phantom((10, 150, 130), (3.0, 0.9, 0.9), seed=5, n_lesions=2).volume
    product = run_to_completion(segment_volume(volume, model, card, threads=1)).labels
    logits = variants.model_grid_logits(volume, model, card)
    assert logits.shape[:2] == (10, len(card["classes"]))
    np.testing.assert_array_equal(labels_from_logits(logits, volume.shape[1:]).numpy(), product)
    # the ensemble path (probabilities resampled onto the native grid, then argmax) agrees
    # with the engine's labels everywhere but at a few boundary pixels
    probs = variants.native_probabilities(logits, volume.shape[1:])
    assert torch.allclose(probs.sum(1), torch.ones(1), atol=1e-5)
    assert (probs.argmax(1).numpy() == product).mean() > 0.995
