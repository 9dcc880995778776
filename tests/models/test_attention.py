"""The attention interface: every implementation against the dense reference, no leaks, O(T) memory, skipping.

Tolerances: float32 implementations differ from the reference only in summation order
(the online softmax rescales partial sums); outputs are convex combinations of values of
size ~1 and gradients sums of ~S such terms, so a few float32 ulps times S: 2e-5 relative
to the largest entry covers S <= 64 with a wide margin. bfloat16 rounds the probabilities
and values to 8 bits before the product: 2^-8 relative to the largest entry, times 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.models import attention as attn
from qlora_jax.models import chunked_attention as chunked
from qlora_jax.models.chunked_attention import ChunkBlockSizes

TOL = {"float32": 2e-5, "bfloat16": 4 * 2.0**-8}
IMPLS = ("reference", "chunked", "pallas")  # pallas: interpret mode on the CPU


def _packed_meta(rng, b, t, n_segments):
    """Segment ids 1..n per row (random cut points), 0 for a padded tail, positions restarting per segment."""
    seg, pos = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(2, t - 2), n_segments, replace=False))
        cuts[-1] = t - int(rng.integers(0, 3))  # sometimes a padded tail
        start = 0
        for i, end in enumerate(cuts):
            seg[row, start:end], pos[row, start:end] = i + 1, np.arange(end - start)
            start = end
    return jnp.asarray(pos), jnp.asarray(seg)


def _qkv(rng, b, t, s, h, kv, d, dtype):
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)  # noqa: E731
    return draw(b, t, h, d), draw(b, s, kv, d), draw(b, s, kv, d)


def _value_and_grads(fn, q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(ct))]


def _assert_close(got, want, tol, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        scale = max(float(np.max(np.abs(b))), 1e-6)
        err = float(np.max(np.abs(a - b))) / scale
        assert err <= tol, f"{what}: {name} differs by {err:.2e} of its largest entry (tolerance {tol:.1e})"


CASES = {
    "causal_gqa": dict(h=4, kv=2),
    "mha": dict(h=2, kv=2),
    "not_causal": dict(h=4, kv=1, causal=False),
    "window": dict(h=4, kv=2, window=5),
    "packed": dict(h=4, kv=2, segments=3),
    "packed_window_softcap": dict(h=6, kv=3, segments=2, window=7, softcap=3.0),
    "softcap_scale": dict(h=4, kv=2, softcap=2.0, scale=0.3),
}


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(rng, impl, dtype, case):
    opts = dict(CASES[case])
    h, kv, segments = opts.pop("h"), opts.pop("kv"), opts.pop("segments", 0)
    b, t, d = 2, 45, 16  # ragged: not a multiple of the 16-row tiles below
    q, k, v = _qkv(rng, b, t, t, h, kv, d, jnp.dtype(dtype))
    if segments:
        pos, seg = _packed_meta(rng, b, t, segments)
        opts |= dict(q_segment_ids=seg, kv_segment_ids=seg)
    else:
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32).astype(q.dtype)
    want = _value_and_grads(lambda q, k, v: attn.reference_attention(q, k, v, q_positions=pos, kv_positions=pos,
                                                                     **opts), q, k, v, ct)
    sizes = ChunkBlockSizes(16, 16) if impl == "chunked" else None
    got = _value_and_grads(jax.jit(lambda q, k, v: attn.attention(q, k, v, q_positions=pos, implementation=impl,
                                                                  block_sizes=sizes, **opts)), q, k, v, ct)
    _assert_close(got, want, TOL[dtype], f"{impl} {case} {dtype}")


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_kv_cache_queries_match_reference(rng, impl):
    """3 new queries at positions 5..7 against 16 cache slots of which 8 are filled."""
    b, t, s, h, kv, d = 2, 3, 16, 4, 2, 16
    q, k, v = _qkv(rng, b, t, s, h, kv, d, jnp.float32)
    kw = dict(q_positions=jnp.broadcast_to(jnp.arange(5, 8), (b, t)), kv_positions=jnp.broadcast_to(jnp.arange(s), (b, s)),
              kv_valid=jnp.broadcast_to(jnp.arange(s) < 8, (b, s)))
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    want = _value_and_grads(lambda q, k, v: attn.reference_attention(q, k, v, **kw), q, k, v, ct)
    got = _value_and_grads(lambda q, k, v: attn.attention(q, k, v, implementation=impl, **kw), q, k, v, ct)
    _assert_close(got, want, TOL["float32"], impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_packing_never_leaks(rng, impl):
    """Two segments in one row give, token for token, what each gives alone (values and gradients)."""
    la, lb, h, kv, d = 21, 27, 4, 2, 16
    q, k, v = _qkv(rng, 1, la + lb, la + lb, h, kv, d, jnp.float32)
    seg = jnp.asarray([[1] * la + [2] * lb])
    pos = jnp.asarray([list(range(la)) + list(range(lb))])
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    sizes = ChunkBlockSizes(16, 16) if impl == "chunked" else None
    run = lambda q, k, v, p, s: attn.attention(q, k, v, q_positions=p, q_segment_ids=s, kv_segment_ids=s,  # noqa: E731
                                               implementation=impl, block_sizes=sizes)
    both = _value_and_grads(lambda q, k, v: run(q, k, v, pos, seg), q, k, v, ct)
    for sl in (slice(0, la), slice(la, la + lb)):
        n = sl.stop - sl.start
        alone = _value_and_grads(lambda q, k, v: run(q, k, v, pos[:, sl], jnp.ones((1, n), jnp.int32)),
                                 q[:, sl], k[:, sl], v[:, sl], ct[:, sl])
        _assert_close([x[:, sl] for x in both], alone, TOL["float32"], f"{impl} segment {sl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_query_seeing_no_key_gets_zeros(rng, impl):
    q, k, v = _qkv(rng, 1, 4, 8, 2, 1, 16, jnp.float32)
    kw = dict(q_positions=jnp.asarray([[0, 1, 2, 3]]), kv_positions=jnp.asarray([list(range(8))]),
              kv_valid=jnp.asarray([[False, True] + [False] * 6]))  # query 0 sees nothing, 1..3 see key 1
    out = np.asarray(attn.attention(q, k, v, implementation=impl, **kw))
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_allclose(out[0, 1:], np.broadcast_to(np.asarray(v)[0, 1], (3, 2, 16)), rtol=1e-6, atol=1e-6)


def test_fully_masked_tiles_are_skipped(rng, monkeypatch):
    """Causal over 4 x 4 tiles computes the 10 on or below the diagonal; two packed segments of two
    tiles each compute 3 + 3 (forward and backward alike)."""
    counts = {"forward": 0, "backward": 0}
    monkeypatch.setattr(chunked, "tile_hook", lambda kind: counts.__setitem__(kind, counts[kind] + 1))
    q, k, v = _qkv(rng, 1, 64, 64, 2, 1, 8, jnp.float32)
    pos = jnp.arange(64)[None]
    for kw, tiles in ((dict(q_positions=pos), 10),
                      (dict(q_positions=jnp.concatenate([pos[:, :32]] * 2, 1),
                            q_segment_ids=jnp.asarray([[1] * 32 + [2] * 32]),
                            kv_segment_ids=jnp.asarray([[1] * 32 + [2] * 32])), 6)):
        counts.update(forward=0, backward=0)
        fn = lambda q, k, v: chunked.chunked_attention(q, k, v, kv_positions=kw["q_positions"],  # noqa: E731
                                                       block_sizes=ChunkBlockSizes(16, 16), **kw)
        jax.block_until_ready(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2))(q, k, v))
        jax.effects_barrier()
        assert counts == {"forward": tiles, "backward": tiles}, counts


def _grad_temp_bytes(impl, t, h=8, kv=2, d=64):
    spec = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    kspec = jax.ShapeDtypeStruct((1, t, kv, d), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32)
    f = lambda q, k, v, p: attn.attention(q, k, v, q_positions=p, implementation=impl).sum()  # noqa: E731
    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(spec, kspec, kspec, pos).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_linear_in_length():
    """XLA's temporaries for the gradient: chunked grows 2x when T doubles, the reference 4x."""
    small, large = _grad_temp_bytes("chunked", 4096), _grad_temp_bytes("chunked", 8192)
    assert large / small < 2.2, (small, large)
    assert large < 8192 * 8 * 64 * 4 * 16  # a few copies of q, k, v: nowhere near the 2 GiB of 8 x 8192^2 scores
    ref_small, ref_large = _grad_temp_bytes("reference", 2048), _grad_temp_bytes("reference", 4096)
    assert ref_large / ref_small > 3.5, (ref_small, ref_large)


def test_auto_resolution_and_bad_input():
    assert attn.resolve_implementation("auto", 256, 256, 64, "cpu")[0] == "reference"
    assert attn.resolve_implementation("auto", 512, 512, 64, "cpu")[0] == "chunked"
    assert attn.resolve_implementation("auto", 4096, 4096, 64, "cpu")[0] == "chunked"
    assert attn.resolve_implementation("auto", 4096, 4096, 128, "gpu")[0] == "pallas"
    assert attn.resolve_implementation("chunked", 8, 8, 64, "gpu") == ("chunked", "chosen explicitly")
    with pytest.raises(ValueError, match="flash"):
        attn.resolve_implementation("flash", 8, 8, 64)
    q, k = jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 3, 8))
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="multiple of key/value heads 3"):
        attn.attention(q, k, k, q_positions=pos)
    with pytest.raises(ValueError, match="kv_positions.shape"):
        attn.attention(q, q[:, :, :2], q[:, :, :2], q_positions=pos, kv_positions=jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="together"):
        attn.attention(q, q, q, q_positions=pos, q_segment_ids=pos)
    with pytest.raises(ValueError, match="window=0"):
        attn.attention(q, q, q, q_positions=pos, window=0)
    with pytest.raises(ValueError, match="ChunkBlockSizes"):
        attn.attention(q, q, q, q_positions=pos, implementation="chunked", block_sizes=(16, 16))
