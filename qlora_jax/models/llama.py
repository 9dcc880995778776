"""The Llama family: Llama 2 / 3 / 3.1+, Mistral, Qwen2 and SmolLM2.

    h = h + o_proj(attn(rope(q_proj(n1(h))), rope(k_proj(n1(h))), v_proj(n1(h))))   (per layer)
    h = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))

``n1`` is ``input_layernorm``, ``n2`` ``post_attention_layernorm``. Qwen2 has biases on
q/k/v, Mistral a sliding window, Llama 3.1 its ``llama3`` rope scaling, SmolLM2 tied
embeddings. The decoder around the layers is ``qlora_jax.models.decoder.CausalLM``
(``LlamaForCausalLM`` is that name, kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from qlora_jax.models.blocks import FULL, LLAMA_TARGETS, DecoderLayerBase, LoraConfig, RMSNorm, norm, tiled_mlp
from qlora_jax.models.config import (ROPE_TENSOR_PREFIX, ModelConfig, RopeScaling, common_fields, gguf_common_fields,
                                     gguf_field, hf_layer_types)
from qlora_jax.models.family import Family, LayerTensor

ALL_TARGETS = LLAMA_TARGETS
_DECODER_NAMES = {"LlamaForCausalLM": "CausalLM", "REMAT_POLICIES": "REMAT_POLICIES", "head_table": "head_table",
                  "init_cache": "init_cache"}

__all__ = ["ALL_TARGETS", "FAMILY", "DecoderLayer", "LoraConfig", "RMSNorm", *_DECODER_NAMES]


def __getattr__(name: str):
    """The decoder's names under their Llama-era ones (``LlamaForCausalLM`` is ``decoder.CausalLM``).

    Looked up lazily: the decoder imports the family registry, which imports this module.
    """
    if name in _DECODER_NAMES:
        from qlora_jax.models import decoder

        return getattr(decoder, _DECODER_NAMES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DecoderLayer(DecoderLayerBase):
    """One pre-norm block: attention and the SwiGLU MLP, each added to the residual."""

    @nn.compact
    def __call__(self, h, positions, segment_ids, kv, index, kind=FULL):
        c = self.config
        h, attn_out, new_kv = self.begin(h, positions, segment_ids, kv, index, kind)
        h = h + attn_out.astype(h.dtype)
        mlp_out = tiled_mlp(self, norm(c, "post_attention_layernorm")(h), self.mlp_tile, self.deterministic)
        return h + mlp_out.astype(h.dtype), new_kv


def attention_tensors(c: ModelConfig) -> dict[str, LayerTensor]:
    """q/k/v/o weights and biases (and q/k norms), shared with the families built like Llama."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    out = {"self_attn.q_proj.weight": LayerTensor((q, c.hidden_size), "proj"),
           "self_attn.k_proj.weight": LayerTensor((kv, c.hidden_size), "proj"),
           "self_attn.v_proj.weight": LayerTensor((kv, c.hidden_size), "proj"),
           "self_attn.o_proj.weight": LayerTensor((c.hidden_size, q), "proj")}
    if c.attention_bias:
        out.update({"self_attn.q_proj.bias": LayerTensor((q,), "bias"),
                    "self_attn.k_proj.bias": LayerTensor((kv,), "bias"),
                    "self_attn.v_proj.bias": LayerTensor((kv,), "bias")})
    if c.o_proj_bias:
        out["self_attn.o_proj.bias"] = LayerTensor((c.hidden_size,), "bias")
    if c.qk_norm:
        out.update({"self_attn.q_norm.weight": LayerTensor((c.head_dim,), "norm"),
                    "self_attn.k_norm.weight": LayerTensor((c.head_dim,), "norm")})
    return out


def mlp_tensors(c: ModelConfig) -> dict[str, LayerTensor]:
    return {"mlp.gate_proj.weight": LayerTensor((c.intermediate_size, c.hidden_size), "proj"),
            "mlp.up_proj.weight": LayerTensor((c.intermediate_size, c.hidden_size), "proj"),
            "mlp.down_proj.weight": LayerTensor((c.hidden_size, c.intermediate_size), "proj")}


def layer_tensors(c: ModelConfig) -> dict[str, LayerTensor]:
    norms = {n: LayerTensor((c.hidden_size,), "norm") for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
    return {**attention_tensors(c), **mlp_tensors(c), **norms}


def sliding_fields(cfg: Mapping[str, Any], num_layers: int, enabled: bool) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` of a config.json whose window is in effect when ``enabled``."""
    window = cfg.get("sliding_window") if enabled else None
    if window is None:
        return {"sliding_window": None}
    types = hf_layer_types(cfg, num_layers)
    if types is not None and "sliding" not in types:
        return {"sliding_window": None}
    return {"sliding_window": window, "layer_types": None if types is None or set(types) == {"sliding"} else types}


def parse_hf(cfg: dict[str, Any]) -> ModelConfig:
    model_type = cfg["model_type"]
    fields = common_fields(cfg, default_eps=1e-6 if model_type == "qwen2" else 1e-5)
    bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    return ModelConfig(**fields, attention_bias=bias, o_proj_bias=bias and model_type == "llama",
                       **sliding_fields(cfg, fields["num_hidden_layers"],
                                        cfg.get("use_sliding_window", model_type == "mistral")))


def parse_gguf(meta: Mapping[str, Any], tensor_names: frozenset[str]) -> ModelConfig:
    arch = meta["general.architecture"]
    fields = gguf_common_fields(meta, tensor_names, model_type=arch)
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        fields["rope_scaling"] = RopeScaling("linear", factor=float(gguf_field(meta, "rope.scaling.factor")))
    freqs = meta.get(ROPE_TENSOR_PREFIX + "rope_freqs.weight")
    if freqs is not None:  # Llama 3.1's scaling, as llama.cpp stores it: per-frequency divisors
        from qlora_jax.models.rope import llama3_from_divisors

        fields["rope_scaling"] = llama3_from_divisors(freqs, fields["rope_theta"], fields["head_dim"])
    return ModelConfig(**fields, attention_bias=arch == "qwen2")


def hf_config(c: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"hidden_act": "silu"}
    if c.model_type == "llama":
        out["attention_bias"] = c.attention_bias
    if c.sliding_window is not None:
        out["sliding_window"] = c.sliding_window
        if c.model_type == "qwen2":
            out["use_sliding_window"] = True
    if c.layer_types is not None:
        out["layer_types"] = [f"{t}_attention" for t in c.layer_types]
    return out


GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation for ``heads`` heads (works for biases too).

    llama.cpp stores a ``llama`` file's ``attn_q`` / ``attn_k`` rows permuted for its rotary
    layout; for Hugging Face's rotate-half layout: ``w.reshape(H, hd/2, 2, in).swapaxes(1, 2)``.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation for ``heads`` heads (``convert_hf_to_gguf.py``'s ``permute``),
    from Hugging Face's rotate-half layout to its interleaved pairs: ``w.reshape(H, 2, hd/2, in).swapaxes(1, 2)``.
    ``unpermute_rows`` inverts it."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor(name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    if c.model_type == "llama" and ".self_attn.q_proj." in name:
        return unpermute_rows(w, c.num_attention_heads)
    if c.model_type == "llama" and ".self_attn.k_proj." in name:
        return unpermute_rows(w, c.num_key_value_heads)
    return w


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"},
    layer=DecoderLayer,
    targets=LLAMA_TARGETS,
    parse_hf=parse_hf,
    layer_tensors=layer_tensors,
    hf_config=hf_config,
    gguf_architectures=("llama", "qwen2"),
    parse_gguf=parse_gguf,
    gguf_names=GGUF_NAMES,
    gguf_tensor=gguf_tensor,
)
