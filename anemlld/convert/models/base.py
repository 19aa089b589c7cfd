"""The pieces every ANE-shaped model shares.

Shaped for the Neural Engine: projections are 1x1 convolutions on a
channels-first ``(1, C, 1, S)`` tensor, RMSNorm is a LayerNorm over ``[x, -x]``
(mean exactly zero, so it equals RMSNorm), rotary tables are precomputed
constants indexed by ``position_ids``, and the KV cache is one buffer
``model.kv_cache_0`` of shape ``(2 * layers, kv_heads, context, head_dim)`` that
becomes the Core ML state: layer ``i`` keeps K at index ``i`` and V at ``i + layers``.

Sliding-window layers (``ModelArgs.layer_windows``) keep theirs in a ring
instead, ``model.kv_cache_local`` of ``(2 * local layers, kv_heads, ring,
head_dim)``: a token's K/V go to slot ``position mod ring`` (``ring_pos``),
and the engine's ``local_mask`` says which slots a row may attend to. The full
layers of such a model keep the whole context in ``model.kv_cache_global``
(ANEMLL's names for Gemma 3). Attention does not care where in the cache a
key sits, since rope is applied before caching.

Module and parameter names mirror the Hugging Face checkpoint
(``model.layers.0.self_attn.q_proj.weight``) so weights load by name; the split
LM head is the one exception, handled in :meth:`AneLM.load_weights`.
"""
from __future__ import annotations

import json
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import BadInput


@dataclass(frozen=True)
class ModelArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool = False
    partial_rotary_factor: float = 1.0  # rope on the first fraction of each head (Phi-4-mini: 0.75)
    rope_attention_factor: float = 1.0  # longrope's scaling of cos and sin
    hidden_act: str = "silu"  # the gated MLP's activation, a key of ACTIVATIONS
    query_pre_attn_scalar: float | None = None  # scores scaled by its -0.5 power (Gemma); None: head_dim's
    # The rope base and scaling of the layers listed, where theirs differ (Gemma 3's local layers).
    local_rope_layers: tuple[int, ...] = ()
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    residual_scale: float = 1.0  # the residual stream carried times this (fp16 range; convert/calibrate.py)
    # One entry per layer: None = full attention, W = attends to the last W
    # tokens (its own included). Empty = every layer full.
    layer_windows: tuple[int | None, ...] = ()

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_hidden_layers)
        windows = self.layer_windows
        if len(windows) != self.num_hidden_layers:
            raise BadInput(f"{len(windows)} layer windows for {self.num_hidden_layers} layers",
                           "check layer_types in config.json", stage="inspect")
        if len({w for w in windows if w is not None}) > 1:
            raise BadInput(f"layers with different sliding windows ({sorted({w for w in windows if w})})",
                           "only one window size shared by every local layer is implemented", stage="inspect")

    @property
    def sliding_window(self) -> int | None:
        """The window of the local layers (one size for all), None if every layer is full."""
        return next((w for w in self.layer_windows if w is not None), None)

    def within(self, context_length: int) -> "ModelArgs":
        """These args for a model of ``context_length`` positions: a window
        that long or longer never takes effect, so its layers are full."""
        windows = tuple(w if w is not None and w < context_length else None for w in self.layer_windows)
        return self if windows == self.layer_windows else replace(self, layer_windows=windows)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def local_rope(self, layer: int) -> bool:
        """Whether ``layer`` takes the local rotary tables."""
        return layer in self.local_rope_layers

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> "ModelArgs":
        heads = _number(cfg, "num_attention_heads", int)
        hidden = _number(cfg, "hidden_size", int)
        fields = dict(
            hidden_size=hidden,
            intermediate_size=_number(cfg, "intermediate_size", int),
            num_hidden_layers=_number(cfg, "num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=_number(cfg, "num_key_value_heads", int, heads),
            head_dim=_number(cfg, "head_dim", int, hidden // heads),
            vocab_size=_number(cfg, "vocab_size", int),
            rms_norm_eps=_number(cfg, "rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta(cfg),
            rope_scaling=rope_scaling(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            partial_rotary_factor=partial_rotary_factor(cfg),
            rope_attention_factor=rope_attention_factor(cfg),
            hidden_act=cfg.get("hidden_act", "silu"),
            layer_windows=layer_windows(cfg),
        )
        fields.update(overrides)
        args = cls(**fields)
        if args.hidden_act not in ACTIVATIONS:
            raise BadInput(f"hidden_act {args.hidden_act!r} is not supported",
                           f"models with a gated MLP of {', '.join(ACTIVATIONS)} convert", stage="inspect")
        if args.num_attention_heads % args.num_key_value_heads:
            raise BadInput("num_attention_heads is not a multiple of num_key_value_heads",
                           "check config.json")
        return args

    @property
    def layer_params(self) -> int:
        """Weights in one decoder layer's projections (what LUT quantizes)."""
        h, kvh = self.hidden_size, self.num_key_value_heads * self.head_dim
        qh = self.num_attention_heads * self.head_dim
        return h * qh * 2 + h * kvh * 2 + 3 * h * self.intermediate_size


def sliding_window(cfg: dict[str, Any], context_length: int) -> int | None:
    """The attention window the config asks for, if it is shorter than the
    context (a longer one never takes effect)."""
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False or window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise BadInput(f"config.json has sliding_window = {window!r}, not a positive integer",
                       "restore the model's original config.json", stage="inspect")
    return window if window < context_length else None


def layer_windows(cfg: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's window from config.json: the ``sliding_window`` for the
    layers ``layer_types`` names ``sliding_attention`` (all of them when
    there is no ``layer_types``; Qwen2's older files: those from
    ``max_window_layers`` on), None for the others. Empty when the config
    asks for no window."""
    window = sliding_window(cfg, context_length=math.inf)
    layers = cfg.get("num_hidden_layers")
    if window is None or not isinstance(layers, int) or isinstance(layers, bool) or layers <= 0:
        return ()
    kinds = cfg.get("layer_types")
    if kinds is None:
        first = cfg.get("max_window_layers") or 0
        return tuple(window if i >= first else None for i in range(layers))
    if not isinstance(kinds, list) or len(kinds) != layers:
        raise BadInput(f"config.json has layer_types for {len(kinds) if isinstance(kinds, list) else 'no'} of "
                       f"its {layers} layers", "restore the model's original config.json", stage="inspect")
    return tuple(window if kind == "sliding_attention" else None for kind in kinds)


def refuse_unimplemented(cfg: dict[str, Any], arch: str, context_length: int, windows: bool = False) -> None:
    """Every config key that changes the computation and that ``arch`` does
    not implement is refused here, by name: converting without it would give
    a model that runs and answers wrongly (a Mistral checkpoint with a window
    of 24 converted as Llama agreed with transformers on 16% of tokens)."""
    def refuse(key: str, why: str, hint: str) -> None:
        raise BadInput(f"config.json sets {key} = {json.dumps(cfg.get(key))}: {why}, which {arch} does not "
                       "implement here", hint, stage="inspect")

    window = sliding_window(cfg, context_length)
    if window is not None and not windows:
        refuse("sliding_window", f"attention limited to the last {window} tokens, shorter than context_length "
               f"{context_length}", f"convert with context_length = {window} or less (the window then never "
               "matters)")
    kinds = set(cfg.get("layer_types") or [])
    # sliding layers whose window never binds (checked above) are full attention
    no_window = cfg.get("sliding_window") is None or cfg.get("use_sliding_window") is False
    if kinds - {"full_attention", "sliding_attention"} or ("sliding_attention" in kinds and no_window and not windows):
        refuse("layer_types", "layers of another kind than full attention", "convert a supported architecture")
    if cfg.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", "attention to later tokens too", "convert a supported architecture")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None:
            refuse(key, "soft-capped logits", "convert a supported architecture")
    scaling = rope_scaling(cfg)
    if scaling is not None and scaling["rope_type"] == "longrope":
        original = int(scaling["original_max_position_embeddings"])
        if context_length > original:
            raise BadInput(f"context_length {context_length} is longer than this model's original "
                           f"{original} positions: its longrope long factors are not implemented",
                           f"convert with context_length = {original} or less", stage="inspect")
    if cfg.get("mlp_bias"):
        refuse("mlp_bias", "biases on the MLP projections", "convert a supported architecture")
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        if cfg.get(key) not in (None, 1, 1.0):
            refuse(key, "a scaling of activations", "convert a supported architecture")
    if any(v == 0 for v in cfg.get("no_rope_layers") or []):
        refuse("no_rope_layers", "layers without rotary embeddings", "convert a supported architecture")


def _number(cfg: dict[str, Any], key: str, kind: type, default: Any = None):
    """A positive number from config.json, or a BadInput naming the key."""
    value = cfg.get(key)
    if value is None:
        if default is not None:
            return default
        raise BadInput(f"config.json has no {key!r}", "the folder's config.json is incomplete; re-download the model",
                       stage="inspect")
    try:
        if isinstance(value, bool) or kind(value) <= 0 or (kind is int and kind(value) != value):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise BadInput(f"config.json has {key} = {value!r}, not a positive {kind.__name__}",
                       "restore the model's original config.json", stage="inspect") from None


def rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 writes rope_theta inside rope_parameters; older files at top level.
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def rope_scaling(cfg: dict[str, Any]) -> dict | None:
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear", "longrope"):
        raise BadInput(f"rope scaling {kind!r} is not supported",
                       "supported rope types: default, linear, llama3, longrope")
    params["rope_type"] = kind
    if kind == "longrope":
        params.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        if not params.get("short_factor") or not params["original_max_position_embeddings"]:
            raise BadInput("longrope scaling without short_factor or original_max_position_embeddings",
                           "restore the model's original config.json", stage="inspect")
    return params


def partial_rotary_factor(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    value = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise BadInput(f"config.json has partial_rotary_factor = {value!r}, not a fraction in (0, 1]",
                       "restore the model's original config.json", stage="inspect")
    return float(value)


def rope_attention_factor(cfg: dict[str, Any]) -> float:
    """longrope scales cos and sin by this, as transformers does: the config's
    ``attention_factor``, else sqrt(1 + ln(factor) / ln(original length)) with
    factor = max_position_embeddings / original_max_position_embeddings."""
    s = rope_scaling(cfg)
    if s is None or s["rope_type"] != "longrope":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    original = float(s["original_max_position_embeddings"])
    factor = s.get("factor") or float(cfg.get("max_position_embeddings", original)) / original
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_inv_freq(args: ModelArgs, local: bool = False) -> torch.Tensor:
    dim = args.rotary_dim
    theta, s = (args.local_rope_theta, args.local_rope_scaling) if local else (args.rope_theta, args.rope_scaling)
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if s is None:
        return inv
    if s["rope_type"] == "longrope":
        # the short factors: refuse_unimplemented keeps the context within the original length
        return inv / torch.tensor(s["short_factor"], dtype=torch.float64)
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = ((old_len / wavelen) - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, blended, out)


def rope_tables(args: ModelArgs, length: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), rope_inv_freq(args, local))
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = args.rope_attention_factor
    return (emb.cos() * scale).float(), (emb.sin() * scale).float()


_building = threading.local()


@contextmanager
def weights_loaded_later():
    """Modules built inside skip torch's random initialisation of their
    weights: a checkpoint is about to overwrite every one (``load_weights``),
    and initialising a 1B model's layers and embeddings costs about 20 s."""
    _building.skip_init = True
    try:
        yield
    finally:
        _building.skip_init = False


def _weighted(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    if getattr(_building, "skip_init", False):
        return torch.nn.utils.skip_init(cls, *args, **kwargs)
    return cls(*args, **kwargs)


def conv1x1(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return _weighted(nn.Conv2d, cin, cout, kernel_size=1, bias=bias)


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """(1, S, C) -> (1, C, 1, S), the layout the Neural Engine convolves fastest."""
    return x.transpose(1, 2).unsqueeze(2)


def from_channels(x: torch.Tensor) -> torch.Tensor:
    """(1, C, 1, S) -> (1, S, C)."""
    return x.squeeze(2).transpose(1, 2)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis written as LayerNorm of [x, -x]: the mean is
    exactly zero, so the variance LayerNorm computes is mean(x^2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        doubled = torch.cat([x, -x], dim=-1)
        normed = F.layer_norm(doubled, (2 * dim,), eps=self.eps)
        return normed[..., :dim] * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dims of each head (all of
    them unless the rotary factor is partial); the rest pass through."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, rest = x[..., :rot], x[..., rot:]
    return torch.cat([head * cos + rotate_half(head) * sin, rest], dim=-1)


def ring_size(window: int, batch: int, context_length: int) -> int:
    """Slots of a sliding-window layer's ring: the smallest multiple of the
    prefill batch that holds the window and one batch more, or the context if
    that is no longer. A batch starting at a multiple of the batch size then
    writes contiguous slots and never overwrites a key one of its own tokens
    still needs: the batch at positions p..p+B-1 overwrites the keys of
    p-R..p-R+B-1, all older than p-W+1, the oldest its first token attends
    to, whenever R >= W + B - 1."""
    return min(batch * (-(-window // batch) + 1), context_length)


def cache_names(args: ModelArgs) -> tuple[str | None, str | None]:
    """The buffers of the full layers' cache and of the ring (None: no such layers)."""
    windows = args.layer_windows
    if all(w is None for w in windows):
        return "kv_cache_0", None
    return ("kv_cache_global" if None in windows else None), "kv_cache_local"


def cache_place(args: ModelArgs, layer: int) -> tuple[int, int]:
    """Where ``layer`` keeps its K/V: its index among the layers sharing its
    cache (V at index + count), and their count."""
    local = args.layer_windows[layer] is not None
    same = [i for i, w in enumerate(args.layer_windows) if (w is not None) == local]
    return same.index(layer), len(same)


class Attention(nn.Module):
    """Grouped-query attention over its KV cache (the full one or the ring).
    ``q_norm``/``k_norm`` hooks let architectures with per-head norms (Qwen3)
    reuse the rest."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.args = args
        self.layer_idx = layer_idx
        self.kv_index, self.kv_layers = cache_place(args, layer_idx)
        h, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv = args.num_attention_heads, args.num_key_value_heads
        bias = args.attention_bias
        self.q_proj = conv1x1(h, self.n_heads * hd, bias)
        self.k_proj = conv1x1(h, self.n_kv * hd, bias)
        self.v_proj = conv1x1(h, self.n_kv * hd, bias)
        self.o_proj = conv1x1(self.n_heads * hd, h)
        self.scale = (args.query_pre_attn_scalar or hd) ** -0.5

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                current_pos: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``current_pos``: where in ``kv`` this step's K/V go (the position, or
        in a ring its slot); ``mask`` covers every slot of ``kv``."""
        seq = x.shape[1]
        hd, n_rep = self.args.head_dim, self.n_heads // self.n_kv
        xc = to_channels(x)
        q = self.q_proj(xc).view(self.n_heads, hd, seq).transpose(1, 2)  # (heads, S, hd)
        k = self.k_proj(xc).view(self.n_kv, hd, seq).transpose(1, 2)
        v = self.v_proj(xc).view(self.n_kv, hd, seq).transpose(1, 2)
        q, k = self.norm_qk(q, k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)

        layers, i, pos = self.kv_layers, self.kv_index, current_pos[0]
        kv[i:i + 1, :, pos:pos + seq, :] = k.unsqueeze(0).to(kv.dtype)
        kv[layers + i:layers + i + 1, :, pos:pos + seq, :] = v.unsqueeze(0).to(kv.dtype)
        keys, values = kv[i].to(q.dtype), kv[layers + i].to(q.dtype)  # (kv_heads, slots, hd)

        # Query heads sharing a KV head are stacked along the sequence axis,
        # so no repeated copy of K/V is ever made.
        q = (q * self.scale).reshape(self.n_kv, n_rep * seq, hd)
        scores = torch.matmul(q, keys.transpose(1, 2)).view(self.n_kv, n_rep, seq, -1) + mask[0]
        weights = torch.softmax(scores, dim=-1).view(self.n_kv, n_rep * seq, -1)
        out = torch.matmul(weights, values).view(self.n_heads, seq, hd)
        out = out.transpose(1, 2).reshape(1, self.n_heads * hd, 1, seq)
        return from_channels(self.o_proj(out))


# config.json's hidden_act -> the gated MLP's activation
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = conv1x1(h, i)
        self.up_proj = conv1x1(h, i)
        self.down_proj = conv1x1(i, h)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = to_channels(x)
        return from_channels(self.down_proj(self.act(self.gate_proj(xc)) * self.up_proj(xc)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, attention: type[Attention]):
        super().__init__()
        self.self_attn = attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h, cos, sin, mask, current_pos, kv):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, current_pos, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    """Mirrors the checkpoint's ``model.``: embeddings, the layers this part
    holds (others are empty placeholders so indices keep their names), the
    final norm when the last layer is here, the KV caches and rotary tables."""

    def __init__(self, args: ModelArgs, layers: range, embeddings: bool, context_length: int,
                 attention: type[Attention], layer: type[DecoderLayer], ring: int):
        super().__init__()
        self.embed_tokens = _weighted(nn.Embedding, args.vocab_size, args.hidden_size) if embeddings else None
        self.layers = nn.ModuleList(
            layer(args, i, attention) if i in layers else nn.Identity()
            for i in range(args.num_hidden_layers))
        self.norm = (RMSNorm(args.hidden_size, args.rms_norm_eps)
                     if len(layers) and layers[-1] == args.num_hidden_layers - 1 else None)
        self.full_cache, self.ring_cache = cache_names(args) if len(layers) else (None, None)
        local = sum(w is not None for w in args.layer_windows)
        for name, count, slots in ((self.full_cache, args.num_hidden_layers - local, context_length),
                                   (self.ring_cache, local, ring)):
            if name is not None:
                self.register_buffer(name, torch.zeros(2 * count, args.num_key_value_heads, slots, args.head_dim))
        if len(layers):
            cos, sin = rope_tables(args, context_length)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            if any(args.local_rope(i) for i in layers):
                cos, sin = rope_tables(args, context_length, local=True)
                self.register_buffer("rope_cos_local", cos, persistent=False)
                self.register_buffer("rope_sin_local", sin, persistent=False)


class SplitHead(nn.Module):
    """The LM head as K convolutions, so no output axis exceeds what the Neural
    Engine handles in one tensor; the runtime concatenates ``logits1..K``."""

    def __init__(self, hidden: int, sizes: list[int]):
        super().__init__()
        self.sizes = sizes
        self.splits = nn.ModuleList(conv1x1(hidden, n) for n in sizes)

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        hc = to_channels(h)
        return [from_channels(conv(hc)) for conv in self.splits]


def split_sizes(vocab: int, parts: int) -> list[int]:
    """Near-equal pieces, the larger ones first."""
    base, extra = divmod(vocab, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class AneLM(nn.Module):
    """An ANE-shaped causal LM, or the slice of one that a part needs.

    ``layers`` selects the decoder layers held (a chunk); ``embeddings`` and
    ``lm_head`` whether those parts are built. Nothing outside the selection is
    allocated, so a converter builds one part at a time.
    """

    attention: type[Attention] = Attention
    decoder_layer: type[DecoderLayer] = DecoderLayer

    def __init__(self, args: ModelArgs, layers: range | None = None, embeddings: bool = True,
                 lm_head: bool = True, lm_head_split: int = 8, context_length: int = 512,
                 ring: int | None = None):
        """``ring``: the slots of the sliding-window layers' cache (see
        :func:`ring_size`); by default the whole context."""
        super().__init__()
        args = args.within(context_length)
        self.args = args
        self.context_length = context_length
        self.ring = min(ring or context_length, context_length)
        self.layer_range = range(args.num_hidden_layers) if layers is None else layers
        self.model = Body(args, self.layer_range, embeddings, context_length, self.attention, self.decoder_layer,
                          self.ring)
        self.lm_head = SplitHead(args.hidden_size, split_sizes(args.vocab_size, lm_head_split)) if lm_head else None

    # --- the three parts -------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def step_inputs(self, seq: int) -> dict[str, tuple[int, ...]]:
        """The inputs a chunk function over ``seq`` tokens takes after
        ``hidden_states`` and ``position_ids``, with their shapes: the full
        layers' ``causal_mask`` and ``current_pos``, the ring's ``local_mask``
        and ``ring_pos``; every chunk of a model takes the same ones."""
        full, ring = cache_names(self.args)
        out: dict[str, tuple[int, ...]] = {}
        if full:
            out.update(causal_mask=(1, 1, seq, self.context_length), current_pos=(1,))
        if ring:
            out.update(local_mask=(1, 1, seq, self.ring), ring_pos=(1,))
        return out

    def caches(self) -> dict[str, torch.Tensor]:
        """This part's KV-cache buffers by name (the Core ML states)."""
        body = self.model
        return {n: getattr(body, n) for n in (body.full_cache, body.ring_cache) if n is not None}

    def layers_forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                       causal_mask: torch.Tensor | None = None, current_pos: torch.Tensor | None = None,
                       local_mask: torch.Tensor | None = None, ring_pos: torch.Tensor | None = None,
                       last_only: bool = False) -> torch.Tensor:
        """Run this part's layers over ``hidden_states`` (1, S, H) at
        ``position_ids`` (S,). Full layers write K/V at ``current_pos``
        onward and attend through ``causal_mask``; sliding-window layers write
        their ring from slot ``ring_pos`` on and attend through ``local_mask``.
        ``last_only`` (prefill): the last chunk returns just the last row,
        normed; other chunks return every row for the next chunk."""
        body = self.model
        rope = {}  # local -> this step's (cos, sin)
        for local, suffix in ((False, ""), (True, "_local")):
            if hasattr(body, f"rope_cos{suffix}"):
                rope[local] = tuple(getattr(body, f"rope_{f}{suffix}").index_select(0, position_ids)
                                    .to(hidden_states.dtype) for f in ("cos", "sin"))
        h = hidden_states
        windows = self.args.layer_windows
        if ring_pos is None and body.ring_cache is not None:
            # A ring of the whole context (the default) is indexed by position.
            if self.ring != self.context_length:
                raise ValueError(f"a ring of {self.ring} slots needs ring_pos")
            ring_pos = current_pos
        used = set()
        for i in self.layer_range:
            cos, sin = rope[self.args.local_rope(i)]
            if windows[i] is None:
                cache, mask, at = body.full_cache, causal_mask, current_pos
            else:
                cache, mask, at = body.ring_cache, local_mask, ring_pos
            used.add(cache)
            h = body.layers[i](h, cos, sin, mask, at, getattr(body, cache))
        for name, kv in self.caches().items():
            if name not in used:
                # A chunk without layers of this kind still declares the state
                # (chunks share one state object) and Core ML refuses a state
                # nothing touches: write one row back to itself.
                kv[0:1, 0:1, 0:1, :] = kv[0:1, 0:1, 0:1, :].clone()
        if body.norm is not None:  # the last chunk
            if last_only:
                h = h[:, -1:, :]
            h = body.norm(h)
        return h

    def head(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        return self.lm_head(hidden_states)

    # --- weights ---------------------------------------------------------
    # Checkpoint tensors that hold several of our parameters stacked by rows
    # (Phi-3's qkv_proj, gate_up_proj): their module name -> ours, in order.
    fused: dict[str, tuple[str, ...]] = {}

    def _source_of(self, name: str) -> tuple[str, int, int] | None:
        """For a parameter held in a fused checkpoint tensor: that tensor's name
        and the rows that are ours; None for a parameter stored as it is."""
        parent, _, leaf = name.rpartition(".")
        owner, _, module = parent.rpartition(".")
        for theirs, ours in self.fused.items():
            if module in ours and owner.endswith(theirs.rpartition(".")[0]) and leaf == "weight":
                start = 0
                for part in ours:
                    rows = self.get_parameter(f"{owner}.{part}.weight").shape[0]
                    if part == module:
                        return f"{owner}.{theirs.rpartition('.')[2]}.weight", start, start + rows
                    start += rows
        return None

    def checkpoint_tensor(self, get: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
        """The checkpoint's tensor for our parameter ``name`` as stored (convs
        2-D, not yet folded): its rows of a fused tensor, or of the LM head
        for one of its splits. ``get`` may be asked for the same tensor
        several times in a row (:func:`last_read` keeps one)."""
        if name.startswith("lm_head.splits."):
            i = int(name.split(".")[2])
            start = sum(self.lm_head.sizes[:i])
            return get(self.head_key)[start:start + self.lm_head.sizes[i]]
        source = self._source_of(name)
        if source is None:
            return get(name)
        fused, start, end = source
        return get(fused)[start:end]

    @property
    def head_key(self) -> str:
        """The checkpoint tensor the split LM head is read from."""
        return "model.embed_tokens.weight" if self.args.tie_word_embeddings else "lm_head.weight"

    def fold(self, name: str, weight: torch.Tensor) -> None:
        """Fold the constant factors an architecture applies to parameter
        ``name`` into its loaded ``weight``, in place (none here). Row by row:
        a block of rows folds as the whole tensor would."""

    def load_weights(self, get: Callable[[str], torch.Tensor], skip: Callable[[str], bool] | None = None) -> None:
        """Fill every parameter from the checkpoint through ``get(name)``,
        but those ``skip(name)`` is true of."""
        get = last_read(get)
        for name, param in self.named_parameters():
            if skip is not None and skip(name):
                continue
            tensor = self.checkpoint_tensor(get, name)
            if param.dim() == 4 and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
            _copy(name, param, tensor)
            with torch.no_grad():
                self.fold(name, param)

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors this model reads, with their expected shapes."""
        out: dict[str, tuple[int, ...]] = {}
        for name, p in self.named_parameters():
            if name.startswith("lm_head.splits."):
                continue
            source = self._source_of(name)
            if source is None:
                out[name] = expected_shape(name, p)
            else:
                fused, _, end = source
                rows = max(end, out.get(fused, (0,))[0])
                out[fused] = (rows, *expected_shape(name, p)[1:])
        if self.lm_head is not None:
            out[self.head_key] = (self.args.vocab_size, self.args.hidden_size)
        return out

    def reset_cache(self) -> None:
        for kv in self.caches().values():
            kv.zero_()


def last_read(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``get`` that keeps the last tensor it read: the splits of the LM head
    and the parts of a fused tensor each come from one read."""
    last: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        if name not in last:
            last.clear()
            last[name] = get(name)
        return last[name]
    return read


def expected_shape(name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The checkpoint's shape for one of our parameters (convs are 2-D there)."""
    shape = tuple(param.shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _copy(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise BadInput(f"weight {name} has shape {tuple(tensor.shape)[:2] if tensor.dim() == 4 else tuple(tensor.shape)},"
                       f" config.json implies {expected_shape(name, param)}",
                       "the weights do not match config.json; re-download the model", stage="load")
    with torch.no_grad():
        param.copy_(tensor)  # converts the dtype without a temporary copy


def causal_mask(positions: torch.Tensor, context_length: int, dtype=torch.float32,
                window: int | None = None) -> torch.Tensor:
    """(1, 1, S, ctx): 0 where row at position p may attend (keys 0..p, and
    with a sliding ``window`` only the last ``window`` of them), -inf elsewhere."""
    keys = torch.arange(context_length)
    allowed = keys[None, :] <= positions[:, None]
    if window is not None:
        allowed &= keys[None, :] > positions[:, None] - window
    mask = torch.full(allowed.shape, float("-inf"), dtype=dtype)
    return mask.masked_fill(allowed, 0.0)[None, None]
