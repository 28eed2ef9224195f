#!/usr/bin/env python
"""SPP-net (conv5 once + SPP pooling of every window) vs R-CNN (every window cropped with 16 px context,
warped to 224x224 and pushed through the same conv layers), side by side on one image and one proposal set.

    python benchmarks/bench_spp_vs_rcnn.py [--width 1.0] [--rcnn-windows 128] [--threads 2]
R-CNN time is measured on --rcnn-windows windows (batched) and scaled linearly to all windows (said in the output).
Also times fc6+fc7 for all windows, dense and with truncated SVD (Fast R-CNN's trick).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from sppdet.backbones import build_backbone
from sppdet.features import conv5_maps, pool_boxes
from sppdet.models import FCHead, truncated_svd_linear
from sppdet.proposals import propose
from sppdet.spp import SpatialPyramidPooling

ROOT = Path(__file__).resolve().parents[1]


def load_image():
    p = ROOT.parent / "shared" / "data" / "voc2007-sample" / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000004.jpg"
    if p.is_file():
        from sppdet.voc import load_image as li

        return li(p), str(p)
    from sppdet.synthetic import render_scene

    return render_scene(np.random.default_rng(0), 500, 375)[0], "synthetic 500x375"


def best_of(fn, n=3):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=1.0, help="ZF-5 width (1.0 = the paper's network)")
    ap.add_argument("--rcnn-windows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--scale", type=int, default=688)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rgb, name = load_image()
    boxes = propose(rgb, max_boxes=2000)
    R = len(boxes)
    zf = build_backbone("zf5", width=args.width).eval()
    levels = (6, 3, 2, 1)
    with torch.no_grad():
        conv_t = best_of(lambda: conv5_maps(zf, rgb, [args.scale], 2000))
        maps, f = conv5_maps(zf, rgb, [args.scale], 2000)
        sidx = np.zeros(R, np.int64)
        pool_t = best_of(lambda: pool_boxes(maps, f, boxes, sidx, zf.stride, zf.center0, levels, 6.5))
        pooled = pool_boxes(maps, f, boxes, sidx, zf.stride, zf.center0, levels, 6.5)
        # R-CNN: crop with 16 px of context in the warped frame, warp to 224, conv, then pool5 per window.
        n = min(args.rcnn_windows, R)
        spp = SpatialPyramidPooling(levels)

        def rcnn():
            crops = []
            for x1, y1, x2, y2 in boxes[:n]:
                w, h = x2 - x1, y2 - y1
                px, py = 16 * w / (224 - 32), 16 * h / (224 - 32)
                a, b = int(max(0, x1 - px)), int(max(0, y1 - py))
                c, d = int(min(rgb.shape[1], np.ceil(x2 + px))), int(min(rgb.shape[0], np.ceil(y2 + py)))
                crops.append(cv2.resize(rgb[b:max(d, b + 1), a:max(c, a + 1)], (224, 224)))
            x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
            for i in range(0, n, 64):
                spp(zf(zf.normalize(x[i:i + 64])))

        rcnn_t = best_of(rcnn, 1) * R / n
        head = FCHead(pooled.shape[1], 4096 if args.width == 1.0 else int(4096 * args.width), 21).eval()
        fc_t = best_of(lambda: head.features(pooled, "fc7"))
        r6 = min(1024, head.fc6.out_features // 4)
        head.fc6 = truncated_svd_linear(head.fc6, r6)
        head.fc7 = truncated_svd_linear(head.fc7, r6 // 4)
        fc_svd_t = best_of(lambda: head.features(pooled, "fc7"))
    print(f"image {name} ({rgb.shape[1]}x{rgb.shape[0]}), {R} proposals, ZF-5 width {args.width} "
          f"(conv5 {zf.out_channels} ch, {pooled.shape[1]}-d SPP), scale {args.scale}, {torch.get_num_threads()} threads")
    print(f"{'':34}{'seconds':>10}")
    print(f"{'(a) SPP: conv5 once':34}{conv_t:10.3f}")
    print(f"{'(a) SPP: pooling all windows':34}{pool_t:10.3f}  ({100 * pool_t / conv_t:.1f}% of the conv5 forward)")
    print(f"{'(b) R-CNN: conv of every window':34}{rcnn_t:10.3f}  (measured on {n} windows, scaled x{R / n:.1f})")
    print(f"conv part speed-up, R-CNN / SPP (conv5 + pooling): {rcnn_t / (conv_t + pool_t):.0f}x "
          f"(conv alone: {rcnn_t / conv_t:.0f}x; paper, GPU, ZF-5 1 scale: 270x)")
    print(f"fc6+fc7 for {R} windows: dense {fc_t:.3f} s, truncated SVD (rank {r6}/{r6 // 4}) {fc_svd_t:.3f} s "
          f"({fc_t / fc_svd_t:.1f}x)")
    print(f"SPP total per image (conv + pool + fc): {conv_t + pool_t + fc_t:.3f} s; R-CNN (conv + same fc): "
          f"{rcnn_t + fc_t:.3f} s; ratio {(rcnn_t + fc_t) / (conv_t + pool_t + fc_t):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
