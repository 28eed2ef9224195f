"""Stage 4: fine-tuning of the fc layers on pooled conv5 features; the conv layers stay frozen (SPP-net's third
limitation: the pooling's input is cached, so no gradient reaches them).

Reads: ``<run>/features/<train>/`` and ``<run>/features/<val>/`` (their manifests' fingerprints), both splits'
annotations, ``<run>/pretrain/checkpoint.pt``'s fc6/fc7 where ``finetune.init_from_pretrain``.
Writes: ``<run>/model/finetune/finetune.pt`` (fc6/fc7/fc8, with ``finetune.bbox_loss`` a box layer beside fc8, the
input scale) and its manifest.
"""

from __future__ import annotations

import numpy as np
import torch

from ..features import weights_fingerprint
from ..finetune import finetune_head
from ..models import FCHead
from ..pretrain import load_checkpoint, save_checkpoint
from ..run import Run
from ..store import ShardError
from ..manifest import Stage
from .common import (StageSpec, feature_cache, pooling_before, pooling_record, require_flipped_maps, require_settings,
                     sample_norm, split_windows, stage_folder)


def _new_head(run: Run, in_dim: int, init_from_pretrain: bool) -> tuple[FCHead, str]:
    cfg = run.cfg.finetune
    head = FCHead(in_dim, cfg.hidden, len(run.classes) + 1, cfg.dropout, fc6_rank=cfg.fc6_rank,
                  box_classes=len(run.classes) if cfg.bbox_loss else 0)
    how = "random"
    if init_from_pretrain and not head.fc6_rank and run.pretrain_ckpt.is_file():
        ck = load_checkpoint(run.pretrain_ckpt)
        st = ck["head"]
        if st["fc6.weight"].shape == head.fc6.weight.shape and st["fc7.weight"].shape == head.fc7.weight.shape:
            head.fc6.load_state_dict({"weight": st["fc6.weight"], "bias": st["fc6.bias"]})
            head.fc7.load_state_dict({"weight": st["fc7.weight"], "bias": st["fc7.bias"]})
            how = "pre-trained fc6/fc7"
    return head, how


def pretrained_head(run: Run) -> FCHead | None:
    """The classifier's fc6/fc7 without fine-tuning (for the ablation's 'no fine-tuning' rows)."""
    cache = feature_cache(run, run.cfg.data.train_split, verify=False)
    in_dim = cache.feature_dim(run.backbone().out_channels)
    head, how = _new_head(run, in_dim, True)
    if how == "random":
        raise ShardError(f"{run.pretrain_ckpt}: no pre-trained fc6/fc7 matching the detection pyramid")
    return head.eval()


def stage_finetune(run: Run, overwrite: bool = False) -> dict:
    """fc6/fc7/fc8 fine-tuned on windows pooled from the train split's conv5 cache (the conv layers are not in
    the trainer: SPP-net's limitation), the checkpoint chosen on the val split."""
    cfg = run.cfg
    device = run.device  # a device this machine lacks is refused before anything else
    tr, va = cfg.data.train_split, cfg.data.val_split
    cache_t, cache_v = feature_cache(run, tr), feature_cache(run, va)
    if va == cfg.data.test_split:
        run.log(f"warning: the validation split '{va}' is the test split (the authors' choice); "
                "the checkpoint is then selected on test")
    feats_t = Stage.read_manifest(cache_t.dir)
    if cfg.finetune.flip:
        require_flipped_maps(cfg, cache_t.dir, feats_t, tr, "finetune.flip")
    conv_before = weights_fingerprint(run.backbone())
    in_dim = cache_t.feature_dim(run.backbone().out_channels)
    inputs = {"features_" + tr: feats_t["fingerprint"],
              "features_" + va: Stage.read_manifest(cache_v.dir)["fingerprint"],
              "annotations_" + tr: run.content(tr, "annotations"), "annotations_" + va: run.content(va, "annotations")}
    # The window sample that sets finetune.input_norm's scale is svm.norm_images x svm.norm_boxes: read here too.
    extra = finetune_settings(run)
    stage = stage_folder(run.finetune_path.parent, "finetune", {"finetune": cfg.finetune}, extra, inputs, overwrite,
                         extra_defaults=pooling_before(run))
    if run.finetune_path.is_file():
        run.log(f"finetune: reusing {run.finetune_path}")
        return stage.finish(1)
    # fc8 (and fc6/fc7 when not from the pre-trained classifier) start from random weights: seeded here, as
    # torch seeds each process differently, so that a run folder's fine-tuning is reproducible.
    torch.manual_seed(cfg.seed)
    head, how = _new_head(run, in_dim, cfg.finetune.init_from_pretrain)
    run.log(f"finetune: fc6/fc7 initialised from {how}; conv layers frozen (not loaded into the trainer)")
    windows_t = split_windows(run, tr)
    if cfg.finetune.input_norm:
        norm = sample_norm(cache_t, windows_t, np.random.default_rng(cfg.seed), cfg.svm.norm_images,
                            cfg.svm.norm_boxes)
        head.input_scale = cfg.finetune.input_norm / norm
        run.log(f"finetune: pooled features scaled by {head.input_scale:.4g} before fc6 (mean norm {norm:.1f} -> "
                f"{cfg.finetune.input_norm:g}, finetune.input_norm)")
    res = finetune_head(head, windows_t, split_windows(run, va), cache_t, cache_v, len(run.classes), cfg.finetune,
                        cfg.seed, log_fn=run.log, device=device)
    conv_after = weights_fingerprint(run.backbone())
    if conv_after != conv_before:  # the trainer is given the head only; this would be a bug, never a result
        raise RuntimeError(f"fine-tuning changed the conv layers ({conv_before} -> {conv_after})")
    save_checkpoint(run.finetune_path, {"head": head.state_dict(), "in_dim": in_dim, "hidden": cfg.finetune.hidden,
                                        "classes": run.classes, "result": res, "init": how,
                                        "input_scale": head.input_scale, "fc6_rank": head.fc6_rank,
                                        "box_classes": head.box_classes})
    return stage.finish(1, best_iteration=res["best_iteration"], best_val_error=res["best_val_error"],
                        background_error=res["background_error"], prior_loss=res["prior_loss"],
                        best_val_loss=res["best_val_loss"], input_scale=head.input_scale,
                        conv_fingerprint=conv_before, history=res["history"])


def finetune_settings(run: Run) -> dict:
    """The values besides the ``finetune`` section that fine-tuning's outputs depend on (the pooling keys too:
    the windows it trains on are pooled with them)."""
    cfg = run.cfg
    return {"seed": cfg.seed, "norm_sample": {"norm_images": cfg.svm.norm_images, "norm_boxes": cfg.svm.norm_boxes},
            **pooling_record(run)}


def load_head(run: Run, check: bool = True) -> FCHead:
    """The fine-tuned fc head; ``check``: refused when made with other settings than those now in force."""
    if check:
        require_settings(run, run.finetune_path.parent, "tools/finetune_fc.py", {"finetune": run.cfg.finetune},
                         finetune_settings(run), extra_defaults=pooling_before(run))
    ck = load_checkpoint(run.finetune_path)
    head = FCHead(ck["in_dim"], ck["hidden"], len(ck["classes"]) + 1, input_scale=ck.get("input_scale", 1.0),
                  fc6_rank=ck.get("fc6_rank", 0), box_classes=ck.get("box_classes", 0))
    head.load_state_dict(ck["head"])
    return head.eval()


SPEC = StageSpec("finetune", "tools/finetune_fc.py", False,
                 ("features/<train>/", "features/<val>/", "data: annotations", "pretrain/checkpoint.pt (fc6/fc7)"),
                 "model/finetune/", ("finetune", "seed", "svm.norm_images", "svm.norm_boxes", "features' pooling keys"),
                 stage_finetune,
                 "conv layers frozen: only fc layers fine-tuned")
