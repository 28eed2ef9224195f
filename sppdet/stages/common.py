"""What the stages share: a stage's declaration (:class:`StageSpec`), its output folder with the settings and
inputs it was made from (:func:`stage_folder`), and the checks that a stage's inputs are current."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import diff_keys, recorded, section_defaults, with_defaults, without_keys
from ..features import POOLING_KEYS, FeatureCache, pooling_settings
from ..proposals import ProposalStore
from ..roidb import make_windows
from ..run import Run
from ..store import ShardError, StaleCacheError
from ..manifest import Stage
from ..svm import mean_norm
from ..voc import VOCDataset


@dataclass(frozen=True)
class StageSpec:
    """One stage of the pipeline, declared.

    Attributes:
        name: the stage's name (its manifests' ``stage``).
        tool: the script that runs it on its own (``tools/...``).
        per_split: whether it runs once per split (``--split``).
        reads: what it reads: upstream stage folders (``<run>/...``) and dataset files.
        writes: its own folder in the run.
        settings: the config sections and keys it reads; all of them are in its manifest's fingerprint, so a
            change of any of them makes its outputs stale (refused by name, or rebuilt with --overwrite).
        run: ``run(run, ...)``, the stage itself.
        limitation: which of SPP-net's limitations (as Fast R-CNN named them) the stage embodies, if any;
            ``benchmarks/bench_family.py`` measures what each costs.
    """

    name: str
    tool: str
    per_split: bool
    reads: tuple[str, ...]
    writes: str
    settings: tuple[str, ...]
    run: Callable
    limitation: str = ""


def stage_folder(directory: Path, name: str, sections: dict, extra: dict, inputs: dict, overwrite: bool,
                 item_inputs: dict | None = None, per_item: tuple = (), extra_defaults: dict | None = None,
                 omit: dict | None = None) -> Stage:
    """A stage folder whose outputs depend on whole config ``sections`` (name -> dataclass) and ``extra``
    values; the sections' defaults (and ``extra_defaults``: what an ``extra`` value added later was before it
    was recorded) let a manifest from before an option was added stay valid while the option is at its
    default (:class:`~sppdet.manifest.Stage`). ``omit``: section name -> keys of it the outputs do not depend on
    (not recorded; an older manifest's values for them are not compared)."""
    omit = omit or {}
    return Stage(directory, name, {**{k: recorded(v, omit.get(k, ())) for k, v in sections.items()}, **extra}, inputs,
                 overwrite=overwrite,
                 defaults={**{k: section_defaults(v, omit.get(k, ())) for k, v in sections.items()},
                           **(extra_defaults or {})},
                 item_inputs=item_inputs, per_item=per_item, ignore=_dotted(omit))


def _dotted(omit: dict) -> tuple[str, ...]:
    return tuple(f"{section}.{key}" for section, keys in omit.items() for key in keys)


# What the conv5 cache records of the features section: everything but how windows are pooled from it.
FEATURES_OMIT = {"features": POOLING_KEYS}


def pooling_record(run: Run) -> dict:
    """What a stage that pools windows from the conv5 cache records besides its own settings: the pooling keys
    now in force (:data:`~sppdet.features.POOLING_KEYS`), which the cache itself does not record."""
    return {"pooling": pooling_settings(run.cfg.features)}


def pooling_before(run: Run) -> dict:
    """What a pooling stage's manifest from before it recorded ``pooling`` was made with: the values its train
    split's conv5 cache recorded then (caches recorded them until they left the cache's record), else the
    defaults; for ``extra_defaults``, so that such a folder stays valid while they are unchanged."""
    d = run.features_dir(run.cfg.data.train_split)
    saved = Stage.read_manifest(d).get("config", {}).get("features", {}) if (d / "manifest.json").is_file() else {}
    defaults = section_defaults(type(run.cfg.features))
    return {"pooling": {k: saved.get(k, defaults[k]) for k in POOLING_KEYS}}


def require_current(run: Run, split: str, directory: Path) -> None:
    """Refuse a proposal or feature folder made from other image files than the split now holds (an
    image edited or regenerated under the same id); folders from before the images were recorded pass."""
    recorded = Stage.read_manifest(directory).get("inputs", {}).get("images")
    if recorded is not None and recorded != run.content(split, "images"):
        raise StaleCacheError(f"{directory}: made from other image files than split {split!r} holds now (an image "
                              f"changed under the same id); rebuild it with --overwrite (tools/demo.py: "
                              f"--rebuild-stale)", folder=directory)


def split_windows(run: Run, split: str, ds: VOCDataset | None = None) -> dict:
    ds = ds or run.dataset(split)
    require_current(run, split, run.proposals_dir(split))
    store = ProposalStore(run.proposals_dir(split))
    k = len(run.classes)
    return {i: make_windows(ds.annotation(i), ds.labels(i), store.load(i), k) for i in ds.ids}


def config_cache(run: Run, directory: Path) -> FeatureCache:
    """A conv5 cache in ``directory`` read with the trunk's geometry and the pooling settings now in force (for a
    cache being written, or none yet: :func:`feature_cache` reads a finished one's from its manifest)."""
    g, f = run.backbone().geometry, run.cfg.features
    return FeatureCache(directory, g.stride, g.center0, f.levels, f.shrink, f.target_size, run.pool_deep())


def feature_cache(run: Run, split: str, verify: bool = True) -> FeatureCache:
    """The split's conv5 cache; ``verify``: refused when made with other feature or trunk settings than those
    now in force, or from other image files than the split holds (False where only its geometry is read)."""
    d = run.features_dir(split)
    if verify:
        require_settings(run, d, f"tools/extract_features.py --split {split}",
                         {"features": run.cfg.features, "backbone": run.cfg.backbone}, omit=FEATURES_OMIT)
    cache = FeatureCache.from_manifest(d, run.cfg.features, run.pool_deep())
    if verify:
        require_current(run, split, cache.dir)
    return cache


def require_flipped_maps(cfg, directory: Path, manifest: dict, split: str, option: str) -> None:
    """Refuse, by name, a feature cache made without the mirror images' maps that ``option`` uses (none are needed
    with ``finetune.flip_from: maps``: the maps are mirrored when read)."""
    if not cfg.finetune.mirror_maps and not manifest["config"].get("flip"):
        raise ShardError(f"{directory}: cached without the flipped images' maps, which {option} asks for; rerun "
                         f"tools/extract_features.py --split {split} --flip --overwrite, or set {option}=false")


def sample_norm(cache: FeatureCache, windows: dict, rng: np.random.Generator, images: int, boxes: int,
                 layer=lambda x: x.numpy()) -> float:
    """Mean L2 norm of ``layer``'s features of up to ``boxes`` random windows of each of the first ``images``."""
    sample = []
    for i in list(windows)[:images]:
        w = windows[i]
        sel = rng.choice(len(w.boxes), min(boxes, len(w.boxes)), replace=False)
        sample.append(layer(cache.pooled(i, w.boxes[sel])))
    norm = mean_norm(sample)
    if not norm > 0:
        raise ValueError(f"{cache.dir}: every sampled window's features are zero (for fc6/fc7: a fine-tuned head "
                         "whose units all died; see the fine-tuning stage's log), nothing to scale or train on")
    return norm


def require_settings(run: Run, directory: Path, tool: str, sections: dict, extra: dict | None = None,
                     prefix: str = "", extra_defaults: dict | None = None, omit: dict | None = None) -> dict:
    """A finished stage folder's manifest, refused (:class:`StaleCacheError`, naming the keys and ``tool``) when
    it was made with other values of the config ``sections`` (name -> dataclass) or ``extra`` than those now in
    force: the check a later stage makes before it uses an upstream model, so that a changed setting is never
    silently ignored. ``prefix`` goes before the keys named (e.g. ``"proposals."`` for a flat manifest config);
    ``extra_defaults``, as for :func:`stage_folder`: what an ``extra`` value recorded later was before, so that a
    folder from before it is checked against that value, as the stage itself checks it. ``omit``, as for
    :func:`stage_folder`."""
    if not (Path(directory) / "manifest.json").is_file():
        raise ShardError(f"{directory}: missing; run {tool} first")
    m = Stage.read_manifest(directory)
    if not m.get("complete"):
        raise ShardError(f"{directory}: unfinished; run {tool} first")
    omit = omit or {}
    now = json.loads(json.dumps({**{k: recorded(v, omit.get(k, ())) for k, v in sections.items()}, **(extra or {})},
                                default=str))
    # as the stage's own check (Stage): section defaults and extra_defaults fill what the manifest lacks, nested too
    defaults = {**{k: section_defaults(v, omit.get(k, ())) for k, v in sections.items()},
                **{k: v for k, v in (extra_defaults or {}).items() if k in now}}
    saved = with_defaults(without_keys({k: v for k, v in m.get("config", {}).items() if k in now}, _dotted(omit)),
                          defaults)
    now = {k: v for k, v in now.items() if k in saved}  # an extra recorded since, without a default: not checked
    changes = diff_keys(saved, now, prefix)
    if changes:
        raise StaleCacheError(f"{directory}: made with other settings than those now in force (changed: "
                              + "; ".join(changes[:6]) + f"); rerun {tool} --overwrite, or pass the same settings",
                              folder=directory)
    return m


def image_route_inputs(run: Run, split: str) -> dict:
    """The inputs of a route that reads a split's images and proposals itself (no conv5 cache: the R-CNN and Fast
    R-CNN modes): the proposals (made with the settings now in force), the trunk's weights, the split's files."""
    from ..features import weights_fingerprint
    from .proposals import require_proposals

    return {"proposals": require_proposals(run, split)["fingerprint"],
            "weights": weights_fingerprint(run.backbone()), "images": run.content(split, "images"),
            "annotations": run.content(split, "annotations")}
