"""The Qwen3 family (dense): Llama's layer with an RMSNorm over each head of q and k, before rope.

    q = rope(q_norm(q_proj(x)));  k = rope(k_norm(k_proj(x)))       (norms over head_dim)

Otherwise Llama's pre-norm block and SwiGLU MLP (``qlora_jax.models.llama.DecoderLayer``),
without biases (``attention_bias``, false by default, puts them on q, k, v and o); a sliding window only where
``use_sliding_window`` and ``layer_types`` put one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qlora_jax.models import llama
from qlora_jax.models.blocks import LLAMA_TARGETS
from qlora_jax.models.config import ModelConfig, common_fields, gguf_common_fields
from qlora_jax.models.family import Family


def parse_hf(cfg: dict[str, Any]) -> ModelConfig:
    fields = common_fields(cfg, default_eps=1e-6)
    bias = bool(cfg.get("attention_bias", False))  # Qwen3's attention_bias covers o_proj too
    return ModelConfig(**fields, attention_bias=bias, o_proj_bias=bias, qk_norm=True,
                       **llama.sliding_fields(cfg, fields["num_hidden_layers"], cfg.get("use_sliding_window", False)))


def parse_gguf(meta: Mapping[str, Any], tensor_names: frozenset[str]) -> ModelConfig:
    bias = "blk.0.attn_q.bias" in tensor_names
    return ModelConfig(**gguf_common_fields(meta, tensor_names, model_type="qwen3"), attention_bias=bias,
                       o_proj_bias=bias, qk_norm=True)


def hf_config(c: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"hidden_act": "silu", "attention_bias": c.attention_bias,
                           "use_sliding_window": c.sliding_window is not None}
    if c.sliding_window is not None:
        out["sliding_window"] = c.sliding_window
    if c.layer_types is not None:
        out["layer_types"] = [f"{t}_attention" for t in c.layer_types]
    return out


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    architectures={"qwen3": "Qwen3ForCausalLM"},
    layer=llama.DecoderLayer,
    targets=LLAMA_TARGETS,
    parse_hf=parse_hf,
    layer_tensors=llama.layer_tensors,
    hf_config=hf_config,
    gguf_architectures=("qwen3",),
    parse_gguf=parse_gguf,
    gguf_names={**llama.GGUF_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
)
