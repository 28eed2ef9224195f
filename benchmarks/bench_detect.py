#!/usr/bin/env python
"""What a user waits for in ``tools/detect.py``: a fresh process per round that imports sppdet, loads a run's
models (``Predictor``) and detects the given photos in order, with selective search's warm-up thread on and off
(``Predictor(warm_up=...)``), the two alternating round by round.

    python benchmarks/bench_detect.py --run runs/real/raccoon [--rounds 3] [--out detect.json] PHOTO [PHOTO ...]

Per process: seconds to import and load the models, the first photo's wall time and each step (proposals run in a
thread beside the conv layers, so a photo's wall time is less than its steps' sum), the later photos' median, and
the process's total. The table gives each variant's mean over the rounds and the first photo's ratio off / on.
Run it alone: two processes on two cores slow each other far more than twofold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(run: str, photos: list[str], warm_up: bool) -> dict:
    """One process's measurements (runs in the child)."""
    t0 = time.perf_counter()
    from sppdet import Predictor

    p = Predictor(run, warm_up=warm_up)
    load = time.perf_counter() - t0
    photos_out = []
    for f in photos:
        r = p(f)
        photos_out.append({"photo": Path(f).name, "wall": r["wall_seconds"], **r["seconds"]})
    return {"warm_up": warm_up, "load_seconds": load, "photos": photos_out, "process_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", nargs="+")
    ap.add_argument("--run", required=True, help="a trained run folder")
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant")
    ap.add_argument("--out", default=None, help="rows as JSON")
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(child(args.run, args.photos, args.child == "on")), flush=True)
        return 0
    for f in args.photos:
        if not Path(f).is_file():
            raise SystemExit(f"{f}: no such photo")
    rows = []
    for r in range(args.rounds):
        for v in ("off", "on"):
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, "--run", args.run, "--child", v, *args.photos],
                               capture_output=True, text=True)
            wall = time.perf_counter() - t0
            line = [x for x in p.stdout.splitlines() if x.startswith("ROW ")]
            if p.returncode or not line:
                raise SystemExit(f"warm-up {v}, round {r}: the process failed:\n{p.stderr[-2000:]}")
            row = json.loads(line[-1][4:])
            row.update(round=r, wall_with_interpreter=wall)
            rows.append(row)
            first, rest = row["photos"][0], [x["wall"] for x in row["photos"][1:]]
            print(f"round {r} warm-up {v:3s}: load {row['load_seconds']:.2f} s, first photo {first['wall']:.2f} s "
                  f"(proposals {first['proposals']:.2f}, conv {first['conv']:.2f}, pooling+fc {first['pool_fc']:.2f}, "
                  f"rest {first['rest']:.3f})"
                  + (f", later photos median {statistics.median(rest):.2f} s" if rest else "")
                  + f", process {wall:.2f} s", flush=True)

    def mean(v, f):
        return statistics.fmean(f(x) for x in rows if x["warm_up"] == (v == "on"))

    summary = {v: {"load_seconds": mean(v, lambda x: x["load_seconds"]),
                   "first_photo_seconds": mean(v, lambda x: x["photos"][0]["wall"]),
                   "process_seconds": mean(v, lambda x: x["wall_with_interpreter"])} for v in ("off", "on")}
    summary["first_photo_ratio_off_on"] = summary["off"]["first_photo_seconds"] / summary["on"]["first_photo_seconds"]
    summary["process_ratio_off_on"] = summary["off"]["process_seconds"] / summary["on"]["process_seconds"]
    print(f"\nmeans over {args.rounds} rounds     load s  first photo s  process s")
    for v in ("off", "on"):
        s = summary[v]
        print(f"warm-up {v:3s}                {s['load_seconds']:6.2f}  {s['first_photo_seconds']:13.2f}  "
              f"{s['process_seconds']:9.2f}")
    print(f"first photo off / on: {summary['first_photo_ratio_off_on']:.2f}x; process off / on: "
          f"{summary['process_ratio_off_on']:.2f}x")
    if args.out:
        from sppdet.store import atomic_write_text

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({"run": args.run, "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
