"""The layer scan: equal to the layers applied one by one, activation offload, the stacked layout's errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig, variables_from_tensors
from qlora_jax.models.llama import DecoderLayer, RMSNorm, head_table
from qlora_jax.models.stacking import check_stacked, layer_slice
from testlib import assert_trees_close, random_llama_tensors, random_llama_variables, reorder_rtol

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
LORA = LoraConfig(rank=4)


def _variables(rng):
    return random_llama_variables(rng, CFG, LORA)


def _unrolled_logits(variables, tokens):
    """The decoder as a Python loop over ``DecoderLayer``, each applied to its own slice of the stacks."""
    frozen, params = variables["frozen"], variables["params"]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    h = jnp.take(frozen["embed_tokens"], tokens, axis=0).astype(jnp.float32)
    layer = DecoderLayer(CFG, LORA, QuantConfig(), jnp.float32)
    for i in range(CFG.num_hidden_layers):
        own = {"frozen": layer_slice(frozen["layers"], i), "params": layer_slice(params["layers"], i)}
        h, _ = layer.apply(own, h, positions, None, None, None)
    h = RMSNorm(CFG.rms_norm_eps).apply({"frozen": frozen["norm"]}, h)
    return jnp.einsum("btd,vd->btv", h, head_table(CFG, variables).astype(jnp.float32))


def test_scanned_model_equals_the_layers_one_by_one(rng):
    v = _variables(rng)
    tokens = jnp.asarray(rng.integers(0, 128, (2, 12)))
    model = LlamaForCausalLM(CFG, LORA, dtype=jnp.float32)
    params, rest = split_trainable(v)
    scanned = jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p, **rest}, tokens) ** 2)))
    unrolled = jax.jit(jax.value_and_grad(lambda p: jnp.mean(_unrolled_logits({"params": p, **rest}, tokens) ** 2)))
    (ls, gs), (lu, gu) = scanned(params), unrolled(params)
    # one program against the other: the same sums, perhaps fused in another order
    rtol = reorder_rtol(2 * CFG.num_hidden_layers * (CFG.hidden_size + CFG.intermediate_size + 12))
    # jitted: one compile each instead of the op-by-op dispatch of every layer's forward and backward
    logits, unrolled_logits = jax.jit(model.apply)(v, tokens), jax.jit(_unrolled_logits)(v, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(unrolled_logits), rtol=rtol, atol=rtol * 10)
    np.testing.assert_allclose(float(ls), float(lu), rtol=rtol)
    assert_trees_close(gs, gu, rtol)


def test_offload_gives_the_gradients_of_remat_full_and_asks_for_pinned_host(rng):
    """On the CPU the offload compiles to the program of remat full (host and device are one RAM), so the
    gradients are equal bit for bit; lowered for CUDA, each layer's input is placed in pinned_host."""
    v = _variables(rng)
    params, rest = split_trainable(v)
    tokens = jnp.asarray(rng.integers(0, 128, (2, 16)))

    def grad_fn(remat):
        model = LlamaForCausalLM(CFG, LORA, dtype=jnp.float32, remat=remat)
        return jax.jit(jax.grad(lambda p, t: jnp.mean(model.apply({"params": p, **rest}, t) ** 2)))

    full, offload = grad_fn("full")(params, tokens), grad_fn("offload")(params, tokens)
    for a, b in zip(jax.tree.leaves(offload), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text = grad_fn("offload").trace(params, tokens).lower(lowering_platforms=("cuda",)).as_text()
    placements = [line for line in text.splitlines() if "annotate_device_placement" in line]
    assert any("pinned_host" in line for line in placements), placements[:3]
    # each placement moves one layer's (B, T, hidden) input: the scan carries it for every layer
    assert any("tensor<2x16x64xf32>" in line for line in placements), placements[:3]
    assert "annotate_device_placement" not in grad_fn("full").trace(params, tokens).lower(
        lowering_platforms=("cuda",)).as_text()


def test_stacked_layout_and_the_old_layout_error(rng):
    v = _variables(rng)
    kernel = v["frozen"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert kernel.shape == (64, 128) and kernel.codes.shape == (3, 64 * 128 // 2) and kernel.stacked == 3
    assert kernel.bits_per_weight == layer_slice(kernel, 0).bits_per_weight
    np.testing.assert_array_equal(np.asarray(layer_slice(kernel, 2).codes), np.asarray(kernel.codes[2]))
    old = {"params": {"layers_0": {"mlp": {}}}}
    with pytest.raises(ValueError, match=r"unrolled layout \('layers_0'"):
        check_stacked(old, "checkpoint x")


def test_loader_errors_name_the_layer(rng):
    tensors = random_llama_tensors(rng, CFG)
    bad = dict(tensors)
    del bad["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing.*model.layers.2.mlp.up_proj.weight"):
        variables_from_tensors(CFG, bad.items(), quant=QuantConfig(), lora=LORA)


def test_peft_adapter_without_some_layers_loads_them_as_zero(rng, tmp_path):
    from qlora_jax.models import load_peft_adapter, save_peft_adapter

    v = _variables(rng)
    save_peft_adapter(tmp_path, v["params"], LORA)
    back, lora = load_peft_adapter(tmp_path)
    assert lora == LORA
    assert_trees_close(back, v["params"], 0.0)
    from safetensors.numpy import load_file, save_file

    tensors = {k: t for k, t in load_file(tmp_path / "adapter_model.safetensors").items() if ".layers.1." not in k}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    partial, _ = load_peft_adapter(tmp_path, num_layers=3)
    a = partial["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert a.shape == (3, 64, 4) and not np.any(np.asarray(a[1])) and np.any(np.asarray(a[2]))
    with pytest.raises(ValueError, match="layer 2, the model has 2 layers"):
        load_peft_adapter(tmp_path, num_layers=2)


def _scanned_attention_grad_temp_bytes(t: int) -> int:
    """XLA temporaries of the gradient of two chunked-attention layers inside a ``lax.scan``, ``T = t``."""
    from qlora_jax.models.attention import attention

    def loss(q, pos):
        def layer(c, _):
            k, v = c[:, :, :2] * 0.5, c[:, :, 2:] * 0.7
            out = attention(c, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=pos, kv_segment_ids=pos,
                            implementation="chunked")
            return out + c, None
        return jax.lax.scan(layer, q, None, length=2)[0].sum()

    args = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32), jax.ShapeDtypeStruct((1, t), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_attention_gradient_inside_the_scan_is_linear_in_length():
    """Positions are the same for every layer, so the scan's partial evaluation would hoist every tile's mask,
    and what depends on it, out of the loop, stacked over all ``(T / 512)^2`` tiles. Memory linear in ``T``
    with a fixed part grows at most 2x when ``T`` doubles; the hoisted tiles made it 2.6x (4x asymptotically)."""
    growth = _scanned_attention_grad_temp_bytes(2048) / _scanned_attention_grad_temp_bytes(1024)
    assert growth <= 2.0, growth
