"""Vision Transformers (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words:
Transformers for Image Recognition at Scale", ICLR).

Pre-norm encoder: patch embedding (a conv with kernel = stride = patch), a learned
class token and position embedding, ``depth`` blocks of
LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP(GELU) -> residual,
a final LayerNorm and a linear head on the class token.

Two configurations:

* ``vit_s_cifar`` - the "ViT-S" of the m-ARWP paper (Li et al., 2024, App. E: 32x32
  input, patch 4, 8 heads, dropout 0.1). Its code builds the ``vit-pytorch`` ViT with
  dim 512, depth 6, 8 heads of 64, MLP 512, dropout 0.1, embedding dropout 0.1 and a
  bias-free qkv projection: 9,523,722 parameters for 10 classes.
* ``vit_s32`` - ViT-S/32 for 224x224 ImageNet (dim 384, depth 12, 6 heads, MLP 1536,
  qkv bias, dropout 0.1): 22,878,952 parameters for 1000 classes (timm's
  ``vit_small_patch32_224``).

Parameter layout: the position embedding is ``(1, tokens, dim)`` and the class token
``(1, 1, dim)`` (PyTorch's layout); linear kernels are ``(in, out)``. Note for
filter-wise perturbations: with flatjax's last-axis filter convention these two
embeddings split into ``dim`` filters, while the PyTorch RWP code treats a tensor
with a leading axis of size 1 as one single filter.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_xavier = nnx.initializers.xavier_uniform()
_embed_init = nnx.initializers.normal(0.02)


def _dense(d_in: int, d_out: int, *, use_bias: bool, rngs: nnx.Rngs, dtype: Any) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=_xavier, dtype=dtype, rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        dropout_rate: float,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the layer.

        Args:
          dim: token width.
          num_heads: attention heads.
          head_dim: width of each head (``num_heads * head_dim`` need not equal ``dim``).
          qkv_bias: add a bias to the qkv projection.
          dropout_rate: dropout on the attention weights and on the output.
          rngs: NNX random streams.
          dtype: computation dtype.
        """
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.qkv = _dense(dim, 3 * inner, use_bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.attn_drop = nnx.Dropout(dropout_rate, rngs=rngs)
        self.out = _dense(inner, dim, use_bias=True, rngs=rngs, dtype=dtype)
        self.out_drop = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps tokens ``(N, T, dim)`` to ``(N, T, dim)``."""
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / jnp.sqrt(self.head_dim).astype(q.dtype)
        weights = self.attn_drop(jax.nn.softmax(logits, axis=-1))
        y = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, t, -1)
        return self.out_drop(self.out(y))


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        mlp_dim: int,
        *,
        qkv_bias: bool,
        dropout_rate: float,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the block.

        Args:
          dim: token width.
          num_heads: attention heads.
          head_dim: width of each head.
          mlp_dim: hidden width of the MLP.
          qkv_bias: add a bias to the qkv projection.
          dropout_rate: dropout in attention and after each MLP layer.
          rngs: NNX random streams.
          dtype: computation dtype.
        """
        self.ln1 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(
            dim, num_heads, head_dim, qkv_bias=qkv_bias, dropout_rate=dropout_rate, rngs=rngs, dtype=dtype
        )
        self.ln2 = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.fc1 = _dense(dim, mlp_dim, use_bias=True, rngs=rngs, dtype=dtype)
        self.drop1 = nnx.Dropout(dropout_rate, rngs=rngs)
        self.fc2 = _dense(mlp_dim, dim, use_bias=True, rngs=rngs, dtype=dtype)
        self.drop2 = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps tokens ``(N, T, dim)`` to ``(N, T, dim)``."""
        x = x + self.attn(self.ln1(x))
        y = self.drop1(nnx.gelu(self.fc1(self.ln2(x)), approximate=False))
        return x + self.drop2(self.fc2(y))


class ViT(nnx.Module):
    """A Vision Transformer classifier (Dosovitskiy et al., 2021)."""

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 512,
        depth: int = 6,
        num_heads: int = 8,
        head_dim: int | None = None,
        mlp_dim: int = 512,
        qkv_bias: bool = False,
        dropout_rate: float = 0.1,
        emb_dropout_rate: float = 0.1,
        in_channels: int = 3,
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        """Builds the network.

        Args:
          num_classes: number of output logits.
          image_size: input height and width (square images).
          patch_size: side of the square patches; must divide ``image_size``.
          dim: token width.
          depth: number of encoder blocks.
          num_heads: attention heads per block.
          head_dim: width per head; defaults to ``dim // num_heads``.
          mlp_dim: hidden width of each MLP.
          qkv_bias: add a bias to the qkv projections.
          dropout_rate: dropout in attention and MLPs.
          emb_dropout_rate: dropout on the embedded tokens.
          in_channels: input image channels.
          rngs: NNX random streams.
          dtype: computation dtype.

        Raises:
          ValueError: if ``patch_size`` does not divide ``image_size``, ``dim`` is not
            divisible by ``num_heads`` (without an explicit ``head_dim``), or a rate is
            outside [0, 1).
        """
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size must divide image_size={image_size}, got {patch_size}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"num_heads must divide dim={dim}, got {num_heads}")
            head_dim = dim // num_heads
        for name, rate in (("dropout_rate", dropout_rate), ("emb_dropout_rate", emb_dropout_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.image_size = image_size
        self.patch_size = patch_size
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch_embed = nnx.Conv(
            in_channels,
            dim,
            kernel_size=(patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            kernel_init=_xavier,
            dtype=dtype,
            rngs=rngs,
        )
        key = rngs.params()
        k_cls, k_pos = jax.random.split(key)
        self.cls_token = nnx.Param(_embed_init(k_cls, (1, 1, dim), jnp.float32))
        self.pos_embedding = nnx.Param(_embed_init(k_pos, (1, tokens, dim), jnp.float32))
        self.emb_drop = nnx.Dropout(emb_dropout_rate, rngs=rngs)
        self.blocks = nnx.List(
            [
                EncoderBlock(
                    dim,
                    num_heads,
                    head_dim,
                    mlp_dim,
                    qkv_bias=qkv_bias,
                    dropout_rate=dropout_rate,
                    rngs=rngs,
                    dtype=dtype,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, kernel_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps NHWC images ``(N, image_size, image_size, C)`` to logits ``(N, num_classes)``."""
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got shape {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(x.dtype)
        x = self.emb_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def vit_s_cifar(num_classes: int, *, rngs: nnx.Rngs, **kw: Any) -> ViT:
    """ViT-S for CIFAR as in the m-ARWP code: 32x32, patch 4, dim 512, depth 6, 8 heads, MLP 512."""
    cfg = dict(image_size=32, patch_size=4, dim=512, depth=6, num_heads=8, head_dim=64, mlp_dim=512,
               qkv_bias=False, dropout_rate=0.1, emb_dropout_rate=0.1)
    cfg.update(kw)
    return ViT(num_classes, rngs=rngs, **cfg)


def vit_s32(num_classes: int, *, rngs: nnx.Rngs, **kw: Any) -> ViT:
    """ViT-S/32 for ImageNet: 224x224, patch 32, dim 384, depth 12, 6 heads, MLP 1536."""
    cfg = dict(image_size=224, patch_size=32, dim=384, depth=12, num_heads=6, mlp_dim=1536,
               qkv_bias=True, dropout_rate=0.1, emb_dropout_rate=0.1)
    cfg.update(kw)
    return ViT(num_classes, rngs=rngs, **cfg)
