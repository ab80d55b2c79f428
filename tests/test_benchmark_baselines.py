"""The benchmarks' naive baselines compute the bundled networks' own output, and count
the FLOPs they run."""

from __future__ import annotations

import numpy as np
import pytest
import torch



@pytest.fixture(scope="module")
def common(benchmark_module):
    return benchmark_module("_common")


def test_the_naive_segmenter_is_the_same_network_one_slice_at_a_time(common):
    """It ran each slice as a one-slice sequence: no state passed between slices, output
    up to 32 logits off, and fewer FLOPs than the network it was compared with."""
    from napari_medseg.core.models import load_model

    model, _card = load_model("segmenter")
    torch.manual_seed(0)
    x = torch.randn(5, 1, 36, 44)
    with torch.no_grad():
        whole = model(x)
        naive = torch.cat(common.per_slice_recurrent(model, x))
        torch.testing.assert_close(naive, whole, rtol=1e-4, atol=1e-4)
        assert common.count_flops(lambda: common.per_slice_recurrent(model, x)) == \
            common.count_flops(lambda: model(x))
        one_slice_sequences = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
        assert (one_slice_sequences - whole).abs().max() > 0.1


@pytest.mark.parametrize("name", ["classifier", "detector", "segmenter"])
def test_the_bf16_models_count_the_flops_of_the_plain_network(common, name):
    """The engine's bf16 copy runs conv + activation as one fused op that FlopCounterMode
    does not know: uncounted, the classifier's bf16 "achieved GFLOP/s" read 0.14."""
    from napari_medseg.core.inference import _autocast, _prepared
    from napari_medseg.core.models import load_model

    model, _card = load_model(name)
    x = torch.randn(2, model.in_slices if name == "detector" else model.in_channels, 40, 48)
    plain = common.count_flops(lambda: model.eval()(x))
    with _autocast(True):
        fused = common.count_flops(lambda: _prepared(model).model_for(True)(x))
    assert fused == pytest.approx(plain, rel=0.02)


def test_the_naive_run_times_the_slices_it_says(common):
    from types import SimpleNamespace

    run = SimpleNamespace(gemm=100.0, model=torch.nn.Conv2d(1, 1, 3))
    args = SimpleNamespace(slices=200)
    out = common.versus_references(run, 100.0, 2e9, 1.0, torch.zeros(12, 1, 8, 8), args, "note")
    assert out["naive"]["slices_timed"] == 12
    assert out["gflops_achieved"] == pytest.approx(2.0) and out["ratio"] == pytest.approx(0.02)
    assert np.isfinite(out["naive"]["seconds_per_slice"])


def test_emitted_json_is_json_even_with_nan(common, tmp_path, capsys):
    """A mean over no structure is NaN: it is written as null (bare NaN is not JSON)."""
    import json

    out = tmp_path / "r.json"
    common.emit({"mean": float("nan"), "d": [np.float32(0.123456), np.inf], "n": np.int64(3)},
                str(out))
    printed = capsys.readouterr().out.strip()
    for text in (printed, out.read_text()):
        assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))["mean"] is None
    assert json.loads(printed)["d"] == [0.1235, None]
    assert json.loads(out.read_text())["d"][0] == pytest.approx(0.123456, abs=1e-7)
