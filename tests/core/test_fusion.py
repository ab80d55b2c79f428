"""Inference-only fusion (core.models.fusion): the same function as the plain layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from napari_medseg.core.models import ConvBNAct, fold_batchnorm, make_activation
from napari_medseg.core.models.fusion import (
    FusedConv2d,
    fuse_for_inference,
    fused_conv_available,
    to_bfloat16_weights,
)

needs_fused = pytest.mark.skipif(not fused_conv_available(),
                                 reason="this torch build has no fused oneDNN conv")


@needs_fused
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "tanh", "sigmoid", "silu", None])
@pytest.mark.parametrize("c_in, kernel, stride, dilation", [
    (1, 3, 1, 1),
    (1, 7, 1, 2),
    (1, 3, 2, 1),
    (1, 4, 3, 1),  # even kernel, stride 3
    (5, 5, 1, 1),
    (4, 3, 2, 2),
])
def test_a_fused_conv_computes_the_conv_and_its_activation(activation, c_in, kernel, stride,
                                                           dilation):
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(c_in, 6, kernel, stride=stride, dilation=dilation,
                     padding=dilation * (kernel - 1) // 2)
    act = make_activation(activation) if activation else None
    # channels_last as the engine runs it (a no-op for one channel)
    x = (torch.randn(3, c_in, 17, 14, generator=gen) * 2).contiguous(
        memory_format=torch.channels_last)
    fused = FusedConv2d(conv, act)
    with torch.inference_mode():
        want = conv(x) if act is None else act(conv(x))
        got = fused(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_fused
def test_fusion_rewrites_each_folded_block_and_keeps_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(ConvBNAct(1, 8), ConvBNAct(8, 8, activation=None),
                          ConvBNAct(8, 4, batch_norm=False, activation="gelu"),
                          nn.Conv2d(4, 2, 1)).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 1, 15, 12).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = model(x)
        fast = fuse_for_inference(fold_batchnorm(copy.deepcopy(model)))
        got = fast(x)
    assert [type(b.conv) for b in fast[:3]] == [FusedConv2d] * 3
    assert all(isinstance(b.act, nn.Identity) for b in fast[:3])
    assert type(fast[3]) is nn.Conv2d  # a bare conv is not a ConvBNAct: left alone
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_without_the_fused_op_the_model_is_left_as_it_was(monkeypatch):
    from napari_medseg.core.models import fusion

    monkeypatch.setattr(fusion, "fused_conv_available", lambda: False)
    model = fold_batchnorm(nn.Sequential(ConvBNAct(1, 4)))
    fuse_for_inference(model)
    assert type(model[0].conv) is nn.Conv2d and isinstance(model[0].act, nn.ReLU)


def test_the_probe_says_no_when_the_op_is_missing(monkeypatch):
    from napari_medseg.core.models import fusion

    def missing(*args, **kwargs):
        raise RuntimeError("No such operator mkldnn::_convolution_pointwise")

    monkeypatch.setattr(fusion, "_pointwise", missing)
    fusion.fused_conv_available.cache_clear()
    try:
        assert fusion.fused_conv_available() is False
    finally:
        fusion.fused_conv_available.cache_clear()


@needs_fused
def test_the_probe_is_not_fooled_by_the_callers_autocast():
    """The engine first fuses from inside its bf16 autocast: the probe's plain conv then
    ran in bfloat16, disagreed with the fp32 fused one, and fusion was off for the session."""
    from napari_medseg.core.models import fusion

    fusion.fused_conv_available.cache_clear()
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert fusion.fused_conv_available() is True
    finally:
        fusion.fused_conv_available.cache_clear()


@needs_fused
def test_bfloat16_weights_run_what_autocast_runs():
    """Weights cast once give autocast's result (it casts the same weights every call);
    only conv and linear weights change dtype."""
    torch.manual_seed(1)
    model = nn.Sequential(ConvBNAct(1, 8, batch_norm=False), ConvBNAct(8, 8, batch_norm=False),
                          nn.Conv2d(8, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Flatten(),
                          nn.Linear(4 * 10 * 9, 3)).eval()
    fast = fuse_for_inference(copy.deepcopy(model))
    low = to_bfloat16_weights(copy.deepcopy(fast))
    assert {p.dtype for n, p in low.named_parameters() if n.startswith("3.")} == {torch.float32}
    assert low[0].conv.weight.dtype == low[2].weight.dtype == low[5].weight.dtype == torch.bfloat16
    x = torch.randn(2, 1, 10, 9).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x).float()
        got = low(x).float()
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    assert not torch.equal(got, model(x).float())  # it did run in bfloat16


@needs_fused
@pytest.mark.parametrize("name", ["classifier", "detector", "segmenter"])
def test_the_engine_runs_the_bundled_models_fused_in_bf16(name):
    """The engine's bf16 copy of each bundled model is fused, its weights bfloat16, and
    it gives what autocast gives on the fp32 copy; the fp32 copy is not rewritten."""
    from napari_medseg.core.inference import _autocast, _main_output, _prepared
    from napari_medseg.core.models import load_model

    model, _card = load_model(name)
    entry = _prepared(model)
    low = entry.model_for(True)
    assert low is entry.model_for(True) and entry.model_for(False) is entry.model
    assert any(isinstance(m, FusedConv2d) for m in low.modules())
    assert not any(isinstance(m, FusedConv2d) for m in entry.model.modules())
    assert all(m.weight.dtype == torch.bfloat16 for m in low.modules()
               if isinstance(m, (FusedConv2d, nn.Conv2d, nn.Linear)))
    channels = model.in_slices if name == "detector" else model.in_channels
    x = torch.randn(3, channels, 40, 36, generator=torch.Generator().manual_seed(2)) * 2
    with torch.inference_mode(), _autocast(True):
        want = _main_output(entry.model(x)).float()
        got = _main_output(low(x)).float()
    assert got.shape == want.shape
    # bf16 rounding only: what the engine's "auto" check would accept
    if got.shape[1] == 1:  # heatmap logits
        assert float((torch.sigmoid(got) - torch.sigmoid(want)).abs().max()) < 0.02
    else:
        assert float((got.argmax(1) == want.argmax(1)).float().mean()) > 0.99
