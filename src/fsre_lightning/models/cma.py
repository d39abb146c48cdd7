"""Cross-task multi-embedding attention, one direction (SPEC section 3, paper eqs. 9-14).

For a target T and a reference R (both B x C x h x w), H embeddings of width C' = int(r * C):

    q = phi_q(R), k = phi_k(T), v = phi_v(T)          (1x1 convs C -> H * C', head-major)
    A^h(i) = <k^h(i), q^h(i)> / sqrt(d)               (d = C' "paper", H * C' "reference")
    rho = softmax over h (H > 1), identity (H = 1)
    F'(i) = sum_h rho(A^h(i)) v^h(i)
    out = fuse([T, BN(W F')])                         (ConvBlock 2C -> C, then 1x1 C -> C)

The attention is per pixel and across embeddings (not across positions), so it is cheap at
every resolution.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fsre_lightning.models.layers import ConvBlock

ATTENTION_SCALES = ("paper", "reference")


class CrossTaskAttention(nn.Module):
    """Refine `target` features with attention weights computed against `reference` features.

    Args:
        channels: C, channels of both inputs.
        num_heads: H, number of embeddings.
        ratio: r, embedding width C' = int(r * C).
        scale: "paper" divides the scores by sqrt(C') (eq. 13); "reference" by sqrt(H * C')
            as the published code does.
    """

    def __init__(
        self, channels: int, num_heads: int = 4, ratio: float = 2.0, scale: str = "paper"
    ) -> None:
        super().__init__()
        if int(channels) < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if int(num_heads) != num_heads or num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {num_heads}")
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        if scale not in ATTENTION_SCALES:
            raise ValueError(f"scale must be one of {ATTENTION_SCALES}, got {scale!r}")
        embed = int(ratio * channels)
        if embed < 1:
            raise ValueError(f"ratio={ratio} gives an empty embedding for {channels} channels")
        self.channels = int(channels)
        self.num_heads = int(num_heads)
        self.embed_channels = embed
        self.scale = scale
        self.temperature = math.sqrt(embed if scale == "paper" else self.num_heads * embed)
        inner = self.num_heads * embed
        self.query = nn.Conv2d(self.channels, inner, kernel_size=1, bias=True)
        self.key = nn.Conv2d(self.channels, inner, kernel_size=1, bias=True)
        self.value = nn.Conv2d(self.channels, inner, kernel_size=1, bias=True)
        self.project = nn.Sequential(
            nn.Conv2d(embed, self.channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(self.channels),
        )
        self.fuse = nn.Sequential(
            ConvBlock(2 * self.channels, self.channels),
            nn.Conv2d(self.channels, self.channels, kernel_size=1, bias=True),
        )

    def attention(self, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """F' (B x C' x h x w): the embeddings' values mixed by the per-pixel weights rho."""
        b, _, h, w = target.shape
        shape = (b, self.num_heads, self.embed_channels, h, w)
        q = self.query(reference).view(shape)
        k = self.key(target).view(shape)
        v = self.value(target).view(shape)
        scores = (q * k).sum(dim=2) / self.temperature  # B x H x h x w
        weights = scores.softmax(dim=1) if self.num_heads > 1 else scores
        return (weights.unsqueeze(2) * v).sum(dim=1)

    def forward(self, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Fused target features, same shape as `target`."""
        if target.shape != reference.shape:
            raise ValueError(
                f"target {tuple(target.shape)} and reference {tuple(reference.shape)} differ"
            )
        if target.dim() != 4 or target.shape[1] != self.channels:
            raise ValueError(
                f"expected B x {self.channels} x h x w features, got {tuple(target.shape)}"
            )
        fused = self.project(self.attention(target, reference))
        return self.fuse(torch.cat([target, fused], dim=1))
