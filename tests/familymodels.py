"""Tiny random transformers models of every family beyond Llama, for the oracle tests (test helper).

Each kind exercises what sets its family apart, at sizes that run in a second on a CPU:

* ``qwen3``: q/k norms, biases on q, k, v and o;
* ``gemma2``: (1 + w) norms, sandwich norms, GeGLU, soft-capped attention and final logits
  (caps small enough to bite), ``query_pre_attn_scalar`` unlike head_dim, sliding and full
  layers alternating;
* ``gemma3``: q/k norms, three layers (sliding, full, sliding), local rope base 10,000 and a
  linearly scaled global one;
* ``phi3``: fused qkv and gate_up, LongRoPE (original context 16, so 40 tokens use the long
  factors) and a partial rotary factor of 0.75 (Phi-4-mini's);
* ``mixtral``: four experts, two per token, and a sliding window of 8.

transformers 5 holds Mixtral's experts fused in memory (``mlp.experts.gate_up_proj``) and
writes them per expert (``block_sparse_moe.experts.{e}.w1.weight``), as every Hub folder has
them: ``disk_tensors`` gives the names a checkpoint has.
"""

from __future__ import annotations

KINDS = ("qwen3", "gemma2", "gemma3", "phi3", "mixtral")
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LORA_TARGETS = {"qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "gemma2": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                "gemma3": ["q_proj", "k_proj", "gate_proj", "down_proj"],
                "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                "mixtral": ["q_proj", "v_proj", "o_proj"]}


def hf_config(kind: str, **overrides):
    import transformers

    if kind == "qwen3":
        return transformers.Qwen3Config(**{**COMMON, "head_dim": 16, "attention_bias": True, **overrides})
    if kind == "gemma2":
        return transformers.Gemma2Config(**{**COMMON, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 8,
                                            "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                                            "initializer_range": 0.2, **overrides})
    if kind == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}
        return transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3, "head_dim": 16,
                                                "query_pre_attn_scalar": 24, "sliding_window": 8,
                                                "layer_types": ["sliding_attention", "full_attention",
                                                                "sliding_attention"],
                                                "rope_parameters": rope, **overrides})
    if kind == "phi3":
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
        return transformers.Phi3Config(**{**COMMON, "max_position_embeddings": 64,
                                          "original_max_position_embeddings": 16, "rope_parameters": rope,
                                          "pad_token_id": 0, **overrides})
    if kind == "mixtral":
        return transformers.MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                             "sliding_window": 8, **overrides})
    raise AssertionError(kind)


def disk_tensors(hf) -> dict:
    """The model's tensors under the names ``save_pretrained`` writes (float32 numpy)."""
    import tempfile

    from safetensors.numpy import load_file

    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        import glob

        out = {}
        for f in sorted(glob.glob(f"{folder}/*.safetensors")):
            out.update(load_file(f))
        return out


def hf_model(kind: str, seed: int = 0, **overrides):
    """A random ``AutoModelForCausalLM`` of ``kind`` in eval mode, biases and norms made non-trivial."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, **overrides))
    offset = 0.0 if kind.startswith("gemma") else 1.0  # Gemma stores w for (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (offset if "norm" in name else 0.0))
    return model.eval()
