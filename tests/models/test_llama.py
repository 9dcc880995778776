"""The decoder on its own: cache, remat, packed segments, LoRA structure, loading errors."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.layers import QuantConfig, merge, split_trainable, trainable_summary
from qlora_jax.models import LlamaConfig, LlamaForCausalLM, LoraConfig, init_cache, variables_from_tensors
from testlib import assert_trees_close, random_llama_tensors, reorder_rtol

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _model_and_vars(rng, quant=QuantConfig(), lora=LoraConfig(rank=4), **kw):
    v = variables_from_tensors(CFG, random_llama_tensors(rng, CFG).items(), quant=quant, lora=lora, base_dtype=jnp.float32)
    v["params"] = jax.tree_util.tree_map(lambda p: p + 0.05, v["params"])  # non-zero B, so LoRA matters
    return LlamaForCausalLM(CFG, lora, quant=quant, dtype=jnp.float32, **kw), v


def test_kv_cache_prefill_then_steps_equals_full_pass(rng):
    model, v = _model_and_vars(rng)
    tokens = jnp.asarray(rng.integers(0, 128, (2, 11)))
    full = np.asarray(model.apply(v, tokens))
    cache = init_cache(CFG, 2, 16, jnp.float32)
    parts = []
    for a, b in ((0, 6), (6, 7), (7, 11)):
        logits, cache = model.apply(v, tokens[:, a:b], cache=cache)
        parts.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "offload", "dots_saveable", "nothing_saveable"])
def test_remat_changes_nothing(rng, remat):
    model, v = _model_and_vars(rng)
    tokens = jnp.asarray(rng.integers(0, 128, (1, 9)))
    base = np.asarray(model.apply(v, tokens))
    rem = LlamaForCausalLM(CFG, LoraConfig(rank=4), dtype=jnp.float32, remat=remat)
    np.testing.assert_allclose(np.asarray(rem.apply(v, tokens)), base, rtol=1e-6, atol=1e-6)
    params, rest = split_trainable(v)
    g1 = jax.grad(lambda p: model.apply({"params": p, **rest}, tokens).sum())(params)
    g2 = jax.grad(lambda p: rem.apply({"params": p, **rest}, tokens).sum())(params)
    # a recomputation sums in another order: the chains of sums run over hidden, ffn and T, forward and back
    assert_trees_close(g2, g1, reorder_rtol(2 * CFG.num_hidden_layers * (CFG.hidden_size + CFG.intermediate_size + 9)))


def test_packed_segments_do_not_attend_to_each_other(rng):
    model, v = _model_and_vars(rng)
    a, b = rng.integers(0, 128, 5), rng.integers(0, 128, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    pos = jnp.asarray([list(range(5)) + list(range(7))])
    out = np.asarray(model.apply(v, packed, positions=pos, segment_ids=seg))
    np.testing.assert_allclose(out[0, :5], np.asarray(model.apply(v, jnp.asarray(a[None])))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], np.asarray(model.apply(v, jnp.asarray(b[None])))[0], rtol=1e-5, atol=1e-5)


def test_lora_targets_and_trainable_fraction(rng):
    model, v = _model_and_vars(rng, lora=LoraConfig(rank=4, targets=("q_proj", "v_proj")))
    layer = v["params"]["layers"]
    assert set(layer) == {"self_attn"} and set(layer["self_attn"]) == {"q_proj", "v_proj"}
    assert layer["self_attn"]["q_proj"]["lora_a"].shape == (CFG.num_hidden_layers, 64, 4)
    s = trainable_summary(v)
    assert s["trainable"] == 2 * 4 * ((64 + 64) + (64 + 32))
    tokens = jnp.asarray(rng.integers(0, 128, (1, 5)))
    assert model.apply(v, tokens).shape == (1, 5, 128)


def test_loading_errors_name_tensors(rng):
    tensors = random_llama_tensors(rng, CFG)
    bad = dict(tensors)
    bad["model.layers.0.mlp.up_proj.weight"] = np.zeros((128, 32), np.float32)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight has shape \(128, 32\), the config needs \(128, 64\)"):
        variables_from_tensors(CFG, bad.items())
    missing = {k: t for k, t in tensors.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match="1 tensors missing.*layers.1.self_attn.k_proj.weight"):
        variables_from_tensors(CFG, missing.items())
    extra = dict(tensors) | {"model.vision_tower.weight": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="does not use.*vision_tower"):
        variables_from_tensors(CFG, extra.items())
    ok = dict(tensors) | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}
    assert "frozen" in variables_from_tensors(CFG, ok.items(), quant=None)


def test_bad_configs():
    with pytest.raises(ValueError, match=r"lora.targets=.*has \['lm_head'\]"):
        LoraConfig(targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="remat='some'"):
        LlamaForCausalLM(CFG, remat="some")


def test_pallas_backend_gives_same_logits_and_lora_grads(rng):
    """The whole decoder on the fused Pallas kernels (interpret mode here) equals the jnp reference."""
    tokens = jnp.asarray(rng.integers(0, 128, (2, 9)))
    model_xla, v = _model_and_vars(rng, backend="xla")
    model_pallas = LlamaForCausalLM(CFG, LoraConfig(rank=4), quant=QuantConfig(), dtype=jnp.float32, backend="pallas")
    params, frozen = split_trainable(v)
    out = {}
    for name, model in (("xla", model_xla), ("pallas", model_pallas)):
        loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply(merge(p, frozen), tokens))[..., 3])
        out[name] = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(out["pallas"][0]), float(out["xla"][0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out["pallas"][1]), jax.tree.leaves(out["xla"][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="backend='gpu'"):
        LlamaForCausalLM(CFG, backend="gpu")


def _scan_carries(jaxpr, shape):
    """The dtypes of every ``scan`` output of ``shape`` in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found += [v.aval.dtype for v in eqn.outvars if v.aval.shape == shape]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _scan_carries(sub, shape)
    return found


def test_residual_stream_dtype(rng):
    """``residual_dtype`` is the layers' carry: float32 over bf16 compute stays float32 through the scan,
    changes nothing in float32 compute, and stays within bf16 rounding of the float32 model."""
    model, v = _model_and_vars(rng)
    tokens = jnp.asarray(rng.integers(0, 128, (1, 9)))
    f32 = np.asarray(model.apply(v, tokens))
    same = LlamaForCausalLM(CFG, LoraConfig(rank=4), dtype=jnp.float32, residual_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(same.apply(v, tokens)), f32)
    params, frozen = split_trainable(v)
    for residual, fp32_out in ((None, False), (jnp.float32, False), (jnp.float32, True)):
        mixed = LlamaForCausalLM(CFG, LoraConfig(rank=4, fp32_output=fp32_out), dtype=jnp.bfloat16,
                                 residual_dtype=residual)
        carries = _scan_carries(jax.make_jaxpr(lambda p: mixed.apply(merge(p, frozen), tokens))(params).jaxpr,
                                (1, 9, CFG.hidden_size))
        assert carries and set(carries) == {jnp.dtype(residual or jnp.bfloat16)}, carries
        def loss(p):
            logits = mixed.apply(merge(p, frozen), tokens)
            return logits[..., 3].sum(), logits

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)  # one compile per setting
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        out = np.asarray(out)
        # bf16 operands (8 significant bits) through two layers: a few percent of the logits' scale
        assert np.max(np.abs(out - f32)) < 0.05 * np.max(np.abs(f32)), (residual, fp32_out)
    with pytest.raises(ValueError, match="residual_dtype"):
        LlamaForCausalLM(CFG, residual_dtype=jnp.int32)
