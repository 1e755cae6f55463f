"""`vit`: a Vision Transformer (Dosovitskiy et al. 2021), on 1-D and 2-D inputs.

    patches of `patch_size` (MNIST-1D: a 1-D sequence of length/patch_size
    patches; Fashion-MNIST: (h/p)·(w/p) patches of p×p pixels), a linear
    embedding to `width`, a learned class token and learned position
    embeddings, `depth` pre-LayerNorm blocks

        x = x + MHA(LN(x));   x = x + MLP(LN(x)),   MLP = Dense(4·width) → GELU → Dense(width)

    with HEADS attention heads, a final LayerNorm, and a linear readout of the
    class token (pool="cls") or of the mean over tokens (pool="mean").

No dropout (the full-batch loss must be deterministic) and no BatchNorm: every
example's output depends on that example alone, so chunks do not matter.
The MLP's activation is GELU whatever --activation says.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

HEADS = 4
MAX_DEPTH = 24
MAX_WIDTH = 1024
POOLS = ("cls", "mean")


def patch_problem(input_shape: Sequence[int], patch_size: int) -> str:
    """Why `patch_size` does not tile inputs of `input_shape`, or "" when it does."""
    spatial = tuple(input_shape[:2]) if len(input_shape) >= 2 else tuple(input_shape)
    if patch_size < 1 or any(d % patch_size for d in spatial):
        return (f"the patch size must divide the input's {' and '.join(map(str, spatial))} "
                f"(inputs of shape {tuple(input_shape)}); divisors: "
                f"{[p for p in range(1, min(spatial) + 1) if all(d % p == 0 for d in spatial)]}")
    return ""


def patchify(x, patch_size: int):
    """(n, L) → (n, L/p, p);  (n, h, w[, c]) → (n, (h/p)(w/p), p·p·c)."""
    n, p = x.shape[0], patch_size
    if x.ndim == 2:
        return x.reshape(n, x.shape[1] // p, p)
    if x.ndim == 3:
        x = x[..., None]
    h, w, c = x.shape[1:]
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


class EncoderBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=self.width)(h, h)
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))
        return x + h


class ViT(nn.Module):
    """`depth` pre-LN Transformer blocks of `width` on patches of `patch_size`."""
    width: int
    depth: int
    num_classes: int
    activation: str = "gelu"     # the MLP's is GELU; kept for the registry's signature
    patch_size: int = 4
    pool: str = "cls"

    @nn.compact
    def __call__(self, x):
        tokens = nn.Dense(self.width, name="embed")(patchify(x, self.patch_size))
        n, t, _ = tokens.shape
        init = nn.initializers.normal(0.02)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
            tokens = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)).astype(
                tokens.dtype), tokens], axis=1)
        tokens = tokens + self.param("pos", init, (1, tokens.shape[1], self.width))
        for _ in range(self.depth):
            tokens = EncoderBlock(self.width)(tokens)
        tokens = nn.LayerNorm()(tokens)
        pooled = tokens[:, 0] if self.pool == "cls" else jnp.mean(tokens, axis=1)
        return nn.Dense(self.num_classes, name="head")(pooled)


def make_vit(input_shape: Sequence[int], num_classes: int, width: int = 64, depth: int = 2,
             patch_size: int = 4, pool: str = "cls") -> ViT:
    """The built-in ViT as a plug-in factory."""
    del input_shape
    return ViT(width=width, depth=depth, num_classes=num_classes, patch_size=patch_size,
               pool=pool)
