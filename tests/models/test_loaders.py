"""from_pretrained on Hugging Face folders (sharded bf16, bnb 4-bit) and its errors."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.models.loaders import from_pretrained
from qlora_jax.models.stacking import layer_slice


def _tiny_hf(dtype_name="bfloat16"):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype_name)).eval()


@pytest.mark.oracle
def test_sharded_bf16_folder_float_parity(rng, tmp_path):
    import torch

    hf = _tiny_hf()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, v, tok = from_pretrained(tmp_path, quantization=None, dtype=jnp.float32, base_dtype=jnp.float32)
    assert tok is None
    tokens = rng.integers(0, 256, (2, 12))
    with torch.no_grad():
        ref = hf.float()(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(np.asarray(model.apply(v, jnp.asarray(tokens))) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.oracle
def test_bnb_4bit_folder_loads_without_requantizing(tmp_path):
    import torch
    import transformers

    hf = _tiny_hf("float32")
    hf.save_pretrained(tmp_path / "fp")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    q = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bnb, dtype=torch.float32)
    expected = q.model.layers[1].mlp.down_proj.weight
    codes, offset = expected.data.numpy().reshape(-1).copy(), float(expected.quant_state.offset)
    q.save_pretrained(tmp_path / "q4")
    _, v, _ = from_pretrained(tmp_path / "q4", dtype=jnp.float32)
    kernel = layer_slice(v["frozen"]["layers"]["mlp"]["down_proj"]["kernel"], 1)
    np.testing.assert_array_equal(np.asarray(kernel.codes), codes)
    assert float(kernel.offset) == offset  # bnb's own offset: read, not recomputed


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        from_pretrained(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"model_type='bert'.*BertModel.*supported"):
        from_pretrained(tmp_path)
    cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.remove(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        from_pretrained(tmp_path)
