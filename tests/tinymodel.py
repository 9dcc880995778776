"""A tiny Llama in a Hugging Face folder, with a byte-level tokenizer and a ChatML template (test helper).

Vocabulary: the 256 byte tokens of a byte-level BPE without merges, plus
``<|im_start|>`` and ``<|im_end|>`` (258). Two layers of width 64; random
weights (N(0, 0.02^2), norms at 1), so nothing is zero.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONFIG = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=True, hidden_act="silu", model_type="llama", architectures=["LlamaForCausalLM"],
              torch_dtype="float32", bos_token_id=256, eos_token_id=257)


def write_tokenizer(folder: str) -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tk.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}, f)


def write_tiny_model(folder: str, seed: int = 0, **overrides) -> str:
    """The tiny model in ``folder``; ``overrides`` change ``CONFIG`` fields (``vocab_size``, ...)."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    c = {**CONFIG, **overrides}
    h, hd, ff = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    w = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        tensors |= {
            pre + "self_attn.q_proj.weight": w(c["num_attention_heads"] * hd, h),
            pre + "self_attn.k_proj.weight": w(c["num_key_value_heads"] * hd, h),
            pre + "self_attn.v_proj.weight": w(c["num_key_value_heads"] * hd, h),
            pre + "self_attn.o_proj.weight": w(h, c["num_attention_heads"] * hd),
            pre + "mlp.gate_proj.weight": w(ff, h), pre + "mlp.up_proj.weight": w(ff, h), pre + "mlp.down_proj.weight": w(h, ff),
            pre + "input_layernorm.weight": np.ones(h, np.float32), pre + "post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f)
    write_tokenizer(folder)
    return folder


def write_chats(path: str, n: int, seed: int = 0) -> str:
    """``n`` random records in all three shapes (mostly two-turn chats of lowercase words)."""
    rng = np.random.default_rng(seed)
    words = ["hello", "how", "are", "you", "fine", "thanks", "what", "is", "the", "weather", "sunny", "rain", "cat", "dog"]
    say = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            if i % 5 == 0:
                rec = {"text": say(12)}
            elif i % 5 == 1:
                rec = {"prompt": say(5), "completion": say(6)}
            else:
                rec = {"messages": [{"role": "user", "content": say(int(rng.integers(3, 8)))},
                                    {"role": "assistant", "content": say(int(rng.integers(3, 10)))}]}
            f.write(json.dumps(rec) + "\n")
    return path
