"""Qwen3, Gemma 2, Gemma 3 and Phi-3 against transformers, bitsandbytes and peft (the Llama family's evidence).

Each kind (``tests/familymodels.py``) is a tiny random model whose family-specific parts are
non-trivial: fp32 logits within 1e-4 of transformers, greedy tokens with and without the KV
cache, NF4 bytes equal to bitsandbytes', PEFT adapters both ways, and the merged export.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from familymodels import KINDS, LORA_TARGETS, disk_tensors, hf_model

from qlora_jax.layers import QuantConfig
from qlora_jax.models.blocks import LoraConfig
from qlora_jax.models.config import from_hf_config
from qlora_jax.models.decoder import CausalLM
from qlora_jax.models.export import load_peft_adapter, save_merged, save_peft_adapter
from qlora_jax.models.family import family_of
from qlora_jax.models.generate import generate, greedy_reference
from qlora_jax.models.loaders import from_pretrained
from qlora_jax.models.stacking import layer_slice
from qlora_jax.models.weights import numpy_tensors, variables_from_tensors

pytestmark = pytest.mark.oracle


def _ours(hf, quant=None, lora=LoraConfig(rank=4)):
    cfg = from_hf_config(hf.config.to_dict())
    v = variables_from_tensors(cfg, numpy_tensors(disk_tensors(hf)), quant=quant, lora=lora, base_dtype=jnp.float32)
    return CausalLM(cfg, lora, quant=quant, dtype=jnp.float32), v


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _close(ours, ref, rel=1e-4, what=""):
    assert np.abs(ours - ref).max() <= rel * np.abs(ref).max(), (what, np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_logits_match_transformers(rng, kind):
    """Both lengths pass the windows of 8 (Gemma, Mixtral); 12 tokens stay within Phi-3's original context of
    16 (LongRoPE's short factors), 40 pass it (the long factors). One model, each length compared on its own."""
    hf = hf_model(kind)
    model, v = _ours(hf)
    for length in (12, 40):
        tokens = rng.integers(0, 256, (2, length))
        _close(np.asarray(model.apply(v, jnp.asarray(tokens))), _torch_logits(hf, tokens), what=f"{length} tokens")


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_matches_transformers(rng, kind):
    import torch

    hf = hf_model(kind)
    prompt = rng.integers(0, 256, 9).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                          pad_token_id=0)[0, 9:].tolist()
    model, v = _ours(hf)
    assert generate(model, v, prompt, 6) == ref
    assert greedy_reference(model, v, prompt, 6) == ref  # the cache changes nothing


@pytest.mark.parametrize("kind", KINDS)
def test_nf4_bytes_and_logits_match_bitsandbytes(rng, tmp_path, kind):
    import torch
    import transformers

    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    q_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_cfg,
                                                             dtype=torch.float32).eval()
    import bitsandbytes.functional as bnbf

    model, v = _ours(hf, quant=QuantConfig("nf4", 64, True))
    projections = [n for n, t in family_of(model.config).layer_tensors(model.config).items() if t.kind == "proj"]
    assert projections
    weights = disk_tensors(hf)
    every_projection_in_bnb = True
    for i, layer in enumerate(q_hf.model.layers):
        for name in projections:
            *module, _ = name.split(".")
            node = v["frozen"]["layers"]
            for part in module:
                node = node if part.isdigit() else node[part]
            ours_q = layer_slice(node["kernel"], i)
            if any(p.isdigit() for p in module):  # an expert: transformers keeps the fused (E, ...) experts in
                # float, so bnb's bytes come from bnb's own quantize_4bit on that expert's (out, in) matrix
                ours_q = layer_slice(ours_q, int(next(p for p in module if p.isdigit())))
                w = torch.from_numpy(np.ascontiguousarray(weights[f"model.layers.{i}.{name}"]))
                theirs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)[0]
                every_projection_in_bnb = False
            else:
                theirs = getattr(getattr(layer, module[0]), module[1]).weight.data
            np.testing.assert_array_equal(np.asarray(ours_q.codes), theirs.numpy().reshape(-1),
                                          err_msg=f"layer {i} {name}")
    if not every_projection_in_bnb:
        return
    tokens = rng.integers(0, 256, (2, 24))
    ref = _torch_logits(q_hf, tokens)
    ours = np.asarray(model.apply(v, jnp.asarray(tokens)))
    # bnb's CPU matmul runs in bf16, so the logits agree to bf16 precision: 2^-7 of the largest, or,
    # where the model amplifies roundings more (Gemma's x8 embeddings, GeGLU), the gap between our own
    # bf16 and float32 runs, which round every activation where bnb rounds only the matmuls
    ours_bf16 = np.asarray(model.clone(dtype=jnp.bfloat16).apply(v, jnp.asarray(tokens)))
    _close(ours, ref, max(2.0**-7, np.abs(ours_bf16 - ours).max() / np.abs(ours).max()))
    assert np.abs(_torch_logits(hf, tokens) - ref).max() > 10 * np.abs(ours - ref).max()  # quantized on both sides


def _random_lora(v, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    return {**v, "params": jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape) * 0.05, v["params"])}


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_our_adapter_and_we_load_peft_s(rng, tmp_path, kind):
    import peft
    import torch

    lora = LoraConfig(rank=4, alpha=8.0, targets=tuple(LORA_TARGETS[kind]))
    hf = hf_model(kind)
    model, v = _ours(hf, lora=lora)
    v = _random_lora(v)
    tokens = rng.integers(0, 256, (2, 12))
    # ours -> peft
    save_peft_adapter(tmp_path / "ours", v["params"], lora)
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(LORA_TARGETS[kind])
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    ref = _torch_logits(peft_model, tokens)
    ours = np.asarray(model.apply(v, jnp.asarray(tokens)))
    _close(ours, ref)
    with peft_model.disable_adapter():
        assert np.abs(_torch_logits(peft_model, tokens) - ref).max() > 100 * np.abs(ours - ref).max()
    # peft -> ours
    made = peft.get_peft_model(hf_model(kind), peft.LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS[kind]))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    made.save_pretrained(tmp_path / "theirs")
    params, theirs = load_peft_adapter(tmp_path / "theirs", num_layers=model.config.num_hidden_layers)
    assert (theirs.rank, theirs.alpha) == (4, 16.0)
    ref = _torch_logits(made.eval(), tokens)
    got = CausalLM(model.config, theirs, quant=None, dtype=jnp.float32).apply({**v, "params": params},
                                                                             jnp.asarray(tokens))
    _close(np.asarray(got), ref)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_export_loads_in_transformers(rng, tmp_path, kind):
    import torch
    import transformers

    lora = LoraConfig(rank=4, alpha=8.0, targets=tuple(LORA_TARGETS[kind]))
    model, v = _ours(hf_model(kind), lora=lora)
    v = _random_lora(v)
    save_merged(tmp_path, model.config, v, lora, dtype="float32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(merged).__name__ == family_of(model.config).architectures[model.config.model_type]
    tokens = rng.integers(0, 256, (1, 20))
    _close(np.asarray(model.apply(v, jnp.asarray(tokens))), _torch_logits(merged, tokens))
    assert from_hf_config(tmp_path) == model.config  # config.json written and read back unchanged


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_reads_the_saved_folder_in_nf4(rng, tmp_path, kind):
    """The folder transformers writes, through ``from_pretrained`` with the default (all) targets,
    gives the model built from the state dict: the same config, LoRA targets and logits."""
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    lora = LoraConfig(rank=2)
    model, v, tok = from_pretrained(tmp_path, lora=lora, dtype=jnp.float32, base_dtype=jnp.float32)
    assert tok is None and model.config == from_hf_config(hf.config.to_dict())
    adapted = {k for group in v["params"]["layers"].values() for k in group}
    assert adapted == set(family_of(model.config).targets)
    ref_model, ref_v = _ours(hf, quant=QuantConfig(), lora=lora)
    tokens = jnp.asarray(rng.integers(0, 256, (1, 16)))
    np.testing.assert_array_equal(np.asarray(model.apply(v, tokens)), np.asarray(ref_model.apply(ref_v, tokens)))
