"""DPO and ORPO against TRL 1.16 (``DPOTrainer``, ``trl.experimental.orpo.ORPOTrainer``) on a tiny Llama with LoRA.

Both sides hold the same model: the tiny float32 Llama folder (``tinymodel``), or its NF4 bytes as
bitsandbytes writes them (QLoRA; TRL casts a 4-bit model's adapters to bf16, set back to float32
here: float32 is what is compared), LoRA on their side
through peft with our adapter's weights (random ``A`` and non-zero ``B``, so the policy is not the
reference), and the same pairs, laid out by ``preference_batch``. Their log-probs come from the
peft model's own forward (TRL's fused head for DPO, ``get_batch_logps`` for ORPO) and their
reference from peft with the adapters disabled (a trainer given a ``peft_config``: a new
adapter); ours from ``make_dpo_step`` / ``make_orpo_step``, the gradients read from an optimizer
that keeps them as its state (compared as gradients, never as updated parameters).

Tolerances: the two stacks evaluate one float32 function in different summation orders
(``reorder_rtol`` of the longest chain: per layer the projections' inputs and the attention over
``T`` tokens, the head's ``hidden`` and ``vocab`` sums, a row's ``T`` log-probs; the backward
twice that plus the ``2P * T`` tokens a weight gradient sums over). A sequence log-prob is a sum
whose error is relative to its terms' magnitudes, not to its value, and DPO's margin is a
difference of four of them, so a margin-derived value (loss, rewards) is compared with the
absolute bound ``rtol * (|pi_c| + |ref_c| + |pi_r| + |ref_r|)`` times its slope in the margin.

TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (0.29 moved it to ``robust``); our cDPO
``sigmoid`` with smoothing ``eps`` is, by its formula, ``(1 - eps)`` times TRL's sigmoid loss on the
pairs plus ``eps`` times TRL's sigmoid loss on the swapped pairs (rejected first), which is what it
is compared with (TRL's own ``sigmoid`` up to 0.28 is that formula; trl/trainer/dpo_trainer.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.layers import split_trainable
from qlora_jax.models import LoraConfig
from qlora_jax.train.preference import make_dpo_step, make_orpo_step
from qlora_jax.train.preference_data import encode_preference_record, preference_batch
from testlib import assert_trees_close, reorder_rtol
from tinymodel import CONFIG as TINY

pytestmark = pytest.mark.oracle

LORA = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
P, T = 3, 40
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = (TINY[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "vocab_size"))
N_FWD = LAYERS * (3 * HIDDEN + INTERMEDIATE + T) + HIDDEN + VOCAB + T
N_BWD = 2 * N_FWD + 2 * P * T
WORDS = ["hello", "how", "are", "you", "fine", "thanks", "what", "is", "the", "weather", "sunny", "rain", "cat"]


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """``setups(base)``: ``_build``'s tuple for base "float" or "nf4", built once per module."""
    cache = {}

    def get(base: str):
        if base not in cache:
            cache[base] = _build(tmp_path_factory.mktemp(base), base)
        return cache[base]

    return get


def _build(root, base: str):
    """``(folder, model, params, frozen, batch, adapter folder)``: the tiny model, perturbed LoRA, P pairs.

    ``base`` "nf4": transformers + bitsandbytes quantize the tiny model (NF4, double quant) and save
    it, and both sides read those bytes (bnb's CPU matmul dequantizes to float32 in train mode,
    as in tests/models/test_dora_peft.py): QLoRA on both sides.
    """
    import shutil

    import qlora_jax as qj
    from qlora_jax.layers import QuantConfig
    from qlora_jax.models.export import save_peft_adapter
    from qlora_jax.models.tokenizer import tokenizer_from_hf_folder
    from tinymodel import write_tiny_model

    folder = write_tiny_model(str(root / "model"))
    quant = None
    if base == "nf4":
        import torch
        import transformers

        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=bnb) \
            .save_pretrained(root / "nf4")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(root / "model" / name, root / "nf4" / name)
        folder, quant = str(root / "nf4"), QuantConfig("nf4", 64, True)
    model, v, _ = qj.from_pretrained(folder, quantization=quant, lora=LORA, dtype=jnp.float32, base_dtype=jnp.float32)
    rng = np.random.default_rng(19)
    params, frozen = split_trainable(v)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape) * 0.1, p.dtype), params)
    save_peft_adapter(root / "adapter", params, LORA)
    tok = tokenizer_from_hf_folder(folder)
    say = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    records = [{"prompt": say(2 + i), "chosen": say(3 + 2 * i), "rejected": say(5 - i)} for i in range(P)]
    pairs = [encode_preference_record(r, tok, max_len=T) for r in records]
    batch = preference_batch(pairs, P, T, pad_id=0)
    return folder, model, params, frozen, batch, root / "adapter"


def _their_model(folder, adapter, trainer_cls, config):
    """A TRL trainer on a new peft adapter over the tiny model, the adapter then set to ours."""
    import peft
    import torch
    import transformers
    from datasets import Dataset
    from safetensors.torch import load_file

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    data = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    peft_config = peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                  target_modules=list(LORA.targets))
    trainer = trainer_cls(model=hf, args=config, train_dataset=data, processing_class=tok, peft_config=peft_config)
    for param in trainer.model.parameters():  # TRL 1.16 casts a 4-bit model's adapters to bf16: float32 again
        if param.requires_grad:
            param.data = param.data.float()
    result = peft.set_peft_model_state_dict(trainer.model, load_file(adapter / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    trainer.model.train()
    return trainer


def _their_grads(trainer, like):
    """The peft model's LoRA gradients in our stacked ``(L, in, r)`` / ``(L, r, out)`` layout."""
    named = dict(trainer.model.named_parameters())

    def pick(path, leaf):
        keys = [k.key for k in path]
        module = ".".join(keys[1:-1])
        name = {"lora_a": "lora_A", "lora_b": "lora_B"}[keys[-1]]
        return np.stack([named[f"base_model.model.model.layers.{i}.{module}.{name}.default.weight"].grad.numpy().T
                         for i in range(leaf.shape[0])])

    return jax.tree_util.tree_map_with_path(pick, like)


def _grad_keeper() -> optax.GradientTransformation:
    """An "optimizer" whose state after a step is that step's gradients (and whose updates are zero)."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _ours(step_fn, params, frozen, batch):
    tx = _grad_keeper()
    stacked = {k: jnp.asarray(x)[None] for k, x in batch.items()}  # one micro-batch
    _, grads, metrics = jax.jit(step_fn)(params, tx.init(params), frozen, stacked, jax.random.key(0))
    return {k: float(x) for k, x in metrics.items()}, grads


def _dpo_inputs(batch, swap: bool = False):
    """TRL's DPO inputs from our rows: ``input_ids``, ``attention_mask``, ``completion_mask`` (unshifted)."""
    import torch

    order = np.r_[P:2 * P, 0:P] if swap else np.arange(2 * P)
    mask = batch["loss_mask"][order]
    completion = np.concatenate([np.zeros((2 * P, 1)), mask[:, :-1]], axis=1)  # loss_mask[t] is token t + 1's
    return {"input_ids": torch.from_numpy(batch["tokens"][order].astype(np.int64)),
            "attention_mask": torch.from_numpy((batch["segment_ids"][order] > 0).astype(np.int64)),
            "completion_mask": torch.from_numpy(completion.astype(np.int64))}


def _their_dpo(setup, loss_type: str, beta: float, eps: float, swap: bool = False):
    import trl

    folder, _, params, _, batch, adapter = setup
    config = trl.DPOConfig(output_dir=str(adapter.parent / "trl"), beta=beta, loss_type=[loss_type],
                           label_smoothing=eps, report_to="none", use_cpu=True, bf16=False)
    trainer = _their_model(folder, adapter, trl.DPOTrainer, config)
    loss = trainer.compute_loss(trainer.model, _dpo_inputs(batch, swap))
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), metrics, _their_grads(trainer, params)


def _margin_atol(metrics, beta: float) -> float:
    """The absolute bound of a margin-derived value (module docstring): ``rtol * sum |logps|``, times beta."""
    scale = 2 * (abs(metrics["logps/chosen"]) + abs(metrics["logps/rejected"]))  # |pi| ~ |ref|: twice each
    return beta * reorder_rtol(N_FWD) * scale


def _check_metrics(ours, theirs, atol, names):
    for name in names:
        assert abs(ours[name] - theirs[name]) <= atol, (name, ours[name], theirs[name], atol)


@pytest.mark.parametrize("base, loss_type, beta", [("float", "sigmoid", 0.1), ("float", "robust", 0.3),
                                                   ("float", "ipo", 0.5), ("nf4", "sigmoid", 0.1)])
def test_dpo_matches_trl(setups, base, loss_type, beta):
    setup = setups(base)
    _, model, params, frozen, batch, _ = setup
    eps = 0.1 if loss_type == "robust" else 0.0
    loss, theirs, grads = _their_dpo(setup, loss_type, beta, eps)
    ours, our_grads = _ours(make_dpo_step(model, _grad_keeper(), beta=beta, loss_type=loss_type,
                                          label_smoothing=eps), params, frozen, batch)
    for name in ("logps/chosen", "logps/rejected"):  # sums of T log-probs: relative to their magnitude
        assert abs(ours[name] - theirs[name]) <= reorder_rtol(N_FWD) * abs(theirs[name]), name
    atol = _margin_atol(theirs, beta)
    # d loss / d margin: IPO's 2 (delta_bar - 1 / (2 beta)) per unit of the margin (|delta_bar| < 1 here), not beta
    slope = 2.0 * (1.0 + 1.0 / (2.0 * beta)) / beta if loss_type == "ipo" else 1.0 / (1.0 - 2.0 * eps)
    assert abs(ours["loss"] - loss) <= slope * atol + 1e-6 * abs(loss), (ours["loss"], loss)
    _check_metrics(ours, theirs, atol, ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    assert ours["rewards/accuracies"] == theirs["rewards/accuracies"]
    assert 0 < theirs["rewards/accuracies"] < 1 or abs(theirs["rewards/margins"]) > 10 * atol  # the policy moved
    assert_trees_close(our_grads, grads, reorder_rtol(N_BWD))


def test_cdpo_label_smoothing_is_trl_sigmoid_of_pairs_and_swapped_pairs(setups):
    setup = setups("float")
    _, model, params, frozen, batch, _ = setup
    beta, eps = 0.2, 0.15
    loss, theirs, grads = _their_dpo(setup, "sigmoid", beta, 0.0)
    swapped, _, swapped_grads = _their_dpo(setup, "sigmoid", beta, 0.0, swap=True)
    ours, our_grads = _ours(make_dpo_step(model, _grad_keeper(), beta=beta, label_smoothing=eps),
                            params, frozen, batch)
    expect = (1 - eps) * loss + eps * swapped
    assert abs(ours["loss"] - expect) <= _margin_atol(theirs, beta) + 1e-6 * expect
    expect_grads = jax.tree.map(lambda g, s: (1 - eps) * g + eps * s, grads, swapped_grads)
    assert_trees_close(our_grads, expect_grads, reorder_rtol(N_BWD))


def _orpo_inputs(batch):
    """ORPO's chosen_/rejected_ ``input_ids``, ``attention_mask``, ``labels`` (-100 off the completion)."""
    import torch

    out = {}
    for side, rows in (("chosen", slice(0, P)), ("rejected", slice(P, 2 * P))):
        tokens, real = batch["tokens"][rows].astype(np.int64), batch["segment_ids"][rows] > 0
        completion = np.concatenate([np.zeros((P, 1), bool), batch["loss_mask"][rows][:, :-1] > 0], axis=1)
        out[f"{side}_input_ids"] = torch.from_numpy(tokens)  # padding: right of every real token, masked
        out[f"{side}_attention_mask"] = torch.from_numpy(real.astype(np.int64))
        out[f"{side}_labels"] = torch.from_numpy(np.where(completion, tokens, -100))
    return out


@pytest.mark.parametrize("base", ["float", "nf4"])
def test_orpo_matches_trl(setups, base):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    folder, model, params, frozen, batch, adapter = setups(base)
    beta = 0.25
    config = ORPOConfig(output_dir=str(adapter.parent / "orpo"), beta=beta, report_to="none", use_cpu=True, bf16=False)
    trainer = _their_model(folder, adapter, ORPOTrainer, config)
    loss, theirs = trainer.get_batch_loss_metrics(trainer.model, _orpo_inputs(batch))
    loss.backward()
    grads = _their_grads(trainer, params)
    ours, our_grads = _ours(make_orpo_step(model, _grad_keeper(), beta=beta), params, frozen, batch)
    # averaged log-probs, the NLL: means of T terms, relative to their magnitude
    rtol = reorder_rtol(N_FWD)
    for name in ("logps/chosen", "logps/rejected", "nll_loss"):
        assert abs(ours[name] - theirs[name]) <= rtol * abs(theirs[name]), name
    atol = rtol * (abs(theirs["logps/chosen"]) + abs(theirs["logps/rejected"]))  # log_odds' inputs
    slope = 1.0 / (1.0 - np.exp(-abs(theirs["logps/chosen"])))  # d log(1 - e^a) / da, bounded at the batch's scale
    _check_metrics(ours, theirs, beta * atol, ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    _check_metrics(ours, theirs, 2 * slope * atol, ("log_odds_chosen", "log_odds_ratio"))
    assert abs(ours["loss"] - loss.item()) <= rtol * abs(theirs["nll_loss"]) + 2 * beta * slope * atol
    assert ours["rewards/accuracies"] == theirs["rewards/accuracies"]
    assert_trees_close(our_grads, grads, reorder_rtol(N_BWD))
