"""ResNets (He et al., 2016, "Deep Residual Learning for Image Recognition", CVPR).

One class covers the variants the flat-minima papers train:

* ResNet-18 / ResNet-50 with either stem:
  - ``stem="cifar"``: 3x3 conv, stride 1, no max-pool (the common CIFAR adaptation,
    e.g. the ``pytorch-cifar`` ResNet-18 used by the SAM/RWP code; 11,173,962
    parameters for 10 classes);
  - ``stem="imagenet"``: 7x7 conv, stride 2, then 3x3 max-pool stride 2
    (torchvision's ResNet-50 "v1.5", stride on the 3x3 conv; 25,557,032 parameters
    for 1000 classes).
* The small CIFAR ResNets of He et al. Sec. 4.2 (depth 6n+2, widths 16/32/64), e.g.
  ResNet-8 and ResNet-20, with 1x1-conv projection shortcuts (option B) rather than
  the paper's zero-padding ones (option A): ResNet-20 has 0.27M parameters either way.

Layout: NHWC inputs, ``(N, H, W, C)`` -> logits ``(N, num_classes)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx

from flatjax.models.layers import batch_norm, conv, global_avg_pool, linear

_STEMS = ("cifar", "imagenet")
_BLOCKS = ("basic", "bottleneck")


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with BatchNorm and an identity or 1x1 projection shortcut."""

    expansion = 1

    def __init__(
        self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs, dtype: Any = None
    ) -> None:
        """Builds the block.

        Args:
          in_features: input channels.
          features: output channels.
          stride: stride of the first convolution (and of the projection shortcut).
          rngs: NNX random streams.
          dtype: computation dtype.
        """
        self.conv1 = conv(in_features, features, 3, stride, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(features, rngs=rngs, dtype=dtype)
        self.conv2 = conv(features, features, 3, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(features, rngs=rngs, dtype=dtype)
        if stride != 1 or in_features != features:
            self.proj_conv = conv(in_features, features, 1, stride, rngs=rngs, dtype=dtype)
            self.proj_bn = batch_norm(features, rngs=rngs, dtype=dtype)
        else:
            self.proj_conv = None
            self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to an NHWC tensor."""
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return nnx.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convolutions, 4x channel expansion (ResNet v1.5)."""

    expansion = 4

    def __init__(
        self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs, dtype: Any = None
    ) -> None:
        """Builds the block.

        Args:
          in_features: input channels.
          features: bottleneck width; the block outputs ``4 * features`` channels.
          stride: stride of the 3x3 convolution (and of the projection shortcut).
          rngs: NNX random streams.
          dtype: computation dtype.
        """
        out = features * self.expansion
        self.conv1 = conv(in_features, features, 1, rngs=rngs, dtype=dtype)
        self.bn1 = batch_norm(features, rngs=rngs, dtype=dtype)
        self.conv2 = conv(features, features, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(features, rngs=rngs, dtype=dtype)
        self.conv3 = conv(features, out, 1, rngs=rngs, dtype=dtype)
        self.bn3 = batch_norm(out, rngs=rngs, dtype=dtype)
        if stride != 1 or in_features != out:
            self.proj_conv = conv(in_features, out, 1, stride, rngs=rngs, dtype=dtype)
            self.proj_bn = batch_norm(out, rngs=rngs, dtype=dtype)
        else:
            self.proj_conv = None
            self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to an NHWC tensor."""
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
    """A ResNet (He et al., 2016) with a CIFAR or ImageNet stem.

    Stage ``i`` has ``stage_sizes[i]`` blocks of width ``widths[i]``; the first stage
    keeps the resolution and every later one halves it in its first block.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        block: str = "basic",
        stage_sizes: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "cifar",
        in_channels: int = 3,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the network.

        Args:
          num_classes: number of output logits.
          block: ``"basic"`` (ResNet-18/34, CIFAR ResNets) or ``"bottleneck"`` (ResNet-50+).
          stage_sizes: blocks per stage.
          widths: block width per stage (same length as ``stage_sizes``); the stem
            outputs ``widths[0]`` channels.
          stem: ``"cifar"`` (3x3 conv stride 1, no pooling) or ``"imagenet"``
            (7x7 conv stride 2 + 3x3 max-pool stride 2).
          in_channels: input image channels.
          rngs: NNX random streams.
          dtype: computation dtype (parameters stay float32).

        Raises:
          ValueError: for an unknown ``block`` or ``stem``, or mismatched
            ``stage_sizes``/``widths``.
        """
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {_BLOCKS}, got {block!r}")
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {_STEMS}, got {stem!r}")
        if len(stage_sizes) != len(widths) or not stage_sizes:
            raise ValueError(
                "stage_sizes and widths must be non-empty and of equal length, got "
                f"{tuple(stage_sizes)} and {tuple(widths)}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        self.stem = stem
        kernel, stride = (3, 1) if stem == "cifar" else (7, 2)
        self.stem_conv = conv(in_channels, widths[0], kernel, stride, rngs=rngs, dtype=dtype)
        self.stem_bn = batch_norm(widths[0], rngs=rngs, dtype=dtype)
        blocks = []
        features = widths[0]
        for i, (n, width) in enumerate(zip(stage_sizes, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(features, width, stride, rngs=rngs, dtype=dtype))
                features = width * block_cls.expansion
        self.blocks = nnx.List(blocks)
        self.head = linear(features, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps NHWC images ``(N, H, W, C)`` to logits ``(N, num_classes)``."""
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        if self.stem == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for blk in self.blocks:
            x = blk(x)
        return self.head(global_avg_pool(x))


def resnet18(num_classes: int, *, stem: str = "cifar", rngs: nnx.Rngs, **kw: Any) -> ResNet:
    """ResNet-18 (He et al., 2016): basic blocks (2, 2, 2, 2), widths 64-512.

    CIFAR stem: 11,173,962 parameters for 10 classes; ImageNet stem: 11,689,512 for 1000.
    """
    return ResNet(num_classes, block="basic", stage_sizes=(2, 2, 2, 2), stem=stem, rngs=rngs, **kw)


def resnet50(num_classes: int, *, stem: str = "cifar", rngs: nnx.Rngs, **kw: Any) -> ResNet:
    """ResNet-50 (He et al., 2016): bottleneck blocks (3, 4, 6, 3), widths 64-512 (x4).

    ImageNet stem: 25,557,032 parameters for 1000 classes (torchvision); CIFAR stem:
    23,520,842 for 10 classes.
    """
    return ResNet(
        num_classes, block="bottleneck", stage_sizes=(3, 4, 6, 3), stem=stem, rngs=rngs, **kw
    )


def cifar_resnet(num_classes: int, *, depth: int = 20, width: int = 16, rngs: nnx.Rngs, **kw: Any) -> ResNet:
    """The CIFAR ResNet-(6n+2) of He et al. (2016, Sec. 4.2), widths ``width * (1, 2, 4)``.

    ``depth=8`` is a ~78K-parameter net for fast tests and CPU runs; ``depth=20`` has
    0.27M parameters.

    Raises:
      ValueError: if ``depth`` is not of the form 6n+2 with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(
        num_classes,
        block="basic",
        stage_sizes=(n, n, n),
        widths=(width, 2 * width, 4 * width),
        stem="cifar",
        rngs=rngs,
        **kw,
    )
