"""Inference-only rewrites for the bf16 copy of a folded model: conv + activation as one
oneDNN call, conv and linear weights cast to bfloat16 once.

Both compute the function of the plain modules under autocast (the activation is exact for
ReLU on numbers, though oneDNN's ReLU turns NaN into 0 where torch's keeps it: the engine
replaces NaN before the model; the others may differ in the last bits, as any two
implementations of tanh do) and exist for speed (``benchmarks/inference_fusion.py``; docs/inference.md):

- a separate activation reads and writes the conv's whole output once more; fused, oneDNN
  applies it while the output is still in cache. In bfloat16 on a CPU with AMX, where the
  conv itself is fast, that pass cost as much as half the conv (a 16→16 conv at 239²:
  0.87 ms, its ReLU 0.48 ms, fused 0.93 ms); in fp32 it is a tenth of the conv and the
  fused call was no faster, so the fp32 model is not rewritten;
- autocast casts every conv's weights to bfloat16 on every call.

The fused op is ``torch.ops.mkldnn._convolution_pointwise``, the one PyTorch's own compiler
emits on CPUs. It is not public API, so :func:`fuse_for_inference` first checks that it
exists and gives the plain conv's result on this build, and leaves the model as it is
otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import ConvBNAct

#: activation module → (oneDNN post-op, its scalars, its algorithm)
_POST_OPS = {
    nn.ReLU: lambda m: ("relu", [None], ""),
    nn.LeakyReLU: lambda m: ("leaky_relu", [m.negative_slope], ""),
    nn.Tanh: lambda m: ("tanh", [None], ""),
    nn.Sigmoid: lambda m: ("sigmoid", [None], ""),
    nn.SiLU: lambda m: ("swish", [None], ""),
    nn.GELU: lambda m: ("gelu", [None], m.approximate),
}


def _pointwise(x, weight, bias, padding, stride, dilation, groups, post):
    attr, scalars, algorithm = post
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, padding, stride, dilation, groups, attr, scalars, algorithm)


class FusedConv2d(nn.Module):
    """A zero-padded :class:`~torch.nn.Conv2d` followed by an activation (or none: post-op
    "none"), as one oneDNN call. Input is cast to the weights' dtype, so a copy whose
    weights are bfloat16 runs in bfloat16 (see ``inference._Prepared``)."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None):
        super().__init__()
        self.kernel_size = conv.kernel_size
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.post = ("none", [None], "") if activation is None else (
            _POST_OPS[type(activation)](activation))
        self.weight = nn.Parameter(conv.weight.detach().contiguous(
            memory_format=torch.channels_last), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(),
                                                                requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(x.to(self.weight.dtype), self.weight, self.bias, self.padding, self.stride,
                          self.dilation, self.groups, self.post)


def _fusable(conv: nn.Module, activation: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and (isinstance(activation, nn.Identity) or type(activation) in _POST_OPS))


@functools.lru_cache(maxsize=1)
def fused_conv_available() -> bool:
    """Whether this torch build has the fused op and it gives the plain result, in fp32 and
    in bfloat16 (probed once, on small random convs, whatever autocast the caller runs
    under: the engine first asks from inside its bf16 autocast). oneDNN may refuse
    bfloat16 where the CPU flags offer it (``ONEDNN_MAX_CPU_ISA`` capped, a VM that
    overstates its CPU); the plain conv then falls back to PyTorch's own, the fused op
    fails."""
    try:
        gen = torch.Generator().manual_seed(0)
        for conv in (nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, stride=2, padding=1),
                     nn.Conv2d(3, 4, 3, padding=1)):
            x = torch.randn(2, conv.in_channels, 9, 11, generator=gen)
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                expected = F.relu(conv(x))
                fused = FusedConv2d(conv, nn.ReLU())
                got = fused(x)
                fused.weight.data = fused.weight.data.to(torch.bfloat16)
                fused.bias.data = fused.bias.data.to(torch.bfloat16)
                low = fused(x).float()
            if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5):
                return False
            if low.shape != expected.shape or not torch.allclose(low, expected, atol=0.05,
                                                                 rtol=0.02):
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@torch.no_grad()
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Rewrite every BatchNorm-free :class:`ConvBNAct` of ``model`` (after
    :func:`~.classifier.fold_batchnorm`) into a :class:`FusedConv2d`, in place: its conv
    becomes the fused call and its activation an ``Identity``, so code that calls
    ``block.conv`` and ``block.act`` separately still computes the same function.

    For inference copies only (no gradients; the state_dict changes). Returns ``model``;
    unchanged where the fused op is unavailable."""
    if not fused_conv_available():
        return model
    for module in model.modules():
        if (isinstance(module, ConvBNAct) and isinstance(module.bn, nn.Identity)
                and _fusable(module.conv, module.act)):
            act = None if isinstance(module.act, nn.Identity) else module.act
            module.conv = FusedConv2d(module.conv, act)
            module.act = nn.Identity()
    return model


@torch.no_grad()
def to_bfloat16_weights(model: nn.Module) -> nn.Module:
    """Cast the weights of every conv and linear layer to bfloat16, in place (the layers
    autocast would cast on every call; norms and recurrent state stay fp32). Run it
    under ``torch.autocast("cpu", torch.bfloat16)``. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, FusedConv2d)):
            for name, param in list(module.named_parameters(recurse=False)):
                param.data = param.data.to(torch.bfloat16)
    return model
