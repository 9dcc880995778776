"""Random-weights checkpoints for benchmarks: seeded per tensor, sharded, loadable by our loader."""

import dataclasses
import json
import os

import numpy as np

from qlora_jax.memory import PRESETS
from qlora_jax.models.loaders import from_pretrained
from qlora_jax.models.synthetic import synthetic_tensors, write_synthetic_folder
from qlora_jax.models.weights import expected_shapes

SMALL = dataclasses.replace(PRESETS["smollm2-135m"], num_hidden_layers=2, vocab_size=1000)


def test_tensors_are_seeded_per_name_and_scaled():
    two = dict(synthetic_tensors(SMALL, seed=3))
    one = dict(synthetic_tensors(dataclasses.replace(SMALL, num_hidden_layers=1), seed=3))
    assert set(two) == set(expected_shapes(SMALL))
    for name, w in one.items():  # the same name gives the same values whatever the layer count
        np.testing.assert_array_equal(w.astype(np.float32), two[name].astype(np.float32))
    q = two["model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    assert abs(float(q.std()) - 0.02) < 0.002 and np.count_nonzero(q) > 0.99 * q.size
    norm = two["model.norm.weight"].astype(np.float32)
    assert 0.89 < norm.min() < norm.max() < 1.11 and norm.std() > 0.01
    other = dict(synthetic_tensors(SMALL, seed=4))["model.layers.1.mlp.up_proj.weight"].astype(np.float32)
    assert not np.array_equal(q, other)


def test_folder_is_sharded_complete_and_loads(tmp_path):
    folder = write_synthetic_folder(SMALL, str(tmp_path / "m"), seed=0, shard_bytes=2 << 20)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(expected_shapes(SMALL))
    stamp = os.path.getmtime(tmp_path / "m" / "config.json")
    write_synthetic_folder(SMALL, folder)  # complete: kept as is
    assert os.path.getmtime(tmp_path / "m" / "config.json") == stamp
    model, variables, tokenizer = from_pretrained(folder)
    assert tokenizer is None and model.config.num_hidden_layers == 2
    logits = model.apply(variables, np.arange(1, 9, dtype=np.int32)[None])
    assert logits.shape == (1, 8, 1000) and bool(np.isfinite(np.asarray(logits)).all())
