#!/usr/bin/env python
"""Put drawn detections (the PNGs that tools/test_net.py and tools/detect.py write) side by side in one picture.

    python tools/draw_grid.py --out docs/real_detections.jpg --cols 4 \
        runs/real/raccoon/detections/test/raccoon-1*.png runs/real/fruit/detections/test/*.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sppdet.cli import run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--out", required=True, type=Path, help="the picture to write (.jpg or .png)")
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--tile", default="320x240", help="WIDTHxHEIGHT each image is scaled to fit")
    args = ap.parse_args(argv)

    def body() -> int:
        from sppdet.images import load_image, save_image
        from sppdet.visualize import image_grid

        parts = args.tile.lower().split("x")
        tile = tuple(int(v) for v in parts) if len(parts) == 2 and all(v.isdigit() for v in parts) else ()
        if not tile or min(tile) <= 0 or args.cols <= 0:
            raise ValueError(f"--tile must be WIDTHxHEIGHT in pixels and --cols positive, got {args.tile!r} / "
                             f"{args.cols}")
        ext = args.out.suffix.lower()
        if ext not in (".jpg", ".jpeg", ".png"):
            raise ValueError(f"{args.out}: write a .jpg or a .png")
        grid = image_grid([load_image(p) for p in args.images], args.cols, tile)
        save_image(args.out, grid, quality=85)
        print(f"{len(args.images)} images -> {args.out} ({grid.shape[1]}x{grid.shape[0]})")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
