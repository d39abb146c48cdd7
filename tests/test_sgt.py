"""Semantics-guided triplet loss against a slow, loop-over-anchors implementation (design 3.10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsre_lightning.losses import sgt as sgt_module
from fsre_lightning.losses import sgt_loss


def _slow_sgt(
    features: torch.Tensor,
    labels: torch.Tensor,
    kernel_size: int = 5,
    margin: float = 0.3,
    threshold: int | None = None,
    border: str = "reference",
) -> torch.Tensor:
    """The definition (design 3.10), one anchor and one patch pixel at a time."""
    t = kernel_size - 1 if threshold is None else threshold
    p = kernel_size // 2
    b, _, h, w = features.shape
    fh = F.normalize(features, dim=1)
    terms = []
    for n in range(b):
        for y in range(h):
            for x in range(w):
                anchor = int(labels[n, y, x])
                if anchor == 255:
                    continue  # a void anchor makes no patch
                pos, neg = [], []
                for yy in range(y - p, y + p + 1):
                    for xx in range(x - p, x + p + 1):
                        if not (0 <= yy < h and 0 <= xx < w):
                            if border == "reference":  # a negative at distance sqrt(2)
                                neg.append(torch.sqrt(features.new_tensor(2.0)))
                            continue  # exclude: neither positive nor negative
                        other = int(labels[n, yy, xx])
                        if other == 255:
                            continue  # void: neither
                        cos = (fh[n, :, y, x] * fh[n, :, yy, xx]).sum()
                        dist = torch.sqrt(torch.clamp(2 - 2 * cos, min=1e-9))
                        (pos if other == anchor else neg).append(dist)
                if len(pos) >= t and len(neg) >= t:
                    d_pos = torch.stack(pos).mean()
                    d_neg = torch.stack(neg).mean()
                    terms.append(torch.relu(d_pos - d_neg + margin))
    if not terms:
        return features.sum() * 0
    return torch.stack(terms).mean()


def _value(t: torch.Tensor) -> float:
    return t.detach().item()


def _case(
    seed: int, b: int = 2, c: int = 4, h: int = 7, w: int = 9, classes: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (b, h, w), generator=gen)
    labels[0, 0, 0] = 255  # void anchor in a corner
    if b > 1 and h >= 5 and w >= 5:
        labels[1, 3, 4] = 255  # void anchor in the middle
        labels[0, 2, :3] = 255  # void run touching the left border
        labels[1, -1, -2:] = 255
    return features.requires_grad_(), labels


# The definition's value and gradient per case: each case is checked on both evaluation paths,
# and the loop-over-anchors reference is most of the time a case takes.
_SLOW: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _slow_with_grad(features: torch.Tensor, labels: torch.Tensor,
                    **kwargs: float) -> tuple[torch.Tensor, torch.Tensor]:
    key = (features.detach().numpy().tobytes(), labels.numpy().tobytes(),
           tuple(sorted(kwargs.items())))
    if key not in _SLOW:
        ref = _slow_sgt(features, labels, **kwargs)  # type: ignore[arg-type]
        (grad,) = torch.autograd.grad(ref, features)
        _SLOW[key] = ref.detach(), grad
    return _SLOW[key]


def _assert_matches_slow(features: torch.Tensor, labels: torch.Tensor, **kwargs: float) -> None:
    ours = sgt_loss(features, labels, **kwargs)  # type: ignore[arg-type]
    ref, g_ref = _slow_with_grad(features, labels, **kwargs)
    torch.testing.assert_close(ours.detach(), ref, rtol=1e-12, atol=1e-14)
    (g_ours,) = torch.autograd.grad(ours, features)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-14)


BORDERS = ["reference", "exclude"]


@pytest.fixture(params=["row-blocked", "whole-map"])
def sgt_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both evaluations of the offsets: row blocks (CPU, eager) and one expression per offset
    over zero-padded maps (GPUs and torch.compile)."""
    monkeypatch.setattr(sgt_module, "_row_blocked", lambda t: request.param == "row-blocked")
    return request.param


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_sgt_matches_slow_reference(kernel_size: int, border: str, sgt_path: str) -> None:
    features, labels = _case(seed=kernel_size)
    loss = sgt_loss(features, labels, kernel_size=kernel_size, border=border)
    assert loss.dim() == 0 and loss.item() > 0
    _assert_matches_slow(features, labels, kernel_size=kernel_size, border=border)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize(("kernel_size", "threshold"), [(3, 1), (3, 3), (5, 2), (5, 8), (7, 6)])
def test_sgt_threshold_variations(
    kernel_size: int, threshold: int, border: str, sgt_path: str
) -> None:
    features, labels = _case(seed=10 + threshold, classes=2)
    _assert_matches_slow(features, labels, kernel_size=kernel_size, threshold=threshold,
                         border=border)


@pytest.mark.parametrize("margin", [0.0, 0.05, 1.0])
def test_sgt_margin_variations(margin: float) -> None:
    features, labels = _case(seed=20)
    _assert_matches_slow(features, labels, kernel_size=3, margin=margin)


def _published_formulation(features: torch.Tensor, labels: torch.Tensor, kernel_size: int,
                           margin: float) -> torch.Tensor:
    """The SGT term as the published trainer computes it (void-free labels): labels padded
    with -1 and normalised features with zeros, a K x K unfolded copy of the features, every
    label other than the anchor's (the padding's included) a negative, the mean hinge over
    the patches with |P+| >= K - 1 and |P-| >= K - 1."""
    p = kernel_size // 2
    fh = F.normalize(features, dim=1)
    windows = F.pad(fh, [p] * 4).unfold(2, kernel_size, 1).unfold(3, kernel_size, 1)
    cos = (fh[..., None, None] * windows).sum(dim=1)  # B x h x w x K x K
    dist = torch.clamp(2 - 2 * cos, min=1e-9).sqrt()
    padded = F.pad(labels[:, None].double(), [p] * 4, value=-1)[:, 0]
    neighbour = padded.unfold(1, kernel_size, 1).unfold(2, kernel_size, 1)
    same = (neighbour == labels[..., None, None].double()).double()
    pos_n, neg_n = same.sum(dim=(-1, -2)), (1 - same).sum(dim=(-1, -2))
    boundary = (pos_n >= kernel_size - 1) & (neg_n >= kernel_size - 1)
    d_pos = (same * dist).sum(dim=(-1, -2))[boundary] / pos_n[boundary]
    d_neg = ((1 - same) * dist).sum(dim=(-1, -2))[boundary] / neg_n[boundary]
    return torch.relu(d_pos - d_neg + margin).mean()


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_sgt_reference_border_is_the_published_formulation(kernel_size: int) -> None:
    """Void-free labels on a map with image borders, float64: value and input gradient."""
    gen = torch.Generator().manual_seed(40 + kernel_size)
    features = torch.randn(2, 6, 9, 13, generator=gen, dtype=torch.float64,
                           requires_grad=True)
    labels = torch.randint(0, 3, (2, 9, 13), generator=gen)
    ours = sgt_loss(features, labels, kernel_size=kernel_size, margin=0.3)
    published = _published_formulation(features, labels, kernel_size, 0.3)
    torch.testing.assert_close(ours, published, rtol=1e-12, atol=1e-14)
    (g_ours,) = torch.autograd.grad(ours, features)
    (g_pub,) = torch.autograd.grad(published, features)
    # The published code's anchor-with-itself cosine is a dot product (rounding noise, ~1e-16
    # in float64); ours is exactly 1: the gradients agree to that noise.
    torch.testing.assert_close(g_ours, g_pub, rtol=1e-7, atol=1e-12)
    excluded = sgt_loss(features, labels, kernel_size=kernel_size, margin=0.3, border="exclude")
    assert abs(_value(excluded) - _value(ours)) > 1e-3  # the border matters at this size


def test_sgt_larger_margin_gives_larger_loss() -> None:
    features, labels = _case(seed=21)
    values = [_value(sgt_loss(features, labels, margin=m)) for m in (0.0, 0.3, 1.0, 3.0)]
    assert values == sorted(values) and values[0] < values[-1]
    # Every distance is <= 2, so with m = 3 every hinge is active: L = mean(d+ - d-) + m.
    assert values[-1] > 3.0 - 2.0


def test_sgt_accepts_numpy_integers_for_kernel_and_threshold() -> None:
    features, labels = _case(seed=30)
    expected = sgt_loss(features, labels, kernel_size=3, threshold=2)
    out = sgt_loss(features, labels, kernel_size=np.int64(3), threshold=np.int32(2))
    assert _value(out) == _value(expected)


def test_sgt_threshold_above_patch_size_has_no_boundary_patch() -> None:
    features, labels = _case(seed=22)
    loss = sgt_loss(features, labels, kernel_size=3, threshold=5)  # |P+| + |P-| <= 9 < 10
    assert _value(loss) == 0.0 and loss.grad_fn is not None


@pytest.mark.parametrize("border", BORDERS)
def test_sgt_image_smaller_than_kernel(border: str) -> None:
    features, labels = _case(seed=23, b=1, h=2, w=3, classes=2)
    _assert_matches_slow(features, labels, kernel_size=5, threshold=1, border=border)


def test_sgt_one_class_is_exactly_zero_with_a_graph() -> None:
    features = torch.randn(2, 4, 6, 7, requires_grad=True)
    labels = torch.full((2, 6, 7), 3, dtype=torch.long)
    labels[0, 1, 1] = 255
    loss = sgt_loss(features, labels, border="exclude")
    assert _value(loss) == 0.0 and torch.isfinite(loss)
    assert loss.grad_fn is not None
    loss.backward()
    assert features.grad is not None and float(features.grad.abs().sum()) == 0.0
    for border in BORDERS:
        all_void = sgt_loss(features, torch.full((2, 6, 7), 255, dtype=torch.long),
                            border=border)
        assert _value(all_void) == 0.0 and all_void.grad_fn is not None
    # The published code's border: the image's edge is a class boundary of its own (anchors
    # near it have negatives outside), so even one class gives a loss.
    assert _value(sgt_loss(features, labels, border="reference")) > 0


def test_sgt_identical_features_give_finite_gradients() -> None:
    # All features equal: every pair is at distance 0, the clamp inside the sqrt is hit.
    for dtype in (torch.float32, torch.float64):
        features = torch.ones(1, 4, 6, 7, dtype=dtype).mul_(0.5).requires_grad_()
        labels = torch.zeros(1, 6, 7, dtype=torch.long)
        labels[:, :, 4:] = 1
        loss = sgt_loss(features, labels, kernel_size=3, border="exclude")
        # d+ = d- (both ~sqrt(1e-9) or a rounding-level distance), so L = m.
        assert _value(loss) == pytest.approx(0.3, abs=1e-3)
        loss.backward()
        assert features.grad is not None and bool(torch.isfinite(features.grad).all())
    features, labels = _case(seed=24)
    with torch.no_grad():
        features[0, :, 3, 3] = features[0, :, 3, 4]  # one zero-distance pair
    _assert_matches_slow(features, labels, kernel_size=3)


def test_sgt_zero_feature_vector_matches_normalize_semantics() -> None:
    features, labels = _case(seed=25)
    with torch.no_grad():
        features[1, :, 2, 2] = 0.0
    ours = sgt_loss(features, labels, kernel_size=3)
    ref = _slow_sgt(features, labels, kernel_size=3)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    (g_ours,) = torch.autograd.grad(ours, features)
    (g_ref,) = torch.autograd.grad(ref, features)
    assert bool(torch.isfinite(g_ours).all())
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-14)


def test_sgt_float32_agrees_with_float64() -> None:
    features, labels = _case(seed=26, c=16, h=12, w=15)
    ref = sgt_loss(features, labels)
    (g_ref,) = torch.autograd.grad(ref, features)
    f32 = features.detach().float().requires_grad_()
    out = sgt_loss(f32, labels.to(torch.int32))
    # No rounding noise from the anchor's self-distance: float32 is float64 to ~1e-7.
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    (g32,) = torch.autograd.grad(out, f32)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g_ref, rtol=1e-3, atol=1e-6 * float(g_ref.abs().max()))


def test_sgt_accepts_bfloat16_and_features_without_grad() -> None:
    features, labels = _case(seed=27)
    expected = float(sgt_loss(features.detach(), labels))
    out = sgt_loss(features.detach().to(torch.bfloat16), labels.to(torch.uint8))
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(expected, abs=2e-2)
    with torch.no_grad():
        assert _value(sgt_loss(features, labels)) == pytest.approx(expected, rel=1e-12)


def test_sgt_is_invariant_to_feature_scale() -> None:
    features, labels = _case(seed=28)
    a = sgt_loss(features, labels)
    b = sgt_loss(features * 7.5, labels)
    assert _value(a) == pytest.approx(_value(b), rel=1e-10)


def test_sgt_gradcheck() -> None:
    features, labels = _case(seed=29, b=1, c=3, h=5, w=6, classes=2)
    assert torch.autograd.gradcheck(
        lambda f: sgt_loss(f, labels, kernel_size=3), (features,), eps=1e-6, atol=1e-7
    )


def test_sgt_hand_computed_patch() -> None:
    # 1 x 3 image, K = 3, T = 1, m = 0.6; classes [0, 0, 1]; unit features at 0, 30, 60 degrees
    # (scaled, the loss normalises them), so neighbours are 2 sin(15 deg) apart.
    angles = torch.tensor([0.0, 30.0, 60.0], dtype=torch.float64).deg2rad()
    radii = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    features = torch.stack([radii * angles.cos(), radii * angles.sin()]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, 1]]])
    eps = math.sqrt(1e-9)  # the anchor's distance to itself, clamped inside the sqrt
    near = 2 * math.sin(math.radians(15))
    # anchor 0: P+ = {itself, 1}, P- = {} -> not a boundary patch
    # anchor 1: P+ = {0 (near), itself (eps)}, P- = {2 (near)}
    # anchor 2: P+ = {itself (eps)}, P- = {1 (near)}; the pixel right of it is off-image
    l1 = max(0.0, (near + eps) / 2 - near + 0.6)
    l2 = max(0.0, eps - near + 0.6)
    assert l1 > 0 and l2 > 0
    loss = sgt_loss(features, labels, kernel_size=3, margin=0.6, threshold=1, border="exclude")
    assert _value(loss) == pytest.approx((l1 + l2) / 2, rel=1e-12)
    # With T = 2 only anchor 1 has |P+| >= 2, but |P-| = 1 < 2: no boundary patch.
    assert _value(sgt_loss(features, labels, kernel_size=3, margin=0.6, threshold=2,
                           border="exclude")) == 0.0
    # border=reference: the 7, 6 and 7 window pixels outside the image are negatives at
    # distance sqrt(2); every anchor's patch is a boundary patch (m = 1.5 keeps all active).
    out = math.sqrt(2)
    r0 = (eps + near) / 2 - out + 1.5
    r1 = (eps + near) / 2 - (near + 6 * out) / 7 + 1.5
    r2 = eps - (near + 7 * out) / 8 + 1.5
    assert min(r0, r1, r2) > 0
    loss = sgt_loss(features, labels, kernel_size=3, margin=1.5, threshold=1)
    assert _value(loss) == pytest.approx((r0 + r1 + r2) / 3, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"features": torch.zeros(4, 7, 9)}, "features"),
        ({"labels": torch.zeros(7, 9, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(2, 7, 8, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(1, 7, 9, dtype=torch.long)}, "labels"),
        ({"labels": torch.zeros(2, 7, 9)}, "labels"),
        ({"labels": torch.zeros(2, 7, 9, dtype=torch.bool)}, "labels"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"kernel_size": 1}, "kernel_size"),
        ({"kernel_size": 3.0}, "kernel_size"),
        ({"margin": -0.1}, "margin"),
        ({"threshold": 0}, "threshold"),
        ({"threshold": 2.5}, "threshold"),
    ],
)
def test_sgt_validation(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {
        "features": torch.zeros(2, 4, 7, 9),
        "labels": torch.zeros(2, 7, 9, dtype=torch.long),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        sgt_loss(**args)  # type: ignore[arg-type]


@pytest.mark.slow  # Dynamo and AOTAutograd: seconds per case
@pytest.mark.parametrize("border", BORDERS)
def test_sgt_compiles_without_graph_break_and_equals_eager(border: str) -> None:
    # fullgraph=True fails on any graph break (a host sync, an op Dynamo cannot trace); the
    # aot_eager backend runs the traced forward and backward graphs op by op, in float64.
    features, labels = _case(seed=7)
    compiled = torch.compile(sgt_loss, backend="aot_eager", fullgraph=True)
    got = compiled(features, labels, kernel_size=5, border=border)
    want = sgt_loss(features, labels, kernel_size=5, border=border)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (g_got,) = torch.autograd.grad(got, features)
    (g_want,) = torch.autograd.grad(want, features)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-14)
    assert float(g_want.abs().sum()) > 0
