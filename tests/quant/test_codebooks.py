"""Code tables against bitsandbytes, value by value (bit patterns, not approximately)."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_jax.quant.codebooks import code_table, dynamic_map, sorted_bounds


def test_nf4_table_is_the_published_one():
    t = code_table("nf4")
    assert t.dtype == np.float32 and t.shape == (16,)
    assert t[7] == 0.0 and t[0] == -1.0 and t[15] == 1.0 and np.all(np.diff(t) > 0)


def test_int4_table():
    np.testing.assert_array_equal(code_table("int4") * 7, np.arange(-8, 8, dtype=np.float32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_bounds_are_sorted_midpoints(quant_type):
    bounds, order = sorted_bounds(quant_type)
    table = code_table(quant_type)
    assert sorted(order.tolist()) == list(range(16))
    assert np.all(np.diff(table[order]) >= 0) and np.all(np.diff(bounds) >= 0)


@pytest.mark.oracle
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_tables_equal_bnb(quant_type):
    import bitsandbytes.functional as F

    theirs = F.get_4bit_type(quant_type, device="cpu").numpy()
    np.testing.assert_array_equal(code_table(quant_type).view(np.uint32), theirs.view(np.uint32))


@pytest.mark.oracle
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bnb(signed):
    import bitsandbytes.functional as F

    theirs = F.create_dynamic_map(signed=signed).numpy()
    np.testing.assert_array_equal(dynamic_map(signed).view(np.uint32), theirs.view(np.uint32))
