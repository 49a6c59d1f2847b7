"""VGG-16 with BatchNorm for CIFAR (Simonyan & Zisserman, 2015, "Very Deep Convolutional
Networks for Large-Scale Image Recognition", ICLR).

The 13 conv layers of configuration D (64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M,
512 x3, M), each a 3x3 conv (with bias, as in the papers' code) + BN + ReLU. A 32x32
input leaves a 1x1x512 map, so the classifier is small. Two classifiers:

* ``classifier="mlp"`` (default): Dropout(0.5)-Linear(512, 512)-ReLU-Dropout(0.5)-
  Linear(512, 512)-ReLU-Linear(512, classes). This is the ``VGG16BN`` of the SWA code
  base that the RWP/m-ARWP code loads by name (``models.VGG16BN``):
  15,253,578 parameters for 10 classes.
* ``classifier="linear"``: a single Linear(512, classes) as in the popular
  ``pytorch-cifar`` VGG: 14,728,266 parameters for 10 classes.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from flatjax.models.layers import batch_norm, conv, linear

_CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_CLASSIFIERS = ("mlp", "linear")


class ConvBNReLU(nnx.Module):
    """3x3 conv (with bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_features: int, features: int, *, rngs: nnx.Rngs, dtype: Any = None) -> None:
        """Builds the layer.

        Args:
          in_features: input channels.
          features: output channels.
          rngs: NNX random streams.
          dtype: computation dtype.
        """
        self.conv = conv(in_features, features, 3, rngs=rngs, use_bias=True, dtype=dtype)
        self.bn = batch_norm(features, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the layer to an NHWC tensor."""
        return nnx.relu(self.bn(self.conv(x)))


class VGG16BN(nnx.Module):
    """VGG-16 with BatchNorm for 32x32 inputs (Simonyan & Zisserman, 2015)."""

    def __init__(
        self,
        num_classes: int,
        *,
        classifier: str = "mlp",
        dropout_rate: float = 0.5,
        in_channels: int = 3,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the network.

        Args:
          num_classes: number of output logits.
          classifier: ``"mlp"`` (SWA/RWP code, 3 linear layers) or ``"linear"``
            (pytorch-cifar, 1 linear layer); see the module docstring.
          dropout_rate: dropout before the two hidden linear layers (``"mlp"`` only).
          in_channels: input image channels.
          rngs: NNX random streams.
          dtype: computation dtype.

        Raises:
          ValueError: for an unknown ``classifier`` or a dropout_rate outside [0, 1).
        """
        if classifier not in _CLASSIFIERS:
            raise ValueError(f"classifier must be one of {_CLASSIFIERS}, got {classifier!r}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        layers = []
        features = in_channels
        for v in _CFG_D:
            if v == "M":
                continue  # pooling positions are re-read from _CFG_D in __call__
            layers.append(ConvBNReLU(features, v, rngs=rngs, dtype=dtype))
            features = v
        self.features = nnx.List(layers)
        self.classifier = classifier
        if classifier == "mlp":
            self.drop1 = nnx.Dropout(dropout_rate, rngs=rngs)
            self.fc1 = linear(512, 512, rngs=rngs, dtype=dtype)
            self.drop2 = nnx.Dropout(dropout_rate, rngs=rngs)
            self.fc2 = linear(512, 512, rngs=rngs, dtype=dtype)
        self.head = linear(512, num_classes, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps NHWC images ``(N, 32, 32, C)`` to logits ``(N, num_classes)``."""
        layers = iter(self.features)
        for v in _CFG_D:
            if v == "M":
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = next(layers)(x)
        # Average over what is left (1x1 for 32x32 inputs) so other sizes still work.
        x = x.mean(axis=(1, 2))
        if self.classifier == "mlp":
            x = nnx.relu(self.fc1(self.drop1(x)))
            x = nnx.relu(self.fc2(self.drop2(x)))
        return self.head(x)
