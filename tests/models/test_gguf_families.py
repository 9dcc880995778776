"""GGUF files of Qwen3, Gemma 2, Gemma 3 and Phi-3 (as llama.cpp writes them) load to transformers' logits."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from familymodels import hf_model
from gguffiles import write_gguf

from qlora_jax.models.config import config_from_gguf, from_hf_config
from qlora_jax.models.loaders import from_pretrained

pytestmark = pytest.mark.oracle

# llama.cpp fixes what its GGUF cannot say: Gemma's query scale is head_dim^-1/2 (below 27B), Gemma 3's
# pattern is five sliding layers to one full, its local rope base 10,000; LongRoPE is tested on its own
# below. The kinds here keep to what the file carries.
KINDS = {
    "qwen3": {},
    "gemma2": {"query_pre_attn_scalar": 16},
    "gemma3": {"query_pre_attn_scalar": 16, "num_hidden_layers": 6, "layer_types": None,
               "sliding_window_pattern": 6},
    "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
             "original_max_position_embeddings": 256, "max_position_embeddings": 256},
}


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_loads_with_transformers_logits(rng, tmp_path, kind):
    import torch

    hf = hf_model(kind, **KINDS[kind])
    path = write_gguf(hf, str(tmp_path / f"{kind}.gguf"))
    want = from_hf_config(hf.config.to_dict())
    got = config_from_gguf(path)
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)  # stored as float32
    got = dataclasses.replace(got, rms_norm_eps=want.rms_norm_eps)
    assert got == want, {k: (getattr(got, k), getattr(want, k)) for k in want.__dataclass_fields__
                         if getattr(got, k) != getattr(want, k)}
    model, v, tok = from_pretrained(path, quantization=None, dtype=jnp.float32, base_dtype=jnp.float32)
    assert tok is None  # this file has no tokenizer tables
    tokens = rng.integers(0, 256, (2, 24))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(model.apply(v, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_longrope_gguf_loads_with_transformers_logits(rng, tmp_path):
    """Phi-3's LongRoPE from a GGUF: its factors are tensors there (rope_factors_long / _short), with the
    original context and attention factor in the metadata; 40 tokens pass the original 16, so the
    long factors are in use."""
    import torch

    hf = hf_model("phi3")
    path = write_gguf(hf, str(tmp_path / "phi3-longrope.gguf"))
    want, got = from_hf_config(hf.config.to_dict()), config_from_gguf(path)
    assert got.rope_scaling.rope_type == "longrope"
    for field in ("short_factor", "long_factor", "factor", "attention_factor"):
        np.testing.assert_allclose(getattr(got.rope_scaling, field), getattr(want.rope_scaling, field), rtol=1e-6)
    assert got.rope_scaling.original_max_position_embeddings == want.rope_scaling.original_max_position_embeddings
    model, v, _ = from_pretrained(path, quantization=None, dtype=jnp.float32, base_dtype=jnp.float32)
    tokens = rng.integers(0, 256, (2, 40))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(model.apply(v, jnp.asarray(tokens)))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_longrope_gguf_without_its_short_factors_says_so(tmp_path):
    import gguf

    path = write_gguf(hf_model("phi3"), str(tmp_path / "phi3.gguf"))
    cut = str(tmp_path / "phi3-cut.gguf")
    w = gguf.GGUFWriter(cut, "phi3")
    r = gguf.GGUFReader(path)
    for key, field in r.fields.items():
        if key.startswith("phi3."):
            w.add_key_value(key, field.contents(), field.types[0])
    for t in r.tensors:
        if t.name != "rope_factors_short.weight":
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=cut + ".*rope_factors_short.weight is missing"):
        from_pretrained(cut)
