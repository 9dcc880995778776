"""The Gemma 2 and Gemma 3 (text) family: sandwich norms, GeGLU, soft-capping, alternating windows.

    h = h + post_attention_layernorm(attn(input_layernorm(h)))
    h = h + post_feedforward_layernorm(down(gelu_tanh(gate(x)) * up(x))),  x = pre_feedforward_layernorm(h)

with every RMSNorm scaling by ``(1 + w)`` (the stored ``w`` starts at 0), embeddings
multiplied by ``sqrt(hidden)``, attention logits scaled by ``query_pre_attn_scalar^-1/2``
and, in Gemma 2, soft-capped (``50 tanh(l / 50)``), as are the final logits
(``30 tanh(l / 30)``). Layers alternate between a sliding window and full attention
(``layer_types``; Gemma 2: every other layer from the first, Gemma 3: five sliding, one
full). Gemma 3 adds (1 + w) RMSNorms over each head of q and k before rope, and gives
its sliding layers their own rope base (``rope_local_base_freq``, 10,000) while the
full ones use ``rope_theta`` (1,000,000) with its scaling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from qlora_jax.models import llama
from qlora_jax.models.blocks import FULL, LLAMA_TARGETS, DecoderLayerBase, norm, tiled_mlp
from qlora_jax.models.config import (ModelConfig, common_fields, gguf_common_fields, gguf_field, hf_layer_types,
                                     rope_parameters)
from qlora_jax.models.family import Family, LayerTensor

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # sliding layers per full one, plus one (transformers' defaults)


class DecoderLayer(DecoderLayerBase):
    """Gemma's block: a norm before and after both attention and the MLP."""

    @nn.compact
    def __call__(self, h, positions, segment_ids, kv, index, kind=FULL):
        c = self.config
        h, attn_out, new_kv = self.begin(h, positions, segment_ids, kv, index, kind)
        h = h + norm(c, "post_attention_layernorm")(attn_out).astype(h.dtype)
        mlp_out = tiled_mlp(self, norm(c, "pre_feedforward_layernorm")(h), self.mlp_tile, self.deterministic)
        return h + norm(c, "post_feedforward_layernorm")(mlp_out).astype(h.dtype), new_kv


def layer_tensors(c: ModelConfig) -> dict[str, LayerTensor]:
    norms = {f"{n}.weight": LayerTensor((c.hidden_size,), "norm") for n in NORMS}
    return {**llama.attention_tensors(c), **llama.mlp_tensors(c), **norms}


def default_layer_types(model_type: str, num_layers: int, pattern: int | None = None) -> tuple[str, ...]:
    """transformers' default: layer ``i`` is full when ``(i + 1) % pattern == 0``, else sliding."""
    pattern = pattern or _PATTERN[model_type]
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))


def _gemma_fields(model_type: str, fields: dict[str, Any], window: int | None, scalar: float,
                  types: tuple[str, ...] | None, **extra) -> ModelConfig:
    if window is None:
        types = None
    elif types is None:
        types = default_layer_types(model_type, fields["num_hidden_layers"], extra.pop("pattern", None))
    extra.pop("pattern", None)
    return ModelConfig(**fields, norm_offset=1.0, sandwich_norm=True, embed_multiplier=math.sqrt(fields["hidden_size"]),
                       attn_scale=float(scalar) ** -0.5, sliding_window=window, layer_types=types, **extra)


def parse_hf(cfg: dict[str, Any]) -> ModelConfig:
    model_type = cfg["model_type"]
    fields = common_fields(cfg, default_eps=1e-6)
    fields["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))  # Gemma ties by default
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACTS:
        raise ValueError(f"config.json hidden_activation={act!r} is not supported; supported: {sorted(_ACTS)}")
    extra: dict[str, Any] = dict(
        hidden_act=_ACTS[act], attention_bias=bool(cfg.get("attention_bias", False)),
        o_proj_bias=bool(cfg.get("attention_bias", False)),
        pattern=cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern"))
    if model_type == "gemma2":
        extra.update(attn_softcap=cfg.get("attn_logit_softcapping", 50.0),
                     final_softcap=cfg.get("final_logit_softcapping", 30.0))
    else:
        local = rope_parameters(cfg, "sliding_attention").get("rope_theta") or cfg.get("rope_local_base_freq") or 10000.0
        extra.update(qk_norm=True, local_rope_theta=float(local), attn_softcap=cfg.get("attn_logit_softcapping"),
                     final_softcap=cfg.get("final_logit_softcapping"))
    return _gemma_fields(model_type, fields, cfg.get("sliding_window", 4096), cfg.get("query_pre_attn_scalar", 256),
                         hf_layer_types(cfg, fields["num_hidden_layers"]), **extra)


# llama.cpp scales a 27B Gemma's queries by (hidden / heads)^-1/2 and every other by head_dim^-1/2
# (llama-model.cpp, f_attention_scale); the 27B models are the ones with these depths
_GGUF_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def parse_gguf(meta: Mapping[str, Any], tensor_names: frozenset[str]) -> ModelConfig:
    arch = meta["general.architecture"]
    model_type = "gemma2" if arch == "gemma2" else "gemma3_text"
    fields = gguf_common_fields(meta, tensor_names, model_type=model_type)
    fields["rms_norm_eps"] = float(gguf_field(meta, "attention.layer_norm_rms_epsilon", 1e-6))
    big = fields["num_hidden_layers"] == _GGUF_27B_LAYERS[arch]
    scalar = fields["hidden_size"] / fields["num_attention_heads"] if big else fields["head_dim"]
    window = int(gguf_field(meta, "attention.sliding_window", 4096))
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")  # newer converters: a period, or a flag per layer
    types = None
    if isinstance(pattern, (list, tuple)):
        types = tuple("sliding" if p else "full" for p in pattern)
        pattern = None
    extra: dict[str, Any] = dict(hidden_act="gelu_tanh")
    if arch == "gemma2":
        extra.update(attn_softcap=float(gguf_field(meta, "attn_logit_softcapping", 50.0)),
                     final_softcap=float(gguf_field(meta, "final_logit_softcapping", 30.0)))
    else:  # llama.cpp's gemma3: local rope base 10,000 and the 5:1 pattern, both fixed in its code
        extra.update(qk_norm=True, local_rope_theta=10000.0)
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if meta.get(f"{arch}.rope.scaling.type") == "linear" and factor:
            from qlora_jax.models.config import RopeScaling

            fields["rope_scaling"] = RopeScaling("linear", float(factor))
    return _gemma_fields(model_type, fields, window, scalar, types, pattern=pattern, **extra)


def hf_config(c: ModelConfig) -> dict[str, Any]:
    scalar = c.attn_scale ** -2
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh", "attention_bias": c.attention_bias,
        "query_pre_attn_scalar": int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 else scalar,
        "sliding_window": c.sliding_window, "attn_logit_softcapping": c.attn_softcap,
        "final_logit_softcapping": c.final_softcap,
    }
    if c.layer_types is not None:
        out["layer_types"] = [f"{t}_attention" for t in c.layer_types]
    if c.model_type == "gemma3_text":
        out["rope_local_base_freq"] = c.local_rope_theta
    return out


GGUF_NAMES = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_tensor(name: str, w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """llama.cpp's converter stores Gemma's norm weights as ``1 + w``; this gives back ``w``."""
    return w - 1.0 if name.endswith("norm.weight") else w


FAMILY = Family(
    name="gemma",
    model_types=("gemma2", "gemma3_text"),
    architectures={"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"},
    layer=DecoderLayer,
    targets=LLAMA_TARGETS,
    parse_hf=parse_hf,
    layer_tensors=layer_tensors,
    hf_config=hf_config,
    gguf_architectures=("gemma2", "gemma3"),
    parse_gguf=parse_gguf,
    gguf_names=GGUF_NAMES,
    gguf_tensor=gguf_tensor,
)
