"""One-image API: ``Predictor(run_dir)(image)``, the models of a trained run loaded once, many images served.

    from sppdet import Predictor
    p = Predictor("runs/demo")
    out = p("photo.jpg")            # or an RGB uint8 array (H, W, 3)
    out["boxes"], out["scores"], out["classes"]

Per image: selective search -> conv5 once per scale -> SPP pooling + fc head -> SVM scores -> per-class NMS -> box
regression -> clipping -> score threshold and per-image cap (``test.max_per_image``). A ``route: fast_rcnn`` run:
the same with its one network's softmax scores and box regression.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["Predictor"]


class Predictor:
    """Detector of a trained run folder (its ``config.yaml`` and models).

    Args:
        run_dir: the run folder (``tools/demo.py --run``).
        device: where the conv and fc layers run: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; None: the run's
            ``device`` setting.
        score_threshold: detections scoring at most this are dropped (default: the run's ``test.draw_threshold``, or
            for a ``route: fast_rcnn`` run, whose scores are probabilities, its ``fast_rcnn.draw_threshold``).
        bbox_reg: apply the run's box regressors (where it has them); None: as its ``test.bbox_reg`` says.
        overrides: ``"section.key=value"`` test-time settings over the run's config (e.g. ``test.nms=0.4``).
        warm_up: load selective search's compiled code in a thread while the models load (~0.4 s that the
            first image would otherwise wait for; ``benchmarks/bench_detect.py`` measures it).
    """

    def __init__(self, run_dir: str | Path, device: str | None = None, score_threshold: float | None = None,
                 bbox_reg: bool | None = None, overrides: tuple[str, ...] | list[str] = (), warm_up: bool = True):
        if warm_up:  # before torch is imported: selective search's module does not need it
            from .selective_search import start_warm_up

            start_warm_up()
        from .config import load_config
        from .run import Run
        from .stages import build_detector

        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml); train one with tools/demo.py")
        self.cfg = load_config(run_dir / "config.yaml", list(overrides))
        self.run = run = Run(self.cfg, run_dir, save_config=False, log_fn=lambda s: None)
        self.cfg = run.cfg  # features.scales: auto resolved (a run's config.yaml holds the scale it chose)
        if device is not None:
            from .config import with_device

            run.cfg = self.cfg = with_device(self.cfg, device)
        self.fast_rcnn = None
        self._pool = None  # the proposal thread, started by the first image
        if self.cfg.route == "fast_rcnn":  # one network: trunk, softmax scores and its own box regression
            from .stages.fast_rcnn import load_model

            if device is not None and run.device != "cpu":
                raise ValueError("route fast_rcnn: Predictor runs its network on the CPU (device='cpu')")
            self.device = "cpu"
            self.fast_rcnn = load_model(run, check=False)
            self.use_bbox_reg = self.cfg.test.bbox_reg if bbox_reg is None else bool(bbox_reg)
            self.classes = list(run.classes)
        else:
            # Each model as it was made (its own manifest says with what); only test-time settings from the run.
            self.device = device = run.device
            self.detector = build_detector(run, self.cfg.data.test_split, use_bbox_reg=bbox_reg, check=False,
                                           device=device)
            self.classes = list(self.detector.classes)
            self.backbone = run.backbone().to(device)
        default = self.cfg.fast_rcnn.draw_threshold if self.fast_rcnn is not None else self.cfg.test.draw_threshold
        self.score_threshold = default if score_threshold is None else float(score_threshold)

    def proposals(self, rgb: np.ndarray) -> np.ndarray:
        """``(R, 4)`` selective-search windows of an RGB image, with the run's proposal settings."""
        from .proposals import propose, usable_cores

        p = self.cfg.proposals
        backend = p.backend if p.backend in ("fast", "selectivesearch") else "fast"  # precomputed: only for datasets
        params = dict(p.params)
        if backend == "fast" and "workers" not in params:
            # the colour spaces in threads on half the cores (the conv layers may need the rest): none on 2 cores
            params["workers"] = max(1, usable_cores() // 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return propose(rgb, backend=backend, max_boxes=p.max_boxes, min_size=p.min_size, cap_nms=p.cap_nms,
                           **params)

    def __call__(self, image: str | Path | np.ndarray) -> dict:
        """Detections in one image (a file path: the photo as a viewer shows it, its EXIF orientation applied;
        or an RGB uint8 ``(H, W, 3)`` array).

        Returns ``{"boxes": (N, 4) float32 xyxy in the image's pixels (0-based continuous), "scores": (N,),
        "labels": (N,) int64, "classes": [N names], "seconds": {"proposals", "conv", "pool_fc", "rest"},
        "wall_seconds": the whole call}``, sorted by score. In an SPP-net run the proposals are computed in a thread
        while the conv layers run, so ``wall_seconds`` is less than the steps' sum."""
        from .voc import load_image

        rgb = load_image(image, orient=True) if isinstance(image, (str, Path)) else np.ascontiguousarray(image)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
        t0 = time.perf_counter()
        if self.fast_rcnn is None:
            # Selective search (one core, compiled code that releases the GIL) runs in a thread beside the conv
            # layers, which need only the image: the photo's wall time is then less than the steps' sum.
            pending = self._proposal_thread().submit(self._timed_proposals, rgb)
            feats, t_conv = self.detector.image_features(self.backbone, rgb, self.cfg.features, self.device)
            boxes, t_prop = pending.result()
            plain, reg, t = self.detector.detect_cached(feats, boxes, self.score_threshold)
            t["conv"] = t_conv
            d, rest = (reg if reg is not None else plain), t["svm"] + t["post"]
            return self._result(d, boxes, t_prop, t, rest, time.perf_counter() - t0)
        import torch

        boxes, t_prop = self._timed_proposals(rgb)  # Fast R-CNN mode: its one network takes image and windows
        c, f = self.cfg, self.cfg.features
        with torch.no_grad():
            plain, reg, _, t = self.fast_rcnn.detect(rgb, boxes, c.fast_rcnn.scales or f.scales, f.max_size,
                                                     f.target_size, c.test, self.score_threshold, c.test.max_per_image,
                                                     floor=c.fast_rcnn.score_threshold)
        d = reg if self.use_bbox_reg else plain
        return self._result(d, boxes, t_prop, t, t["post"], time.perf_counter() - t0)

    def _timed_proposals(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        return self.proposals(rgb), time.perf_counter() - t0

    def _proposal_thread(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="proposals")
        return self._pool

    def _result(self, d, boxes: np.ndarray, t_prop: float, t: dict, rest: float, wall: float) -> dict:
        return {"boxes": d.boxes, "scores": d.scores, "labels": d.labels,
                "classes": [self.classes[int(k)] for k in d.labels], "proposals": len(boxes),
                "seconds": {"proposals": t_prop, "conv": t["conv"], "pool_fc": t["pool"] + t["fc"], "rest": rest},
                "wall_seconds": wall}
