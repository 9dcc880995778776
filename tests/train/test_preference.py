"""Preference losses, steps and pair batches (TRL itself is in test_preference_trl.py, oracle)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.layers import QuantConfig, split_trainable
from qlora_jax.models import LlamaConfig, LoraConfig
from qlora_jax.models.decoder import CausalLM
from qlora_jax.train.preference import (dpo_objective, make_dpo_step, make_orpo_step, make_preference_eval_step,
                                        make_reference_step, sequence_logps, token_logps)
from qlora_jax.train.preference_data import PreferencePair, encode_preference_record, preference_batch
from qlora_jax.train.preference_loss import dpo_loss, log1mexp, orpo_loss
from qlora_jax.train.records import Example, RecordError
from testlib import assert_trees_close, random_llama_variables, reorder_rtol

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16)
LORA = LoraConfig(rank=4, alpha=8.0)
T = 16
N_BWD = 2 * (CONFIG.num_hidden_layers * (3 * CONFIG.hidden_size + CONFIG.intermediate_size + T)
             + CONFIG.vocab_size + T) + 8 * T


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


# ---- losses ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("ipo", 0.0)])
def test_dpo_loss_is_its_formula(rng, loss_type, eps):
    pc, pr, rc, rr = (rng.uniform(-60, -20, 6) for _ in range(4))
    nc, nr = rng.integers(1, 30, 6), rng.integers(1, 30, 6)
    beta = 0.3
    losses, m = dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta=beta, loss_type=loss_type,
                         label_smoothing=eps, chosen_tokens=nc, rejected_tokens=nr)
    delta = (pc - rc) - (pr - rr)
    expect = {"sigmoid": -(1 - eps) * _log_sigmoid(beta * delta) - eps * _log_sigmoid(-beta * delta),
              "robust": (-(1 - eps) * _log_sigmoid(beta * delta) + eps * _log_sigmoid(-beta * delta)) / (1 - 2 * eps),
              "ipo": ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2}[loss_type]
    np.testing.assert_allclose(losses, expect, rtol=1e-5, atol=1e-5 * 80)  # inputs are float32 at |x| <= 60
    np.testing.assert_allclose(m["rewards/chosen"], beta * (pc - rc), atol=1e-5 * 80)
    np.testing.assert_allclose(m["rewards/margins"], beta * delta, atol=2e-5 * 80)
    np.testing.assert_array_equal(m["rewards/accuracies"], (np.asarray(m["rewards/chosen"])
                                                            > np.asarray(m["rewards/rejected"])).astype(np.float32))
    np.testing.assert_array_equal(m["logps/chosen"], pc.astype(np.float32))


def test_orpo_loss_is_its_formula(rng):
    ac, ar = rng.uniform(-4, -0.05, 6), rng.uniform(-4, -0.05, 6)
    losses, m = orpo_loss(jnp.asarray(ac, jnp.float32), jnp.asarray(ar, jnp.float32), beta=0.25)
    log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
    np.testing.assert_allclose(m["log_odds_chosen"], log_odds, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses, -0.25 * _log_sigmoid(log_odds), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], 0.25 * ac, rtol=1e-6)


def test_log1mexp_is_accurate_on_both_branches_with_finite_gradients():
    x = np.array([-40.0, -5.0, -math.log(2) - 1e-3, -math.log(2), -math.log(2) + 1e-3, -1e-3, -1e-7], np.float32)
    got = np.asarray(log1mexp(jnp.asarray(x)), np.float64)
    x64 = x.astype(np.float64)
    expect = np.where(x64 < -math.log(2), np.log1p(-np.exp(x64)), np.log(-np.expm1(x64)))  # each exact in float64
    np.testing.assert_allclose(got, expect, rtol=4 * np.finfo(np.float32).eps)
    grads = jax.vmap(jax.grad(log1mexp))(jnp.asarray(x))
    np.testing.assert_allclose(grads, -1.0 / np.expm1(-x.astype(np.float64)), rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [({"beta": 0.0}, "beta"), ({"loss_type": "hinge"}, "loss_type"),
                                           ({"label_smoothing": 0.5, "loss_type": "robust"}, "label_smoothing"),
                                           ({"label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing")])
def test_dpo_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*(jnp.zeros(2),) * 4, **kwargs)


# ---- steps -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_vars():
    v = random_llama_variables(np.random.default_rng(7), CONFIG, LORA)
    return CausalLM(CONFIG, LORA, QuantConfig(), dtype=jnp.float32), *split_trainable(v)


def _pairs(rng, n):
    def row(prompt):
        k = int(rng.integers(2, T - prompt))
        return Example(rng.integers(0, CONFIG.vocab_size, prompt + k).astype(np.int32),
                       np.arange(prompt + k) >= prompt)
    return [PreferencePair(row(p), row(p)) for p in rng.integers(1, 6, n)]


def _stack(*batches):
    return {k: jnp.asarray(np.stack([b[k] for b in batches])) for k in batches[0]}


def _grad_keeper():
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


@pytest.fixture(scope="module")
def steps(model_and_vars):
    """The jitted DPO (beta 0.1) and ORPO (beta 0.2) steps, shared so that each shape compiles once per module."""
    model = model_and_vars[0]
    return {"dpo": jax.jit(make_dpo_step(model, _grad_keeper(), beta=0.1)),
            "orpo": jax.jit(make_orpo_step(model, _grad_keeper(), beta=0.2))}


def _run(step, params, frozen, batch):
    _, grads, metrics = step(params, _grad_keeper().init(params), frozen, batch, jax.random.key(0))
    return {k: float(x) for k, x in metrics.items()}, grads


def test_token_logps_are_log_softmax_of_the_logits(rng, model_and_vars):
    model, params, frozen = model_and_vars
    batch = preference_batch(_pairs(rng, 2), 2, T)
    v = {"params": params, **frozen}
    got = token_logps(model, v, {k: jnp.asarray(x) for k, x in batch.items()})
    logits = model.apply(v, jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                         segment_ids=jnp.asarray(batch["segment_ids"]))
    expect = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
    assert_trees_close(got, expect, reorder_rtol(N_BWD))
    sums = sequence_logps(got, jnp.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(sums, np.sum(np.where(batch["loss_mask"] > 0, got, 0), -1), rtol=1e-6)


def test_fresh_adapter_gives_log_2_and_zero_rewards(rng, model_and_vars, steps):
    model, params, frozen = model_and_vars
    zero_b = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p).endswith("['lora_b']") else x, params)
    m, grads = _run(steps["dpo"], zero_b, frozen, _stack(preference_batch(_pairs(rng, 3), 3, T)))
    # the policy's forward (B = 0) and the reference's (LoRA off) are one function, fused apart by XLA
    atol = 0.1 * reorder_rtol(N_BWD) * 2 * (abs(m["logps/chosen"]) + abs(m["logps/rejected"]))
    assert abs(m["loss"] - math.log(2)) <= atol
    assert abs(m["rewards/chosen"]) <= atol and abs(m["rewards/rejected"]) <= atol
    assert any(np.asarray(g).any() for g in jax.tree.leaves(grads))  # B = 0 still gets a gradient


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_accumulation_and_padding_pairs_change_nothing(rng, model_and_vars, steps, objective):
    model, params, frozen = model_and_vars
    step = steps[objective]
    pairs = _pairs(rng, 4)
    one, g1 = _run(step, params, frozen, _stack(preference_batch(pairs, 4, T)))
    two, g2 = _run(step, params, frozen, _stack(preference_batch(pairs[:2], 2, T), preference_batch(pairs[2:], 2, T)))
    _check_same(one, g1, two, g2)
    # three pairs, one of the four places all padding: laid out in one micro-batch or two
    one, g1 = _run(step, params, frozen, _stack(preference_batch(pairs[:3], 4, T)))
    two, g2 = _run(step, params, frozen, _stack(preference_batch(pairs[:2], 2, T), preference_batch(pairs[2:3], 2, T)))
    _check_same(one, g1, two, g2)


def _check_same(one, g1, two, g2):
    for k, x in one.items():
        if k not in ("grad_norm", "finite"):
            assert abs(two[k] - x) <= reorder_rtol(N_BWD) * max(1.0, abs(x)), k
    assert_trees_close(g2, g1, reorder_rtol(N_BWD))


def test_precomputed_reference_is_the_reference_forward(rng, model_and_vars, steps):
    model, params, frozen = model_and_vars
    batch = _stack(preference_batch(_pairs(rng, 3), 3, T))
    step = steps["dpo"]
    live, g_live = _run(step, params, frozen, batch)
    ref = jax.jit(make_reference_step(model))(frozen, batch)
    stored, g_stored = _run(step, params, frozen, {**batch, "ref_logps": ref})
    assert abs(live["loss"] - stored["loss"]) < 1e-6
    assert_trees_close(g_stored, g_live, reorder_rtol(N_BWD))
    # the starting adapter as the reference (TRL's "ref" copy): at the start the policy is its reference
    own = jax.jit(make_reference_step(model))(frozen, batch, params)
    same, _ = _run(step, params, frozen, {**batch, "ref_logps": own})
    assert abs(same["loss"] - math.log(2)) < 1e-5 and abs(same["rewards/margins"]) < 1e-5
    # the eval step: the step's loss and metrics, without a gradient (no dropout here, so the same values)
    loss, metrics = jax.jit(make_preference_eval_step(dpo_objective(model, beta=0.1)))(params, frozen,
                                                                                      {**batch, "ref_logps": ref})
    assert abs(float(loss) - stored["loss"]) < 1e-6
    assert all(abs(float(metrics[k]) - stored[k]) < 1e-6 for k in metrics)


# ---- records and batches ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from qlora_jax.models.tokenizer import tokenizer_from_hf_folder
    from tinymodel import write_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(str(folder))
    return tokenizer_from_hf_folder(folder)


def test_string_record_rows_and_batch_layout(tok):
    pair = encode_preference_record({"prompt": "ab", "chosen": "cde", "rejected": "f"}, tok)
    for ex, completion in ((pair.chosen, "cde"), (pair.rejected, "f")):
        assert ex.tokens.tolist() == tok.encode("ab") + tok.encode(completion) + [tok.eos_id]
        assert ex.trainable.tolist() == [False] * 2 + [True] * (len(completion) + 1)
    b = preference_batch([pair], 2, 8, pad_id=0)
    assert all(x.shape == (4, 8) for x in b.values())
    assert b["tokens"][0, :6].tolist() == pair.chosen.tokens.tolist() and b["tokens"][2, :4].tolist() == \
        pair.rejected.tokens.tolist()
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0] and b["loss_mask"][2].tolist() == [0, 1, 1] + [0] * 5
    assert b["target_mask"][0].tolist() == [1] * 5 + [0] * 3 and b["target_mask"][2].tolist() == [1] * 3 + [0] * 5
    assert not b["loss_mask"][[1, 3]].any() and not b["segment_ids"][[1, 3]].any()  # the missing pair: padding


def test_messages_record_trains_on_the_completion_only(tok):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "and?"}]
    pair = encode_preference_record({"prompt": prompt, "chosen": [{"role": "assistant", "content": "good"}],
                                     "rejected": [{"role": "assistant", "content": "bad"}]}, tok)
    for ex, text in ((pair.chosen, "good"), (pair.rejected, "bad")):
        full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": text}], add_generation_prompt=False)
        assert tok.decode(ex.tokens.tolist(), skip_special_tokens=False) == full
        trained = tok.decode(ex.tokens[ex.trainable].tolist(), skip_special_tokens=False)
        assert trained == text + "<|im_end|>"  # not the prompt's assistant turn


@pytest.mark.parametrize("record, field", [
    ({"prompt": "a", "chosen": "b"}, "'rejected' is missing"),
    ({"prompt": "a", "chosen": " ", "rejected": "c"}, "'chosen' is empty"),
    ({"prompt": 3, "chosen": "b", "rejected": "c"}, "'prompt' must be a string"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}, "'rejected' must be a str"),
    ({"prompt": [], "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, "'rejected' must be a list"),
    ({"prompt": [], "chosen": [{"role": "user", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},
     "'chosen' has no assistant message"),
    ({"prompt": [{"role": "bot", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, r"'prompt'\[0\]\['role'\] is 'bot'"),
    (["a"], "JSON object"),
])
def test_bad_records_name_the_field(tok, record, field):
    with pytest.raises(RecordError, match=field):
        encode_preference_record(record, tok)


def test_truncation_that_leaves_no_completion_names_the_field(tok):
    with pytest.raises(RecordError, match="field 'chosen': no token to train on within the first 4 tokens"):
        encode_preference_record({"prompt": "abcdefgh", "chosen": "x", "rejected": "y"}, tok, max_len=4)
    with pytest.raises(ValueError, match="num_pairs=1"):
        preference_batch([encode_preference_record({"prompt": "", "chosen": "x", "rejected": "y"}, tok)] * 2, 1, 8)
