"""benchmarks/bench_trunk.py: one row per round, the folded trunk's maps as the layers as written give them."""

import json


def test_rows_and_agreement(tmp_path, load_script):
    bench = load_script("benchmarks/bench_trunk.py")
    out = tmp_path / "trunk.json"
    assert bench.main(["--backbone", "efficientnet_lite0", "--size", "96x128", "--reps", "1", "--rounds", "2",
                       "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert [r["round"] for r in rec["rows"]] == [0, 1]
    for r in rec["rows"]:
        assert r["as_written_s"] > 0 and r["folded_s"] > 0
        assert abs(r["ratio"] - r["as_written_s"] / r["folded_s"]) < 1e-9
    assert 0 <= rec["max_rel_diff"] < 1e-4
    from sppdet import efficientnet
    assert efficientnet.FOLD_BATCHNORM  # switched back on after timing
