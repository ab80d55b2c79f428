"""Slice classifier (no_body / normal / lesion, or any class list) and shared conv blocks.

Seed architecture from the project's design notes: Conv32-Pool-Conv64-Pool-Conv128-Pool-FC-FC,
made size-agnostic with adaptive average pooling before the fully connected layers.

The small building blocks the other models reuse (:class:`ConvBNAct`,
:func:`make_activation`, :func:`fold_batchnorm`) live here too, so every model is built
from the same foldable conv → BatchNorm → activation unit.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MedsegInputError

#: Activation names accepted everywhere a model takes ``activation=``.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
}

KERNEL_SIZES = (3, 5, 7)
#: adaptive pooling before the fully connected layers. "max" keeps a small lesion's
#: evidence at full strength on any slice size; "avg" dilutes it by the area of each bin.
POOLS = ("avg", "max")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module from its name (see :data:`ACTIVATIONS`)."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in ACTIVATIONS:
        raise MedsegInputError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[key]()


class ConvBNAct(nn.Sequential):
    """conv (padding "same") → BatchNorm (optional) → activation (optional).

    The conv has no bias when a BatchNorm follows (the BN shift replaces it), so
    :func:`fold_batchnorm` can merge the two into one conv for inference.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        batch_norm: bool = True,
        activation: str | None = "relu",
    ):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=not batch_norm,
        )
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = make_activation(activation) if activation else nn.Identity()


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Merge every eval-mode BatchNorm of a :class:`ConvBNAct` into its conv, in place.

    For inference only: the folded model computes the same function with one op less per
    block, but its state_dict no longer matches the architecture's (do not save it).
    Returns ``model`` (in eval mode) for chaining.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return model


def check_choice(value: Any, options: Sequence[Any], what: str) -> None:
    if value not in options:
        raise MedsegInputError(
            f"{what} must be one of {', '.join(map(str, options))}, got {value!r}"
        )


def check_positive_ints(values: Sequence[Any], what: str, length: int | None = None) -> tuple:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise MedsegInputError(
            f"{what} must be a list of positive integers, got {values!r}"
        ) from exc
    if not out or any(v <= 0 for v in out) or any(int(v) != v for v in values):
        raise MedsegInputError(f"{what} must be a list of positive integers, got {values!r}")
    if length is not None and len(out) != length:
        raise MedsegInputError(f"{what} must have {length} entries, got {len(out)}")
    return out


def check_input(x: torch.Tensor, channels: int, model: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise MedsegInputError(
            f"{model} expects a (N, {channels}, H, W) tensor, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise MedsegInputError(f"{model} got an empty input of shape {tuple(x.shape)}")


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` (floor mode) as the maximum of four strided views: the same
    values (NaN included), about twice as fast on channels_last CPU tensors, whose
    ``max_pool2d`` also computes indices; keeps the memory format."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
    return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]), out=top)


class SliceClassifier(nn.Module):
    """Per-slice classifier: (N, C, H, W) → logits (N, n_classes), any H, W ≥ 1.

    One block per entry of ``filters`` (default three: 32, 64, 128 channels), each
    conv(k, same) → BN → activation → MaxPool2d(2) (``convs_per_block`` > 1: that many
    conv → BN → activation before each pooling), adaptive pooling to
    ``pool_size`` × ``pool_size`` (default 4; ``pool``: "avg" or "max"), then
    FC(pool_size²·filters[-1] → hidden) → activation → dropout → FC(hidden → n_classes).
    Inputs smaller than ``min_size`` = 2 ** len(filters) pixels on a side (8 by default)
    are edge-padded, centred, to it so the poolings never reach zero size.

    Grad-CAM: :attr:`last_conv` is the last conv block (conv → BN → activation, before
    its pooling); hook its output, or call :meth:`features` for the activation map.

    ``lesion_head``: a 1×1 conv on :meth:`features` that maps where the lesion is
    (:meth:`lesion_logits`). Training supervises it with the lesion mask, so the features
    the fully connected layers read must locate the lesion instead of recognising the
    anatomy level where lesions sit; the forward pass does not use it.
    """

    MIN_SIZE = 8  # 2 ** number of poolings of the default three blocks (see min_size)

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 3,
        kernel_size: int = 3,
        activation: str = "relu",
        filters: Sequence[int] = (32, 64, 128),
        batch_norm: bool = True,
        hidden: int = 128,
        dropout: float = 0.5,
        pool_size: int = 4,
        pool: str = "avg",
        lesion_head: bool = False,
        convs_per_block: int = 1,
    ):
        super().__init__()
        check_choice(kernel_size, KERNEL_SIZES, "kernel_size")
        check_choice(pool, POOLS, "pool")
        make_activation(activation)  # validate early, with the list of options
        filters = check_positive_ints(filters, "filters")
        (in_channels, n_classes, hidden, pool_size, convs_per_block) = check_positive_ints(
            (in_channels, n_classes, hidden, pool_size, convs_per_block),
            "in_channels/n_classes/hidden/pool_size/convs_per_block",
        )
        if not 0.0 <= float(dropout) < 1.0:
            raise MedsegInputError(f"dropout must be in [0, 1), got {dropout}")
        #: constructor kwargs, JSON-ready: the registry stores them in the model card
        self.arch_params: dict[str, Any] = {
            "in_channels": in_channels,
            "n_classes": n_classes,
            "kernel_size": int(kernel_size),
            "activation": str(activation),
            "filters": list(filters),
            "batch_norm": bool(batch_norm),
            "hidden": hidden,
            "dropout": float(dropout),
            "pool_size": pool_size,
        }
        if pool != "avg":  # cards written before this option keep loading unchanged
            self.arch_params["pool"] = pool
        if lesion_head:
            self.arch_params["lesion_head"] = True
        if convs_per_block != 1:
            self.arch_params["convs_per_block"] = convs_per_block
        self.in_channels = in_channels
        self.n_classes = n_classes
        channels = (in_channels, *filters)
        # a block's extra convs run before its last one (VGG-style); they live apart from
        # ``blocks`` so a one-conv model's state_dict keeps the keys of the cards before it
        self.pre_convs = nn.ModuleList(
            nn.Sequential(*(
                ConvBNAct(channels[i] if j == 0 else channels[i + 1], channels[i + 1],
                          kernel_size, batch_norm=batch_norm, activation=activation)
                for j in range(convs_per_block - 1)))
            for i in range(len(filters))
        ) if convs_per_block > 1 else None
        self.blocks = nn.ModuleList(
            ConvBNAct(channels[i] if convs_per_block == 1 else channels[i + 1], channels[i + 1],
                      kernel_size, batch_norm=batch_norm, activation=activation)
            for i in range(len(filters))
        )
        self.pool = nn.MaxPool2d(2)
        self.min_size = 2 ** len(filters)
        self.gap = (nn.AdaptiveMaxPool2d if pool == "max" else nn.AdaptiveAvgPool2d)(pool_size)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(filters[-1] * pool_size * pool_size, hidden),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )
        self.lesion_head = nn.Conv2d(filters[-1], 1, 1) if lesion_head else None

    @property
    def last_conv(self) -> ConvBNAct:
        """The last conv block (a property, so its weights appear once in state_dict)."""
        return self.blocks[-1]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = max(0, self.min_size - h), max(0, self.min_size - w)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Activation map of :attr:`last_conv` (before its pooling): (N, filters[-1], h, w)."""
        check_input(x, self.in_channels, type(self).__name__)
        x = self._pad(x)
        for i, block in enumerate(self.blocks):
            if i:
                x = self.pool(x)
            if self.pre_convs is not None:
                x = self.pre_convs[i](x)
            x = block(x)
        return x

    def classify_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`features` output (the rest of the forward pass)."""
        return self.head(self.gap(self.pool(feats)))

    def lesion_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, 1, h, w) logits of "lesion here" from :meth:`features` output."""
        if self.lesion_head is None:
            raise MedsegInputError("this classifier was built without a lesion head")
        return self.lesion_head(feats)

    def enable_fast_inference(self) -> None:
        """Called on the inference copy (``inference.prepare_model``): its eval-mode
        forward may then pool before the activation (see :meth:`_pool_first`). Off on the
        module users train and call directly, so a plain forward stays the plain network."""
        self.fast_inference = True

    def _pool_first(self) -> bool:
        """Whether the forward may pool before the activation: max-pooling commutes with a
        non-decreasing activation applied after it (relu(max) == max(relu)), so the
        activation then runs on a quarter of the voxels. Only ReLU / LeakyReLU, whose
        float results are exactly monotone; not GELU (not monotone) nor tanh / sigmoid.
        An ``Identity`` activation is one fused into the conv (``models.fusion``): it
        already ran before the pooling, so any activation may take this path."""
        return getattr(self, "fast_inference", False) and not self.training and all(
            isinstance(b.act, (nn.ReLU, nn.LeakyReLU, nn.Identity)) for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._pool_first():
            return self.classify_features(self.features(x))
        # the same function, faster: conv (+ BN) → 2×2 max-pool → activation per block
        check_input(x, self.in_channels, type(self).__name__)
        x = self._pad(x)
        for i, block in enumerate(self.blocks):
            if self.pre_convs is not None:
                x = self.pre_convs[i](x)
            x = block.act(max_pool_2x2(block.bn(block.conv(x))))
        return self.head(self.gap(x))
