"""The detector's window semantics, chunking and calibration (PyTorch side)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_export.calibrate import choose_thresholds, fit_calibration, threshold_at_fpr
from model_export.model import (
    ARCHS,
    BandedSelfAttention,
    Calibration,
    Detector,
    ModelConfig,
    _midp_surprise,
    layer_bands,
    piecewise_linear,
)
from model_export.train import make_chunks

CARD = (7, 20, 4, 4, 12, 6, 25, 4, 4, 7, 7, 9, 9)


def random_ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(1, c, (b, t), generator=g) for c in CARD], dim=-1)


def fused(model: Detector) -> Detector:
    """``model`` with a fisher calibration, so its probability depends on the recent surprise."""
    knots = [0.0, 1.0, 30.0]
    model.calibration.set("fisher", ab=(1.0, -2.0), logit_x=[-3.0, 0.0, 3.0], logit_y=[0.0, 1.0, 2.0],
                          recent_x=knots, recent_y=[0.0, 0.5, 3.0])
    return model


@pytest.mark.parametrize("span", [1, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_long_pass_equals_each_events_own_window(arch, span):
    torch.manual_seed(0)
    w = 12
    model = fused(Detector(ModelConfig(cardinalities=CARD, arch=arch, window=w, d_model=32, surprise_span=span)))
    model.eval()
    ids = random_ids(1, 40)
    with torch.no_grad():
        full = model(ids)
        for t in range(ids.shape[1]):
            own = ids[:, max(0, t - w + 1) : t + 1]
            padded = torch.cat([torch.zeros(1, w - own.shape[1], len(CARD), dtype=torch.long), own], 1)
            for x in (own, padded):
                out = model(x)
                for k in ("anomaly_probability", "surprise", "recent_surprise"):
                    assert abs(float(out[k][0, -1] - full[k][0, t])) < 1e-5, (arch, t, k)


def test_recent_surprise_is_the_mean_of_the_last_k_events():
    torch.manual_seed(0)
    model = Detector(ModelConfig(cardinalities=CARD, window=12, d_model=16, surprise_span=4)).eval()
    ids = random_ids(2, 20)
    ids[0, :5] = 0  # left padding
    with torch.no_grad():
        out = model(ids)
    s, valid = out["surprise"].numpy(), (ids[..., 0] != 0).numpy()
    for b in range(2):
        for t in range(20):
            w = valid[b, max(0, t - 3): t + 1]
            want = s[b, max(0, t - 3): t + 1][w].mean() if valid[b, t] else 0.0
            assert float(out["recent_surprise"][b, t]) == pytest.approx(want, abs=1e-5)


def test_surprise_span_narrows_the_encoder_so_the_window_still_holds():
    cfg = ModelConfig(cardinalities=CARD, window=64, surprise_span=16)
    assert cfg.context == 49 and sum(b - 1 for b in layer_bands(cfg.context, cfg.n_layers)) + 1 == 48
    with pytest.raises(ValueError, match="surprise_span"):
        ModelConfig(cardinalities=CARD, window=8, surprise_span=7)


@pytest.mark.parametrize("span", [1, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_output_ignores_events_older_than_the_window(arch, span):
    torch.manual_seed(1)
    w = 10
    model = fused(Detector(ModelConfig(cardinalities=CARD, arch=arch, window=w, d_model=16, surprise_span=span)))
    model.eval()
    a = random_ids(1, 30, seed=1)
    b = a.clone()
    b[:, :20] = random_ids(1, 20, seed=2)  # change everything but the last w events
    with torch.no_grad():
        pa, pb = model(a)["anomaly_probability"], model(b)["anomaly_probability"]
    assert abs(float(pa[0, -1] - pb[0, -1])) < 1e-5
    assert float((pa[0, :20] - pb[0, :20]).abs().max()) > 1e-4  # and the rest did change


def test_padding_positions_score_zero_and_do_not_leak():
    model = Detector(ModelConfig(cardinalities=CARD, window=8, d_model=16)).eval()
    ids = random_ids(1, 6)
    padded = torch.cat([torch.zeros(1, 4, len(CARD), dtype=torch.long), ids], 1)
    with torch.no_grad():
        out = model(padded)
    assert float(out["anomaly_probability"][0, :4].abs().max()) == 0.0
    assert float(out["surprise"][0, :4].abs().max()) == 0.0


def dense_banded_attention(att: BandedSelfAttention, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The reference: every query against every key, masked to the band and valid keys."""
    b, t, d = x.shape
    h, dh = att.n_heads, d // att.n_heads
    q, k, v = (z.reshape(b, t, h, dh).transpose(1, 2) for z in att.qkv(x).split(d, dim=-1))
    dist = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # query minus key
    in_band = (dist >= 0) & (dist < att.band)
    scores = q @ k.transpose(-2, -1) / dh**0.5 + att.rel_bias[:, dist.clamp(0, att.band - 1)][None]
    scores = scores.masked_fill(~(in_band[None, None] & valid[:, None, None, :]), -1e4)
    y = scores.softmax(dim=-1) @ v
    return att.proj(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("band", [1, 5, 8, 9, 32])
@pytest.mark.parametrize("t", [1, 7, 8, 9, 33, 64])
def test_block_local_attention_equals_dense_masked_attention(band, t):
    torch.manual_seed(band * 100 + t)
    att = BandedSelfAttention(d=16, n_heads=2, band=band, dropout=0.0).eval()
    torch.nn.init.normal_(att.rel_bias)
    x = torch.randn(3, t, 16)
    valid = torch.rand(3, t) > 0.2
    valid[:, -1] = True
    with torch.no_grad():
        got, want = att(x, valid), dense_banded_attention(att, x, valid)
    # Rows whose band holds no valid key are a uniform mix either way; compare the rest.
    has_key = torch.stack([valid[:, max(0, i - band + 1): i + 1].any(dim=1) for i in range(t)], dim=1)
    assert torch.allclose(got[has_key], want[has_key], atol=1e-5)


def test_bands_cover_window_minus_one():
    for w in (8, 16, 64, 65):
        for layers in (1, 2, 3):
            assert sum(b - 1 for b in layer_bands(w, layers)) + 1 == w - 1


def test_chunks_train_every_event_once_with_full_context():
    feats = np.arange(1, 301, dtype=np.int64)[:, None].repeat(2, axis=1)
    groups = np.repeat([0, 1, 2], [10, 250, 40])
    x, _, m = make_chunks(feats, groups, None, chunk_len=32, window=8)
    trained = x[..., 0][m & (x[..., 0] != 0)]
    assert sorted(trained.tolist()) == list(range(1, 301))
    for chunk, mask in zip(x[..., 0], m, strict=True):
        first = int(np.argmax(mask))
        row = chunk[first] - 1
        user_start = {0: 0, 1: 10, 2: 260}[int(groups[row])]
        context = chunk[:first][chunk[:first] != 0]
        assert len(context) == min(7, row - user_start)  # W-1 events of context, or all there are


def test_piecewise_linear_is_monotone_and_flat_outside():
    kx, ky = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.1, 0.5, 0.9])
    x = torch.linspace(-2, 5, 200)
    y = piecewise_linear(x, kx, ky)
    assert bool((y[1:] >= y[:-1] - 1e-7).all())
    assert float(y[0]) == pytest.approx(0.1) and float(y[-1]) == pytest.approx(0.9)
    assert float(piecewise_linear(torch.tensor([2.0]), kx, ky)[0]) == pytest.approx(0.7)


@pytest.mark.parametrize("kind", ["platt", "isotonic", "tail", "fisher"])
def test_calibration_is_monotone_in_the_raw_score(kind):
    rng = np.random.default_rng(0)
    label = (rng.random(4000) < 0.1).astype(np.int8)
    logit = rng.normal(size=4000) + 3 * label
    surprise = np.abs(rng.normal(size=4000)) + 2 * label
    cal = Calibration()
    fit_calibration(cal, kind, logit=logit, surprise=surprise, label=None if kind == "tail" else label,
                    recent=surprise)
    grid = torch.linspace(-6, 8, 500)
    p = cal(grid, grid, grid)
    assert bool((p[1:] >= p[:-1] - 1e-7).all())
    if kind == "fisher":  # in each input alone, the other held
        for fixed in (-2.0, 0.5, 3.0):
            c = torch.full_like(grid, fixed)
            for q in (cal(grid, c, c), cal(c, grid, grid)):
                assert bool((q[1:] >= q[:-1] - 1e-7).all())
            assert float(cal(c[:1], torch.tensor([6.0]), torch.tensor([6.0]))[0]) > float(cal(c[:1], c[:1], c[:1])[0])
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    if kind == "tail":  # the distribution function of normal surprise
        q99 = float(np.quantile(surprise, 0.99))
        assert float(cal(torch.tensor([0.0]), torch.tensor([q99]))[0]) == pytest.approx(0.99, abs=0.005)


def test_thresholds_reach_their_false_positive_rates_on_validation():
    rng = np.random.default_rng(3)
    normal = rng.random(100_000)
    t = choose_thresholds(normal, {"review": 0.01, "block": 0.001})
    assert t["block"] >= t["review"]
    assert np.mean(normal >= t["review"]) <= 0.01
    assert np.mean(normal >= t["block"]) <= 0.001
    assert t["chosen"]["review"]["validation_fpr"] == pytest.approx(0.01, abs=0.001)
    assert threshold_at_fpr(np.array([0.5] * 10), 0.05) > 0.5  # ties: never flag every normal event


def _midp(probs: list[float], observed: int) -> float:
    logp = torch.log(torch.tensor(probs, dtype=torch.float32))[None, None]  # (1, 1, C)
    return float(_midp_surprise(logp, logp[..., observed : observed + 1])[0, 0])


def test_midp_surprise_is_zero_for_any_of_several_likely_values():
    """Where the next event is legitimately one of several, being one of them is no
    surprise (DeepLog's top-g rule, smoothed); the plain NLL would say 1.1 nats."""
    assert _midp([1 / 3, 1 / 3, 1 / 3], 0) == pytest.approx(0.0, abs=1e-6)
    assert _midp([0.45, 0.45, 0.05, 0.05], 1) == pytest.approx(0.0, abs=1e-6)
    assert _midp([0.97, 0.01, 0.01, 0.01], 0) == pytest.approx(0.0, abs=1e-6)


def test_midp_surprise_grows_as_the_observed_value_gets_rarer():
    s = [_midp([0.9, 0.09, 0.009, 0.001], k) for k in range(4)]
    assert s[0] == pytest.approx(0.0, abs=1e-6)
    assert s[1] < s[2] < s[3]
    assert s[3] == pytest.approx(-np.log(0.001), rel=0.05)  # the least likely: about -log(p)


def test_midp_surprise_is_continuous_in_the_logits():
    """Ties between near-equal probabilities cannot flip it: float error stays small."""
    base = torch.tensor([[[-1.0, -1.0 + 1e-6, -3.0, -6.0]]])
    for obs in range(4):
        a = _midp_surprise(base, base[..., obs : obs + 1])
        pert = base + torch.tensor([[[1e-5, -1e-5, 1e-5, -1e-5]]])
        b = _midp_surprise(pert, pert[..., obs : obs + 1])
        assert float((a - b).abs().max()) < 1e-3


def test_detector_surprise_kinds():
    ids = random_ids(2, 12)
    out = {}
    for kind in ("midp", "nll"):
        torch.manual_seed(0)
        out[kind] = Detector(ModelConfig(CARD, window=16, surprise=kind)).eval()(ids)
    assert torch.allclose(out["nll"]["surprise"], out["nll"]["total_nll"])
    assert bool((out["midp"]["surprise"] <= out["midp"]["total_nll"] + 1e-5).all())  # −log(2 midp) ≤ −log p
    assert torch.allclose(out["midp"]["total_nll"], out["nll"]["total_nll"])
    assert ModelConfig.from_dict({"cardinalities": list(CARD)}).surprise == "nll"  # saved before midp existed
    with pytest.raises(ValueError, match="surprise"):
        ModelConfig(CARD, surprise="rank")
