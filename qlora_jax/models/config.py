"""``ModelConfig``: the shape and options of a decoder, from HF ``config.json`` or GGUF metadata.

One dataclass describes every family (``qlora_jax.models.family``): the sizes all
decoders share, and the options that tell the families apart, each defaulting to
Llama's behaviour (Qwen3's q/k norms, Gemma's ``(1 + w)`` norms, sandwich norms,
soft-capping and per-layer windows, Phi-3's partial rotary and LongRoPE). Parsing a
``config.json`` is the family's job (``family_for_hf``); the fields every family
reads the same way are parsed here (``common_fields``). Every invariant is checked
in ``__post_init__`` with an error that names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_ROPE_SCALING = ("llama3", "linear", "longrope")
HIDDEN_ACTS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    ``llama3``: Llama 3.1's piecewise rule; ``linear``: positions / factor; ``longrope``
    (Phi-3): ``inv_freq / short_factor`` while every position is below
    ``original_max_position_embeddings``, ``inv_freq / long_factor`` beyond, and cos/sin
    scaled by ``attention_factor``.
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_SCALING:
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not one of {SUPPORTED_ROPE_SCALING}")
        _positive("rope_scaling.factor", self.factor)
        _positive("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings, integer=True)
        if self.rope_type == "llama3":
            _positive("rope_scaling.low_freq_factor", self.low_freq_factor)
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                                 f"low_freq_factor={self.low_freq_factor}")
        if self.rope_type == "longrope":
            _positive("rope_scaling.attention_factor", self.attention_factor)
            for name in ("short_factor", "long_factor"):
                values = getattr(self, name)
                if not values or not all(isinstance(v, (int, float)) and v > 0 for v in values):
                    raise ValueError(f"rope_scaling.{name}={list(values)!r} must be a non-empty list of positive numbers")
            if len(self.short_factor) != len(self.long_factor):
                raise ValueError(f"rope_scaling.short_factor has {len(self.short_factor)} values, "
                                 f"long_factor {len(self.long_factor)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of a decoder (names follow Hugging Face's config.json where it has them)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v (Qwen2: True)
    sliding_window: int | None = None
    model_type: str = "llama"
    # the options that tell the families apart; the defaults are Llama's
    o_proj_bias: bool = False  # a bias on o_proj as well (Llama's attention_bias)
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): Gemma stores w for (1 + w)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # norms after attention and after the MLP as well (Gemma 2 / 3)
    embed_multiplier: float = 1.0  # h_0 = embed(tokens) * this (Gemma: sqrt(hidden_size))
    attn_softcap: float | None = None  # attention logits -> c * tanh(l / c) (Gemma 2)
    final_softcap: float | None = None  # output logits -> c * tanh(l / c) (Gemma 2)
    attn_scale: float | None = None  # attention logit scale; None: head_dim ** -0.5
    layer_types: tuple[str, ...] | None = None  # "full" / "sliding" per layer; None: all use sliding_window
    local_rope_theta: float | None = None  # rope base of the sliding layers (Gemma 3); None: rope_theta
    partial_rotary_factor: float = 1.0  # the leading fraction of head_dim that rope rotates (Phi-4-mini)
    num_experts: int = 0  # MLP experts per layer (Mixtral: 8); 0: a dense MLP
    experts_per_token: int = 0  # experts each token is routed to (Mixtral: 2)

    def __post_init__(self):
        from qlora_jax.models.family import supported_model_types

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _positive(name, getattr(self, name), integer=True)
        _positive("rms_norm_eps", self.rms_norm_eps)
        _positive("rope_theta", self.rope_theta)
        if self.model_type not in supported_model_types():
            raise ValueError(f"model_type={self.model_type!r} is not supported; supported: {supported_model_types()}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window, integer=True)
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {HIDDEN_ACTS}")
        for name in ("attn_softcap", "final_softcap", "attn_scale", "local_rope_theta"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        _positive("embed_multiplier", self.embed_multiplier)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"num_hidden_layers={self.num_hidden_layers}")
            odd = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if odd:
                raise ValueError(f"layer_types holds {odd}; each must be one of {LAYER_TYPES}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding layers but sliding_window is not set")
        if not 0 < self.partial_rotary_factor <= 1 or int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1] and rotate an "
                             f"even number of the head_dim={self.head_dim} dims")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be in [1, num_experts="
                             f"{self.num_experts}]")
        rs = self.rope_scaling
        if rs is not None and rs.rope_type == "longrope" and len(rs.short_factor) != self.rotary_dim // 2:
            raise ValueError(f"rope_scaling.short_factor has {len(rs.short_factor)} values; the rotary dim "
                             f"{self.rotary_dim} needs {self.rotary_dim // 2}")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head rope rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (``None``: full causal attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_hidden_layers
        return tuple(self.sliding_window if t == "sliding" else None for t in self.layer_types)


LlamaConfig = ModelConfig  # the name the Llama-only releases used


def from_hf_config(source: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from a Hugging Face ``config.json`` (a path, a folder holding one, or its dict)."""
    from qlora_jax.models.family import family_for_hf

    cfg = read_hf_config(source)
    return family_for_hf(cfg).parse_hf(cfg)


def read_hf_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The ``config.json`` dict of a path, a folder or a mapping."""
    return _read_json(source) if not isinstance(source, Mapping) else dict(source)


def common_fields(cfg: Mapping[str, Any], default_eps: float = 1e-5) -> dict[str, Any]:
    """The ``ModelConfig`` fields every family reads the same way from a ``config.json`` dict."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise ValueError(f"config.json is missing the field {key!r}")
    heads = cfg["num_attention_heads"]
    rope = rope_parameters(cfg)
    head_dim = cfg.get("head_dim") or _divide("hidden_size", cfg["hidden_size"], "num_attention_heads", heads)
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", default_eps),
        rope_theta=float(rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0),
        rope_scaling=rope_scaling_from(rope, cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        model_type=cfg["model_type"],
    )


def rope_parameters(cfg: Mapping[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE settings: transformers >= 5 keeps them in ``rope_parameters`` (theta included, per layer
    type for Gemma 3), older files in ``rope_scaling`` and ``rope_theta`` at the top level."""
    raw = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if layer_type is not None and isinstance(raw.get(layer_type), Mapping):
        return dict(raw[layer_type])
    if any(isinstance(v, Mapping) for v in raw.values()):  # per layer type, but none asked: the full layers'
        return dict(raw.get("full_attention") or {})
    return raw


def rope_scaling_from(raw: Mapping[str, Any] | None, cfg: Mapping[str, Any] | None = None) -> RopeScaling | None:
    """``RopeScaling`` of a ``rope_scaling`` / ``rope_parameters`` dict (``None`` for plain RoPE)."""
    if not raw:
        return None
    cfg = cfg or {}
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind in ("su", "longrope"):  # "su": Phi-3's first name for it
        return _longrope(raw, cfg)
    if "factor" not in raw:
        raise ValueError(f"rope_scaling={dict(raw)} is missing 'factor'")
    extra = {k: raw[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in raw}
    return RopeScaling(rope_type=kind, factor=float(raw["factor"]), **extra)


def _longrope(raw: Mapping[str, Any], cfg: Mapping[str, Any]) -> RopeScaling:
    import math

    for key in ("short_factor", "long_factor"):
        if key not in raw:
            raise ValueError(f"rope_scaling (longrope) is missing {key!r}")
    original = raw.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if not original:
        raise ValueError("rope_scaling (longrope) needs original_max_position_embeddings")
    factor = raw.get("factor") or cfg.get("max_position_embeddings", original) / original
    attention = raw.get("attention_factor")
    if attention is None:  # the LongRoPE paper's choice, as transformers makes it
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(rope_type="longrope", factor=float(factor), original_max_position_embeddings=int(original),
                       short_factor=tuple(float(v) for v in raw["short_factor"]),
                       long_factor=tuple(float(v) for v in raw["long_factor"]), attention_factor=float(attention))


def hf_layer_types(cfg: Mapping[str, Any], num_layers: int) -> tuple[str, ...] | None:
    """``config.json``'s ``layer_types`` ("sliding_attention" / "full_attention") as ``LAYER_TYPES``."""
    raw = cfg.get("layer_types")
    if raw is None:
        return None
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    odd = sorted({t for t in raw if t not in names})
    if odd:
        raise ValueError(f"config.json layer_types holds {odd}; supported: {sorted(names)}")
    if len(raw) != num_layers:
        raise ValueError(f"config.json layer_types has {len(raw)} entries for num_hidden_layers={num_layers}")
    return tuple(names[t] for t in raw)


ROPE_TENSOR_PREFIX = "tensor."  # metadata keys the GGUF loader adds for the rope tables stored as tensors


def from_gguf_metadata(meta: Mapping[str, Any], tensor_names: set[str] | frozenset[str] = frozenset()) -> ModelConfig:
    """A ``ModelConfig`` from GGUF key/values (``general.architecture``, ``<arch>.*``).

    ``tensor_names`` decides tied embeddings: a file without ``output.weight`` ties them.
    """
    from qlora_jax.models.family import family_for_gguf

    return family_for_gguf(meta.get("general.architecture")).parse_gguf(meta, frozenset(tensor_names))


def gguf_common_fields(meta: Mapping[str, Any], tensor_names: frozenset[str], model_type: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields every family reads the same way from GGUF metadata."""
    arch = meta["general.architecture"]
    hidden, heads = int(gguf_field(meta, "embedding_length")), int(gguf_field(meta, "attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    head_dim = (int(gguf_field(meta, "attention.key_length", 0)) or int(gguf_field(meta, "rope.dimension_count", 0))
                or _divide("embedding_length", hidden, "head_count", heads))
    return dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(gguf_field(meta, "feed_forward_length")),
        num_hidden_layers=int(gguf_field(meta, "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(gguf_field(meta, "attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(gguf_field(meta, "context_length", 4096)),
        rms_norm_eps=float(gguf_field(meta, "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gguf_field(meta, "rope.freq_base", 10000.0)),
        tie_word_embeddings=bool(tensor_names) and "output.weight" not in tensor_names,
        model_type=model_type,
    )


def gguf_field(meta: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """``<general.architecture>.<name>`` from GGUF metadata; required when ``default`` is None."""
    key = f"{meta['general.architecture']}.{name}"
    if key not in meta and default is None:
        raise ValueError(f"GGUF metadata is missing {key!r}")
    return meta.get(key, default)


def _read_json(source: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def _divide(name: str, value: int, by_name: str, by: int) -> int:
    if by <= 0 or value % by:
        raise ValueError(f"{name}={value} is not divisible by {by_name}={by}: set head_dim explicitly")
    return value // by


def _positive(name: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or value <= 0:
        kind = "a positive int" if integer else "a positive number"
        raise ValueError(f"{name}={value!r} must be {kind}")


def config_from_gguf(path: str | os.PathLike) -> ModelConfig:
    """Reads a GGUF file's metadata (and its rope tables, not its weights) and builds the ``ModelConfig``."""
    from qlora_jax.models.gguf_loader import gguf_metadata, open_gguf

    path = os.fspath(path)
    reader = open_gguf(path)
    try:
        return from_gguf_metadata(gguf_metadata(reader), {t.name for t in reader.tensors})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
