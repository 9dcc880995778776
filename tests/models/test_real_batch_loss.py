"""Our NF4 SmolLM2-135M's loss on a real chitchat batch against transformers + bitsandbytes, float32 compute.

Both stacks load one Hugging Face folder (SmolLM2-135M-Instruct's real weights, the
``smollm2_hf`` fixture) and quantize it themselves to NF4 with double quantization, block 64.
The batch is the trainer's: the shipped chitchat conversations (6 turns per record, as
``scripts/train.py`` writes them) tokenized, masked (assistant turns only) and packed by
``qlora_jax.train.data``. Our loss is the trainer's eval step on the packed batch; transformers'
is the same masked mean of next-token NLLs, each packed example run as its own sequence.

Why the two must agree within 2e-3 (absolute, on a loss of about 4.6):

* Same bytes: every projection's 4-bit codes are equal (asserted); the block scales are equal
  except where the double-quant offset, ``mean(absmax)``, comes out of torch's float32 cascade sum
  one bit away from ours (float32 sums differ in the last bit between machines and libraries) and an
  8-bit scale code flips (counted, asserted rare).
* Same values: bnb, in train mode, dequantizes to the compute dtype (``gemm_4bit``'s default path:
  ``code * absmax`` in float32, one rounding, as ours; asserted on layer 0) and runs a float32
  matmul. So both sides compute one float32 function and differ in summation order only.
* How big a difference is: a perturbation of the weights moves this loss roughly in proportion to
  its relative size. NF4's own rounding (relative Frobenius error 0.094 on these weights,
  docs/quantization.md) moves a chitchat loss by about 0.19 (NF4 against bf16 weights, on one batch). Scaled by that
  ratio, float32 reordering (a dot of K = 1536 terms rounds at about sqrt(K) * 2^-24 = 2.3e-6
  relative) is worth about 5e-6, and the flipped scale codes (64 weights each, in under 1e-4 of
  the blocks) less still; one bf16 rounding of every weight (relative RMS 2^-8 / sqrt(3) = 2.3e-3)
  is worth about 4.5e-3.
* So 2e-3 is two decades above what the same float32 computation of the same bytes can give,
  and below one bf16 rounding: the losses are equal to float32 precision, and a bf16 step in
  either path would show. That is why bnb runs in train mode (under ``no_grad``): in eval mode on
  an AVX512-BF16 CPU it repacks its weights for a bf16 kernel. And why our embeddings (the tied
  head too) are loaded in float32 (``base_dtype``): the loaders' default bf16 table is such a step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from testlib import TOL

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

LOSS_TOL = 2e-3  # module docstring
SEQ_LEN, BATCH, RECORDS = 256, 2, 48
# a scale code flips only where the offsets differ by a bit and a block's scale sits within that bit
# of a rounding boundary of the 8-bit map; a systematic difference (another offset or map) moves most
FLIPPED_SCALES_MAX = 1e-3
PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


@pytest.fixture(scope="module")
def chat_batch(smollm2_hf, tmp_path_factory):
    """The first training batch (``BATCH`` x ``SEQ_LEN``) of the trainer's pipeline over the first chitchat records."""
    from qlora_jax.train.chitchat import write_chitchat_jsonl
    from qlora_jax.train.data import load_data

    _, tok = smollm2_hf
    path = str(tmp_path_factory.mktemp("chitchat") / "chitchat.jsonl")
    write_chitchat_jsonl(path, limit=RECORDS, turns_per_record=6)
    data = load_data(path, tok, max_len=SEQ_LEN)
    batch = next(data.iterator(BATCH, SEQ_LEN, pad_id=tok.eos_id))
    assert batch.segment_ids.max() >= 2 and batch.loss_mask.sum() > 100, "a packed batch with assistant targets"
    return batch


def _examples(batch) -> list[np.ndarray]:
    """Flat indices into ``(B, T)`` of each packed example (segment), padding left out."""
    b, t = batch.tokens.shape
    return [np.flatnonzero(batch.segment_ids[r] == s) + r * t
            for r in range(b) for s in range(1, int(batch.segment_ids[r].max()) + 1)]


def torch_loss(model, batch) -> float:
    """The masked mean NLL, each example its own right-padded row (positions from 0, as packing gives)."""
    import torch

    examples = _examples(batch)
    width = max(len(e) for e in examples)
    tokens, targets = np.zeros((len(examples), width), np.int64), np.zeros((len(examples), width), np.int64)
    attend, mask = np.zeros_like(tokens), np.zeros((len(examples), width))
    for j, e in enumerate(examples):
        n = len(e)
        tokens[j, :n], targets[j, :n] = batch.tokens.reshape(-1)[e], batch.targets.reshape(-1)[e]
        attend[j, :n], mask[j, :n] = 1, batch.loss_mask.reshape(-1)[e]
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(attend)).logits
    nll = torch.nn.functional.cross_entropy(logits.double().reshape(-1, logits.shape[-1]),
                                            torch.from_numpy(targets).reshape(-1), reduction="none").numpy()
    return float((nll * mask.reshape(-1)).sum() / mask.sum())


def our_loss(model, variables, batch) -> float:
    """The trainer's eval step (packed batch, chunked loss): total masked NLL / masked tokens."""
    from qlora_jax.layers import split_trainable
    from qlora_jax.train.step import make_eval_step

    params, frozen = split_trainable(variables)
    arrays = {k: np.asarray(getattr(batch, k))[None] for k in batch._fields}  # one micro-batch
    total, count = jax.jit(make_eval_step(model))(params, frozen, arrays)
    return float(total) / float(count)


def test_nf4_loss_on_a_chitchat_batch_equals_bitsandbytes(smollm2_hf, chat_batch):
    import bitsandbytes.functional as bnb_f
    import torch
    import transformers

    import qlora_jax as qj
    from qlora_jax.layers import QuantConfig
    from qlora_jax.models import LoraConfig
    from qlora_jax.quant import from_bnb_state_dict
    from testlib import bnb_state_dict

    folder, _ = smollm2_hf
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config,
                                                               dtype=torch.float32).train()  # docstring: train mode
    model, variables, _ = qj.from_pretrained(folder, quantization=QuantConfig("nf4", 64, True),
                                             lora=LoraConfig(rank=0), dtype=jnp.float32, base_dtype=jnp.float32)
    assert variables["frozen"]["embed_tokens"].dtype == jnp.float32

    blocks = flipped = 0
    for group, names in PROJECTIONS:
        for name in names:
            stack = variables["frozen"]["layers"][group][name]["kernel"]
            codes, scales, offsets = (np.asarray(x) for x in (stack.codes, stack.absmax, stack.offset))  # (L, ...)
            for i, layer in enumerate(theirs.model.layers):
                weight = getattr(getattr(layer, group), name).weight
                state, where = weight.quant_state, f"layer {i} {name}"
                np.testing.assert_array_equal(codes[i], weight.data.numpy().reshape(-1), err_msg=where)
                assert abs(float(offsets[i]) - float(state.offset)) <= TOL["offset_rel"] * float(state.offset), where
                differ = int(np.sum(scales[i] != state.absmax.numpy()))
                assert differ == 0 or float(offsets[i]) != float(state.offset), f"{where}: same offset, other codes"
                blocks, flipped = blocks + scales[i].size, flipped + differ
            weight = getattr(getattr(theirs.model.layers[0], group), name).weight
            same = from_bnb_state_dict(bnb_state_dict(weight.data, weight.quant_state))  # bnb's bytes, our dequantize
            np.testing.assert_array_equal(np.asarray(same.dequantize(jnp.float32)),
                                          bnb_f.dequantize_4bit(weight.data, weight.quant_state).numpy(), err_msg=name)
    assert flipped <= FLIPPED_SCALES_MAX * blocks, f"{flipped} of {blocks} block scale codes differ"

    ours_loss, bnb_loss = our_loss(model, variables, chat_batch), torch_loss(theirs, chat_batch)
    assert abs(ours_loss - bnb_loss) <= LOSS_TOL, (ours_loss, bnb_loss)
