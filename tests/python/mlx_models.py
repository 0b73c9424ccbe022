"""The fixture models of `tests/fixtures/frameworks/make_frameworks.py` in MLX.

A plain Python list of modules gives `mlp.0.weight`-style paths, as torch's Sequential.
"""

import mlx.nn as nn


class VitBlock(nn.Module):
    def __init__(self, dim=32, heads=4, mlp_dim=128):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiHeadAttention(dim, heads, bias=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        # nn.GELU() is the exact erf form, as torch's.
        self.mlp = [nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim), nn.Dropout(0.0)]

    def __call__(self, x):
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h)
        h = self.ln_2(x)
        for layer in self.mlp:
            h = layer(h)
        return x + h


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads, ff):
        super().__init__()
        self.self_attn = nn.MultiHeadAttention(dim, heads, bias=True)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def __call__(self, x):
        x = self.norm1(x + self.self_attn(x, x, x))
        return self.norm2(x + self.linear2(nn.gelu(self.linear1(x))))


class TransformerEncoder(nn.Module):
    def __init__(self, dim=32, heads=4, ff=64, num_layers=2):
        super().__init__()
        self.layers = [EncoderLayer(dim, heads, ff) for _ in range(num_layers)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class ConvTransposeDecoder(nn.Module):
    """Takes and returns NHWC. MLX's ConvTranspose takes torch's padding/output_padding."""

    def __init__(self):
        super().__init__()
        self.deconv1 = nn.ConvTranspose2d(8, 6, (3, 2), stride=2, padding=1, output_padding=1)
        self.bn1 = nn.BatchNorm(6, eps=1e-5)
        self.up2 = nn.ConvTranspose2d(6, 4, 3, stride=1)
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

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
    model = MODELS[name]()
    model.eval()  # BatchNorm from its running statistics
    return model
