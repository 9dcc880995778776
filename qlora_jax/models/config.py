"""``LlamaConfig``: the shape of a Llama-family decoder, from HF ``config.json`` or GGUF metadata.

Covers Llama 2 / 3 / 3.1+ (``rope_scaling`` of type "llama3"), Mistral, Qwen2
(biases on q/k/v) and SmolLM2 (tied embeddings). Every invariant is checked in
``__post_init__`` with an error that names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_SCALING = ("llama3", "linear")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``llama3``: Llama 3.1's piecewise rule; ``linear``: positions / factor."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_SCALING:
            raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not one of {SUPPORTED_ROPE_SCALING}")
        _positive("rope_scaling.factor", self.factor)
        if self.rope_type == "llama3":
            _positive("rope_scaling.low_freq_factor", self.low_freq_factor)
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                                 f"low_freq_factor={self.low_freq_factor}")
            _positive("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and options of a Llama-family decoder (names follow Hugging Face's config.json)."""

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

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _positive(name, getattr(self, name), integer=True)
        _positive("rms_norm_eps", self.rms_norm_eps)
        _positive("rope_theta", self.rope_theta)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None:
            _positive("sliding_window", self.sliding_window, integer=True)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads


def from_hf_config(source: str | os.PathLike | Mapping[str, Any]) -> LlamaConfig:
    """A ``LlamaConfig`` from a Hugging Face ``config.json`` (a path, a folder holding one, or its dict)."""
    cfg = _read_json(source) if not isinstance(source, Mapping) else dict(source)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures")
        raise ValueError(f"config.json model_type={model_type!r} (architectures={archs}) is not supported; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in cfg:
            raise ValueError(f"config.json is missing the field {key!r}")
    heads = cfg["num_attention_heads"]
    # transformers >= 5 keeps RoPE settings in `rope_parameters` (theta included); older files at the top level
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    head_dim = cfg.get("head_dim") or _divide("hidden_size", cfg["hidden_size"], "num_attention_heads", heads)
    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5),
        rope_theta=float(rope_theta),
        rope_scaling=_rope_scaling(rope),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None,
        model_type=model_type,
    )


def from_gguf_metadata(meta: Mapping[str, Any], tensor_names: set[str] | frozenset[str] = frozenset()) -> LlamaConfig:
    """A ``LlamaConfig`` from GGUF key/values (``general.architecture``, ``llama.*``).

    ``tensor_names`` decides tied embeddings: a file without ``output.weight`` ties them.
    """
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"GGUF general.architecture={arch!r} is not supported; supported: ('llama', 'qwen2')")

    def field(name: str, default: Any = None) -> Any:
        key = f"{arch}.{name}"
        if key not in meta and default is None:
            raise ValueError(f"GGUF metadata is missing {key!r}")
        return meta.get(key, default)

    hidden, heads = int(field("embedding_length")), int(field("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field("feed_forward_length")),
        num_hidden_layers=int(field("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field("attention.head_count_kv", heads)),
        head_dim=int(field("rope.dimension_count", 0)) or _divide("embedding_length", hidden, "head_count", heads),
        max_position_embeddings=int(field("context_length", 4096)),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field("rope.freq_base", 10000.0)),
        tie_word_embeddings=bool(tensor_names) and "output.weight" not in tensor_names,
        attention_bias=arch == "qwen2",
        model_type=arch,
    )


def _rope_scaling(raw: Mapping[str, Any] | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type", raw.get("type"))
    if kind == "default":
        return None
    if "factor" not in raw:
        raise ValueError(f"rope_scaling={dict(raw)} is missing 'factor'")
    extra = {k: raw[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in raw}
    return RopeScaling(rope_type=kind, factor=float(raw["factor"]), **extra)


def _read_json(source: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _divide(name: str, value: int, by_name: str, by: int) -> int:
    if by <= 0 or value % by:
        raise ValueError(f"{name}={value} is not divisible by {by_name}={by}: set head_dim explicitly")
    return value // by


def _positive(name: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or value <= 0:
        kind = "a positive int" if integer else "a positive number"
        raise ValueError(f"{name}={value!r} must be {kind}")


def config_from_gguf(path: str | os.PathLike) -> LlamaConfig:
    """Reads a GGUF file's metadata (not its tensors) and builds the ``LlamaConfig``."""
    from gguf import GGUFReader, GGUFValueType

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] != GGUFValueType.ARRAY:  # skip the big token tables
            meta[key] = field.contents()
    return from_gguf_metadata(meta, {t.name for t in reader.tensors})
