"""benchmarks/bench_finetune_step.py: one row per batch size, the first the reference of the ratios."""

import json


def test_rows_and_ratios(tmp_path, load_script):
    bench = load_script("benchmarks/bench_finetune_step.py")
    out = tmp_path / "ft.json"
    assert bench.main(["--dim", "96", "--hidden", "16", "--batches", "8,32", "--steps", "3", "--threads", "1",
                       "--precisions", "fp32,bf16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["precision"]) for r in rows] == [(8, "fp32"), (32, "fp32"), (8, "bf16"), (32, "bf16")]
    assert rows[0]["speedup"] == 1.0
    for r in rows:
        assert r["s_per_step"] > 0
        assert abs(r["ms_per_window"] - 1000 * r["s_per_step"] / r["batch"]) < 1e-9
        assert abs(r["speedup"] - rows[0]["ms_per_window"] / r["ms_per_window"]) < 1e-9
