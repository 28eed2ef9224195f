"""Stage 3: conv5 once per image and scale (SPP-net's point: not once per window), cached on disk.

Reads: the split's images, ``<run>/proposals/<split>/`` (its manifest: made with the proposal settings now in
force), the trunk. Writes: ``<run>/features/<split>/<id>.npz`` (conv5 maps per scale, float16; with ``flip`` the
mirror image's too) and a manifest; shards (``--shard i/n``) each write their images, the last one completes it.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from ..config import fingerprint
from ..features import ImageFeatures, extract_image, weights_fingerprint
from ..malloc import large_blocks_reused
from ..models import resolve_precision
from ..proposals import ProposalStore
from ..run import Run
from ..spp import spp_output_dim
from ..store import atomic_write_text, dir_bytes, file_sha256
from ..manifest import Stage
from .common import FEATURES_OMIT, StageSpec, config_cache, stage_folder
from .proposals import require_proposals


def stage_features(run: Run, split: str, shard: tuple[int, int] = (0, 1), overwrite: bool = False,
                   device: str | None = None, flip: bool | None = None) -> dict:
    """conv5 once per image and scale, cached as float16; prints the cost summary. ``device``: None for the
    config's ``device``. ``flip``: also the flipped image's maps; None: for the train split when
    ``finetune.flip`` (the authors include flipped images in fine-tuning) with ``finetune.flip_from: image``."""
    cfg = run.cfg
    device = device or run.device
    if flip is None:
        flip = split == cfg.data.train_split and cfg.finetune.flip and not cfg.finetune.mirror_maps
    ds = run.dataset(split)
    prop_manifest = require_proposals(run, split)
    backbone = run.backbone().to(device)
    g = backbone.geometry
    precision = resolve_precision(cfg.features.precision, device, "features.precision")
    inputs = {"weights": weights_fingerprint(backbone), "proposals": prop_manifest["fingerprint"],
              "split": fingerprint(ds.ids), "images": run.content(split, "images")}
    # The precision the pass resolved to ("auto" is bf16 on one machine, fp32 on another) is part of the
    # config, so a run resumed elsewhere cannot mix the two in one cache.
    # Per image: its file and its proposals; when only some images changed, only their maps are recomputed.
    images = run.item_hashes(split, "images")
    items = {i: images[i] + file_sha256(run.proposals_dir(split) / f"{i}.npz") for i in ds.ids}
    # The pooling keys (features.levels, shrink...) are not the maps' settings: changing one reuses this cache.
    stage = stage_folder(run.features_dir(split), "features", {"features": cfg.features, "backbone": cfg.backbone},
                         {"flip": bool(flip), "conv_precision": precision}, inputs, overwrite and shard == (0, 1),
                         item_inputs=items, per_item=("images", "proposals"), omit=FEATURES_OMIT)
    i_shard, n_shard = shard
    ids = ds.ids[i_shard::n_shard]
    todo = [i for i in ids if not stage.has(i)]
    conv_s, pool_s, boxes = _extract(run, split, stage, todo, backbone, bool(flip), device, precision,
                                     f" shard {i_shard}/{n_shard}" if n_shard > 1 else "")
    done_all = all(stage.has(i) for i in ds.ids)
    n = len(todo)
    summary = {
        "new_images": n,
        "conv_seconds_per_image": conv_s if n else None,
        "pool_seconds_per_image": pool_s if n else None,
        "boxes_per_image": boxes if n else None,
        "geometry": {"stride": g.stride, "center0": g.center0, "receptive_field": g.receptive_field},
        # a window's pooled length at the pooling settings of this call (for the cost line; not the cache's)
        "feature_dim": spp_output_dim(backbone.out_channels, cfg.features.levels, run.pool_deep()),
        "conv_precision": precision,
    }
    m = _record(stage, shard, summary, len(ds.ids) if done_all else None)
    _log_costs(run, split, stage, ds.ids, summary)
    return m


def _record(stage: Stage, shard: tuple[int, int], summary: dict, items: int | None) -> dict:
    """A shard's summary goes to its own progress file (concurrent shards never write over each other's); the
    shard that finds every image done (``items``) marks the stage complete, with every shard's summary. A shard
    that is not the last never writes the manifest, so it cannot undo a complete one written meanwhile."""
    if shard != (0, 1):
        atomic_write_text(stage.dir / f"progress-{shard[0]}-of-{shard[1]}.json", json.dumps(summary))
    if items is None:
        return {**Stage.read_manifest(stage.dir), **summary}
    shards = {p.stem: json.loads(p.read_text()) for p in sorted(stage.dir.glob("progress-*-of-*.json"))}
    return stage.finish(items, **summary, **({"shards": shards} if shards else {}))


# The cost line's pooling time is measured on every 32nd image: pooling all of them only to time it was a quarter of
# the stage with 23,600-d hypercolumn windows (every 8th: ~4 s of raccoon's 200 images). Its window count is those
# images'.
POOL_TIMED_EVERY = 32


def _extract(run: Run, split: str, stage: Stage, todo: list[str], backbone, flip: bool, device: str, precision: str,
             label: str) -> tuple[float, float, float]:
    """conv5 of each image of ``todo`` written to its shard; returns the seconds of conv per image, and the seconds
    of pooling the windows per image and the windows per image on every :data:`POOL_TIMED_EVERY`-th image (timed,
    not stored: what the later stages pay per read)."""
    from tqdm import tqdm

    f = run.cfg.features
    ds = run.dataset(split)
    store = ProposalStore(run.proposals_dir(split))
    cache = config_cache(run, stage.dir)
    t_conv = t_pool = 0.0
    nbox = timed = 0
    # Each shard is written (float16 conversion, zip, fsync: ~25 ms, mostly waiting on the disk) in a thread while
    # the next image's conv5 runs; one write at a time, so at most one image's maps wait in memory.
    writer, pending = ThreadPoolExecutor(1, thread_name_prefix="conv5-writer"), None
    try:
        with large_blocks_reused():  # each image's activations: the same large blocks
            for n, i in enumerate(tqdm(todo, desc=f"features {split}{label}", unit="img")):
                rgb = ds.image(i)
                maps, factors, flipped, dt = extract_image(backbone, rgb, f.scales, f.max_size, flip, device,
                                                           precision)
                t_conv += dt
                if n % POOL_TIMED_EVERY == 0:
                    boxes = store.load(i)
                    t0 = time.perf_counter()
                    cache.pooled(ImageFeatures(maps, factors, rgb.shape[0], rgb.shape[1]), boxes)
                    t_pool += time.perf_counter() - t0
                    nbox += len(boxes)
                    timed += 1
                if pending is not None:
                    pending.result()  # the previous shard is on disk (or its error is raised here)
                pending = writer.submit(cache.write, stage.path(i), maps, factors, rgb.shape[:2], flipped, f.dtype)
            if pending is not None:
                pending.result()
    finally:
        writer.shutdown(wait=True)
    return t_conv / max(len(todo), 1), t_pool / max(timed, 1), nbox / max(timed, 1)


def _log_costs(run: Run, split: str, stage: Stage, ids: list[str], summary: dict) -> None:
    """The features stage's cost line: conv and pooling time, the cache per image, projected to VOC 2007."""
    n = summary["new_images"]
    total = dir_bytes(stage.dir)
    per_img = total / max(1, sum(stage.has(i) for i in ids))
    pooled_per_img = 2000 * summary["feature_dim"] * 4
    run.log(f"features {split}: {n} new images"
            + (f", conv {summary['conv_seconds_per_image']:.3f} s/img, pooling {summary['boxes_per_image']:.0f} windows "
               f"{summary['pool_seconds_per_image'] * 1000:.1f} ms/img" if n else "")
            + f"; cache {per_img / 1e6:.2f} MB/img ({total / 1e6:.1f} MB in all). Projected to VOC 2007 trainval+test "
              f"(9963 images): conv5 cache {per_img * 9963 / 1e9:.1f} GB; caching pooled {summary['feature_dim']}-d "
              f"float32 vectors of 2000 windows instead: {pooled_per_img / 1e6:.0f} MB/img, "
              f"{pooled_per_img * 9963 / 1e9:.0f} GB")


SPEC = StageSpec("features", "tools/extract_features.py", True,
                 ("data: the split's images", "proposals/<split>/", "the trunk's weights"),
                 "features/<split>/", ("features (less its pooling keys)", "backbone",
                                       "finetune.flip, finetune.flip_from (train split)"),
                 stage_features,
                 "features written to disk (conv5 cache)")
