"""Planted-pattern models: attention heads whose true pattern is known by construction.

:class:`PlantedAttention` has no RoPE; every head's q and k are functions of the position
alone (values come from the input), so its attention is the same for every input:

- ``("window", {"window": w})``: score ``-(i - j)**2 / (2 sigma**2)`` with ``sigma = w/4``
  (q = c[2p, -p**2, -1], k = [p, 1, p**2]): a Gaussian band, 99.99% of each row at ``|d| < w``.
- ``("sink_window", {"sink": s, "window": w})``: the window, but the first ``s`` keys are
  sink keys (k = e_3, q_3 = bonus) that hold about half of each row's mass.
- ``("vertical_stripe", {"columns": [...], "window": w})``: the same for given key columns.
- ``("multi_diagonal", {"period": P, "width": w})``: score ``A cos(2 pi (i - j) / P)``,
  ``A`` so each diagonal is a Gaussian of ``sigma = (w - 1)/2`` tokens.
- ``("block_topk", {"block": B, "density": rho, "seed": s})``: score ``A`` on a random
  block adjacency (diagonal blocks included; lower-triangular when causal), 0 elsewhere:
  q = A * adjacency[block(i)], k = onehot(block(j)).
- ``("dense", {})``: q = 0, uniform attention.

:func:`planted_llama` is a small Llama-style model (RMSNorm, RoPE, GQA, SwiGLU, causal) with
random weights in which some heads are planted through q/k biases (as Qwen2 has): with
constant q and k, RoPE makes q.k depend on ``i - j`` only, and two low-frequency rotary
pairs of opposite sign give a Gaussian local window; BOS (sink) and SEP (stripe) keys are
read from reserved embedding channels on the lowest-frequency pairs, which barely rotate. :func:`planted_llama_inputs` puts BOS at 0 and SEP at fixed positions.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SCORE = 24.0          # planted block score: mass outside kept blocks ~ n * e^-24


def _attend(q, k, v, scale: float, causal: bool, attention: str) -> torch.Tensor:
    """Attention through sparsec's canonical op or plain SDPA (K/V repeated for GQA)."""
    if attention == "sparsec":
        return torch.ops.sparsec.attention(q, k, v, None, scale, causal)
    repeat = q.shape[1] // k.shape[1]
    if repeat > 1:      # repeat_kv, as Hugging Face Llama
        b, h, n, d = k.shape
        k = k[:, :, None].expand(b, h, repeat, n, d).reshape(b, h * repeat, n, d)
        v = v[:, :, None].expand(b, h, repeat, n, v.shape[-1]).reshape(b, h * repeat, n, v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _gaussian_normaliser(sigma: float, causal: bool, reach: int = 100_000) -> float:
    d = torch.arange(-reach if not causal else 0, reach, dtype=torch.float64)
    return float(torch.exp(-d**2 / (2 * sigma**2)).sum())


class _PlantedLayer(nn.Module):
    """The q/k of one layer's planted heads, built from positions at run time."""

    def __init__(self, heads: list[tuple[str, dict]], head_dim: int, causal: bool, generator: torch.Generator):
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, head_dim, causal
        self.bonus = []
        for h, (kind, params) in enumerate(heads):
            bonus = 0.0
            if kind in ("sink_window", "vertical_stripe"):
                keys = params["sink"] if kind == "sink_window" else len(params["columns"])
                bonus = math.log(_gaussian_normaliser(params["window"] / 4, causal) / keys)
            if kind == "vertical_stripe":
                self.register_buffer(f"columns{h}", torch.tensor(params["columns"], dtype=torch.float64))
            if kind == "block_topk":
                adjacency = (torch.rand(head_dim, head_dim, generator=generator) < params["density"]).double()
                if causal:
                    adjacency = adjacency.tril()
                adjacency.fill_diagonal_(1.0)
                self.register_buffer(f"adjacency{h}", adjacency)
            self.bonus.append(bonus)

    def _features(self, columns: list[torch.Tensor]) -> torch.Tensor:
        """Feature columns ``[n]`` stacked and zero-padded to ``[n, head_dim]``."""
        return F.pad(torch.stack(columns, -1), (0, self.head_dim - len(columns)))

    def _head(self, h: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind, params = self.heads[h]
        ones, zeros = torch.ones_like(positions), torch.zeros_like(positions)
        if kind in ("window", "sink_window", "vertical_stripe"):
            p = positions - positions.mean()               # centred: smaller fp32 cancellation
            c = 1.0 / (2 * (params["window"] / 4) ** 2)
            q = self._features([2 * c * p, -c * p**2, -c * ones, self.bonus[h] * ones])
            k = self._features([p, ones, p**2, zeros])
            if kind != "window":
                if kind == "sink_window":
                    special = positions < params["sink"]
                else:
                    special = torch.isin(positions, getattr(self, f"columns{h}"))
                k = torch.where(special[:, None], self._features([zeros, zeros, zeros, ones]), k)
        elif kind == "multi_diagonal":
            sigma = max(0.35, (params["width"] - 1) / 2)
            amplitude = (params["period"] / (2 * math.pi * sigma)) ** 2
            angle = 2 * math.pi * positions / params["period"]
            q = self._features([amplitude * torch.cos(angle), amplitude * torch.sin(angle)])
            k = self._features([torch.cos(angle), torch.sin(angle)])
        elif kind == "block_topk":
            block = torch.div(positions, params["block"], rounding_mode="floor").long()
            k = F.one_hot(block, self.head_dim).double()
            q = BLOCK_SCORE * getattr(self, f"adjacency{h}")[block]
        elif kind == "dense":
            q = k = self._features([zeros])
        else:
            raise ValueError(f"no planted construction for {kind!r}")
        return q, k

    def forward(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k ``[H, n, head_dim]`` in float64 (the planted scores, scale 1)."""
        positions = torch.arange(n, dtype=torch.float64, device=device)
        q, k = zip(*(self._head(h, positions) for h in range(len(self.heads))))
        return torch.stack(q), torch.stack(k)


class PlantedAttention(nn.Module):
    """Residual layers of planted heads: ``x + o(attention(q_planted, k_planted, v(x)))``.

    ``layers`` lists, per layer, each head's ``(kind, params)`` (see the module docstring);
    ``attention="sparsec"`` calls ``torch.ops.sparsec.attention``, ``"sdpa"`` calls
    ``F.scaled_dot_product_attention``. Input ``x`` is ``[B, N, dim]``.
    """

    def __init__(self, layers: list[list[tuple[str, dict]]], dim: int = 32, head_dim: int = 32,
                 causal: bool = True, attention: str = "sparsec", seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers, self.causal, self.attention = layers, causal, attention
        self.planted = nn.ModuleList(_PlantedLayer(heads, head_dim, causal, generator) for heads in layers)
        self.values = nn.ModuleList(nn.Linear(dim, len(heads) * head_dim) for heads in layers)
        self.outputs = nn.ModuleList(nn.Linear(len(heads) * head_dim, dim) for heads in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, _ = x.shape
        for planted, values, outputs in zip(self.planted, self.values, self.outputs):
            q, k = (t.to(x.dtype)[None].expand(batch, -1, -1, -1) for t in planted(n, x.device))
            v = values(x).view(batch, n, q.shape[1], -1).transpose(1, 2)
            y = _attend(q, k, v, 1.0, self.causal, self.attention)
            x = x + outputs(y.transpose(1, 2).reshape(batch, n, -1))
        return x


def planted_attention_probs(model: PlantedAttention, n: int) -> list[torch.Tensor]:
    """The exact attention probabilities ``[H, n, n]`` of each layer of a planted model."""
    probs = []
    offsets = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    for planted in model.planted:
        q, k = planted(n, torch.device("cpu"))
        scores = (q.float() @ k.float().transpose(-1, -2)).double()
        if model.causal:
            scores = scores.masked_fill(offsets < 0, float("-inf"))
        probs.append(torch.softmax(scores, dim=-1))
    return probs


# -- a Llama-style model with planted heads --

BOS, SEP = 1, 2                     # token ids; their embeddings own channels 0 and 1
SEP_POSITIONS = (300, 700, 1200, 1800)
# The window: q.k = A (cos(theta_27 d) - cos(theta_28 d)) ~ -A (theta_27^2 - theta_28^2) d^2 / 2,
# a Gaussian in d = i - j with no constant term (so sink / stripe scores stay small and
# exact) and, at these low frequencies, no recurrence up to N ~ 4096.
_WINDOW_PAIRS = (27, 28)
_STRIPE_PAIR, _SINK_PAIR = 30, 31   # nearly position-free pairs for SEP and BOS keys
LONG_CONTEXT_ROPE_BASE = 500000.0   # Llama-3's: its lowest pairs barely turn in 128k tokens
_POWER_LAW_ALPHA = 6.0              # long-context window score ~ -3 log(1 + d^2 / width^2)
_SPECIAL = 1000.0                   # BOS/SEP channel value: after RMSNorm ~sqrt(hidden), to 1e-5
_SUPPRESS = 40.0                    # score taken off BOS / SEP keys in heads that ignore them


def _pairs(head_dim: int) -> tuple[tuple[int, int], int, int]:
    """The window pairs, stripe pair and sink pair at ``head_dim``: the rotary pairs of the
    same frequencies as at head_dim 64 (pair ``p`` of 64 turns as pair ``p * head_dim / 64``)."""
    if head_dim % 64:
        raise ValueError(f"planted_llama plants heads of head_dim a multiple of 64, not {head_dim}")
    scale = head_dim // 64
    return (_WINDOW_PAIRS[0] * scale, _WINDOW_PAIRS[1] * scale), _STRIPE_PAIR * scale, _SINK_PAIR * scale


def _rotary_frequencies(head_dim: int, base: float) -> torch.Tensor:
    return base ** (-torch.arange(head_dim // 2, dtype=torch.float64) * 2 / head_dim)


def _window_pairs(head_dim: int, long_context: bool) -> list[int]:
    """The rotary pairs that carry the window: two low-frequency pairs, or (long context)
    every pair but the four lowest, which hold the stripe and sink pairs."""
    return list(range(head_dim // 2 - 4)) if long_context else list(_pairs(head_dim)[0])


def _window_score(weights: torch.Tensor, head_dim: int, long_context: bool, length: int) -> torch.Tensor:
    """``sum_p weights[p] cos(theta_p d)`` for ``d = 0 ... length - 1``: the planted window
    score of a head whose q bias puts ``weights`` on the window pairs (k is 1 there)."""
    theta = _rotary_frequencies(head_dim, LONG_CONTEXT_ROPE_BASE if long_context else 10000.0)
    theta = theta[_window_pairs(head_dim, long_context)]
    d = torch.arange(length, dtype=torch.float64)
    return (weights[:, None] * torch.cos(theta[:, None] * d[None, :])).sum(0)


def _window_weights(width: float, head_dim: int, long_context: bool) -> torch.Tensor:
    """Per-pair q bias of a window of scale ``width``. Short context: ``width`` on the first
    pair and ``-width`` on the second, a Gaussian in ``d`` that holds up to N ~ 4096.
    Long context: ``alpha * dlog(theta) * exp(-width * theta_p)`` over the window pairs, the
    spectral measure of ``-alpha/2 * log(1 + d**2 / width**2)`` sampled at the rotary
    frequencies: a power-law window, the same at every length up to 128k, with q entries
    below ~15 so bf16 keeps its scores to ~0.03."""
    if not long_context:
        return torch.tensor([width, -width], dtype=torch.float64)
    theta = _rotary_frequencies(head_dim, LONG_CONTEXT_ROPE_BASE)[_window_pairs(head_dim, True)]
    step = math.log(LONG_CONTEXT_ROPE_BASE) * 2 / head_dim
    return _POWER_LAW_ALPHA * step * torch.exp(-width * theta)


@lru_cache(maxsize=64)
def _window_profile(window: int, head_dim: int, long_context: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q bias on the window pairs, score over ``d``) of the window that holds 95% of a far
    query row's mass within ``window`` keys, by bisection on its scale (a Gaussian narrows
    as its amplitude grows, a power law widens with its width)."""
    length = 131072 if long_context else 2048
    narrow, wide = (1e9, 1e-3) if not long_context else (1e-3, 1e9)
    for _ in range(60):
        width = math.sqrt(narrow * wide)
        score = _window_score(_window_weights(width, head_dim, long_context), head_dim, long_context, length)
        reach = int((torch.softmax(score, 0).cumsum(0) < 0.95).sum()) + 1
        narrow, wide = (narrow, width) if reach > window else (width, wide)
    weights = _window_weights(narrow, head_dim, long_context)
    return weights, _window_score(weights, head_dim, long_context, length)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _LlamaLayer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, intermediate, attention):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.attention = heads, kv_heads, head_dim, attention
        self.input_norm, self.post_norm = _RMSNorm(hidden), _RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        y = _attend(q, k, v, self.head_dim ** -0.5, True, self.attention)
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, n, -1))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class PlantedLlama(nn.Module):
    """See :func:`planted_llama`. ``forward(input_ids) -> logits``."""

    def __init__(self, vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, attention, rope_base):
        super().__init__()
        self.head_dim, self.rope_base = head_dim, rope_base
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_LlamaLayer(hidden, heads, kv_heads, head_dim, intermediate, attention)
                                    for _ in range(layers))
        self.norm = _RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32)
        inv_freq = self.rope_base ** (-torch.arange(0, self.head_dim, 2, device=x.device).float() / self.head_dim)
        angles = positions[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angles.cos()] * 2, -1).to(x.dtype), torch.cat([angles.sin()] * 2, -1).to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


# layer -> {query head: (kind, planted window)}; kv group of the heads = head // 4
DEFAULT_PLANT = {
    0: {0: ("window", 32), 1: ("sink_window", 64), 2: ("vertical_stripe", 32)},
    1: {4: ("window", 64), 5: ("sink_window", 32), 6: ("vertical_stripe", 64)},
    2: {0: ("window", 128), 1: ("sink_window", 16)},
    3: {4: ("window", 16), 6: ("vertical_stripe", 16)},
}


def planted_llama(layers: int = 4, heads: int = 8, kv_heads: int = 2, head_dim: int = 64, hidden: int = 256,
                  intermediate: int = 512, vocab: int = 512, plant: dict | None = None,
                  attention: str = "sdpa", seed: int = 0, long_context: bool = False) -> PlantedLlama:
    """A small Llama-style model with planted heads, in eval mode.

    ``plant`` maps layer -> {query head: (kind, window)}, kind one of ``window``,
    ``sink_window`` (BOS is the sink) and ``vertical_stripe`` (SEP tokens are the stripes,
    at :data:`SEP_POSITIONS` in :func:`planted_llama_inputs`); ``window`` is the number of
    keys holding 95% of a far query row's local mass. Planted heads take q from a bias
    alone; their kv head's k gets a constant on the window rotary pairs (so q.k depends on
    ``i - j`` only) and reads the BOS / SEP channels on the sink / stripe pairs. Other heads
    keep random weights (dense). ``attention`` is ``"sdpa"`` or ``"sparsec"``.

    ``long_context=True`` makes the windows hold at every length up to 128k and the model
    stable in bf16 there (dense bf16 agrees with fp32, so a sparse error means something):
    Llama-3's rotary base 500000 and a power-law window over all but the lowest four rotary
    pairs (see :func:`_window_weights`). The default is a Gaussian window on two pairs,
    which recurs beyond ~4k tokens.
    """
    torch.manual_seed(seed)
    model = PlantedLlama(vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, attention,
                         LONG_CONTEXT_ROPE_BASE if long_context else 10000.0)
    scale = 1.0 / math.sqrt(hidden)           # turns an RMS-normalised special channel into ~1
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    module.bias.zero_()
        nn.init.normal_(model.embed.weight, std=0.02)
        model.embed.weight[:, :2] = 0.0
        model.embed.weight[BOS, 0] = model.embed.weight[SEP, 1] = _SPECIAL
        half = head_dim // 2
        _, stripe_pair, sink_pair = _pairs(head_dim)
        window_pairs = _window_pairs(head_dim, long_context)
        for index, layer in enumerate(model.layers):
            layer.o_proj.weight[:2] = 0.0          # channels 0 and 1 stay BOS / SEP flags
            layer.down_proj.weight[:2] = 0.0
            planted_groups = {h // (heads // kv_heads) for h in (plant or DEFAULT_PLANT).get(index, {})}
            for group in planted_groups:
                rows = slice(group * head_dim, (group + 1) * head_dim)
                k_weight, k_bias = layer.k_proj.weight[rows], layer.k_proj.bias[rows]
                for pair in (*window_pairs, stripe_pair, sink_pair):
                    k_weight[[pair, pair + half]] = 0.0
                for pair in window_pairs:        # constant 1, cancelled on BOS / SEP keys
                    k_bias[pair] = 1.0
                    k_weight[pair, :2] = -scale
                k_weight[sink_pair, 0] = scale
                k_weight[stripe_pair, 1] = scale
            for head, (kind, window) in (plant or DEFAULT_PLANT).get(index, {}).items():
                rows = slice(head * head_dim, (head + 1) * head_dim)
                layer.q_proj.weight[rows] = 0.0
                weights, score = _window_profile(window, head_dim, long_context)
                bias = torch.zeros(head_dim)
                bias[window_pairs] = weights.float()
                # Special keys get about half of a row's mass: the window's log-normaliser.
                special = float(torch.logsumexp(score, 0))
                # BOS / SEP keys score 0 on the window pairs, as much as the diagonal: a head
                # that does not attend to them pushes them down on their own pair.
                bias[sink_pair] = special if kind == "sink_window" else -_SUPPRESS
                bias[stripe_pair] = special - math.log(len(SEP_POSITIONS)) if kind == "vertical_stripe" else -_SUPPRESS
                if kind not in ("window", "sink_window", "vertical_stripe"):
                    raise ValueError(f"planted_llama plants window, sink_window or vertical_stripe, not {kind!r}")
                layer.q_proj.bias[rows] = bias * math.sqrt(head_dim)     # undo SDPA's 1/sqrt(D)
    return model.eval()


def planted_llama_inputs(batch: int = 1, length: int = 2048, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """Token ids ``[batch, length]``: BOS first, SEP at :data:`SEP_POSITIONS` (those that fit),
    other tokens random."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    ids[:, 0] = BOS
    for position in SEP_POSITIONS:
        if position < length:
            ids[:, position] = SEP
    return ids
