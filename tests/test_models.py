"""Tests for flatjax.models: parameter counts against published/reference numbers,
forward shapes (abstractly for the large models), and the pure functional interface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flatjax import models as M

CIFAR = (2, 32, 32, 3)
IMAGENET = (2, 224, 224, 3)

# (name, num_classes, kwargs, input shape, exact count of the reference implementation,
#  published count or None, relative tolerance against the published count, reference)
PARAM_COUNTS = [
    ("resnet18", 10, {}, CIFAR, 11_173_962, 11.17e6, 1e-3,
     "He et al. 2016 ResNet-18, CIFAR stem as in pytorch-cifar (11.17M)"),
    ("resnet18", 1000, {"stem": "imagenet"}, IMAGENET, 11_689_512, 11.69e6, 1e-3,
     "torchvision resnet18 (11.69M)"),
    ("resnet50", 1000, {"stem": "imagenet"}, IMAGENET, 25_557_032, 25.56e6, 1e-3,
     "torchvision resnet50 (25.56M; He et al. 2016 quote 25.6M)"),
    ("resnet50", 10, {}, CIFAR, 23_520_842, None, 0.0, "pytorch-cifar ResNet50"),
    ("wrn28_10", 10, {}, CIFAR, 36_479_194, 36.5e6, 2e-3,
     "Zagoruyko & Komodakis 2016, WRN-28-10: 36.5M"),
    ("vgg16_bn", 10, {}, CIFAR, 15_253_578, None, 0.0,
     "VGG16BN of the SWA code base loaded by the RWP/m-ARWP code (3 linear layers)"),
    ("vgg16_bn", 10, {"classifier": "linear"}, CIFAR, 14_728_266, None, 0.0,
     "pytorch-cifar VGG16 with BN (single linear classifier)"),
    ("vit_s_cifar", 10, {}, CIFAR, 9_523_722, None, 0.0,
     "m-ARWP code: vit-pytorch ViT(dim=512, depth=6, heads=8, mlp_dim=512), patch 4"),
    ("vit_s32", 1000, {}, IMAGENET, 22_878_952, 22.9e6, 2e-3,
     "Dosovitskiy et al. 2021 ViT-S/32 (timm vit_small_patch32_224: 22.88M)"),
    ("pyramidnet110", 10, {}, CIFAR, 28_485_477, 28.3e6, 1e-2,
     "Han et al. 2017, PyramidNet-110 alpha=270 (basic): 28.3M in the paper; the reference "
     "code's construction gives 28.49M"),
    ("resnet20", 10, {}, CIFAR, 272_474, 0.27e6, 1e-2, "He et al. 2016, ResNet-20: 0.27M"),
    ("small_cnn", 10, {}, CIFAR, 78_042, None, 0.0, "ResNet-8 (6n+2, n=1)"),
    ("mlp", 10, {}, (2, 8, 8, 1), 26_122, None, 0.0, "64-128-128-10 MLP"),
]


@pytest.mark.parametrize(
    "name,num_classes,kw,shape,exact,published,rtol,reference",
    PARAM_COUNTS,
    ids=[f"{p[0]}-{p[1]}-{'-'.join(map(str, p[2].values())) or 'default'}" for p in PARAM_COUNTS],
)
def test_param_count_and_output_shape(name, num_classes, kw, shape, exact, published, rtol, reference):
    # nnx.eval_shape: no parameter is allocated and no convolution runs.
    model = nnx.eval_shape(lambda: M.create(name, num_classes, **kw))
    n = M.count_params(model)
    assert n == exact, f"{name}: {n:,} parameters, reference {exact:,} ({reference})"
    if published is not None:
        assert abs(n - published) / published <= rtol, (name, n, published, reference)
    graphdef, params, state = M.split_model(model)
    assert M.count_params(params) == n
    apply = M.make_apply(graphdef)
    logits, new_state = jax.eval_shape(
        lambda p, s, x: apply(p, s, x, train=True), params, state,
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    assert logits.shape == (shape[0], num_classes)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_kernels_put_output_channels_last():
    model = nnx.eval_shape(lambda: M.create("resnet18", 10))
    _, params, _ = M.split_model(model)
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
    assert params["blocks"][2]["proj_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert params["head"]["kernel"].shape == (512, 10)


def _rbg(seed: int) -> jax.Array:
    # XLA compiles threefry bit generation slowly on CPU (seconds per shape); the tests
    # use "rbg" keys so that they stay fast. The semantics under test do not change.
    return jax.random.key(seed, impl="rbg")


def _rngs() -> nnx.Rngs:
    return nnx.Rngs(params=_rbg(0), dropout=_rbg(1))


@pytest.fixture(scope="module")
def cnn():
    """A 4-wide ResNet-8 for 8x8 grayscale inputs, split into its functional parts."""
    model = M.create("small_cnn", 10, width=4, in_channels=1)
    graphdef, params, state = M.split_model(model)
    apply = jax.jit(M.make_apply(graphdef), static_argnames="train")
    return model, graphdef, params, state, apply


@pytest.mark.parametrize("key", ["mlp", "vit_tiny"])
def test_small_models_real_forward(key):
    # The full-size models are only traced (above); these reduced ones also run.
    if key == "mlp":
        model, shape = M.create("mlp", 10), (4, 8, 8, 1)
    else:
        model = M.create("vit_s_cifar", 10, image_size=16, depth=1, dim=16, head_dim=8, mlp_dim=16)
        shape = (2, 16, 16, 3)
    graphdef, params, state = M.split_model(model)
    y, _ = jax.jit(M.make_apply(graphdef), static_argnames="train")(
        params, state, jax.random.normal(jax.random.key(0), shape), train=False
    )
    assert y.shape == (shape[0], 10)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_split_merge_round_trip(cnn):
    model, graphdef, params, state, apply = cnn
    assert set(params) >= {"stem_conv", "blocks", "head"}
    assert "mean" in state["stem_bn"] and "scale" not in state["stem_bn"]
    rebuilt = M.merge_model(graphdef, params, state)
    _, p2, s2 = M.split_model(rebuilt)
    for a, b in ((p2, params), (s2, state)):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    rebuilt.eval()
    expected = nnx.jit(lambda m, x: m(x))(rebuilt, x)
    logits, _ = apply(params, state, x, train=False)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_stats_update_only_in_train_mode(cnn):
    _, _, params, state, apply = cnn
    x = 3.0 + jax.random.normal(jax.random.key(2), (8, 8, 8, 1))
    y_train, train_state = apply(params, state, x, train=True)
    y_eval, eval_state = apply(params, state, x, train=False)
    old, new = state["stem_bn"], train_state["stem_bn"]
    assert not np.allclose(old["mean"], new["mean"]) and not np.allclose(old["var"], new["var"])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eval_state)):
        np.testing.assert_array_equal(a, b)
    # Train mode normalizes with batch statistics, eval mode with the running ones.
    assert not np.allclose(y_train, y_eval)


def test_dropout_key_controls_the_masks():
    model = M.WideResNet(10, depth=10, widen_factor=1, dropout_rate=0.5, rngs=_rngs())
    graphdef, params, state = M.split_model(model)
    apply = jax.jit(M.make_apply(graphdef), static_argnames="train")
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    k10, k11 = _rbg(10), _rbg(11)
    a, s1 = apply(params, state, x, train=True, dropout_key=k10)
    b, _ = apply(params, state, x, train=True, dropout_key=k10)
    c, _ = apply(params, state, x, train=True, dropout_key=k11)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # The stream state comes back advanced: a pure function of (params, state, x, key).
    assert not all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(s1), jax.tree.leaves(state)))
    # Eval mode: no dropout, the key is irrelevant.
    g, _ = apply(params, state, x, train=False, dropout_key=k10)
    h, _ = apply(params, state, x, train=False, dropout_key=k11)
    np.testing.assert_array_equal(g, h)


def test_loss_fn_is_differentiable(cnn):
    _, graphdef, params, state, apply = cnn
    batch = {"image": jax.random.normal(jax.random.key(4), (4, 8, 8, 1)), "label": jnp.arange(4)}
    loss_fn = M.make_loss_fn(graphdef)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, new_state), grads = grad_fn(params, batch, state)
    logits, expected_state = apply(params, state, batch["image"], train=True)
    expected = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), batch["label"]])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(expected_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: M.create("resnet999", 10), "name must be one of"),
        (lambda: M.create("resnet18", 0), "num_classes"),
        (lambda: M.create("resnet18", 10, stem="tiny"), "stem must be one of"),
        (lambda: M.create("vgg16_bn", 10, classifier="mlp3"), "classifier must be one of"),
        (lambda: M.WideResNet(10, depth=27, rngs=nnx.Rngs(0)), "depth must be 6n\\+4"),
        (lambda: M.PyramidNet(10, depth=100, rngs=nnx.Rngs(0)), "depth must be 6n\\+2"),
        (lambda: M.create("vit_s_cifar", 10, patch_size=5), "patch_size must divide"),
        (lambda: M.create("small_cnn", 10, depth=9), "depth must be 6n\\+2"),
    ],
)
def test_bad_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_train_flag_must_be_bool():
    graphdef, params, state = M.split_model(M.create("mlp", 10))
    with pytest.raises(ValueError, match="train must be a Python bool"):
        M.make_apply(graphdef)(params, state, jnp.zeros((1, 64)), train=1)


def test_available_lists_every_model():
    names = M.available()
    assert {"resnet18", "resnet50", "wrn28_10", "vgg16_bn", "vit_s_cifar", "vit_s32",
            "pyramidnet110", "mlp", "small_cnn", "resnet20"} <= set(names)
    assert all(isinstance(v, str) and v for v in names.values())
