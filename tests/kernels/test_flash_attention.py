"""The fused flash-attention kernels (Pallas interpret mode on a CPU) against ``reference_attention``.

Tolerances, relative to the largest entry of the compared array. float32: both sides
sum at most S products whose terms are bounded by that entry (outputs are convex
combinations of values, gradients sums of S products of two such sums); in a
different order each sum moves by at most S unit roundoffs (2^-24) per side, twice
for the products, and the online softmax adds one rescaling per key block: 16 * S *
2^-24. bfloat16: the two sides round to bf16 at different points (the kernel rounds
the unnormalized probabilities and ds, the reference the normalized ones and the
cotangents of its casts, both round the result): up to four roundings of unit roundoff
2^-9 on each side, 2^-6. On a GPU the reference runs at "highest" matmul precision,
as the kernel's float32 dots do (IEEE, not TF32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from qlora_jax.kernels.flash_attention import FlashBlockSizes, flash_attention, unsupported_reason
from qlora_jax.models.attention import reference_attention

SMALL = FlashBlockSizes(16, 16, 16, 16)  # several blocks per row at test sizes
MIXED = FlashBlockSizes(32, 16, 16, 32)  # forward and backward tiles differ: T, S padded to 32


def _tol(dtype, s: int) -> float:
    return 16 * s * 2.0**-24 if jnp.dtype(dtype) == jnp.float32 else 2.0**-6


def _draw(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _packed(rng, b, t, n_segments):
    """Segment ids 1..n per row at random cut points, positions restarting at 0 in each segment."""
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = [*np.sort(rng.choice(np.arange(3, t - 3), n_segments - 1, replace=False)), t]
        start = 0
        for i, end in enumerate(cuts):
            seg[row, start:end], pos[row, start:end] = i + 1, np.arange(end - start)
            start = end
    return jnp.asarray(pos), jnp.asarray(seg)


def _value_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return [np.asarray(x.astype(jnp.float32)) for x in (out, *vjp(ct))]


def _reference(q, k, v, ct, **kw):
    with jax.default_matmul_precision("highest"):
        return _value_and_grads(lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, ct)


def _kernel(q, k, v, ct, block_sizes=SMALL, **kw):
    # "highest": on a GPU, Triton's float32 dots are TF32 unless asked for IEEE; the float32
    # tolerance assumes IEEE on both sides
    with jax.default_matmul_precision("highest"):
        return _value_and_grads(jax.jit(lambda q, k, v: flash_attention(q, k, v, block_sizes=block_sizes, **kw)),
                                q, k, v, ct)


def _assert_close(got, want, tol, what=""):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.all(np.isfinite(a)), f"{what}: {name} is not finite"
        err = float(np.max(np.abs(a - b))) / max(float(np.max(np.abs(b))), 1e-30)
        assert err <= tol, f"{what}: {name} differs by {err:.2e} of its largest entry (tolerance {tol:.1e})"


CASES = {  # b=2, t=s=45 (ragged against 16-row tiles), d=16 unless given
    "causal_gqa": dict(h=4, kv=2),
    "mha_not_causal": dict(h=2, kv=2, causal=False),
    "window_gqa": dict(h=4, kv=1, window=7),
    "packed_3_segments": dict(h=4, kv=2, segments=3),
    "softcap_scale": dict(h=2, kv=1, softcap=2.0, scale=0.3),
    "cross_ragged_mixed_tiles": dict(h=4, kv=2, t=21, s=37, block_sizes=MIXED),  # queries at positions 16..36
    "head_dim_48_padded": dict(h=2, kv=1, d=48, t=33),
    "bf16_packed_window": dict(h=4, kv=2, segments=2, window=9, dtype=jnp.bfloat16),
    "bf16_causal_gqa": dict(h=4, kv=2, dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(rng, case):
    opts = dict(CASES[case])
    h, kv, d, dtype = opts.pop("h"), opts.pop("kv"), opts.pop("d", 16), opts.pop("dtype", jnp.float32)
    t, segments, b = opts.pop("t", 45), opts.pop("segments", 0), 2
    s = opts.pop("s", t)
    block_sizes = opts.pop("block_sizes", SMALL)
    q, k, v, ct = _draw(rng, (b, t, h, d), dtype), _draw(rng, (b, s, kv, d), dtype), _draw(rng, (b, s, kv, d), dtype), \
        _draw(rng, (b, t, h, d), dtype)
    if segments:
        pos, seg = _packed(rng, b, t, segments)
        opts |= dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    else:
        opts |= dict(q_positions=jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t)),
                     kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
    want = _reference(q, k, v, ct, **opts)
    _assert_close(_kernel(q, k, v, ct, block_sizes, **opts), want, _tol(dtype, s), case)


def test_kv_cache_queries(rng):
    """3 new queries at positions 5..7 against 16 cache slots of which 8 are filled (default tiles)."""
    b, t, s, h, kv, d = 2, 3, 16, 4, 2, 16
    q, k, v, ct = _draw(rng, (b, t, h, d)), _draw(rng, (b, s, kv, d)), _draw(rng, (b, s, kv, d)), _draw(rng, (b, t, h, d))
    kw = dict(q_positions=jnp.broadcast_to(jnp.arange(5, 8), (b, t)), kv_positions=jnp.broadcast_to(jnp.arange(s), (b, s)),
              kv_valid=jnp.broadcast_to(jnp.arange(s) < 8, (b, s)))
    got = _kernel(q, k, v, ct, None, **kw)
    _assert_close(got, _reference(q, k, v, ct, **kw), _tol(jnp.float32, s), "kv cache")
    np.testing.assert_array_equal(got[2][:, 8:], 0.0)  # empty slots get no gradient
    np.testing.assert_array_equal(got[3][:, 8:], 0.0)


def _two_segments(rng, la, lb, nan_in_second=False):
    h, kv, d = 4, 2, 16
    q, k, v, ct = _draw(rng, (1, la + lb, h, d)), _draw(rng, (1, la + lb, kv, d)), _draw(rng, (1, la + lb, kv, d)), \
        _draw(rng, (1, la + lb, h, d))
    seg = jnp.asarray([[1] * la + [2] * lb], jnp.int32)
    pos = jnp.asarray([list(range(la)) + list(range(lb))], jnp.int32)
    if nan_in_second:
        q, k, v = (x.at[:, la:].set(jnp.nan) for x in (q, k, v))
    return q, k, v, ct, pos, seg


def _segment_alone(q, k, v, ct, pos, sl):
    n = sl.stop - sl.start
    one = jnp.ones((1, n), jnp.int32)
    return _kernel(q[:, sl], k[:, sl], v[:, sl], ct[:, sl], q_positions=pos[:, sl], kv_positions=pos[:, sl],
                   q_segment_ids=one, kv_segment_ids=one)


def test_packing_never_leaks(rng):
    """Two segments in one row give, token for token, what each gives alone (values and gradients)."""
    la, lb = 21, 27  # neither a multiple of the 16-row tiles: one tile holds both segments
    q, k, v, ct, pos, seg = _two_segments(rng, la, lb)
    both = _kernel(q, k, v, ct, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    for sl in (slice(0, la), slice(la, la + lb)):
        _assert_close([x[:, sl] for x in both], _segment_alone(q, k, v, ct, pos, sl), _tol(jnp.float32, lb), str(sl))


def test_fully_masked_tiles_are_skipped(rng):
    """NaN in every q, k, v of the second segment leaves the first one's values and gradients finite and exact.

    Segments of 32 tokens fill whole 16 x 16 tiles, so each tile pairing the two is all
    masked. A kernel that computed such a tile and masked it would turn the NaNs into
    NaN outputs (``0 * NaN`` in ``p @ v``, in ``dout @ v^T`` of the ``dq`` kernel, and in
    ``delta`` of the ``dk, dv`` kernel): the dense reference does. Finite results show
    that all three kernels skipped them.
    """
    q, k, v, ct, pos, seg = _two_segments(rng, 32, 32, nan_in_second=True)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    first = slice(0, 32)
    both = _kernel(q, k, v, ct, **kw)
    _assert_close([x[:, first] for x in both], _segment_alone(q, k, v, ct, pos, first), _tol(jnp.float32, 32), "first")
    assert np.isnan(_reference(q, k, v, ct, **kw)[0][:, first]).any()  # the dense product does touch them


def test_query_seeing_no_key_gets_zeros(rng):
    q, k, v, ct = _draw(rng, (1, 4, 2, 16)), _draw(rng, (1, 8, 1, 16)), _draw(rng, (1, 8, 1, 16)), _draw(rng, (1, 4, 2, 16))
    kw = dict(q_positions=jnp.asarray([[0, 1, 2, 3]]), kv_positions=jnp.arange(8)[None],
              kv_valid=jnp.asarray([[False, True] + [False] * 6]))  # query 0 sees nothing, 1..3 see key 1
    out, dq, dk, dv = _kernel(q, k, v, ct, None, **kw)
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_array_equal(dq[0, 0], 0.0)
    np.testing.assert_allclose(out[0, 1:], np.broadcast_to(np.asarray(v)[0, 1], (3, 2, 16)), rtol=1e-6)
    np.testing.assert_allclose(dv[0, 1, 0], np.asarray(ct)[0, 1:].sum((0, 1)), rtol=1e-5)


def test_residuals_are_linear_in_length(rng):
    """The custom VJP saves q, k, v, out, lse and the int vectors: no residual is as large as a T x S array."""
    b, t, h, d = 1, 64, 4, 16
    q, k = _draw(rng, (b, t, h, d)), _draw(rng, (b, t, 2, d))
    pos = jnp.arange(t)[None]
    f = lambda q, k, v: flash_attention(q, k, v, q_positions=pos, kv_positions=pos, block_sizes=SMALL)  # noqa: E731
    sizes = [int(np.prod(r[0].shape)) for r in saved_residuals(f, q, k, k)]
    assert sizes and max(sizes) <= q.size < b * h * t * t, sizes


def test_unsupported_head_dims_and_bad_input():
    for d in (16, 32, 48, 64, 80, 96, 128, 192, 256):
        assert unsupported_reason(d) is None
    for d in (8, 40, 100, 272, 512):
        assert f"head_dim={d}" in unsupported_reason(d)
    q, k = jnp.ones((1, 4, 4, 16)), jnp.ones((1, 4, 2, 16))
    pos = jnp.arange(4)[None]
    kw = dict(q_positions=pos, kv_positions=pos)
    with pytest.raises(ValueError, match="head_dim=8"):
        flash_attention(jnp.ones((1, 4, 4, 8)), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)), **kw)
    with pytest.raises(ValueError, match="KV heads must divide"):
        flash_attention(q, jnp.ones((1, 4, 3, 16)), jnp.ones((1, 4, 3, 16)), **kw)
    with pytest.raises(ValueError, match="kv_positions must be an integer \\(1, 4\\)"):
        flash_attention(q, k, k, q_positions=pos, kv_positions=jnp.arange(5)[None])
    with pytest.raises(ValueError, match="together"):
        flash_attention(q, k, k, q_segment_ids=pos, **kw)
    with pytest.raises(ValueError, match="one floating dtype"):
        flash_attention(q, k.astype(jnp.bfloat16), k, **kw)
    with pytest.raises(ValueError, match="window=0"):
        flash_attention(q, k, k, window=0, **kw)
    with pytest.raises(ValueError, match="softcap=-1"):
        flash_attention(q, k, k, softcap=-1.0, **kw)
    with pytest.raises(ValueError, match="must be a FlashBlockSizes"):
        flash_attention(q, k, k, block_sizes=(16, 16), **kw)
    with pytest.raises(ValueError, match="block_k=24 must be a power of two"):
        FlashBlockSizes(16, 24)


def test_default_tiles():
    for d, fwd, bwd in ((64, (128, 64), (64, 64)), (128, (128, 64), (32, 64)), (96, (128, 64), (32, 64)),
                        (256, (64, 16), (32, 32))):
        bs = FlashBlockSizes.get_default(4096, 4096, d)
        assert (bs.block_q, bs.block_k) == fwd and (bs.block_q_bwd, bs.block_k_bwd) == bwd, (d, bs)
    short = FlashBlockSizes.get_default(3, 40, 64)  # a decode step: tiles shrink to the sequence, 16 at least
    assert (short.block_q, short.block_k, short.block_q_bwd, short.block_k_bwd) == (16, 64, 16, 64)
