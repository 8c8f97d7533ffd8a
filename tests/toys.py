"""Toy modules for the contract tests: each kind of layer the core must handle."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    @staticmethod
    def inputs(g):
        return (torch.randn(5, 6, generator=g),)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.out = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)).flatten(1))

    @staticmethod
    def inputs(g):
        return (torch.randn(3, 2, 5, 5, generator=g),)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        # no in_proj bias: the key bias has a zero gradient in exact arithmetic, float noise in
        # practice, which Adam amplifies; comparing optimizers on it would compare noise
        self.attn = nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.out(h)

    @staticmethod
    def inputs(g):
        return (torch.randn(2, 4, 8, generator=g),)


class Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(11, 6), nn.Linear(6, 2)

    def forward(self, idx):
        return self.out(self.emb(idx))

    @staticmethod
    def inputs(g):
        return (torch.randint(11, (7,), generator=g),)


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.out = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.ln(self.fc(x)))

    @staticmethod
    def inputs(g):
        return (torch.randn(4, 5, generator=g),)


class Tied(nn.Module):
    """Input embedding and output projection share one weight (as in GPT-2)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.hidden = nn.Linear(6, 6)
        self.proj = nn.Linear(6, 9, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, idx):
        return self.proj(torch.tanh(self.hidden(self.emb(idx))))

    @staticmethod
    def inputs(g):
        return (torch.randint(9, (6,), generator=g),)


class Heads(nn.Module):
    """Attention written out with a fused qkv projection and declared heads, then an MLP."""

    def __init__(self):
        super().__init__()
        self.n_head, self.head_dim = 2, 4
        # no qkv bias: the key bias has a zero gradient up to float noise (see Attention)
        self.qkv, self.proj = nn.Linear(8, 24, bias=False), nn.Linear(8, 8)
        self.fc, self.out = nn.Linear(8, 12), nn.Linear(12, 2)

    def attention_heads(self):
        from maskmtl.structures import AttentionHeads

        return [AttentionHeads("", self.n_head, self.head_dim, split=(("qkv", 3),), merge=("proj",))]

    def forward(self, x):
        b, n, _ = x.shape
        nh, hs = self.n_head, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, L, hs) each
        y = ((q @ k.transpose(-2, -1)) / hs**0.5).softmax(-1) @ v  # (B, nh, L, hs)
        h = x + self.proj(y.transpose(1, 2).reshape(b, n, nh * hs))
        return self.out(torch.relu(self.fc(h)))

    @staticmethod
    def inputs(g):
        return (torch.randn(2, 3, 8, generator=g),)


TOYS = {"mlp": MLP, "conv": Conv, "attention": Attention, "embedding": Embedding, "layernorm": Norm, "tied": Tied, "heads": Heads}
# Every parameter with at least 2 entries is a target (1-D LayerNorm weights included).
INCLUDE = r".*"


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TOYS[kind]()


def loss_fn(forward, task, batch):
    """A task-dependent regression loss: each task pulls outputs towards its own target value."""
    out = forward(*batch)
    return (out.float() - (task + 1.0)).square().mean()
