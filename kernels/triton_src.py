"""Triton source of the jax-triton backend (imported only by ``triton_matmul``; needs ``triton``).

See ``triton_matmul`` for the math and the launch. Kept apart because Triton
resolves helper kernels through module globals, and importing it must stay
optional for the rest of the package.

Each step decodes a ``(BN, BK)`` tile of ``W`` from ``BN x BK/2`` bytes and
``BN x BK/B`` scales: nibbles interleaved with ``join`` + ``reshape``, code
values by a binary tree of 15 selects over the table passed as 16 scalars
``T0..T15`` (no per-weight memory reads, which Triton's pipeliner would stage
through shared memory), scales decoded once per block and broadcast over it.

Parameter order is jax-triton's calling convention: every input (arrays, then scalars) in the
order ``triton_call`` gets them, then the output pointer, then the constexprs by name.
"""

import triton
import triton.language as tl


@triton.jit
def _lookup(nib, T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15):
    """``table[nib]`` for int32 nibbles: 4 levels of selects on the bits of ``nib``."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    b3 = (nib & 8) != 0
    v0 = tl.where(b1, tl.where(b0, T3, T2), tl.where(b0, T1, T0))
    v1 = tl.where(b1, tl.where(b0, T7, T6), tl.where(b0, T5, T4))
    v2 = tl.where(b1, tl.where(b0, T11, T10), tl.where(b0, T9, T8))
    v3 = tl.where(b1, tl.where(b0, T15, T14), tl.where(b0, T13, T12))
    return tl.where(b3, tl.where(b2, v3, v2), tl.where(b2, v1, v0))


@triton.jit
def _w_tile(codes_ptr, scales_ptr, nested_ptr, offset_ptr, dmap_ptr, n0, k0, K,
            T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15,
            BN: tl.constexpr, BK: tl.constexpr, B: tl.constexpr, B2: tl.constexpr, DOUBLE: tl.constexpr):
    """Float32 ``W[n0:n0+BN, k0:k0+BK]``: ``table[nibble] * scale[n, k // B]``."""
    offs_n = n0 + tl.arange(0, BN)
    offs_byte = k0 // 2 + tl.arange(0, BK // 2)
    byte = tl.load(codes_ptr + offs_n[:, None] * (K // 2) + offs_byte[None, :]).to(tl.int32)
    nib = tl.reshape(tl.join(byte >> 4, byte & 15), (BN, BK))  # element 2j is the high nibble
    value = _lookup(nib, T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15)
    block = offs_n[:, None] * (K // B) + (k0 // B + tl.arange(0, BK // B))[None, :]  # (BN, BK / B)
    if DOUBLE:
        raw = tl.load(scales_ptr + block).to(tl.int32)
        product = tl.load(dmap_ptr + raw) * tl.load(nested_ptr + block // B2)
        product = tl.where(product == product, product, 0.0)  # two roundings, as bitsandbytes: no FMA
        scale = product + tl.load(offset_ptr)
    else:
        scale = tl.load(scales_ptr + block)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BN, BK // B, B)), (BN, BK))
    return value * scale


@triton.jit
def forward(x_ptr, codes_ptr, scales_ptr, nested_ptr, offset_ptr, dmap_ptr, M, N, K,
            T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15, out_ptr,
            STEPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            B: tl.constexpr, B2: tl.constexpr, DOUBLE: tl.constexpr, PRECISION: tl.constexpr):
    """``out[s, m-tile, n-tile] = sum over split s's k-tiles of x @ W.T``."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(STEPS):
        k0 = (pid_s * STEPS + t) * BK
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = _w_tile(codes_ptr, scales_ptr, nested_ptr, offset_ptr, dmap_ptr, pid_n * BN, k0, K,
                    T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15, BN, BK, B, B2, DOUBLE)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    offs_n = pid_n * BN + tl.arange(0, BN)
    out = out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < M)


@triton.jit
def transposed(dy_ptr, codes_ptr, scales_ptr, nested_ptr, offset_ptr, dmap_ptr, M, N, K,
               T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15, out_ptr,
               STEPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               B: tl.constexpr, B2: tl.constexpr, DOUBLE: tl.constexpr, PRECISION: tl.constexpr):
    """``out[s, m-tile, k-tile] = sum over split s's n-tiles of dy @ W``."""
    pid_m, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for t in range(STEPS):
        n0 = (pid_s * STEPS + t) * BN
        offs_n = n0 + tl.arange(0, BN)
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = _w_tile(codes_ptr, scales_ptr, nested_ptr, offset_ptr, dmap_ptr, n0, pid_k * BK, K,
                    T0, T1, T2, T3, T4, T5, T6, T7, T8, T9, T10, T11, T12, T13, T14, T15, BN, BK, B, B2, DOUBLE)
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=PRECISION)
    offs_k = pid_k * BK + tl.arange(0, BK)
    out = out_ptr + pid_s * M * K + offs_m[:, None] * K + offs_k[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < M)
