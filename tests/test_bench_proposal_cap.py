"""benchmarks/bench_proposal_cap.py: recall of the best N boxes in rank order and with proposals.cap_nms, on the
same uncapped selective-search boxes."""

import json


def test_the_cap_table_gives_recall_per_ordering_and_cap(toy_voc, tmp_path, load_script, capsys):
    out = tmp_path / "cap.json"
    bench = load_script("benchmarks/bench_proposal_cap.py")
    assert bench.main(["--root", str(toy_voc), "--split", "val", "--caps", "5,40", "--cap-nms", "0.7",
                       "--images", "2", "--out", str(out)]) == 0
    t = json.loads(out.read_text())
    assert t["photos"] == 2 and t["objects"] > 0 and t["photos_over_cap"]["5"] == 2
    rank, spread = t["recall"]["rank order"], t["recall"]["cap_nms 0.7"]
    assert set(rank) == set(spread) == {"5", "40", "all"}
    assert rank["all"] == spread["all"]  # no cap: the same boxes
    for row in (rank, spread):
        assert all(0 <= r[1] <= r[0] <= 1 for r in row.values())  # IoU 0.7 recalls no more than 0.5
        assert row["5"][0] <= row["40"][0] <= row["all"][0]
    assert "recall at IoU 0.5 / 0.7" in capsys.readouterr().out
