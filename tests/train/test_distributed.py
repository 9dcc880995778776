"""Multi-process parts that need no second process: start-up arguments, the peer timeout, data streams."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from tinymodel import write_tiny_model

from qlora_jax.train.data import load_data
from qlora_jax.train.distributed import WATCHDOG_EXIT, resolve_processes
from qlora_jax.train.streams import StreamedBatches, StreamLayout, eval_batches, global_state

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]


# ---- start-up ----------------------------------------------------------------------------------------------------

def test_one_process_without_flags_or_cluster():
    assert resolve_processes(env={}) is None
    assert resolve_processes(num_processes=1, env={}) is None


def test_flags_win_over_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve_processes(env=env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert resolve_processes("127.0.0.1:99", 2, 1, env=env) == {"coordinator_address": "127.0.0.1:99",
                                                                "num_processes": 2, "process_id": 1}
    # what is left out is for JAX to find in the cluster's environment
    assert resolve_processes(env={"JAX_COORDINATOR_ADDRESS": "h:1"}) == {"coordinator_address": "h:1",
                                                                        "num_processes": None, "process_id": None}


def test_a_cluster_jax_detects_gets_no_arguments():
    assert resolve_processes(env={"SLURM_JOB_ID": "77"}) == {}
    assert resolve_processes(env={"OMPI_COMM_WORLD_SIZE": "2"}) == {}


@pytest.mark.parametrize("kwargs, env, message", [
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
    ({"process_id": 2, "num_processes": 2}, {}, "process_id (JAX_PROCESS_ID)=2 must be in [0, num_processes=2)"),
    ({"coordinator": "localhost"}, {}, "must be host:port"),
])
def test_bad_start_up_values_are_named(kwargs, env, message):
    with pytest.raises(ValueError) as err:
        resolve_processes(**kwargs, env=env)
    assert message in str(err.value)


@pytest.mark.slow
def test_a_peer_that_never_arrives_ends_the_run_with_a_clear_error(tmp_path):
    """Process 0 of 2 alone: after ``mesh.timeout_s`` it exits with WATCHDOG_EXIT and says what to check,
    instead of JAX's C++ abort."""
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    code = ("import sys; from qlora_jax.train.distributed import initialize_distributed; "
            "initialize_distributed('127.0.0.1:' + sys.argv[1], 2, 0, timeout_s=3)")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(_free_port())], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == WATCHDOG_EXIT, proc.stderr[-3000:]
    assert "process 0 of 2" in proc.stderr and "within 3 s (mesh.timeout_s)" in proc.stderr
    assert time.time() - t0 < 60


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- data streams ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from qlora_jax.models.tokenizer import tokenizer_from_hf_folder

    return tokenizer_from_hf_folder(write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    with open(path, "w") as f:
        for _ in range(90):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(2, 14))))}) + "\n")
    return str(path)


def _process_data(text_file, tok, layout):
    keep = layout.keeps if layout.num_streams > 1 else None
    return load_data(text_file, tok, eval_fraction=0.2, seed=7, keep=keep)


def _equal(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("pack", [True, False])
def test_each_process_builds_its_rows_of_the_same_global_batches(text_file, tok, pack):
    """4 streams of 2 rows: one process building all of them gives the batches that two processes, each
    indexing only its own streams' records, give between them, row for row."""
    whole = StreamLayout.for_rows(4, 8, (0, 8))
    halves = [StreamLayout.for_rows(4, 8, (0, 4)), StreamLayout.for_rows(4, 8, (4, 8))]
    assert halves[1].local == (2, 3) and halves[1].batch_rows() == 4
    one = StreamedBatches(_process_data(text_file, tok, whole), whole, 24, pack=pack)
    parts = [_process_data(text_file, tok, h) for h in halves]
    assert all(set(d.train.positions % 4) <= set(h.local) for d, h in zip(parts, halves))  # only their own records
    two = [StreamedBatches(d, h, 24, pack=pack) for d, h in zip(parts, halves)]
    for _ in range(12):  # several epochs of each stream
        batch = next(one)
        _equal(batch, [np.concatenate([x, y]) for x, y in zip(next(two[0]), next(two[1]))])
    assert batch.tokens.shape == (8, 24)


def test_one_stream_is_the_single_stream_layout(text_file, tok):
    layout = StreamLayout.for_rows(1, 3, (0, 3))
    data = _process_data(text_file, tok, layout)
    ours, theirs = StreamedBatches(data, layout, 24), data.iterator(3, 24)
    for _ in range(8):
        _equal(next(ours), next(theirs))
    assert ours.sequences_per_epoch() == theirs.sequences_per_epoch()


def test_the_global_data_position_resumes_on_another_process_count(text_file, tok):
    """Positions gathered from two processes restore one process that builds every stream, and back."""
    halves = [StreamLayout.for_rows(4, 8, (0, 4)), StreamLayout.for_rows(4, 8, (4, 8))]
    two = [StreamedBatches(_process_data(text_file, tok, h), h, 24) for h in halves]
    for _ in range(5):
        [next(it) for it in two]
    state = global_state(np.stack([it.local_state() for it in two]))
    assert len(state["streams"]) == 4 and json.loads(json.dumps(state)) == state
    whole = StreamLayout.for_rows(4, 8, (0, 8))
    one = StreamedBatches(_process_data(text_file, tok, whole), whole, 24)
    one.restore(state)
    for _ in range(4):
        _equal(next(one), [np.concatenate([x, y]) for x, y in zip(next(two[0]), next(two[1]))])
    other = StreamedBatches(_process_data(text_file, tok, StreamLayout.for_rows(2, 8, (0, 8))),
                            StreamLayout.for_rows(2, 8, (0, 8)), 24)
    with pytest.raises(ValueError, match="4 data stream.*resume with --data.streams 4"):
        other.restore(state)


def test_eval_batches_are_whole_on_every_process(text_file, tok):
    """Every process builds exactly n eval batches (padding rows once a stream's records run out)."""
    whole = StreamLayout.for_rows(2, 4, (0, 4))
    halves = [StreamLayout.for_rows(2, 4, (0, 2)), StreamLayout.for_rows(2, 4, (2, 4))]
    n = 40  # more than the held-out records fill
    one = eval_batches(_process_data(text_file, tok, whole), whole, n, 24)
    two = [eval_batches(_process_data(text_file, tok, h), h, n, 24) for h in halves]
    assert len(one) == len(two[0]) == len(two[1]) == n
    for b, x, y in zip(one, *two):
        _equal(b, [np.concatenate([p, q]) for p, q in zip(x, y)])
    assert one[-1].loss_mask.sum() == 0 and one[0].loss_mask.sum() > 0


def test_streams_must_split_the_batch_and_the_processes():
    with pytest.raises(ValueError, match="data.streams=3 must divide loop.batch_size=8"):
        StreamLayout.for_rows(3, 8, (0, 8))
    with pytest.raises(ValueError, match="make data.streams a multiple of the number of processes"):
        StreamLayout.for_rows(2, 8, (2, 6))


def test_process_rows_of_one_process():
    import jax

    from qlora_jax.train.mesh import batch_sharding, global_batch, make_mesh, process_rows

    mesh = make_mesh(1, 1)
    assert process_rows(batch_sharding(mesh), 6) == (0, 6)
    got = global_batch(batch_sharding(mesh), {"tokens": np.arange(12).reshape(1, 6, 2)}, 6)
    assert isinstance(got["tokens"], jax.Array) and got["tokens"].shape == (1, 6, 2)
