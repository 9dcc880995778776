"""PEFT adapter files and merged export, checked by loading them with peft / transformers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig
from qlora_jax.models.config import from_hf_config
from qlora_jax.models.export import (load_peft_adapter, merged_tensors, requantization_error, save_merged,
                                     save_peft_adapter)
from qlora_jax.models.llama import LlamaForCausalLM, LoraConfig
from qlora_jax.models.weights import numpy_tensors, variables_from_tensors

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))


def _setup(quant=None):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    config = from_hf_config(hf.config.to_dict())
    v = variables_from_tensors(config, numpy_tensors(hf.state_dict()), quant=quant, lora=LORA, base_dtype=jnp.float32)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    v["params"] = jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape) * 0.05, v["params"])
    return hf, config, v


@pytest.mark.oracle
def test_peft_loads_our_adapter_and_logits_agree(rng, tmp_path):
    import peft
    import torch

    hf, config, v = _setup()
    save_peft_adapter(tmp_path, v["params"], LORA, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == ["down_proj", "o_proj", "q_proj", "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    tokens = rng.integers(0, 256, (2, 10))
    with torch.no_grad():
        ref = peft_model(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(LlamaForCausalLM(config, LORA, quant=None, dtype=jnp.float32).apply(v, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    # and the adapter changes the output, so the comparison means something
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(plain - ref).max() > 100 * np.abs(ours - ref).max()


@pytest.mark.oracle
def test_adapter_round_trip(tmp_path):
    _, _, v = _setup()
    save_peft_adapter(tmp_path, v["params"], LORA)
    params, lora = load_peft_adapter(tmp_path)
    assert lora == LORA
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(v["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.oracle
def test_merged_export_loads_in_transformers(rng, tmp_path):
    import torch
    import transformers

    hf, config, v = _setup(quant=QuantConfig("nf4", 64, True))
    tensors = save_merged(tmp_path, config, v, LORA, dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = rng.integers(0, 256, (1, 12))
    with torch.no_grad():
        ref = merged(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(LlamaForCausalLM(config, LORA, dtype=jnp.float32).apply(v, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    err = requantization_error(tensors)
    assert 0.05 < err < 0.15  # NF4's error on these weights (~0.09 on Gaussian ones)


def test_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        load_peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["c_attn"]}))
    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\]"):
        load_peft_adapter(tmp_path)
    with pytest.raises(ValueError, match="no LoRA parameters"):
        save_peft_adapter(tmp_path / "x", {}, LORA)


def test_merged_tensors_fold_the_adapter(rng):
    """Without transformers: a merged projection is W + s (A B)^T, an untargeted one is W."""
    from qlora_jax.models import LlamaConfig
    from qlora_jax.models.weights import expected_shapes

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cfg_tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(config).items()}
    v = variables_from_tensors(config, cfg_tensors.items(), quant=None, lora=LORA, base_dtype=jnp.float32)
    v["params"] = jax.tree_util.tree_map(lambda p: p + 0.1, v["params"])
    out = merged_tensors(v, LORA)
    ab = v["params"]["layers"]["self_attn"]["q_proj"]
    expect = cfg_tensors["model.layers.0.self_attn.q_proj.weight"] + 2.0 * (np.asarray(ab["lora_a"][0]) @ np.asarray(ab["lora_b"][0])).T
    np.testing.assert_allclose(out["model.layers.0.self_attn.q_proj.weight"], expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["model.layers.0.self_attn.k_proj.weight"], cfg_tensors["model.layers.0.self_attn.k_proj.weight"])


@pytest.mark.oracle
def test_from_pretrained_with_an_adapter(rng, tmp_path):
    """``from_pretrained(folder, adapter=...)``: the adapter's config and weights in one call, the same logits
    as the variables it was saved from; an adapter of another model's shape is refused by name."""
    import torch
    import transformers

    from qlora_jax.models.loaders import from_pretrained

    hf, config, v = _setup()
    hf.save_pretrained(tmp_path / "model")
    save_peft_adapter(tmp_path / "adapter", v["params"], LORA)
    model, loaded, _ = from_pretrained(tmp_path / "model", quantization=None, dtype=jnp.float32,
                                       base_dtype=jnp.float32, adapter=tmp_path / "adapter")
    assert model.lora == LORA
    tokens = jnp.asarray(rng.integers(0, 256, (1, 7)))
    want = LlamaForCausalLM(config, LORA, quant=None, dtype=jnp.float32).apply(v, tokens)
    np.testing.assert_allclose(np.asarray(model.apply(loaded, tokens)), np.asarray(want), rtol=1e-6, atol=1e-6)
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"adapter: layers/.*/lora_a has shape \(2, \d+, 4\), this model needs \(2, \d+, 4\)"):
        from_pretrained(tmp_path / "other", quantization=None, adapter=tmp_path / "adapter")
