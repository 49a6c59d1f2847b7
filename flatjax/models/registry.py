"""Builds models by name: ``create("resnet18", 10, seed=0)``."""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from flatjax.models.mlp import MLP
from flatjax.models.pyramidnet import pyramidnet110
from flatjax.models.resnet import cifar_resnet, resnet18, resnet50
from flatjax.models.vgg import VGG16BN
from flatjax.models.vit import vit_s32, vit_s_cifar
from flatjax.models.wide_resnet import wrn28_10


def _small_cnn(num_classes: int, *, rngs: nnx.Rngs, depth: int = 8, **kw: Any) -> nnx.Module:
    return cifar_resnet(num_classes, depth=depth, rngs=rngs, **kw)


def _resnet20(num_classes: int, *, rngs: nnx.Rngs, **kw: Any) -> nnx.Module:
    return cifar_resnet(num_classes, depth=20, rngs=rngs, **kw)


_BUILDERS: dict[str, Callable[..., nnx.Module]] = {
    "mlp": MLP,
    "small_cnn": _small_cnn,
    "resnet20": _resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "wrn28_10": wrn28_10,
    "vgg16_bn": VGG16BN,
    "vit_s_cifar": vit_s_cifar,
    "vit_s32": vit_s32,
    "pyramidnet110": pyramidnet110,
}

_DESCRIPTIONS = {
    "mlp": "MLP on flattened inputs (in_features=64 for 8x8 digits); kw: in_features, hidden",
    "small_cnn": "ResNet-8 (He et al. 2016 CIFAR family), 78K params; kw: width, depth, in_channels",
    "resnet20": "CIFAR ResNet-20 (He et al. 2016), 0.27M params; kw: width, in_channels",
    "resnet18": "ResNet-18 (He et al. 2016); kw: stem='cifar'|'imagenet'",
    "resnet50": "ResNet-50 (He et al. 2016); kw: stem='cifar'|'imagenet'",
    "wrn28_10": "WideResNet-28-10 (Zagoruyko & Komodakis 2016); kw: dropout_rate",
    "vgg16_bn": "VGG-16-BN for CIFAR (Simonyan & Zisserman 2015); kw: classifier='mlp'|'linear'",
    "vit_s_cifar": "ViT-S for 32x32 CIFAR, patch 4 (Dosovitskiy et al. 2021; m-ARWP config)",
    "vit_s32": "ViT-S/32 for 224x224 ImageNet (Dosovitskiy et al. 2021)",
    "pyramidnet110": "PyramidNet-110, alpha=270, basic blocks (Han et al. 2017); kw: alpha",
}


def available() -> dict[str, str]:
    """Returns the registered model names, each with a one-line description."""
    return dict(_DESCRIPTIONS)


def create(
    name: str,
    num_classes: int,
    *,
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
    **kw: Any,
) -> nnx.Module:
    """Builds a registered model.

    Args:
      name: one of :func:`available` (e.g. ``"resnet18"``, ``"wrn28_10"``).
      num_classes: number of output logits.
      seed: seeds the ``params`` and ``dropout`` streams when ``rngs`` is not given.
        The ``params`` stream then uses JAX's ``"rbg"`` PRNG (XLA RngBitGenerator):
        threefry, the default, compiles one kernel per parameter shape, which made
        eager initialization of a ResNet take tens of seconds on CPU. Initial values
        are reproducible per seed on a given backend but may differ between CPU, GPU
        and TPU; pass ``rngs`` for threefry keys.
      rngs: explicit NNX random streams (give it a ``dropout`` stream so that
        ``make_apply``'s ``dropout_key`` can reseed it).
      **kw: model-specific options (see :func:`available`), e.g. ``in_channels=1``
        for grayscale images, plus ``dtype`` for the computation dtype
        (e.g. ``jnp.bfloat16``).

    Returns:
      The model, in train mode (NNX's default); inputs are NHWC.

    Raises:
      ValueError: for an unknown ``name`` or a non-positive ``num_classes``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {sorted(_BUILDERS)}, got {name!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if rngs is None:
        rngs = nnx.Rngs(
            params=jax.random.key(seed, impl="rbg"),
            dropout=jax.random.fold_in(jax.random.key(seed), 1),
        )
    return _BUILDERS[name](num_classes, rngs=rngs, **kw)
