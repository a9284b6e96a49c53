"""The sequence detector: a causal Transformer (default), a GRU or an LSTM over a user's
last W events, sharing the feature embedding and the heads.

Sliding-window semantics, exactly: the hidden state at event t depends on events
[t-W+2, t] only, and event t's outputs on events [t-W+1, t]. So one pass over a long
sequence gives every event the output it would get on its own last W events, which is
what lets batch scoring run long sequences while online scoring runs single windows.

- Transformer: every layer attends within a causal band, with a learned bias per
  relative offset and no absolute positions; the bands add up to a receptive field of
  W-1 events.
- GRU / LSTM: run over the W-1 events ending at each position (the sequence unfolded
  into windows), which costs W-1 steps per event.

Outputs per position: the event's ``surprise`` given its history (self-supervised), the
anomaly logit (supervised head, fed the hidden state and the per-feature next-event
negative log-likelihoods) and the calibrated ``anomaly_probability``.

The surprise (``ModelConfig.surprise``): ``"midp"`` (default) sums, over the predicted
features, −log of twice the mid-p-value of the observed value under the predicted
distribution (Lancaster, 1961: the probability of the less likely values plus half the
observed one's), clipped at 0. It is 0 whenever the observed value is no less likely than
a typical draw, however many values were likely: where the next event is legitimately one
of several, being one of them is no surprise. DeepLog (Du et al., CCS 2017) draws the same
line with a hard rule (the observed log key is among the top g predictions); the mid-p
form is its smooth, ranking version, and summing −log p over features is Fisher's method
of combining p-values. ``"nll"`` is the plain next-event negative log-likelihood.

Recent surprise (``ModelConfig.surprise_span`` = K > 1): the mean surprise of the event
and the K-1 events before it. One surprising event is common in ordinary shopping; a run
of them is what a pattern nobody taught looks like (a brushing ring's purchases, a
takeover's carts), so the supervised calibration fuses the two (``Calibration`` kind
``fisher``) and the probability rises with either. For the window semantics to hold
exactly, the encoder then sees W-K+1 events (its receptive field shrinks by K-1), so
each of the K surprises still depends only on the event's own last W events.

Novel event types (``ModelConfig.novel_types``): event type ids that training never showed
as a next event are impossible, their logit held at ``NOVEL_LOGIT`` below the others. A
softmax only learns that a class never occurs slowly (its probability decays with the
gradient it gets, to ~1e-4 in a short run, no rarer than a legitimately rare key), so
without this an unseen log key scores like a rare one; DeepLog treats an unseen key as
anomalous outright. Training sets it only when no unknown types are taught
(``TrainConfig.unknown_type_rate == 0``, the mode for logs): a shopper model shows 1% of
events with the unknown type, so an unknown type keeps a calibrated, non-blocking meaning.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from app.core.features import FEATURES

ARCHS = ("transformer", "gru", "lstm")
#: Feature columns the next-event heads predict (category hash buckets and hour are
#: inputs only: too noisy to predict, and not behaviour).
TARGETS = ("event_type", "item_repeat", "category_new", "gap", "price", "device_change", "country_change")
SURPRISES = ("midp", "nll")
#: Temperature (nats) of the smooth "less likely than the observed value" comparison: the
#: mid-p-value is continuous in the logits, so float error cannot flip it.
MIDP_TEMPERATURE = 0.05
#: Logit offset of an event type never seen as a next event in training: e^-30 ≈ 1e-13
#: relative probability, far below anything learnt, still finite (no NaN downstream).
NOVEL_LOGIT = -30.0


@dataclass
class ModelConfig:
    cardinalities: tuple[int, ...]
    arch: str = "transformer"
    window: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.1
    targets: tuple[str, ...] = TARGETS
    surprise: str = "midp"  # midp | nll (see the module docstring)
    novel_types: tuple[int, ...] = ()  # event type ids impossible as a next event (see the module docstring)
    surprise_span: int = 1  # K: recent surprise = mean over the event and its K-1 before (1 = the event's own)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")
        if self.surprise not in SURPRISES:
            raise ValueError(f"surprise must be one of {SURPRISES}, not {self.surprise!r}")
        if len(self.cardinalities) != len(FEATURES):
            raise ValueError("cardinalities must have one entry per feature column")
        self.cardinalities = tuple(int(c) for c in self.cardinalities)
        self.targets = tuple(self.targets)
        self.novel_types = tuple(int(i) for i in self.novel_types)
        if any(not 0 <= i < self.cardinalities[0] for i in self.novel_types):
            raise ValueError(f"novel_types must be event type ids below {self.cardinalities[0]}")
        if not 1 <= self.surprise_span <= self.window - 2:
            raise ValueError(f"surprise_span must be in [1, window - 2], got {self.surprise_span}")

    @property
    def context(self) -> int:
        """Events the encoder sees at each position, the event included (W - K + 1): with
        the K surprises averaged, every output depends on the last W events exactly."""
        return self.window - self.surprise_span + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = {"surprise": "nll"} | d  # saved before the mid-p surprise existed
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def layer_bands(window: int, n_layers: int) -> list[int]:
    """Attention band of each layer so that the receptive field is ``window - 1``.

    A stack of causal bands b_1..b_L sees sum(b_l - 1) + 1 events.

    >>> layer_bands(64, 2)
    [32, 32]
    """
    total = window - 2 + n_layers
    base, rest = divmod(total, n_layers)
    bands = [base + (1 if i < rest else 0) for i in range(n_layers)]
    if min(bands) < 1:
        raise ValueError(f"window {window} too small for {n_layers} layers")
    return bands


class FeatureEmbedding(nn.Module):
    """Sum of one embedding per feature column (one table, offset ids): (B,T,F) → (B,T,d)."""

    def __init__(self, cardinalities: tuple[int, ...], d: int) -> None:
        super().__init__()
        offsets = torch.tensor([0, *list(_cumsum(cardinalities))[:-1]], dtype=torch.long)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(sum(cardinalities), d)
        self.norm = nn.LayerNorm(d)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        offsets: Tensor = self.offsets
        return self.norm(self.table(ids + offsets).sum(dim=-2))  # (B, T, d)


class BandedSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, band: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.band = n_heads, band
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.rel_bias = nn.Parameter(torch.zeros(n_heads, band))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_valid: Tensor) -> Tensor:
        """Block-local form of banded attention: queries in blocks of ``band`` positions,
        each attending to its own block and the one before (every key of its band is
        there). Same result as dense masked attention, at O(T·band) instead of O(T²)."""
        b, t, d = x.shape
        h, s = self.n_heads, self.band
        pad = (s - t % s) % s  # left padding up to a whole number of blocks
        x = torch.cat([x.new_zeros(b, pad, d), x], dim=1)  # (B, T', d)
        valid = torch.cat([key_valid.new_zeros(b, pad), key_valid], dim=1)  # (B, T')
        tp = x.shape[1]
        q, k, v = (
            z.reshape(b, -1, s, h, d // h).permute(0, 3, 1, 2, 4)  # (B, H, nb, S, dh)
            for z in self.qkv(x).split(d, dim=-1)
        )
        k, v = _with_previous_block(k, dim=3), _with_previous_block(v, dim=3)  # (B, H, nb, 2S, dh)
        key_ok = _with_previous_block(valid.reshape(b, -1, s), dim=2)  # (B, nb, 2S)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)  # (B, H, nb, S, 2S)
        offset = s + torch.arange(s, device=x.device)[:, None] - torch.arange(2 * s, device=x.device)[None, :]
        in_band = (offset >= 0) & (offset < s)  # (S, 2S): query minus key within the band
        bias = self.rel_bias.index_select(1, offset.clamp(0, s - 1).reshape(-1)).view(h, s, 2 * s)
        att = att + bias[None, :, None]
        allowed = in_band[None, None, None] & key_ok[:, None, :, None, :]
        att = att.masked_fill(~allowed, -1e4).softmax(dim=-1)
        y = self.drop(att) @ v  # (B, H, nb, S, dh)
        y = y.permute(0, 2, 3, 1, 4).reshape(b, tp, d)[:, pad:]  # (B, T, d)
        return self.proj(y)


def _with_previous_block(z: Tensor, dim: int) -> Tensor:
    """Concatenate each block with the block before it (zeros before the first) along
    ``dim``; blocks are indexed by ``dim - 1``."""
    first = torch.zeros_like(z.narrow(dim - 1, 0, 1))
    prev = torch.cat([first, z.narrow(dim - 1, 0, z.shape[dim - 1] - 1)], dim=dim - 1)
    return torch.cat([prev, z], dim=dim)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int, band: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = BandedSelfAttention(d, n_heads, band, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d), nn.Dropout(dropout))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x), valid)
        return x + self.mlp(self.ln2(x))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bands = layer_bands(cfg.context, cfg.n_layers)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.d_ff, b, cfg.dropout) for b in bands
        )
        self.ln = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, valid: Tensor, pad: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x, valid)
        return self.ln(x)


class RecurrentEncoder(nn.Module):
    """GRU/LSTM over the ``context - 1`` events ending at each position (exact window semantics)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        rnn = nn.GRU if cfg.arch == "gru" else nn.LSTM
        self.rnn = rnn(cfg.d_model, cfg.d_model, num_layers=cfg.n_layers, batch_first=True,
                       dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.span = cfg.context - 1
        self.ln = nn.LayerNorm(cfg.d_model)

    def forward(self, x: Tensor, valid: Tensor, pad: Tensor) -> Tensor:
        b, t, d = x.shape
        s = self.span
        padded = torch.cat([pad.expand(b, s - 1, d), x], dim=1)  # (B, T+S-1, d)
        idx = torch.arange(t, device=x.device)[:, None] + torch.arange(s, device=x.device)[None, :]
        windows = padded[:, idx].reshape(b * t, s, d)  # (B*T, S, d)
        out, _ = self.rnn(windows)
        return self.ln(out[:, -1].reshape(b, t, d))


class Detector(nn.Module):
    """Features (B,T,F) int64 → dict of per-position outputs, each (B,T)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = FeatureEmbedding(cfg.cardinalities, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = TransformerEncoder(cfg) if cfg.arch == "transformer" else RecurrentEncoder(cfg)
        self.bos = nn.Parameter(torch.zeros(d))
        self.target_cols = [FEATURES.index(n) for n in cfg.targets]
        self.next_heads = nn.ModuleList(nn.Linear(d, cfg.cardinalities[c]) for c in self.target_cols)
        n_t = len(self.target_cols)
        self.anomaly_head = nn.Sequential(nn.Linear(d + n_t + 1, d), nn.GELU(), nn.Linear(d, 1))
        self.calibration = Calibration()
        offset = torch.zeros(cfg.cardinalities[0])
        offset[list(cfg.novel_types)] = NOVEL_LOGIT
        # (C_event_type,) added to the event type head's logits; a constant, not a weight
        self.register_buffer("type_offset", offset, persistent=False)

    def forward(self, ids: Tensor) -> dict[str, Tensor]:
        valid = ids[..., 0] != 0  # (B, T): event_type id 0 is padding
        pad = self.embed(torch.zeros_like(ids[:1, :1]))  # (1, 1, d): embedding of a padding row
        h = self.encoder(self.drop(self.embed(ids)), valid, pad)  # (B, T, d)

        # Next-event prediction of event t from the state after event t-1 (BOS if none).
        prev_valid = F.pad(valid[:, :-1], (1, 0), value=False)  # (B, T)
        h_prev = torch.where(prev_valid[..., None], F.pad(h[:, :-1], (0, 0, 1, 0)), self.bos)
        logits = [head(h_prev) for head in self.next_heads]  # each (B, T, C)
        if self.cfg.novel_types and 0 in self.target_cols:
            i = self.target_cols.index(0)
            logits[i] = logits[i] + self.type_offset
        logps = [F.log_softmax(z, dim=-1) for z in logits]
        observed = [lp.gather(-1, ids[..., c : c + 1]) for lp, c in zip(logps, self.target_cols, strict=True)]
        nll = -torch.cat(observed, dim=-1) * valid[..., None]  # (B, T, n_targets)
        total_nll = nll.sum(dim=-1)  # (B, T)
        if self.cfg.surprise == "midp":
            # (B, T, n_targets): each predicted feature's share of the surprise (reason codes)
            feature_surprise = torch.stack([_midp_surprise(lp, o) for lp, o in zip(logps, observed, strict=True)],
                                           dim=-1) * valid[..., None]
        else:
            feature_surprise = nll
        surprise = feature_surprise.sum(dim=-1)
        logit = self.anomaly_head(torch.cat([h, nll, total_nll[..., None]], dim=-1)).squeeze(-1)
        recent = recent_mean(surprise, valid, self.cfg.surprise_span)
        prob = self.calibration(logit, surprise, recent) * valid
        return {"anomaly_probability": prob, "surprise": surprise, "recent_surprise": recent, "logit": logit,
                "nll": nll, "total_nll": total_nll, "feature_surprise": feature_surprise}


def recent_mean(x: Tensor, valid: Tensor, span: int) -> Tensor:
    """Mean of ``x`` (B, T) over each position and the ``span - 1`` valid positions before
    it (fewer at a sequence's start) → (B, T), 0 at padding. A sum of at most ``span``
    terms (a convolution, not a running cumulative sum), so its float error does not
    grow with the sequence: a batch chunk of 512 events and a single window agree."""
    if span == 1:
        return x * valid
    v = valid.to(x.dtype)[:, None, :]  # (B, 1, T)
    ones = torch.ones(1, 1, span, dtype=x.dtype, device=x.device)
    t = x.shape[1]
    total = F.conv1d(F.pad(x[:, None, :] * v, (span - 1, 0)), ones)[:, 0, :t]
    count = F.conv1d(F.pad(v, (span - 1, 0)), ones)[:, 0, :t]
    return total / count.clamp_min(1.0) * v[:, 0]


def _midp_surprise(logp: Tensor, observed: Tensor) -> Tensor:
    """−log min(1, 2·mid-p) of the observed value: ``logp`` (B, T, C) the predicted log
    distribution, ``observed`` (B, T, 1) the observed value's log probability → (B, T)."""
    less_likely = torch.sigmoid((observed - logp) / MIDP_TEMPERATURE)  # 1/2 at the observed value itself
    midp = (logp.exp() * less_likely).sum(dim=-1)
    return -torch.log((2.0 * midp).clamp(1e-30, 1.0))


class Calibration(nn.Module):
    """Maps the raw score to a probability inside the graph, so every consumer of the
    exported model gets the same calibrated number.

    kinds: ``platt`` sigmoid(a·logit + b); ``isotonic`` piecewise-linear on the logit;
    ``tail`` piecewise-linear on the surprise (its distribution function under normal
    data, for models trained without labels); ``fisher`` sigmoid(a·(L(logit) + R(recent
    surprise)) + b), where L and R are −log of each score's survival function under
    normal data (Fisher's method of combining p-values, Fisher 1925), so the
    probability rises with either score and neither can hide the other; ``identity``
    sigmoid(logit) before fitting.
    """

    KINDS = ("identity", "platt", "isotonic", "tail", "fisher")

    def __init__(self) -> None:
        super().__init__()
        self.kind = "identity"
        self.register_buffer("ab", torch.tensor([1.0, 0.0]))
        self.register_buffer("knots_x", torch.zeros(2))
        self.register_buffer("knots_y", torch.tensor([0.0, 1.0]))
        self.register_buffer("logit_x", torch.zeros(2))
        self.register_buffer("logit_y", torch.zeros(2))
        self.register_buffer("recent_x", torch.zeros(2))
        self.register_buffer("recent_y", torch.zeros(2))

    def set(self, kind: str, *, ab: tuple[float, float] = (1.0, 0.0),
            knots_x: list[float] | None = None, knots_y: list[float] | None = None,
            logit_x: list[float] | None = None, logit_y: list[float] | None = None,
            recent_x: list[float] | None = None, recent_y: list[float] | None = None) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"calibration kind must be one of {self.KINDS}")
        self.kind = kind
        self.ab = torch.tensor(ab, dtype=torch.float32)
        for name, value in (("knots_x", knots_x), ("knots_y", knots_y), ("logit_x", logit_x),
                            ("logit_y", logit_y), ("recent_x", recent_x), ("recent_y", recent_y)):
            if value is not None:
                setattr(self, name, torch.tensor(value, dtype=torch.float32))

    def restore(self, described: dict[str, Any]) -> None:
        """Set from what :meth:`describe` returned (a run's ``model.pt``)."""
        self.set(described["kind"], ab=(described.get("a", 1.0), described.get("b", 0.0)),
                 **{k: described.get(k) for k in ("knots_x", "knots_y", "logit_x", "logit_y", "recent_x", "recent_y")})

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("platt", "fisher"):
            out["a"], out["b"] = (float(v) for v in self.ab)
        if self.kind in ("isotonic", "tail"):
            out["input"] = "logit" if self.kind == "isotonic" else "surprise"
            out["knots_x"] = [float(v) for v in self.knots_x]
            out["knots_y"] = [float(v) for v in self.knots_y]
        if self.kind == "fisher":
            out["input"] = "logit and recent surprise"
            for name in ("logit_x", "logit_y", "recent_x", "recent_y"):
                out[name] = [float(v) for v in getattr(self, name)]
        return out

    def forward(self, logit: Tensor, surprise: Tensor, recent: Tensor | None = None) -> Tensor:
        if self.kind == "identity":
            return torch.sigmoid(logit)
        if self.kind == "platt":
            return torch.sigmoid(self.ab[0] * logit + self.ab[1])
        if self.kind == "fisher":
            combined = piecewise_linear(logit, self.logit_x, self.logit_y) + piecewise_linear(
                surprise if recent is None else recent, self.recent_x, self.recent_y)
            return torch.sigmoid(self.ab[0] * combined + self.ab[1])
        x = logit if self.kind == "isotonic" else surprise
        return piecewise_linear(x, self.knots_x, self.knots_y)


def piecewise_linear(x: Tensor, kx: Tensor, ky: Tensor) -> Tensor:
    """Monotone interpolation through knots (kx increasing), flat outside them.

    Written with elementwise ops only, so it exports to any ONNX opset.
    """
    widths = kx[1:] - kx[:-1]  # (K-1,)
    slopes = (ky[1:] - ky[:-1]) / widths.clamp_min(1e-12)
    seg = torch.minimum((x[..., None] - kx[:-1]).clamp_min(0.0), widths)  # (..., K-1)
    return ky[0] + (seg * slopes).sum(dim=-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cumsum(xs: tuple[int, ...]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out
