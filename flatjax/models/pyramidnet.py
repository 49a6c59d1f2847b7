"""PyramidNet for CIFAR (Han, Kim & Kim, 2017, "Deep Pyramidal Residual Networks", CVPR).

Widths grow additively by ``alpha / N`` per block (N = total blocks) from 16 to
``16 + alpha``. Basic blocks are BN-conv3x3-BN-ReLU-conv3x3-BN (no ReLU at the block
output); the shortcut is the identity, average-pooled 2x2 when the block downsamples
and zero-padded along channels to the new width (no parameters).

``pyramidnet110`` is depth 110 with basic blocks (18 per stage) and alpha = 270:
28,485,477 parameters for 10 classes with the reference code's construction (the
paper lists this network as 28.3M). It is the PyramidNet-110 of the CR-SAM and LETS
CIFAR tables.
Bottleneck PyramidNets (e.g. depth 272, alpha 200 with ShakeDrop in the SAM paper)
are not implemented.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flatjax.models.layers import batch_norm, conv, global_avg_pool, linear


class PyramidBlock(nnx.Module):
    """A PyramidNet basic block with a zero-padded identity shortcut."""

    def __init__(
        self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs, dtype: Any = None
    ) -> None:
        """Builds the block.

        Args:
          in_features: input channels.
          features: output channels (>= in_features).
          stride: 1, or 2 to downsample (the shortcut then average-pools 2x2).
          rngs: NNX random streams.
          dtype: computation dtype.
        """
        self.stride = stride
        self.pad = features - in_features
        self.bn1 = batch_norm(in_features, rngs=rngs, dtype=dtype)
        self.conv1 = conv(in_features, features, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = batch_norm(features, rngs=rngs, dtype=dtype)
        self.conv2 = conv(features, features, 3, rngs=rngs, dtype=dtype)
        self.bn3 = batch_norm(features, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to an NHWC tensor."""
        y = self.conv1(self.bn1(x))
        y = self.conv2(nnx.relu(self.bn2(y)))
        y = self.bn3(y)
        shortcut = x
        if self.stride != 1:
            shortcut = nnx.avg_pool(shortcut, (2, 2), strides=(2, 2))
        if self.pad:
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, self.pad)))
        return y + shortcut


class PyramidNet(nnx.Module):
    """PyramidNet with basic blocks for 32x32 inputs (Han et al., 2017)."""

    def __init__(
        self,
        num_classes: int,
        *,
        depth: int = 110,
        alpha: float = 270,
        in_channels: int = 3,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the network.

        Args:
          num_classes: number of output logits.
          depth: 6n+2 (basic blocks, n per stage).
          alpha: total width increase over all blocks.
          in_channels: input image channels.
          rngs: NNX random streams.
          dtype: computation dtype.

        Raises:
          ValueError: for a depth not of the form 6n+2 or a negative alpha.
        """
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (e.g. 110), got {depth}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        n = (depth - 2) // 6
        add_rate = alpha / (3 * n)
        self.stem = conv(in_channels, 16, 3, rngs=rngs, dtype=dtype)
        self.stem_bn = batch_norm(16, rngs=rngs, dtype=dtype)
        blocks = []
        width = 16.0
        features = 16
        for i in range(3):
            for j in range(n):
                width += add_rate
                # Python's round on the running float width, as the reference code does.
                out = int(round(width))
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PyramidBlock(features, out, stride, rngs=rngs, dtype=dtype))
                features = out
        self.blocks = nnx.List(blocks)
        self.bn = batch_norm(features, rngs=rngs, dtype=dtype)
        self.head = linear(features, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps NHWC images ``(N, H, W, C)`` to logits ``(N, num_classes)``."""
        x = self.stem_bn(self.stem(x))
        for blk in self.blocks:
            x = blk(x)
        x = nnx.relu(self.bn(x))
        return self.head(global_avg_pool(x))


def pyramidnet110(num_classes: int, *, alpha: float = 270, rngs: nnx.Rngs, **kw: Any) -> PyramidNet:
    """PyramidNet-110, alpha=270, basic blocks (Han et al., 2017): ~28.5M parameters."""
    return PyramidNet(num_classes, depth=110, alpha=alpha, rngs=rngs, **kw)
