"""Our Llama-family model against transformers (fp32 logits, greedy tokens) and bnb NF4."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig
from qlora_jax.models.config import from_hf_config
from qlora_jax.models.generate import generate, greedy_reference
from qlora_jax.models.llama import LlamaForCausalLM, LoraConfig
from qlora_jax.models.stacking import layer_slice
from qlora_jax.models.weights import numpy_tensors, variables_from_tensors

pytestmark = pytest.mark.oracle

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _hf_model(kind: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**COMMON, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=8)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise AssertionError(kind)
    with torch.no_grad():  # random non-zero biases and norm weights, so they are checked too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _ours(hf, quant=None, dtype=jnp.float32):
    cfg = from_hf_config(hf.config.to_dict())
    lora = LoraConfig(rank=4)
    v = variables_from_tensors(cfg, numpy_tensors(hf.state_dict()), quant=quant, lora=lora, base_dtype=jnp.float32)
    return LlamaForCausalLM(cfg, lora, quant=quant, dtype=dtype), v


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_fp32_logits_match_transformers(rng, kind):
    import torch

    hf = _hf_model(kind)
    tokens = rng.integers(0, 256, (2, 40))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
    model, v = _ours(hf)
    ours = np.asarray(model.apply(v, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_greedy_generation_matches_transformers(rng, kind):
    import torch

    hf = _hf_model(kind)
    prompt = rng.integers(0, 256, 9).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 9:].tolist()
    model, v = _ours(hf)
    assert generate(model, v, prompt, 8) == ref
    assert greedy_reference(model, v, prompt, 8) == ref  # the cache changes nothing


def test_nf4_logits_match_bitsandbytes(rng, tmp_path):
    import torch
    import transformers

    hf = _hf_model("llama3")
    hf.save_pretrained(tmp_path)
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    q_hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_cfg, dtype=torch.float32).eval()
    model, v = _ours(hf, quant=QuantConfig("nf4", 64, True))
    # every projection holds bnb's bytes
    for i, layer in enumerate(q_hf.model.layers):
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                theirs = getattr(getattr(layer, group), name).weight.data.numpy().reshape(-1)
                ours_q = layer_slice(v["frozen"]["layers"][group][name]["kernel"], i)
                np.testing.assert_array_equal(np.asarray(ours_q.codes), theirs, err_msg=f"layer {i} {name}")
    # (compared before bnb's first CPU forward, which repacks its weights in place for its kernel)
    tokens = rng.integers(0, 256, (2, 24))
    with torch.no_grad():
        ref = q_hf(torch.from_numpy(tokens)).logits.float().numpy()
    ours = np.asarray(model.apply(v, jnp.asarray(tokens)))
    # bnb's CPU Linear4bit matmul runs in bf16 (1.6e-3 off an exact fp32 dequant-matmul here), so the
    # logits agree to bf16 precision: 2^-7 of the largest logit
    assert np.abs(ours - ref).max() <= 2.0**-7 * np.abs(ref).max()
    # and clearly not the float model: quantization was applied on both sides
    with torch.no_grad():
        fp = hf(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(fp - ref).max() > 10 * np.abs(ours - ref).max()
