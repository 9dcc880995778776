"""The planner on every family: exact state bytes against the loaded arrays, and the compiled step."""

from __future__ import annotations

import jax
import pytest
from test_memory import check_exact

from qlora_jax import memory
from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LoraConfig, from_hf_config
from qlora_jax.models.synthetic import synthetic_tensors
from qlora_jax.models.weights import variables_from_tensors

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
CONFIGS = {
    "qwen3": {"model_type": "qwen3", "attention_bias": True},
    "gemma2": {"model_type": "gemma2", "sliding_window": 16},
    "gemma3": {"model_type": "gemma3_text", "sliding_window": 16, "sliding_window_pattern": 2},
    "phi3": {"model_type": "phi3"},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
}


@pytest.mark.parametrize("kind", CONFIGS)
def test_state_bytes_equal_the_loaded_arrays_and_the_step_compiles(rng, kind):
    config = from_hf_config({**BASE, **CONFIGS[kind]})
    lora = LoraConfig(rank=8)
    variables = variables_from_tensors(config, synthetic_tensors(config, seed=int(rng.integers(2**31))),
                                       quant=QuantConfig(), lora=lora, key=jax.random.key(0))
    params, frozen = split_trainable(variables)
    check_exact(memory.state_bytes(config, lora=lora), params, frozen)
    p = memory.plan(config, batch=1, seq_len=64, lora=lora, platform="cpu", compute_dtype="float32")
    assert p.step_temp > 0 and p.device_bytes > p.step_temp
