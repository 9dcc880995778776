"""Writes a transformers model as a float32 GGUF the way llama.cpp's converter does (test helper).

Tensor names come from gguf-py's own map (``gguf.get_tensor_name_map``, the table
``convert_hf_to_gguf.py`` uses), not from ours. What the converter changes is done
here as it does it: Gemma's norm weights are stored as ``1 + w``; a ``llama`` file's
q/k rows are permuted for llama.cpp's rotary layout. Metadata: the architecture's
sizes, rope base, and the family's extras (Gemma's soft-caps and window, Phi-3's LongRoPE factors,
which llama.cpp stores as the tensors ``rope_factors_long`` / ``rope_factors_short``).
"""

from __future__ import annotations

import numpy as np

ARCH = {"qwen3": "QWEN3", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3", "phi3": "PHI3", "llama": "LLAMA"}


def write_gguf(hf, path: str) -> str:
    import gguf

    c = hf.config
    arch = gguf.MODEL_ARCH[ARCH[c.model_type]]
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters) if c.model_type == "gemma3_text" else c.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if c.model_type == "phi3":
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if c.model_type == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if c.model_type.startswith("gemma"):
        w.add_sliding_window(c.sliding_window)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_type") == "longrope":  # as convert_hf_to_gguf.py's Phi3MiniModel: factors as tensors
        import math

        original = c.original_max_position_embeddings
        scale = c.max_position_embeddings / original
        w.add_rope_scaling_attn_factors(1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original)))
        w.add_rope_scaling_orig_ctx_len(original)
        for kind in ("long", "short"):
            tensor = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"ROPE_FACTORS_{kind.upper()}")]
            w.add_tensor(f"{tensor}.weight", np.asarray(rope[f"{kind}_factor"], np.float32))
    for name, tensor in hf.state_dict().items():
        x = tensor.detach().float().numpy()
        base, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None or base == "lm_head" and c.tie_word_embeddings:  # a tied head is not written
            continue
        if c.model_type.startswith("gemma") and name.endswith("norm.weight"):
            x = x + 1.0
        w.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
