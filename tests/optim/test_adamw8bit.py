"""8-bit blockwise AdamW: bitsandbytes' state format and update, optax's structure and math.

* the state format is bnb's ``quantize_blockwise`` byte for byte (oracle);
* a few steps equal bnb's own ``AdamW8bit`` on the CPU: same codes, same scales (oracle);
* 200 steps of linear regression track fp32 ``optax.adamw``;
* parameters under ``min_8bit_size`` keep float32 state and equal ``optax.adamw`` bit for bit;
* jit with a donated state, about 2 bytes of state per parameter, dtypes, bad input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.optim.adamw8bit import QuantizedMoment, ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit
from testlib import rel_err, torch_and_bnb

# 200 steps of linear regression (lr 3e-2, wd 0.01), 8-bit against float32 optax.adamw; worst of
# 12 seeds in brackets. ||params_8 - params_32|| / ||params_32|| [4.1e-3]:
TRACK_PARAMS_REL = 1e-2
# ||loss curve_8 - loss curve_32|| / ||loss curve_32|| over the 200 steps [3.7e-3]:
TRACK_CURVE_REL = 1e-2
# final loss: both sit at the noise floor (~1e-4 of the initial loss), where 8-bit v makes Adam's
# steps jitter a little more; |loss_8 / loss_32 - 1| [0.11]:
TRACK_FINAL_LOSS_REL = 0.25
# Against bnb's AdamW8bit after 8 steps: |p_ours - p_bnb| as a fraction of one step's lr; the
# two round the update differently (bnb: sqrt(v) / sqrt(1 - b2^t), ours: sqrt(v / (1 - b2^t)))
# and each step rounds p to float32 [0.007]:
BNB_PARAM_STEP_FRAC = 0.02
# absmax of v: bnb's v_t is addcmul'ed, ours is (1 - b2) * g * g + b2 * v, a few ulp apart [1.5 ulp]:
BNB_ABSMAX_RTOL = 5e-7
# codes may flip to a neighbour when such an ulp moves a value across a grid point [0 seen]:
BNB_CODES_DIFF_FRAC = 1e-3
# bf16 params: the update is rounded to bf16 before the lr scale, the reference after; one bf16 ulp
# (XLA on the CPU may also elide the round trip, then they are equal):
BF16_UPDATE_RTOL = 2**-7


def _tree_bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _randn(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _adam_state(state) -> ScaleByAdam8bitState:
    return state[0]  # adamw_8bit is chain(scale_by_adam_8bit, add_decayed_weights, scale_by_learning_rate)


@pytest.mark.oracle
@pytest.mark.parametrize("n", [10000, 4097, 256 * 40])
@pytest.mark.parametrize("signed", [True, False])
def test_moment_quantization_equals_bnb(rng, n, signed):
    torch, F = torch_and_bnb()
    x = (rng.standard_normal(n) * rng.uniform(1e-3, 10)).astype(np.float32)
    if not signed:  # v is a mean of squares
        x = x * x
    q = QuantizedMoment.quantize(jnp.asarray(x), 256, signed)
    ref_codes, ref_state = F.quantize_blockwise(
        torch.from_numpy(x), code=F.create_dynamic_map(signed=signed), blocksize=256
    )
    np.testing.assert_array_equal(np.asarray(q.codes), ref_codes.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint32), ref_state.absmax.numpy().view(np.uint32))
    assert q.codes.shape == (n,) and q.absmax.shape == (-(-n // 256),)
    assert q.codes.dtype == jnp.uint8 and q.absmax.dtype == jnp.float32
    ref_values = F.dequantize_blockwise(ref_codes, ref_state).numpy()
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref_values)


@pytest.mark.oracle
def test_steps_match_bnb_adamw8bit(rng):
    """bnb 0.50.2 runs AdamW8bit on the CPU (dequantize, fp32 update, quantize_blockwise)."""
    torch, _ = torch_and_bnb()
    import bitsandbytes as bnb

    shapes = {"a": (5000,), "b": (300, 257), "small": (40, 25)}
    lr, wd = 1e-3, 0.01
    p0 = {k: (rng.standard_normal(s) * 0.5).astype(np.float32) for k, s in shapes.items()}
    theirs = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
    topt = bnb.optim.AdamW8bit(list(theirs.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    opt = adamw_8bit(lr, weight_decay=wd)
    ours = {k: jnp.asarray(v) for k, v in p0.items()}
    state = opt.init(ours)

    @jax.jit
    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(8):
        grads = {k: (rng.standard_normal(s) * rng.uniform(0.1, 3)).astype(np.float32) for k, s in shapes.items()}
        for k, p in theirs.items():
            p.grad = torch.from_numpy(grads[k])
        topt.step()
        ours, state = step({k: jnp.asarray(g) for k, g in grads.items()}, state, ours)

    adam = _adam_state(state)
    for k in shapes:
        their_p = theirs[k].detach().numpy()
        np.testing.assert_allclose(np.asarray(ours[k]), their_p, rtol=0, atol=BNB_PARAM_STEP_FRAC * lr)
        ts = topt.state[theirs[k]]
        if k == "small":  # under 4096 elements both keep float32 state
            assert isinstance(adam.mu[k], jax.Array) and ts["state1"].dtype == torch.float32
            continue
        pairs = ((adam.mu[k], ts["state1"], ts["absmax1"]), (adam.nu[k], ts["state2"], ts["absmax2"]))
        for moment, codes, absmax in pairs:
            diff = np.asarray(moment.codes).astype(int) - codes.numpy().reshape(-1).astype(int)
            assert np.mean(diff != 0) <= BNB_CODES_DIFF_FRAC and np.max(np.abs(diff)) <= 1
            np.testing.assert_allclose(np.asarray(moment.absmax), absmax.numpy(), rtol=BNB_ABSMAX_RTOL, atol=0)


def _train(opt, params, loss, steps):
    def body(carry, _):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), value

    (params, _), losses = jax.jit(lambda p: jax.lax.scan(body, (p, opt.init(p)), None, steps))(params)
    return params, np.append(np.asarray(losses), float(loss(params)))


def test_tracks_fp32_adamw_on_linear_regression(rng):
    x = _randn(rng, (512, 128))
    y = x @ _randn(rng, (128, 64), rng.uniform(0.2, 1.0)) + _randn(rng, (512, 64), 0.1)
    params = {"w": _randn(rng, (128, 64), 0.05), "b": _randn(rng, (64,), 0.05)}  # w: 8192 elements, 8-bit state

    def loss(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    p8, l8 = _train(adamw_8bit(3e-2, weight_decay=0.01), params, loss, 200)
    p32, l32 = _train(optax.adamw(3e-2, weight_decay=0.01), params, loss, 200)
    flat = lambda p: np.concatenate([np.ravel(p["w"]), np.ravel(p["b"])])  # noqa: E731
    assert rel_err(flat(p8), flat(p32)) < TRACK_PARAMS_REL
    assert rel_err(l8, l32) < TRACK_CURVE_REL
    assert abs(l8[-1] / l32[-1] - 1) < TRACK_FINAL_LOSS_REL
    assert l8[-1] < 1e-3 * l8[0] and np.all(l8[-20:] < 0.01 * l8[0])


def test_small_tensors_keep_fp32_state_and_equal_optax(rng):
    shapes = {"w": (30, 40), "b": (7,), "edge": (4095,), "big": (64, 64)}  # 4096 elements: 8-bit
    params = {k: _randn(rng, s) for k, s in shapes.items()}
    kw = dict(
        learning_rate=optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 10),
        b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1,
        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    )  # fmt: skip
    ours, ref = adamw_8bit(**kw), optax.adamw(**kw)
    s8, s32 = ours.init(params), ref.init(params)
    adam = _adam_state(s8)
    for k in ("w", "b", "edge"):
        for moment in (adam.mu[k], adam.nu[k]):
            assert isinstance(moment, jax.Array) and moment.dtype == jnp.float32 and moment.shape == shapes[k]
    assert isinstance(adam.mu["big"], QuantizedMoment) and adam.mu["big"].signed
    assert isinstance(adam.nu["big"], QuantizedMoment) and not adam.nu["big"].signed

    step8, step32 = jax.jit(ours.update), jax.jit(ref.update)
    for _ in range(10):
        grads = {k: _randn(rng, s, rng.uniform(0.01, 2)) for k, s in shapes.items()}
        u8, s8 = step8(grads, s8, params)
        u32, s32 = step32(grads, s32, params)
        for k in ("w", "b", "edge"):
            np.testing.assert_array_equal(np.asarray(u8[k]), np.asarray(u32[k]), err_msg=k)
            np.testing.assert_array_equal(np.asarray(_adam_state(s8).mu[k]), np.asarray(s32[0].mu[k]))
            np.testing.assert_array_equal(np.asarray(_adam_state(s8).nu[k]), np.asarray(s32[0].nu[k]))
        params = optax.apply_updates(params, u32)
    assert int(_adam_state(s8).count) == 10


def test_init_is_exact_zeros_and_first_step_equals_optax(rng):
    params = {"w": _randn(rng, (100, 77))}
    state = _adam_state(adamw_8bit(1e-3).init(params))
    for moment in (state.mu["w"], state.nu["w"]):
        assert np.all(np.asarray(moment.dequantize()) == 0.0)
        assert moment.dequantize().shape == (100, 77)
    # From exact zeros, step 1 computes m, v in float32 without any quantization error.
    grads = {"w": _randn(rng, (100, 77), rng.uniform(0.01, 2))}
    ours, ref = adamw_8bit(1e-3, weight_decay=0.1), optax.adamw(1e-3, weight_decay=0.1)
    u8, _ = jax.jit(ours.update)(grads, ours.init(params), params)
    u32, _ = jax.jit(ref.update)(grads, ref.init(params), params)
    np.testing.assert_array_equal(np.asarray(u8["w"]), np.asarray(u32["w"]))


def test_jit_donation_and_state_bytes(rng):
    n = 1024 * 1024
    params = {"w": _randn(rng, (1024, 1024), 0.1), "b": _randn(rng, (1024,))}
    opt = adamw_8bit(1e-3)
    grads = {k: _randn(rng, v.shape) for k, v in params.items()}

    adam = _adam_state(opt.init(params))
    per_param = (_tree_bytes(adam.mu["w"]) + _tree_bytes(adam.nu["w"])) / n
    assert per_param == 2 + 2 * 4 / 256  # 2 bytes of codes + two fp32 absmax per 256-block
    assert adam.mu["w"].nbytes == n + 4 * n // 256
    fp32 = _adam_state(jax.eval_shape(optax.adamw(1e-3).init, params))
    assert (_tree_bytes(fp32.mu["w"]) + _tree_bytes(fp32.nu["w"])) / n == 8

    expected_u, expected_s = jax.jit(opt.update)(grads, opt.init(params), params)
    donated = opt.init(params)
    u, s = jax.jit(opt.update, donate_argnums=(1,))(grads, donated, params)
    assert _adam_state(donated).mu["w"].codes.is_deleted()
    for a, b in zip(jax.tree.leaves((u, s)), jax.tree.leaves((expected_u, expected_s))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(s) == jax.tree.structure(expected_s)


@pytest.mark.parametrize(
    "param_dtype,grad_dtype", [("float32", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", "float32")]
)
def test_dtypes(rng, param_dtype, grad_dtype):
    params = {"w": _randn(rng, (64, 80)).astype(param_dtype), "b": _randn(rng, (80,)).astype(param_dtype)}
    grads = jax.tree.map(lambda p: _randn(rng, p.shape).astype(grad_dtype), params)
    opt = adamw_8bit(1e-2)
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
    assert all(u.dtype == jnp.dtype(param_dtype) for u in jax.tree.leaves(updates))
    adam = _adam_state(state)
    assert adam.mu["w"].codes.dtype == jnp.uint8 and adam.nu["w"].absmax.dtype == jnp.float32
    assert adam.mu["b"].dtype == jnp.float32 and adam.nu["b"].dtype == jnp.float32
    # State math is float32 on the gradient's values: the same as feeding those values in float32.
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    ref, _ = jax.jit(opt.update)(jax.tree.map(lambda g: g.astype(jnp.float32), grads), opt.init(params32), params32)
    for k in params:
        ours, theirs = np.asarray(updates[k], np.float32), np.asarray(ref[k], np.float32)
        if param_dtype == "float32":
            np.testing.assert_array_equal(ours, theirs)
        else:
            np.testing.assert_allclose(ours, theirs, rtol=BF16_UPDATE_RTOL, atol=0)
    # Without params, scale_by_adam_8bit returns updates in the gradient's dtype.
    bare = scale_by_adam_8bit()
    u, _ = bare.update(grads, bare.init(params))
    assert all(x.dtype == jnp.dtype(grad_dtype) for x in jax.tree.leaves(u))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blocksize=0), "blocksize=0 must be a positive power of two"),
        (dict(blocksize=300), "blocksize=300 must be a positive power of two"),
        (dict(blocksize=256.0), "blocksize=256.0 must be a positive power of two"),
        (dict(b1=1.0), r"b1=1.0 must be in \[0, 1\)"),
        (dict(b2=-0.1), r"b2=-0.1 must be in \[0, 1\)"),
        (dict(eps=-1e-8), "eps=-1e-08 must be >= 0"),
        (dict(min_8bit_size=0), "min_8bit_size=0 must be a positive int"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adamw_8bit(1e-3, **kwargs)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"w": jnp.zeros((3, 3)), "steps": jnp.arange(5)}, r"\['steps'\] is int32"),
        ({"w": [1.0, 2.0]}, r"\['w'\]\[0\] is float"),
        ({"mask": jnp.ones(4, bool)}, r"\['mask'\] is bool"),
    ],
)
def test_non_float_params_raise(params, match):
    with pytest.raises(ValueError, match=match + ".*must be a floating-point array"):
        adamw_8bit(1e-3).init(params)
