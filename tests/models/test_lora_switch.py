"""``CausalLM(lora_enabled=False)``: the adapted model's variables run as the base model (DPO's reference)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig
from qlora_jax.models import LlamaConfig, LoraConfig
from qlora_jax.models.decoder import CausalLM
from testlib import assert_trees_close, random_llama_variables, reorder_rtol

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16)
LORA = LoraConfig(rank=4, alpha=8.0)
DORA = LoraConfig(rank=4, alpha=8.0, use_dora=True, targets=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"))
B, T = 2, 9
N_FWD = CONFIG.num_hidden_layers * (3 * CONFIG.hidden_size + CONFIG.intermediate_size + T) + CONFIG.hidden_size


def _model(lora, **kw):
    return CausalLM(CONFIG, lora, QuantConfig(), dtype=jnp.float32, **kw)


def _base_logits(v, tokens):
    """The model without adapters, on the frozen collection alone."""
    return _model(LoraConfig(rank=0)).apply({"frozen": v["frozen"]}, tokens)


@pytest.mark.parametrize("lora", [LORA, DORA], ids=["lora", "dora"])
def test_disabled_adapters_give_the_base_model(rng, lora):
    v = random_llama_variables(rng, CONFIG, lora)
    if lora.use_dora:  # the magnitude off its init: DoRA rescales every adapted row
        v["params"] = jax.tree_util.tree_map_with_path(
            lambda p, x: x * (1.0 + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype))
            if jax.tree_util.keystr(p).endswith("['lora_magnitude']") else x, v["params"])
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
    model = _model(lora)
    off = jax.jit(model.clone(lora_enabled=False).apply)(v, tokens)
    base = jax.jit(_base_logits)(v, tokens)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(base))  # the same computation, op for op
    on = jax.jit(model.apply)(v, tokens)
    assert np.abs(np.asarray(on) - np.asarray(base)).max() > 1e3 * reorder_rtol(N_FWD) * np.abs(base).max()


def test_zero_b_is_the_base_model(rng):
    v = random_llama_variables(rng, CONFIG, LORA)
    v["params"] = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p).endswith("['lora_b']") else x, v["params"])
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
    on = jax.jit(_model(LORA).apply)(v, tokens)
    off = jax.jit(_model(LORA, lora_enabled=False).apply)(v, tokens)
    assert_trees_close(on, off, reorder_rtol(N_FWD))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_gradient_through_disabled_adapters_is_zero(rng, remat):
    v = random_llama_variables(rng, CONFIG, LORA)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
    off = _model(LORA, lora_enabled=False, remat=remat)

    def grads(model):
        def loss(params):
            return jnp.sum(model.apply({"params": params, "frozen": v["frozen"]}, tokens) ** 2)
        return jax.jit(jax.grad(loss))(v["params"])

    assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads(off)))
    assert all(np.asarray(g).any() for g in jax.tree.leaves(grads(off.clone(lora_enabled=True))))


def test_disabled_model_needs_no_params_and_initialises_none(rng):
    tokens = jnp.ones((1, 4), jnp.int32)
    v = _model(LORA, lora_enabled=False).init(jax.random.key(0), tokens)
    assert "params" not in v and "frozen" in v


def test_lora_enabled_must_be_a_bool():
    with pytest.raises(ValueError, match="lora_enabled"):
        _model(LORA, lora_enabled=0)


def test_without_adapters_keeps_the_other_fields():
    from qlora_jax.models.blocks import without_adapters

    off = without_adapters(DORA)
    assert (off.rank, off.use_dora) == (0, False)
    assert dataclasses.replace(off, rank=DORA.rank, use_dora=True) == DORA
