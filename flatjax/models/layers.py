"""Layer constructors shared by the convolutional models.

They pin down the PyTorch conventions the papers' code uses, so parameter counts
and shapes match the published models:

* convolutions pad ``kernel // 2`` on every side (not Flax's ``"SAME"``, which pads
  asymmetrically for stride 2 and would shift the sampling grid);
* convolutions have no bias when a BatchNorm follows;
* BatchNorm uses momentum 0.9 and epsilon 1e-5 (PyTorch's ``momentum=0.1``); unlike
  PyTorch, the running variance tracks the biased batch variance (Flax's convention);
* kernels are ``(kh, kw, in, out)``: output channels on the last axis, which the
  filter-wise perturbations of the optimizers rely on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# He et al. (2015) normal init over fan-out, as torchvision's ResNet/VGG do.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    stride: int = 1,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = False,
    dtype: Any = None,
) -> nnx.Conv:
    """A 2-D convolution with symmetric ``kernel_size // 2`` padding (PyTorch style).

    Args:
      in_features: input channels.
      out_features: output channels (the kernel's last axis).
      kernel_size: square kernel side.
      stride: spatial stride.
      rngs: NNX random streams; the ``params`` stream initializes the kernel.
      use_bias: add a bias (off by default since a BatchNorm usually follows).
      dtype: computation dtype (``None`` keeps the input's).

    Returns:
      An ``nnx.Conv`` with kernel shape ``(kernel_size, kernel_size, in, out)``.
    """
    pad = kernel_size // 2
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=conv_init,
        dtype=dtype,
        rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` over the last axis, with a cheaper running-statistics update.

    Same variables (``scale``, ``bias``, ``mean``, ``var``), constructor and
    ``use_running_average`` switch as ``nnx.BatchNorm``. Only ``__call__`` differs: it
    stores the new statistics with ``Variable.set_value`` instead of ``var[...] = x``.
    Under ``jax.jit`` the latter compares shardings and, for a tracer, JAX then builds
    an error message that walks the whole traced program, so tracing grew
    quadratically with the number of BatchNorm layers (24 s of a 29 s trace of
    PyramidNet-110).
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes ``x`` over all axes but the last (batch statistics in train mode)."""
        dtype = self.dtype or x.dtype
        axes = tuple(range(x.ndim - 1))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            # Statistics in float32 even for bfloat16 activations.
            x32 = x.astype(jnp.float32)
            mean = x32.mean(axes)
            var = jnp.maximum(jnp.square(x32).mean(axes) - jnp.square(mean), 0.0)
            m = self.momentum
            self.mean.set_value(jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean))
            self.var.set_value(jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var))
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(dtype)


def batch_norm(num_features: int, *, rngs: nnx.Rngs, dtype: Any = None) -> BatchNorm:
    """BatchNorm over the channel (last) axis with PyTorch's defaults.

    Args:
      num_features: channels.
      rngs: NNX random streams (BatchNorm draws nothing random; NNX requires it).
      dtype: computation dtype.

    Returns:
      A :class:`BatchNorm` with momentum 0.9 and epsilon 1e-5.
    """
    return BatchNorm(
        num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs
    )


def linear(
    in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: Any = None
) -> nnx.Linear:
    """A dense layer with PyTorch's default weight init and a zero bias.

    Args:
      in_features: input width.
      out_features: output width (the kernel's last axis).
      rngs: NNX random streams.
      dtype: computation dtype.

    Returns:
      An ``nnx.Linear`` with kernel shape ``(in_features, out_features)``.
    """
    return nnx.Linear(in_features, out_features, kernel_init=linear_init, dtype=dtype, rngs=rngs)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC tensor, giving ``(N, C)``."""
    return x.mean(axis=(1, 2))
