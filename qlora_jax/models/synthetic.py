"""A random-weights checkpoint of any Llama-family shape, written once as a Hugging Face folder.

For benchmarks that need a model of a given size (Llama-3-8B on a GPU) where no
real weights can be fetched: both stacks then load the very same bf16 tensors.

Every tensor is drawn from its own stream, ``default_rng([seed, crc32(name)])``,
so the values do not depend on the order of writing or on the number of layers
kept. Projection and embedding weights are ``k * 0.02 / 73.3`` for uniform int8
``k`` in [-127, 127] (standard deviation 0.02, as ``initializer_range``; drawing
bytes is ~10x faster than normals, which matters at 8 billion weights); norm
weights are ``1 + 0.1 * that`` so they are not the trivial all-ones either.
Nothing is ever all zeros.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.export import to_hf_config
from qlora_jax.models.weights import expected_shapes

_STD = 0.02 / 73.3  # uniform int8 on [-127, 127] has standard deviation 73.3


def synthetic_tensors(config: LlamaConfig, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """``(hf_name, bf16 array)`` for every tensor ``config`` needs (module docstring)."""
    for name, shape in expected_shapes(config).items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        k = rng.integers(-127, 128, shape, dtype=np.int8).astype(np.float32)
        w = 1.0 - config.norm_offset + 0.1 * k * (1 / 127) if name.endswith("norm.weight") else k * np.float32(_STD)
        yield name, w.astype(ml_dtypes.bfloat16)


def write_synthetic_folder(config: LlamaConfig, folder: str, seed: int = 0, shard_bytes: int = 2 << 30) -> str:
    """Writes ``config.json`` and sharded bf16 safetensors to ``folder`` (kept if already complete)."""
    from safetensors.numpy import save_file

    done = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(done):
        return folder
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(to_hf_config(config, "bfloat16"), f)
    weight_map, shard, size = {}, {}, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, w in synthetic_tensors(config, seed):
        if shard and size + w.nbytes > shard_bytes:
            flush()
        shard[name] = w
        size += w.nbytes
    if shard:
        flush()
    with open(done + ".tmp", "w") as f:  # the index last: its presence marks a complete folder
        json.dump({"metadata": {"seed": seed}, "weight_map": weight_map}, f)
    os.replace(done + ".tmp", done)
    return folder
