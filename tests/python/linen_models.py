"""The fixture models of `tests/fixtures/frameworks/make_frameworks.py` in Flax linen.

Submodules get the names Flax gives them on its own wherever it can (a list assigned in
`setup` names its modules `<attr>_<index>`), so the tests check relayout's names against
Flax's, not against names written here to fit.
"""

import functools

from flax import linen as nn

# torch's nn.GELU() and activation="gelu" are the exact erf form; Flax defaults to tanh.
gelu = functools.partial(nn.gelu, approximate=False)


def identity(x):
    return x


class VitBlock(nn.Module):
    """torchvision's ViT EncoderBlock: pre-norm, LayerNorm eps 1e-6 (Flax's default)."""

    heads: int = 4
    dim: int = 32
    mlp_dim: int = 128

    def setup(self):
        self.ln_1 = nn.LayerNorm(epsilon=1e-6)
        self.self_attention = nn.MultiHeadDotProductAttention(num_heads=self.heads)
        self.ln_2 = nn.LayerNorm(epsilon=1e-6)
        # torch's Sequential(Linear, GELU, Dropout, Linear, Dropout): Dense at 0 and 3.
        self.mlp = [nn.Dense(self.mlp_dim), gelu, identity, nn.Dense(self.dim), identity]

    def __call__(self, x):
        h = self.ln_1(x)
        x = x + self.self_attention(h)
        h = self.ln_2(x)
        for layer in self.mlp:
            h = layer(h)
        return x + h


class EncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer(norm_first=False, activation="gelu"): post-norm, eps 1e-5."""

    heads: int
    dim: int
    ff: int

    def setup(self):
        self.self_attn = nn.MultiHeadDotProductAttention(num_heads=self.heads)
        self.linear1 = nn.Dense(self.ff)
        self.linear2 = nn.Dense(self.dim)
        self.norm1 = nn.LayerNorm(epsilon=1e-5)
        self.norm2 = nn.LayerNorm(epsilon=1e-5)

    def __call__(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(gelu(self.linear1(x))))


class TransformerEncoder(nn.Module):
    heads: int = 4
    dim: int = 32
    ff: int = 64
    num_layers: int = 2

    def setup(self):
        self.layers = [EncoderLayer(self.heads, self.dim, self.ff) for _ in range(self.num_layers)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def torch_transpose_padding(kernel, padding, output_padding):
    """PyTorch ConvTranspose `padding`/`output_padding` as Flax's explicit per-side padding
    (for `transpose_kernel=True`): (k - 1 - p, k - 1 - p + output_padding) on each axis."""
    return [(k - 1 - p, k - 1 - p + op) for k, p, op in zip(kernel, padding, output_padding)]


class ConvTransposeDecoder(nn.Module):
    """Takes and returns NHWC (torch's NCHW transposed)."""

    def setup(self):
        self.deconv1 = nn.ConvTranspose(
            6, (3, 2), strides=(2, 2), padding=torch_transpose_padding((3, 2), (1, 1), (1, 1)), transpose_kernel=True
        )
        self.bn1 = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
        self.up2 = nn.ConvTranspose(
            4, (3, 3), strides=(1, 1), padding=torch_transpose_padding((3, 3), (0, 0), (0, 0)), transpose_kernel=True
        )
        self.conv_out = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)))

    def __call__(self, x):
        x = nn.relu(self.bn1(self.deconv1(x)))
        x = nn.relu(self.up2(x))
        return self.conv_out(x)


MODELS = {
    "vit_block": VitBlock,
    "transformer_encoder": TransformerEncoder,
    "convtranspose_decoder": ConvTransposeDecoder,
}


def build(name):
    return MODELS[name]()
