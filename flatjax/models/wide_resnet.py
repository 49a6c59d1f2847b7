"""Wide residual networks (Zagoruyko & Komodakis, 2016, "Wide Residual Networks", BMVC).

WRN-d-k for CIFAR: a 3x3 stem conv with 16 channels, three groups of (d-4)/6
pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3) with widths 16k, 32k,
64k, then BN-ReLU, global average pooling and a linear classifier. Convolutions have
no bias; a 1x1 projection (applied to the pre-activated input) joins blocks whose
width or stride changes. WRN-28-10 has 36,479,194 parameters for 10 classes
(the paper's "36.5M").
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from flatjax.models.layers import batch_norm, conv, global_avg_pool, linear


class WideBlock(nnx.Module):
    """A pre-activation wide basic block with optional dropout between the convolutions."""

    def __init__(
        self,
        in_features: int,
        features: int,
        stride: int,
        dropout_rate: float,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the block.

        Args:
          in_features: input channels.
          features: output channels.
          stride: stride of the first convolution and of the projection.
          dropout_rate: dropout probability between the two convolutions.
          rngs: NNX random streams (``dropout`` drives the dropout masks).
          dtype: computation dtype.
        """
        self.bn1 = batch_norm(in_features, rngs=rngs, dtype=dtype)
        self.conv1 = conv(in_features, features, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(features, rngs=rngs, dtype=dtype)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.conv2 = conv(features, features, 3, rngs=rngs, dtype=dtype)
        if stride != 1 or in_features != features:
            self.proj = conv(in_features, features, 1, stride, rngs=rngs, dtype=dtype)
        else:
            self.proj = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to an NHWC tensor."""
        pre = nnx.relu(self.bn1(x))
        y = self.conv1(pre)
        y = self.conv2(self.dropout(nnx.relu(self.bn2(y))))
        # The projection sees the pre-activated input, as in the reference implementation.
        shortcut = x if self.proj is None else self.proj(pre)
        return y + shortcut


class WideResNet(nnx.Module):
    """WRN-depth-widen_factor (Zagoruyko & Komodakis, 2016) for 32x32 inputs."""

    def __init__(
        self,
        num_classes: int,
        *,
        depth: int = 28,
        widen_factor: int = 10,
        dropout_rate: float = 0.0,
        in_channels: int = 3,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the network.

        Args:
          num_classes: number of output logits.
          depth: total depth, 6n+4 (16, 22, 28, 40, ...).
          widen_factor: channel multiplier k.
          dropout_rate: dropout inside every block (the RWP/SAM CIFAR runs use 0).
          in_channels: input image channels.
          rngs: NNX random streams.
          dtype: computation dtype.

        Raises:
          ValueError: for a depth not of the form 6n+4, a non-positive widen_factor or
            a dropout_rate outside [0, 1).
        """
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = conv(in_channels, 16, 3, rngs=rngs, dtype=dtype)
        blocks = []
        features = 16
        for i, width in enumerate(widths):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBlock(features, width, stride, dropout_rate, rngs=rngs, dtype=dtype))
                features = width
        self.blocks = nnx.List(blocks)
        self.bn = batch_norm(features, rngs=rngs, dtype=dtype)
        self.head = linear(features, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps NHWC images ``(N, H, W, C)`` to logits ``(N, num_classes)``."""
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        x = nnx.relu(self.bn(x))
        return self.head(global_avg_pool(x))


def wrn28_10(num_classes: int, *, dropout_rate: float = 0.0, rngs: nnx.Rngs, **kw: Any) -> WideResNet:
    """WRN-28-10 (Zagoruyko & Komodakis, 2016): 36,479,194 parameters for 10 classes."""
    return WideResNet(num_classes, depth=28, widen_factor=10, dropout_rate=dropout_rate, rngs=rngs, **kw)
