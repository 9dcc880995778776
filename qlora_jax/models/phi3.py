"""The Phi-3 family (Phi-3, Phi-3.5, Phi-4, Phi-4-mini): Llama's block with fused projections and LongRoPE.

    q, k, v = split(qkv_proj(x), [H * D, KV * D, KV * D])
    mlp(x)  = down_proj(silu(g) * u),   g, u = halves of gate_up_proj(x)

LoRA goes on the fused projections under peft's names (``qkv_proj``, ``o_proj``,
``gate_up_proj``, ``down_proj``); the Llama names stand for them when all of a fused
group is named (``Family.resolve_targets``). Rope rotates the leading
``partial_rotary_factor`` of each head (Phi-4-mini: 0.75) and may be LongRoPE scaled
(``rope_scaling.type`` "longrope", or "su" in early files). A ``sliding_window``, where
the config has one, applies to every layer, as transformers applies it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from qlora_jax.models.blocks import FULL, DecoderLayerBase, SelfAttention, norm, tiled_mlp
from qlora_jax.models.config import (ROPE_TENSOR_PREFIX, ModelConfig, common_fields, gguf_common_fields,
                                     rope_parameters, rope_scaling_from)
from qlora_jax.models.family import Family, LayerTensor

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class FusedAttention(SelfAttention):
    """Self-attention whose q, k and v come from one ``qkv_proj``."""

    def project(self, x, deterministic):
        c = self.config
        q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        qkv = self.dense(q_size + 2 * kv_size, "qkv_proj")(x, deterministic)
        return qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]


class DecoderLayer(DecoderLayerBase):
    """Llama's pre-norm block over the fused projections."""

    @nn.compact
    def __call__(self, h, positions, segment_ids, kv, index, kind=FULL):
        c = self.config
        h, attn_out, new_kv = self.begin(h, positions, segment_ids, kv, index, kind, FusedAttention)
        h = h + attn_out.astype(h.dtype)
        x = norm(c, "post_attention_layernorm")(h)
        return h + tiled_mlp(self, x, self.mlp_tile, self.deterministic, fused=True).astype(h.dtype), new_kv


def layer_tensors(c: ModelConfig) -> dict[str, LayerTensor]:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"self_attn.qkv_proj.weight": LayerTensor((q + 2 * kv, c.hidden_size), "proj"),
            "self_attn.o_proj.weight": LayerTensor((c.hidden_size, q), "proj"),
            "mlp.gate_up_proj.weight": LayerTensor((2 * c.intermediate_size, c.hidden_size), "proj"),
            "mlp.down_proj.weight": LayerTensor((c.hidden_size, c.intermediate_size), "proj"),
            "input_layernorm.weight": LayerTensor((c.hidden_size,), "norm"),
            "post_attention_layernorm.weight": LayerTensor((c.hidden_size,), "norm")}


def parse_hf(cfg: dict[str, Any]) -> ModelConfig:
    fields = common_fields(cfg)
    partial = rope_parameters(cfg).get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0
    return ModelConfig(**fields, sliding_window=cfg.get("sliding_window"), partial_rotary_factor=float(partial))


def parse_gguf(meta: Mapping[str, Any], tensor_names: frozenset[str]) -> ModelConfig:
    fields = gguf_common_fields(meta, tensor_names, model_type="phi3")
    # rope.dimension_count is the rotary part of a head here (Phi-4-mini: 96 of 128)
    fields["head_dim"] = int(meta.get("phi3.attention.key_length") or fields["hidden_size"] // fields["num_attention_heads"])
    rotary = int(meta.get("phi3.rope.dimension_count") or fields["head_dim"])
    window = meta.get("phi3.attention.sliding_window")
    if "rope_factors_long.weight" in tensor_names:
        fields["rope_scaling"] = gguf_longrope(meta, fields["max_position_embeddings"], rotary)
    return ModelConfig(**fields, partial_rotary_factor=rotary / fields["head_dim"],
                       sliding_window=int(window) if window else None)


def gguf_longrope(meta: Mapping[str, Any], context: int, rotary: int):
    """LongRoPE as llama.cpp's converter writes it: the short and long factors as the tensors
    ``rope_factors_short`` / ``rope_factors_long`` (``rotary / 2`` each; the loader passes them as
    ``tensor.*`` metadata), ``rope.scaling.original_context_length``, and ``rope.scaling.attn_factor``."""
    factors = {}
    for kind in ("short", "long"):
        key = f"{ROPE_TENSOR_PREFIX}rope_factors_{kind}.weight"
        if key not in meta:
            raise ValueError(f"LongRoPE needs both rope_factors tensors; rope_factors_{kind}.weight is missing")
        factors[f"{kind}_factor"] = meta[key]
        if len(meta[key]) != rotary // 2:
            raise ValueError(f"rope_factors_{kind}.weight has {len(meta[key])} values; rope.dimension_count "
                             f"{rotary} needs {rotary // 2}")
    original = meta.get("phi3.rope.scaling.original_context_length")
    if not original:
        raise ValueError("LongRoPE needs phi3.rope.scaling.original_context_length")
    raw = {"rope_type": "longrope", **factors, "original_max_position_embeddings": int(original)}
    if meta.get("phi3.rope.scaling.attn_factor") is not None:
        raw["attention_factor"] = float(meta["phi3.rope.scaling.attn_factor"])
    return rope_scaling_from(raw, {"max_position_embeddings": context})


def hf_config(c: ModelConfig) -> dict[str, Any]:
    # pad_token_id: Phi3Config's default (32000) is outside a smaller vocabulary; save_merged keeps the base's
    return {"hidden_act": "silu", "sliding_window": c.sliding_window, "partial_rotary_factor": c.partial_rotary_factor,
            "pad_token_id": None}


FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    architectures={"phi3": "Phi3ForCausalLM"},
    layer=DecoderLayer,
    targets=TARGETS,
    target_aliases={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    parse_hf=parse_hf,
    layer_tensors=layer_tensors,
    hf_config=hf_config,
    gguf_architectures=("phi3",),
    parse_gguf=parse_gguf,
    gguf_names={"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
)
