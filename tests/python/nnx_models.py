"""The fixture models of `tests/fixtures/frameworks/make_frameworks.py` in Flax NNX.

`nnx.List` keeps list indices as their own state path entries (`mlp`, 0, `kernel`), with
placeholders where torch's Sequential holds a parameterless layer, so indices line up.
"""

import functools

from flax import nnx

gelu = functools.partial(nnx.gelu, approximate=False)


def identity(x):
    return x


class VitBlock(nnx.Module):
    def __init__(self, rngs, dim=32, heads=4, mlp_dim=128):
        self.ln_1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
        self.self_attention = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
        self.mlp = nnx.List(
            [nnx.Linear(dim, mlp_dim, rngs=rngs), gelu, identity, nnx.Linear(mlp_dim, dim, rngs=rngs), identity]
        )

    def __call__(self, x):
        h = self.ln_1(x)
        x = x + self.self_attention(h)
        h = self.ln_2(x)
        for layer in self.mlp:
            h = layer(h)
        return x + h


class EncoderLayer(nnx.Module):
    def __init__(self, rngs, dim, heads, ff):
        self.self_attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.linear1 = nnx.Linear(dim, ff, rngs=rngs)
        self.linear2 = nnx.Linear(ff, dim, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs)

    def __call__(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(gelu(self.linear1(x))))


class TransformerEncoder(nnx.Module):
    def __init__(self, rngs, dim=32, heads=4, ff=64, num_layers=2):
        self.layers = nnx.List([EncoderLayer(rngs, dim, heads, ff) for _ in range(num_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def torch_transpose_padding(kernel, padding, output_padding):
    """PyTorch ConvTranspose padding as Flax's per side: (k-1-p, k-1-p+output_padding)."""
    return [(k - 1 - p, k - 1 - p + op) for k, p, op in zip(kernel, padding, output_padding)]


class ConvTransposeDecoder(nnx.Module):
    """Takes and returns NHWC."""

    def __init__(self, rngs):
        self.deconv1 = nnx.ConvTranspose(
            8,
            6,
            (3, 2),
            strides=(2, 2),
            padding=torch_transpose_padding((3, 2), (1, 1), (1, 1)),
            transpose_kernel=True,
            rngs=rngs,
        )
        self.bn1 = nnx.BatchNorm(6, use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.up2 = nnx.ConvTranspose(
            6,
            4,
            (3, 3),
            strides=(1, 1),
            padding=torch_transpose_padding((3, 3), (0, 0), (0, 0)),
            transpose_kernel=True,
            rngs=rngs,
        )
        self.conv_out = nnx.Conv(4, 3, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.deconv1(x)))
        x = nnx.relu(self.up2(x))
        return self.conv_out(x)


MODELS = {
    "vit_block": VitBlock,
    "transformer_encoder": TransformerEncoder,
    "convtranspose_decoder": ConvTransposeDecoder,
}


def build(name):
    return MODELS[name](nnx.Rngs(0))
