"""Cross-task multi-embedding attention, one direction (the paper's eqs. 9-14; design 3.11).

For a target T and a reference R (both B x C x h x w), H embeddings of width C' = int(r * C):

    q = phi_q(R), k = phi_k(T), v = phi_v(T)          (1x1 convs C -> H * C', head-major)
    A^h(i) = <k^h(i), q^h(i)> / sqrt(d)               (d = C' "paper", H * C' "reference")
    rho = softmax over h (H > 1), identity (H = 1)
    F'(i) = sum_h rho(A^h(i)) v^h(i)
    out = fuse([T, BN(W F')])                         (ConvBlock 2C -> C, then 1x1 C -> C)

The attention is per pixel and across embeddings (not across positions), so it is cheap at
every resolution.

`forward` evaluates the same function with fewer operations (`projected_attention`): the
score of embedding h is a bilinear form of T and R, t^T (W_k^h^T W_q^h) r + linear terms, and
W F' = sum_h rho_h (W W_v^h t + W b_v^h); multiplying the small weight matrices first replaces
the three H * C'-channel maps q, k, v (24 C^2 multiply-adds per pixel with H = 4, r = 2, plus
2 C^2 for W) by two H * C-channel maps (8 C^2), in time and in memory kept for backward.
The weight products are two batched matrix products of the weights with their biases appended
as a column (`folded_weights`), which carry every linear and constant term along (figures in
docs/design.md, "Channels-last"). `attention` is the literal formulation (tests compare both).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsre_lightning.models.layers import ConvBlock, is_channels_last
from fsre_lightning.models.network_config import ATTENTION_SCALES


class _Layout:
    """Where the channels of B x C x h x w features lie in memory, and views that put them on
    the axis the per-pixel attention works along.

    For NCHW features that is axis 1 of the features themselves (per head: B x H x C x h x w);
    for channels_last features, the last axis of their NHWC view (B x h x w x H x C). Either
    way the views are free, the softmax runs over a dense axis, and the result comes back in
    the features' own memory format (docs/design.md, "Channels-last"): a channels_last
    network stays NHWC through CMA.
    """

    def __init__(self, features: torch.Tensor) -> None:
        self.nhwc = is_channels_last(features)
        self.axis = 3 if self.nhwc else 1

    def view(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1) if self.nhwc else x

    def split(self, x: torch.Tensor, sizes: tuple[int, int]) -> torch.Tensor:
        """The channels of `x` split into (heads, width), in this layout."""
        return self.view(x).unflatten(self.axis, sizes)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.nhwc else x


class CrossTaskAttention(nn.Module):
    """Refine `target` features with attention weights computed against `reference` features.

    Args:
        channels: C, channels of both inputs.
        num_heads: H, number of embeddings.
        ratio: r, embedding width C' = int(r * C).
        scale: "paper" divides the scores by sqrt(C') (eq. 13); "reference" by sqrt(H * C')
            as the published code does.
    """

    # Recompute q, k, v and the attention in backward instead of keeping them (3 tensors of
    # 2 * H times the features' size). The BatchNorm of `project` stays outside the recomputed
    # part, so its running statistics are updated once per step as without recomputation.
    recompute: bool = False
    # False: the literal q, k, v formulation (`attention`), kept for comparison.
    fused_weights: bool = True

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
        layout = _Layout(target)
        split = (self.num_heads, self.embed_channels)
        q = layout.split(self.query(reference), split)
        k = layout.split(self.key(target), split)
        v = layout.split(self.value(target), split)
        scores = (q * k).sum(dim=layout.axis + 1) / self.temperature  # per pixel and head
        return layout.restore(self._mix(scores, v, layout))

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """1x1 convolution weights and biases (r_weight, r_bias, t_weight, t_bias) of
        `projected_attention`: on R, the H bilinear maps and the linear score terms; on T, the
        projected values of the H embeddings."""
        heads, embed, c = self.num_heads, self.embed_channels, self.channels

        def with_bias(conv: nn.Conv2d) -> torch.Tensor:  # H x C' x (C + 1): [W^h | b^h]
            return torch.cat([conv.weight.view(heads, embed, c), conv.bias.view(heads, embed, 1)],
                             dim=2)

        q, k, v = with_bias(self.query), with_bias(self.key), with_bias(self.value)
        # <W_k t + b_k, W_q r + b_q> = t . (W_k^T W_q r + W_k^T b_q) + (W_q^T b_k) . r + b_k . b_q:
        # all four are blocks of [W_k | b_k]^T [W_q | b_q], one batched product over the heads.
        kq = k.transpose(1, 2) @ q  # H x (C + 1) x (C + 1)
        r_weight = torch.cat([kq[:, :c, :c].reshape(heads * c, c), kq[:, c, :c]])
        r_bias = torch.cat([kq[:, :c, c].reshape(-1), kq[:, c, c]])
        # W (sum_h rho_h (W_v^h t + b_v^h)) = sum_h rho_h ((W W_v^h) t + W b_v^h), and
        # W [W_v^h | b_v^h] = [W W_v^h | W b_v^h].
        pv = self.project[0].weight.view(1, c, embed) @ v  # H x C x (C + 1)
        # Dense copies: a strided weight would be copied by the convolution at every call (and
        # is neither NCHW nor NHWC, docs/design.md "Channels-last").
        t_weight = pv[..., :c].reshape(heads * c, c).contiguous()
        return r_weight, r_bias, t_weight, pv[..., c].reshape(-1).contiguous()

    def projected_attention(self, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """W F' (B x C x h x w, before BatchNorm), equal to `project[0](attention(T, R))`."""
        heads, c = self.num_heads, self.channels
        r_weight, r_bias, t_weight, t_bias = self.folded_weights()
        layout = _Layout(target)
        on_reference = layout.view(F.conv2d(reference, r_weight[..., None, None], r_bias))
        values = layout.split(F.conv2d(target, t_weight[..., None, None], t_bias), (heads, c))
        axis = layout.axis
        per_head = on_reference.narrow(axis, 0, heads * c).unflatten(axis, (heads, c))
        scores = (layout.view(target).unsqueeze(axis) * per_head).sum(dim=axis + 1)
        scores = (scores + on_reference.narrow(axis, heads * c, heads)) / self.temperature
        return layout.restore(self._mix(scores, values, layout))

    def _mix(self, scores: torch.Tensor, values: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """sum_h rho(scores_h) values_h, in `layout` (heads on `layout.axis`)."""
        weights = scores.softmax(dim=layout.axis) if self.num_heads > 1 else scores
        return (weights.unsqueeze(layout.axis + 1) * values).sum(dim=layout.axis)

    def _projected(self, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.fused_weights:
            return self.projected_attention(target, reference)
        return self.project[0](self.attention(target, reference))

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
        if self.recompute and torch.is_grad_enabled():
            projected = checkpoint(self._projected, target, reference, use_reentrant=False)
        else:
            projected = self._projected(target, reference)
        fused = self.project[1](projected)  # BatchNorm, outside any recomputation
        return self.fuse(torch.cat([target, fused], dim=1))
