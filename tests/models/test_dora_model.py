"""DoRA through the model: the loader's magnitudes, a fresh adapter changes nothing, PEFT files round-trip.

peft itself (logits, gradients, its own adapter files) is in test_dora_peft.py (oracle).
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qlora_jax.layers import QuantConfig
from qlora_jax.models import LlamaConfig, LoraConfig
from qlora_jax.models.decoder import CausalLM
from qlora_jax.models.export import load_peft_adapter, merged_tensors, save_peft_adapter
from qlora_jax.models.weights import init_lora, variables_from_tensors
from testlib import assert_trees_close, random_llama_tensors, reorder_rtol

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
DORA = LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module")
def variables():
    """One random NF4 model with DoRA for the module (its base weights fresh per run of the module)."""
    rng = np.random.default_rng(zlib.crc32(__name__.encode()))
    tensors = random_llama_tensors(rng, CONFIG)
    return variables_from_tensors(CONFIG, tensors.items(), quant=QuantConfig(), lora=DORA, base_dtype=jnp.float32)


def test_loader_magnitudes_are_each_layers_row_norms(variables):
    v = variables
    for group, name in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("mlp", "down_proj")):
        stack, kernel = v["params"]["layers"][group][name], v["frozen"]["layers"][group][name]["kernel"]
        assert set(stack) == {"lora_a", "lora_b", "lora_magnitude"}
        assert stack["lora_magnitude"].shape == (CONFIG.num_hidden_layers, kernel.shape[0])
        dense = np.asarray(jax.vmap(lambda q: q.dequantize(jnp.float32))(kernel), np.float64)  # (L, out, in)
        assert_trees_close(stack["lora_magnitude"], np.linalg.norm(dense, axis=2), reorder_rtol(dense.shape[2]))
    assert "lora_magnitude" not in v["params"]["layers"]["self_attn"].get("v_proj", {})  # not a target


def test_fresh_dora_model_is_the_base_model(rng, variables):
    """B = 0 and m = ||W||: W' = W, so the logits are plain LoRA's (which adds nothing either)."""
    v = variables
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 9)))
    plain = dataclasses.replace(DORA, use_dora=False)
    no_m = jax.tree.map(lambda d: {k: x for k, x in d.items() if k != "lora_magnitude"}, v["params"]["layers"],
                        is_leaf=lambda d: isinstance(d, dict) and "lora_a" in d)
    dora = jax.jit(CausalLM(CONFIG, DORA, QuantConfig(), dtype=jnp.float32).apply)(v, tokens)
    lora = jax.jit(CausalLM(CONFIG, plain, QuantConfig(), dtype=jnp.float32).apply)(
        {"params": {"layers": no_m}, "frozen": v["frozen"]}, tokens)
    n = CONFIG.num_hidden_layers * (3 * CONFIG.hidden_size + CONFIG.intermediate_size + 9) + CONFIG.hidden_size
    assert_trees_close(dora, lora, reorder_rtol(n))


def test_init_lora_needs_the_base_for_dora():
    with pytest.raises(ValueError, match="use_dora needs the frozen base weights"):
        init_lora(CONFIG, DORA, jax.random.key(0))


def _perturbed(rng, v):
    return jax.tree.map(lambda p: p * (1.0 + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype)) + 0.01,
                        v["params"])


def test_adapter_round_trip_and_merge(rng, tmp_path, variables):
    v = variables
    params = _perturbed(rng, v)
    save_peft_adapter(tmp_path, params, DORA)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (CONFIG.hidden_size,)
    loaded, lora = load_peft_adapter(tmp_path)
    assert lora == DORA
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)
    # the merge is PEFT's: every adapted row rescaled to its magnitude
    merged = merged_tensors({**v, "params": params}, DORA)
    row = merged["model.layers.0.self_attn.q_proj.weight"]
    assert_trees_close(np.linalg.norm(row, axis=1), params["layers"]["self_attn"]["q_proj"]["lora_magnitude"][0],
                       reorder_rtol(CONFIG.hidden_size + DORA.rank))


def test_dora_adapter_errors(tmp_path, variables):
    v = variables
    with pytest.raises(ValueError, match="lora.use_dora=False but self_attn.q_proj has DoRA magnitude"):
        save_peft_adapter(tmp_path / "a", v["params"], dataclasses.replace(DORA, use_dora=False))
    save_peft_adapter(tmp_path / "b", v["params"], DORA)
    tensors = load_file(tmp_path / "b" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(ValueError, match="is a DoRA magnitude but .* does not set use_dora"):
        load_peft_adapter(tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: t for k, t in tensors.items() if not k.endswith("q_proj.lora_magnitude_vector")},
              str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="self_attn.q_proj has lora_a weights but no lora_magnitude"):
        load_peft_adapter(tmp_path / "b")
    save_file({k: t for k, t in tensors.items() if ".layers.1." not in k},
              str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"leaves out layers \[1\]; DoRA needs every layer"):
        load_peft_adapter(tmp_path / "b", num_layers=2)
