"""scripts/bench_attention.py runs end to end in its CPU dry run (--tiny) and agrees with the reference.

The error bound is test_flash_attention's float32 one: each of ``out, dq, dk, dv`` is
a sum over at most S keys, evaluated in another order (and with one rescaling per
key block) by the chunked implementation: 16 * S float32 unit roundoffs of its
largest entry.
"""

from __future__ import annotations

import json

from testlib import load_script


def test_tiny_run_reports_reference_and_chunked(tmp_path, capsys):
    bench = load_script("bench_attention")
    t = 96  # one tiny length (the dry run does 64 and 96); two segments of 48
    bench.main(["--tiny", "--seq-lens", str(t), "--packed", "2",
                "--json", str(tmp_path / "a.json"), "--markdown", str(tmp_path / "a.md")])
    payload = json.loads((tmp_path / "a.json").read_text())
    assert payload["dtype"] == "float32" and payload["shape"] == dict(heads=9, kv_heads=3, head_dim=64)
    rows = {r["implementation"]: r for r in payload["rows"]}
    assert sorted(rows) == ["chunked", "pallas", "reference"] and all(r["seq_len"] == t for r in rows.values())
    for r in (rows["reference"], rows["chunked"]):
        assert "error" not in r, r
        assert r["ms"] > 0 and r["temp_bytes"] > 0 and r["vs"] == "reference"
        assert r["max_rel_err"] <= 16 * t * 2.0**-24, r
    assert rows["reference"]["vs_first"] == 1.0
    assert rows["pallas"]["error"].startswith("skipped: needs a GPU")  # no --interpret: not run on a CPU
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    written = [line for line in (tmp_path / "a.md").read_text().splitlines() if line.startswith("|")]
    assert printed == written and len(printed) == 2 + 3
    assert printed[-2].startswith(f"| {t} | chunked | float32 |")
