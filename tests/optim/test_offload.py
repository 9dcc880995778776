"""Host-offloaded optimizer state: same numbers as the plain transform, state in pinned_host, jit, mesh, Orbax."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from qlora_jax.optim import host_shardings, offload_to_host, top_level_group
from qlora_jax.optim.offload import resolve_memory_kind
from testlib import assert_trees_close, reorder_rtol


def _params(rng):
    """Two layers stacked along axis 0 under ``layers`` (the models' layout), and one unstacked leaf."""
    return {
        "layers": {"q": {"lora_a": jnp.asarray(rng.standard_normal((2, 96, 8)), jnp.float32),
                         "lora_b": jnp.asarray(rng.standard_normal((2, 8, 64)) * 0.1, jnp.float32)}},
        "head": {"w": jnp.asarray(rng.standard_normal((64, 8)) * 0.1, jnp.float32)},
    }


def _grads(rng, params):
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def _kinds(tree):
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


def _train(tx, params, grads_seq, donate: bool):
    """Runs ``tx`` under jit (explicit shardings, optional donation); returns params and the state after each step."""
    state = tx.init(params)
    p_sh, s_sh = host_shardings(params), host_shardings(state)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    f = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh),
                donate_argnums=(0, 1) if donate else ())
    params = jax.tree.map(jnp.copy, params)
    kinds = []
    for g in grads_seq:
        params, state = f(params, state, g)
        kinds.append(_kinds(state))
    return params, state, kinds


@pytest.mark.parametrize("group_by", [None, top_level_group], ids=["one-group", "per-layer"])
def test_offloaded_adamw_equals_plain_adamw(rng, group_by):
    """Per layer: the stacked leaves are cut into their 2 layer slices (2 groups) beside the head's group."""
    params = _params(rng)
    grads_seq = [_grads(rng, params) for _ in range(25)]
    make = lambda: optax.chain(optax.clip_by_global_norm(0.3), optax.adamw(1e-2, weight_decay=0.01))
    ref, ref_state, ref_kinds = _train(make(), params, grads_seq, donate=False)
    tx = optax.chain(optax.clip_by_global_norm(0.3), offload_to_host(optax.adamw(1e-2, weight_decay=0.01), group_by=group_by,
                                                                         split_layers=group_by is not None))
    ours, state, kinds = _train(tx, params, grads_seq, donate=True)
    if group_by is None:  # the same XLA arithmetic: bit for bit
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # the same elementwise math, fused into other loops (vector widths): a few roundings per step
        assert_trees_close(ours, ref, reorder_rtol(10 * len(grads_seq)))
    inner = state[1]
    assert all(k == {"pinned_host"} for k in kinds) and _kinds(inner) == {"pinned_host"}
    assert ref_kinds[-1] == {"device"}
    assert len(inner.groups) == (3 if group_by else 1)
    if group_by:  # groups in first-seen order ("head" sorts first); a layer's group holds that layer's slices
        assert {leaf.shape for leaf in jax.tree.leaves(inner.groups[1])} >= {(96, 8), (8, 64)}


def test_orbax_round_trip_restores_into_host_memory(rng, tmp_path):
    params = _params(rng)
    tx = offload_to_host(optax.adamw(1e-2))
    _, state, _ = _train(tx, params, [_grads(rng, params) for _ in range(3)], donate=False)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "opt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "opt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state) and _kinds(restored) == {"pinned_host"}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mesh_of_simulated_devices():
    """Four CPU devices, data-parallel grads, the state sharded over the mesh and kept in pinned_host."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np, optax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from qlora_jax.optim import offload_to_host, host_shardings
        mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        rng = np.random.default_rng(0)
        shard = NamedSharding(mesh, P("fsdp"))
        params = {"a": jax.device_put(jnp.asarray(rng.standard_normal((64, 16)), jnp.float32), shard)}
        tx, ref = offload_to_host(optax.adamw(1e-2)), optax.adamw(1e-2)
        state, ref_state = tx.init(params), ref.init(params)
        p_sh, s_sh = host_shardings(params), host_shardings(state)
        step = lambda tx: lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
        f = jax.jit(step(tx), in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh), donate_argnums=(1,))
        g_ref = jax.jit(step(ref))
        p, pr = params, params
        for i in range(5):
            g = {"a": jax.device_put(jnp.asarray(rng.standard_normal((64, 16)), jnp.float32), shard)}
            p, state = f(p, state, g)
            pr, ref_state = g_ref(pr, ref_state, g)
        leaf = jax.tree.leaves(state)[1]
        assert len(jax.devices()) == 4 and leaf.sharding.memory_kind == "pinned_host", leaf.sharding
        assert leaf.sharding.spec == P("fsdp") and len(leaf.addressable_shards) == 4
        np.testing.assert_array_equal(np.asarray(p["a"]), np.asarray(pr["a"]))
        print("OK")
    """)
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_bad_input(rng):
    params = _params(rng)
    with pytest.raises(ValueError, match="memory_kind='hbm'"):
        offload_to_host(optax.adam(1e-3), memory_kind="hbm")
    with pytest.raises(ValueError, match="GradientTransformation"):
        offload_to_host(lambda p: p)
    weird = optax.GradientTransformation(lambda p: {"step": 0, "note": "text"}, lambda u, s, p=None: (u, s))
    with pytest.raises(ValueError, match=r"state must be a pytree of jax arrays, but \[0\]\['note'\] is str"):
        offload_to_host(weird).init(params)


def test_platform_without_pinned_host_falls_back_with_warning(monkeypatch):
    import qlora_jax.optim.offload as offload

    monkeypatch.setattr(offload, "available_memory_kinds", lambda: ("device",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_memory_kind("pinned_host") == "device"
    assert any("no 'pinned_host' memory" in str(w.message) for w in caught)
