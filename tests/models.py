"""Small models used across the tests (built here: nothing is downloaded)."""

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalNet(nn.Module):
    """Weights reached only through functional calls, plus a positional embedding that is no weight."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(64, 32) * 0.1)
        self.b1 = nn.Parameter(torch.zeros(64))
        self.w2 = nn.Parameter(torch.randn(32, 64) * 0.1)  # used as x @ w2.t()
        self.pos = nn.Parameter(torch.randn(4, 32) * 0.1)  # added, never multiplied

    def forward(self, x):
        x = x + self.pos
        return F.relu(F.linear(x, self.w1, self.b1)) @ self.w2.t()


class StdConv2d(nn.Conv2d):
    """A custom Conv2d subclass that standardizes its weight (as timm's StdConv2d does)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class TiedLM(nn.Module):
    """An embedding whose matrix is also the output projection (tied weights)."""

    def __init__(self, vocab=300, dim=48):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 40)
        self.b = nn.Linear(40, 40)

    def forward(self, x):
        if x.sum() > 0:
            return self.b(self.a(x))
        return self.a(x)


def tiny_bert():
    """A Hugging Face BERT with random weights and a masked-LM head tied to the embeddings."""
    transformers = __import__("pytest").importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(config).eval()


class LayerZoo(nn.Module):
    """One of each weight-bearing layer kind, plus an einsum weight and an LSTM."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(100, 16)
        self.conv1 = nn.Conv1d(1, 8, 5)
        self.up = nn.ConvTranspose2d(8, 4, 3)
        self.conv3 = nn.Conv3d(1, 4, 3)
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.mix = nn.Parameter(torch.randn(24, 10) * 0.1)
        self.bilinear = nn.Bilinear(10, 10, 6)

    def forward(self, tokens, offsets, signal, image, volume):
        a = self.bag(tokens, offsets)
        b = self.conv1(signal).mean()
        c = self.up(image).mean()
        d = self.conv3(volume).mean()
        seq, _ = self.rnn(a.unsqueeze(1).repeat(1, 3, 1))
        e = torch.einsum("bti,io->bo", seq, self.mix)
        return self.bilinear(e, e) + b + c + d

    @staticmethod
    def inputs():
        return (
            torch.randint(0, 100, (12,)), torch.tensor([0, 4, 8]), torch.randn(3, 1, 20),
            torch.randn(3, 8, 5, 5), torch.randn(3, 1, 6, 6, 6),
        )
