"""``kernels.schedule``: ties keep every bit, and they keep XLA from holding every layer's buffers at once.

The memory tests compare XLA's compiled temporaries of a gradient at two depths: what one
more layer adds must be that layer's saved input (plus small LoRA gradients), not its
dequantized weights or its attention buffers. Each bound sits far from both outcomes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels.schedule import tie_to, zeros_after
from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig
from qlora_jax.models.weights import expected_shapes, variables_from_tensors
from qlora_jax.train.step import token_losses


@pytest.mark.parametrize("first", [0.5, -0.0, np.nan, np.inf])
def test_tie_keeps_every_bit(rng, first):
    tree = {"x": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32).at[0, 0].set(np.nan),
            "codes": jnp.asarray(rng.integers(0, 256, 40), jnp.uint8),
            "pos": jnp.asarray(rng.integers(-9, 9, 7), jnp.int32),
            "w": jnp.asarray(rng.standard_normal(6), jnp.bfloat16).at[1].set(-np.inf),
            "flag": jnp.asarray(rng.random(5) < 0.5), "key": jax.random.key(3), "none": None}
    anchor = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32).at[0, 0].set(first)
    out = jax.jit(tie_to)(tree, anchor)
    for name in ("x", "codes", "pos", "w", "flag"):
        assert out[name].dtype == tree[name].dtype
        np.testing.assert_array_equal(np.asarray(out[name]).view(np.uint8), np.asarray(tree[name]).view(np.uint8))
    np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))
    assert out["none"] is None
    zeros = jax.jit(lambda a: zeros_after(a, (3, 2), jnp.bfloat16))(anchor)
    assert zeros.dtype == jnp.bfloat16 and not np.asarray(zeros, np.float32).any()


def _grad_temp(config, lora, seq_len, attention, dtype=jnp.float32):
    """XLA's temporaries of the LoRA gradient (remat full) on abstract weights."""
    tensors = lambda: ((k, jnp.zeros(s, jnp.float32)) for k, s in expected_shapes(config).items())  # noqa: E731
    params, frozen = split_trainable(jax.eval_shape(lambda: variables_from_tensors(config, tensors(), QuantConfig(), lora)))
    model = LlamaForCausalLM(config, lora, QuantConfig(), dtype=dtype, remat="full", attention=attention)
    tok = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    batch = {"tokens": tok, "positions": tok, "segment_ids": tok, "targets": tok,
             "loss_mask": jax.ShapeDtypeStruct((1, seq_len), jnp.float32)}
    grad = jax.grad(lambda p, f, b: token_losses(model, {**f, "params": p}, b, None, True)[0])
    return jax.jit(grad).lower(params, frozen, batch).compile().memory_analysis().temp_size_in_bytes


def _config(layers, hidden, ffn, heads):
    return LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=64)


def test_dequantized_weights_are_not_all_kept():
    """Wide layers, 32 tokens: a layer's float32 dequantized weights (14 MiB) dwarf its input (64 KiB).
    Before the tie every extra layer added them all (XLA dequantized every layer up front)."""
    lora = LoraConfig(rank=4)
    per_layer_weights = 4 * (4 * 512 * 512 + 3 * 512 * 1536)
    grow = _grad_temp(_config(4, 512, 1536, 8), lora, 32, "reference") - _grad_temp(_config(2, 512, 1536, 8), lora, 32,
                                                                                      "reference")
    assert grow / 2 < 0.25 * per_layer_weights, grow


def test_chunked_attention_buffers_are_not_all_kept():
    """2048 tokens through chunked attention: one more layer keeps its input (2 MiB) and at most one
    more buffer of that size; before ``zeros_after`` each layer's loop buffers (out, dq, dk, dv: 4x
    the input and more) were all allocated at the start of the step."""
    lora, t, d = LoraConfig(rank=4), 2048, 256
    grow = _grad_temp(_config(4, d, 512, 4), lora, t, "chunked") - _grad_temp(_config(2, d, 512, 4), lora, t, "chunked")
    layer_input = t * d * 4
    assert grow / 2 < 2.5 * layer_input, (grow / 2, layer_input)
