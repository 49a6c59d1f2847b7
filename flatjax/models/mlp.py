"""A multi-layer perceptron for quick tests and the offline digits dataset."""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx

from flatjax.models.layers import linear


class MLP(nnx.Module):
    """Flatten -> [Linear -> (LayerNorm) -> ReLU] * len(hidden) -> Linear.

    Inputs of any shape ``(N, ...)`` are flattened, so ``(N, 8, 8, 1)`` digits and
    ``(N, 64)`` vectors both work once ``in_features`` matches.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 128),
        norm: bool = False,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the network.

        Args:
          num_classes: number of output logits.
          in_features: flattened input size (64 for 8x8 digits, 3072 for CIFAR).
          hidden: widths of the hidden layers (may be empty: a linear classifier).
          norm: a LayerNorm after each hidden Linear (its leaves are named ``norms/<i>/scale|bias``).
          rngs: NNX random streams.
          dtype: computation dtype.

        Raises:
          ValueError: for non-positive sizes.
        """
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ValueError(
                "in_features, num_classes and every hidden width must be >= 1, got "
                f"in_features={in_features}, num_classes={num_classes}, hidden={tuple(hidden)}"
            )
        sizes = (in_features, *hidden)
        self.layers = nnx.List(
            [linear(a, b, rngs=rngs, dtype=dtype) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.head = linear(sizes[-1], num_classes, rngs=rngs, dtype=dtype)
        self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs, dtype=dtype) for b in hidden] if norm else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(N, ...)`` inputs to logits ``(N, num_classes)``."""
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = nnx.relu(self.norms[i](x) if self.norms else x)
        return self.head(x)
