"""The family registry: lookups, LoRA target names per family, and each family's config.json parsing."""

from __future__ import annotations

import math

import pytest

from qlora_jax.models.blocks import LoraConfig, lora_targets
from qlora_jax.models.config import from_hf_config
from qlora_jax.models.family import families, family_for_gguf, family_of, known_targets, supported_model_types

BASE = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)


def test_every_model_type_has_one_family():
    types = supported_model_types()
    assert len(types) == len(set(types))
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"} <= set(types)
    for f in families():
        for t in f.model_types:
            assert t in f.architectures, f"{f.name}: no transformers class for {t}"


def test_gguf_architectures():
    assert family_for_gguf("qwen2").name == "llama" and family_for_gguf("gemma3").name == "gemma"
    with pytest.raises(ValueError, match=r"general.architecture='mamba' is not supported; supported: \('llama'"):
        family_for_gguf("mamba")


def test_phi3_fuses_the_llama_target_names():
    phi3 = from_hf_config({**BASE, "model_type": "phi3"})
    assert lora_targets(phi3, LoraConfig()) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert lora_targets(phi3, LoraConfig(targets=("qkv_proj", "down_proj"))) == {"qkv_proj", "down_proj"}
    with pytest.raises(ValueError, match="fuses q_proj, k_proj, v_proj into qkv_proj.*name only q_proj, v_proj"):
        lora_targets(phi3, LoraConfig(targets=("q_proj", "v_proj")))
    llama = from_hf_config({**BASE, "model_type": "llama"})
    with pytest.raises(ValueError, match=r"lora targets \['qkv_proj'\] are not projections of the llama family"):
        lora_targets(llama, LoraConfig(targets=("qkv_proj",)))
    with pytest.raises(ValueError, match=r"lora.targets=\('c_attn',\) has \['c_attn'\], not projections"):
        LoraConfig(targets=("c_attn",))
    assert "gate_up_proj" in known_targets() and "q_proj" in known_targets()


def test_gemma2_defaults_as_transformers_sets_them():
    c = from_hf_config({**BASE, "model_type": "gemma2", "head_dim": 32})
    assert family_of(c).name == "gemma" and c.tie_word_embeddings and c.norm_offset == 1.0 and c.sandwich_norm
    assert (c.attn_softcap, c.final_softcap, c.sliding_window) == (50.0, 30.0, 4096)
    assert c.layer_types == ("sliding", "full", "sliding", "full") and c.hidden_act == "gelu_tanh"
    assert c.attn_scale == pytest.approx(256 ** -0.5) and c.embed_multiplier == pytest.approx(math.sqrt(128))
    assert c.layer_windows() == (4096, None, 4096, None)


def test_gemma3_old_and_new_rope_fields():
    """transformers 4's top-level rope_theta / rope_local_base_freq / rope_scaling, and 5's per-type rope_parameters."""
    old = from_hf_config({**BASE, "model_type": "gemma3_text", "num_hidden_layers": 7, "rope_theta": 1e6,
                          "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                          "sliding_window_pattern": 6})
    new = from_hf_config({**BASE, "model_type": "gemma3_text", "num_hidden_layers": 7, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}})
    assert old == new
    assert new.layer_types == ("sliding",) * 5 + ("full", "sliding") and new.qk_norm
    assert (new.rope_theta, new.local_rope_theta, new.rope_scaling.factor) == (1e6, 10000.0, 8.0)
    assert new.final_softcap is None and new.attn_softcap is None


def test_qwen3_and_qwen2_windows_follow_layer_types():
    c = from_hf_config({**BASE, "model_type": "qwen3", "use_sliding_window": True, "sliding_window": 64,
                        "layer_types": ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]})
    assert c.qk_norm and c.layer_windows() == (None, None, 64, 64)
    assert from_hf_config({**BASE, "model_type": "qwen3", "sliding_window": 64}).sliding_window is None
    q2 = from_hf_config({**BASE, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64})
    assert q2.layer_windows() == (64,) * 4


def test_phi3_longrope_and_its_su_name():
    short, long = [1.0] * 16, [2.0] * 16
    c = from_hf_config({**BASE, "model_type": "phi3", "max_position_embeddings": 131072,
                        "original_max_position_embeddings": 4096,
                        "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long}})
    rs = c.rope_scaling
    assert rs.rope_type == "longrope" and rs.original_max_position_embeddings == 4096
    assert rs.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))  # transformers' rule
    with pytest.raises(ValueError, match="short_factor has 4 values; the rotary dim 32 needs 16"):
        from_hf_config({**BASE, "model_type": "phi3", "original_max_position_embeddings": 4096,
                        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}})
    partial = from_hf_config({**BASE, "model_type": "phi3", "partial_rotary_factor": 0.75})
    assert partial.rotary_dim == 24


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gemma2", "hidden_activation": "relu"}, "hidden_activation='relu' is not supported"),
    ({"model_type": "gemma3_text", "layer_types": ["sliding_attention"]}, "layer_types has 1 entries"),
    ({"model_type": "gemma3_text", "layer_types": ["chunked_attention"] * 4}, r"layer_types holds \['chunked_attention'\]"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0]}}, "missing 'long_factor'"),
])
def test_family_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config({**BASE, **change})
