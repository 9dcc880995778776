"""Remat inside the layer scan: same values and gradients as no remat, and the memory remat promises on both jaxlibs.

jaxlib 0.10.2's CPU compiler merged an unrolled model's recomputation back into the forward
(remat saved nothing) until a custom VJP forced the order; inside ``nn.scan`` the forward and
the backward are two loops and plain ``nn.remat`` saves the memory on 0.10.2 and 0.11.2 alike
(``test_remat_full_frees_the_activations`` passes on both without that workaround).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig, variables_from_tensors
from testlib import random_llama_tensors

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _variables(rng, lora):
    v = variables_from_tensors(CFG, random_llama_tensors(rng, CFG).items(), quant=QuantConfig(), lora=lora, base_dtype=jnp.float32)
    v["params"] = jax.tree_util.tree_map(lambda p: p + 0.05, v["params"])  # non-zero B, so LoRA matters
    return v


def test_dropout_masks_are_the_same_in_the_recomputation(rng):
    lora = LoraConfig(rank=4, dropout=0.3)
    v = _variables(rng, lora)
    params, rest = split_trainable(v)
    tokens = jnp.asarray(rng.integers(0, 128, (2, 9)))
    key = jax.random.key(7)

    def loss(model):
        return lambda p: model.apply({"params": p, **rest}, tokens, deterministic=False, rngs={"dropout": key}).sum()

    none = LlamaForCausalLM(CFG, lora, dtype=jnp.float32)
    full = LlamaForCausalLM(CFG, lora, dtype=jnp.float32, remat="full")
    l1, g1 = jax.jit(jax.value_and_grad(loss(none)))(params)  # jitted: one compile, not op-by-op dispatch
    l2, g2 = jax.jit(jax.value_and_grad(loss(full)))(params)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_remat_full_frees_the_activations(rng):
    """XLA's temporaries for the gradient: remat full needs a fraction of remat none's.

    Measured before the layer scan (6 unrolled layers, batch 4 x 256, f32): none 133.5 MB;
    plain ``nn.remat`` 129.7 MB on jax 0.10.2 (no saving), 26.9 MB on 0.11.2.
    """
    lora = LoraConfig(rank=4)
    params, rest = split_trainable(_variables(rng, lora))
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)

    def temp(remat):
        model = LlamaForCausalLM(CFG, lora, dtype=jnp.float32, remat=remat)
        grad = jax.jit(jax.grad(lambda p, t: model.apply({"params": p, **rest}, t).mean()))
        return grad.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    none, full = temp("none"), temp("full")
    assert full < 0.4 * none, (full, none)


def test_dropout_costs_no_memory_under_remat():
    """LoRA dropout's masks are recomputed in the backward, not kept from the forward.

    What one more layer adds to XLA's temporaries of the trainer's compiled step (remat full,
    chunked attention, 2048 tokens), with dropout 0.1 and without. Kept masks would add
    ``8 * (6 * 64 + 256)`` bytes per token per layer (XLA's float32 uniform draws of the 7
    projections' inputs), 20x the layer's saved float32 input. Measured on jax 0.10.2: 4542
    bytes per token per layer before the mask's key was tied to the recomputed input, 779 after
    (777 without dropout).
    """
    import dataclasses

    from qlora_jax.memory import StepShape, compiled_step_temp

    def per_token_per_layer(dropout):
        shape = StepShape(1, 2048, LoraConfig(rank=4, dropout=dropout), QuantConfig(), "fp32", "full", "float32",
                          "float32", "chunked", 0)
        t2, t3 = (compiled_step_temp(dataclasses.replace(CFG, num_hidden_layers=n), shape) for n in (2, 3))
        return (t3 - t2) / 2048

    without, with_dropout = per_token_per_layer(0.0), per_token_per_layer(0.1)
    masks = 8 * (6 * 64 + 256)
    assert with_dropout <= without + 0.25 * masks, (with_dropout, without)
