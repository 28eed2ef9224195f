"""benchmarks/bench_scale.py's projection: per-image rates are the marginal ones between the two largest sizes (a
tool's fixed start-up left out), fine-tuning is projected per step, and every stage gets a row."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/bench_scale.py")


def _rows(n, start=10.0, per=2.0):
    tv, va, te = n // 2 + n // 4, n // 4, n // 4
    split = lambda rate: {"trainval": {"images": tv, "seconds": start + rate * tv},  # noqa: E731
                          "val": {"images": va, "seconds": start + rate * va},
                          "test": {"images": te, "seconds": start + rate * te}}
    rows = [{"stage": s, "n_images": n, "classes": 20, "seconds": 3 * start + per * n, "peak_rss_mb": 100.0,
             "images": split(per), "disk_mb": 0.5 * n} for s in ("proposals", "features")]
    rows += [{"stage": "finetune", "n_images": n, "classes": 20, "seconds": 50.0, "peak_rss_mb": 100.0,
              "images": {"trainval": tv}, "iterations": 100, "disk_mb": 1.0}]
    rows += [{"stage": s, "n_images": n, "classes": 20, "seconds": start + per * tv, "peak_rss_mb": 100.0 + n,
              "images": {"trainval": tv}, "disk_mb": 0.0} for s in ("svm", "bbox_reg")]
    rows += [{"stage": "test", "n_images": n, "classes": 20, "seconds": start + per * te, "peak_rss_mb": 100.0,
              "images": {"trainval": tv}, "test_images": te, "disk_mb": 0.0}]
    return rows


def test_projection_uses_marginal_rates_and_steps(bench):
    rows = _rows(40) + _rows(200)
    p = bench.projection(rows, str(ROOT / "configs" / "voc07_efficientnet_lite0.yaml"), [], finetune_seconds=40.0)
    # 2 s per image whatever the start-up: trainval 5011 + val 2510 + test 4952 images
    assert p["proposals"]["hours"] == pytest.approx(2.0 * (5011 + 2510 + 4952) / 3600, abs=0.01)
    assert p["svm"]["hours"] == pytest.approx(2.0 * 5011 / 3600, abs=0.01)
    assert p["test"]["hours"] == pytest.approx(2.0 * 4952 / 3600, abs=0.01)
    assert p["finetune"]["hours"] == pytest.approx(0.4 * 40000 / 3600, abs=0.01)  # 40 s / 100 steps, 40000 steps
    assert p["svm"]["peak_rss_ratio_largest_to_smallest_n"] == pytest.approx(300 / 140, abs=0.01)
    assert set(bench.STAGES) <= set(p) and p["total_hours"] > 0


def test_projection_takes_the_scale_the_runs_chose(bench):
    """With ``features.scales: auto`` (custom.yaml) the conv5 area compares the paper's five scales with the one
    each run chose (its features row's ``scales``, read from the run's config.yaml)."""
    rows = _rows(40) + _rows(200)
    for r in rows:
        if r["stage"] == "features":
            r["scales"] = [480]
    p = bench.projection(rows, str(ROOT / "configs" / "custom.yaml"), ["data.train_split=trainval"], finetune_seconds=40.0)
    five = 480 ** 2 + 576 ** 2 + 688 ** 2 + 864 ** 2 + 1200 ** 2
    c = p["conv5_cache_gb"]
    assert c["paper_five_scales"] == pytest.approx(c["these_scales"] * five / 480 ** 2, rel=0.02)
    assert "[480]" in p["basis"]
