"""Flax NNX models used in the flat-minima papers, and a pure-function interface.

Build by name with :func:`create` (see :func:`available`); inputs are NHWC and conv
kernels are ``(kh, kw, in, out)``. For the optimizers, turn a model into
``(graphdef, params, model_state)`` with :func:`split_model` and a pure ``apply`` with
:func:`make_apply` (see :mod:`flatjax.models.functional`); in an NNX loop, :func:`pure_loss` and
:func:`value_and_grad` run a flatjax estimator on the module directly.
"""

from flatjax.models.functional import (
    count_params,
    make_apply,
    make_loss_fn,
    merge_model,
    params_of,
    pure_loss,
    split_model,
    value_and_grad,
)
from flatjax.models.mlp import MLP
from flatjax.models.pyramidnet import PyramidNet
from flatjax.models.registry import available, create
from flatjax.models.resnet import ResNet
from flatjax.models.vgg import VGG16BN
from flatjax.models.vit import ViT
from flatjax.models.wide_resnet import WideResNet

__all__ = [
    "MLP",
    "PyramidNet",
    "ResNet",
    "VGG16BN",
    "ViT",
    "WideResNet",
    "available",
    "count_params",
    "create",
    "make_apply",
    "make_loss_fn",
    "merge_model",
    "params_of",
    "pure_loss",
    "split_model",
    "value_and_grad",
]
