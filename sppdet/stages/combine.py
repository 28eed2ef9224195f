"""Model combination (the paper's section 4.4), after testing: the detections of several run folders on one
split merged by NMS over their union.

Reads: ``<run>/detections/<split>/`` of this run and of each other run, the split's annotations. Writes:
``<run>/detections/<split><tag>/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..run import Run
from ..store import StaleCacheError
from .common import StageSpec
from .test import annotations_of, evaluate, write_results


def stage_combine(run: Run, split: str, others: list[str | Path], tag: str = "_combined", draw: int = 4) -> dict:
    """The paper's model combination (section 4.4) across runs: per image and class, NMS on the union of this
    run's detections on ``split`` and those of each run folder in ``others`` (each tested on the same split
    first, e.g. with another trunk); a more confident box of one model suppresses the less confident boxes of
    another. Each run's boxes are its own final ones (box regression, where it has any, applied). Written to
    ``detections/<split><tag>`` with the usual artefacts."""
    from ..detector import load_detections, union_nms

    t0 = time.time()
    if not others:
        raise ValueError("a combination needs at least one other run folder")
    ds = run.dataset(split)
    sources = [run.detections_dir(split)] + [Path(o) / "detections" / split for o in others]
    sets = []
    for src in sources:
        m_path, d_path = src / "metrics.json", src / "detections.npz"
        if not m_path.is_file() or not d_path.is_file():
            raise FileNotFoundError(f"{src}: no detections of split {split!r} (run tools/test_net.py --run "
                                    f"{src.parent.parent} --split {split} first)")
        m = json.loads(m_path.read_text())
        if list(m.get("classes", [])) != run.classes:
            raise ValueError(f"{m_path}: classes {m.get('classes')} differ from this run's {run.classes}")
        for w, fp in m.get("inputs", {}).items():  # detections made before this was recorded are not checked
            if fp != run.content(split, w):
                raise StaleCacheError(f"{m_path}: made from other {w} than split {split!r} holds now "
                                      f"(test that run again: tools/test_net.py --run {src.parent.parent} "
                                      f"--split {split})")
        sets.append(load_detections(d_path, ds.ids, len(run.classes)))
        run.log(f"combine: {src} (mAP {m.get('map07', float('nan')):.3f})")
    final = {i: union_nms([s[i] for s in sets if i in s], run.cfg.test.nms, run.cfg.test.max_per_class)
             for i in ds.ids}
    out = run.detections_dir(split, tag)
    results = {"combined": evaluate(run, ds, final)}
    annotations = {i: annotations_of(run, ds, i) for i in ds.ids}
    return write_results(run, ds, split, out, results, final, annotations, [], {"combined": [str(s) for s in sources]},
                          draw, t0)


SPEC = StageSpec("combine", "tools/test_net.py --combine-with", False, ("detections/<split>/ of each run",),
                 "detections/<split>_combined/", ("test.nms", "test.max_per_class"), stage_combine)
