"""The four CPU step fixes of 2026-11-29, each timed against the formulation it replaced, in one run.

    python scripts/bench_cpu_parts.py [--runs 10]

SmolLM2-135M's shapes (4 x 256 tokens, hidden 576, MLP 1536, 9 query / 3 KV heads
of 64, vocab 49152, LoRA r = 16), float32, fresh random inputs. Each row is the
median of ``--runs`` calls of a jitted forward + backward, old and new measured
alternately in the same process, with the new/old ratio:

* LoRA: autodiff of ``s * (x @ A) @ B`` against ``lora_product`` (its own VJP), in
  a two-projection NF4 MLP block ``W2(silu(h) * h), h = W1 x`` with LoRA on both;
* attention: the 5-D ``btkgd,bskd->bkgts`` einsum against the heads-first ``reference_attention``;
* NF4 lookup: dequantizing a 1536 x 576 weight with a 16-entry gather against the
  select tree (forward only);
* loss: ``-log_softmax(logits)[target]`` against ``logsumexp - target logit``,
  through the tied output head.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from qlora_jax.kernels import quantized_matmul
from qlora_jax.layers.lora_product import lora_product
from qlora_jax.models.attention import reference_attention, visible
from qlora_jax.quant import blockwise, quantize
from qlora_jax.quant.codebooks import code_table

B, T, D, F, H, KV, HD, V, R, S = 4, 256, 576, 1536, 9, 3, 64, 49152, 16, 2.0


def _time(fn, args, runs: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lora_case(key):
    k = jax.random.split(key, 7)
    w1 = quantize(jax.random.normal(k[0], (F, D)) * 0.02, "nf4", 64, double_quant=True)
    w2 = quantize(jax.random.normal(k[1], (D, F)) * 0.02, "nf4", 64, double_quant=True)
    lora = [jax.random.normal(k[i], s) * 0.02 for i, s in zip(range(2, 6), [(D, R), (R, F), (F, R), (R, D)])]
    x = jax.random.normal(k[6], (B, T, D))

    def block(product):
        def f(x, a1, b1, a2, b2):
            h = quantized_matmul(x, w1) + product(x, a1, b1, S)
            h = jax.nn.silu(h) * h
            y = quantized_matmul(h, w2) + product(h, a2, b2, S)
            return jnp.sum(y * y)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))

    old = block(lambda x, a, b, s: (x @ a) @ b * s)
    return old, block(lora_product), (x, *lora)


def attention_case(key):
    k = jax.random.split(key, 4)
    q, kk, v = (jax.random.normal(k[0], (B, T, H, HD)), jax.random.normal(k[1], (B, T, KV, HD)),
                jax.random.normal(k[2], (B, T, KV, HD)))
    w = jax.random.normal(k[3], (B, T, H * HD))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = visible(pos, pos)[:, None, None]

    def einsum_5d(q, kk, v):
        qg = q.reshape(B, T, KV, H // KV, HD)
        s = jnp.einsum("btkgd,bskd->bkgts", qg, kk, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(HD))
        p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, -1)

    def grad(attend):
        return jax.jit(jax.grad(lambda q, kk, v: jnp.sum(attend(q, kk, v) * w), argnums=(0, 1, 2)))

    return grad(einsum_5d), grad(lambda q, kk, v: reference_attention(q, kk, v, q_positions=pos, kv_positions=pos).reshape(B, T, -1)), (q, kk, v)


def lookup_case(key):
    qa = quantize(jax.random.normal(key, (F, D)) * 0.02, "nf4", 64, double_quant=True)

    def gathered(q):
        values = jnp.asarray(code_table("nf4"))[blockwise.unpack_nibbles(q.codes).astype(jnp.int32)]
        return blockwise.scale_blocks(values, q.block_scales(), 64, q.size).reshape(q.shape)

    return jax.jit(gathered), jax.jit(lambda q: q.dequantize(jnp.float32)), (qa,)


def loss_case(key):
    k = jax.random.split(key, 3)
    h, emb = jax.random.normal(k[0], (B, T, D)), jax.random.normal(k[1], (V, D)) * 0.05
    targets = jax.random.randint(k[2], (B, T), 0, V)

    def nll(formula):
        def f(h):
            logits = jnp.einsum("btd,vd->btv", h, emb, preferred_element_type=jnp.float32)
            return jnp.sum(formula(logits))
        return jax.jit(jax.grad(f))

    old = nll(lambda lg: -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), targets[..., None], -1)[..., 0])
    new = nll(lambda lg: jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, targets[..., None], -1)[..., 0])
    return old, new, (h,)


CASES = {"LoRA backward (NF4 MLP block, fwd+bwd)": lora_case, "attention (one layer, fwd+bwd)": attention_case,
         "NF4 lookup (1536 x 576 dequantize)": lookup_case, "loss through the head (fwd+bwd)": loss_case}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d')}, jax {jax.__version__} on {jax.devices()[0].device_kind}\n")
    print("| part | before | after | after / before | max rel. diff |\n|---|---:|---:|---:|---:|")
    for i, (name, case) in enumerate(CASES.items()):
        old, new, inputs = case(jax.random.key(i))
        t_old, t_new = _time(old, inputs, args.runs), _time(new, inputs, args.runs)
        t_old = min(t_old, _time(old, inputs, args.runs))  # alternate once more: drift hits both
        t_new = min(t_new, _time(new, inputs, args.runs))
        a, b = jax.tree.leaves(old(*inputs)), jax.tree.leaves(new(*inputs))
        diff = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(x))) for x, y in zip(a, b))
        print(f"| {name} | {t_old * 1e3:.2f} ms | {t_new * 1e3:.2f} ms | {t_new / t_old:.2f}x | {diff:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
