"""The SPP-net pipeline, one module per stage. Each declares (its ``SPEC``, a :class:`StageSpec`) what it
reads, what it writes and which settings its outputs depend on; a stage never runs another one (a missing
input is an error naming the tool that makes it). :data:`STAGES` is their one order; :func:`plan` lists the
calls a whole run makes and :func:`run_all` makes them (``tools/demo.py``, the ablation benchmark and the
end-to-end tests all use it).

==========  ======================================  =========================================
stage       reads                                   writes
==========  ======================================  =========================================
pretrain    images (pretrain.root or train crops)   pretrain/checkpoint.pt
proposals   a split's images                        proposals/<split>/<id>.npz
features    images, proposals, trunk                features/<split>/<id>.npz (conv5 maps)
finetune    features of train and val               model/finetune/finetune.pt
svm         features of train, finetune             model/svm<tag>/svm.npz
bbox_reg    features of train                       model/bbox_reg/bbox_reg.npz
test        proposals, features, models             detections/<split><tag>/
combine     detections of several runs              detections/<split>_combined/
==========  ======================================  =========================================

With ``route: fast_rcnn`` a run is instead proposals -> :mod:`~sppdet.stages.fast_rcnn` (one stage training the conv
layers above the stem and the head together) -> its test: no conv5 cache, fine-tuning, SVMs or separate regressors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..run import Run
from . import bbox_reg, combine, fast_rcnn, features, finetune, pretrain, proposals, svm, test
from .bbox_reg import stage_bbox_reg
from .combine import stage_combine
from .common import StageSpec
from .fast_rcnn import stage_fast_rcnn, stage_fast_rcnn_test
from .features import stage_features
from .finetune import load_head, pretrained_head, stage_finetune
from .pretrain import stage_pretrain
from .proposals import stage_proposals
from .svm import combined_svms, stage_svm, stage_svms
from .test import build_detector, stage_test

STAGES: tuple[StageSpec, ...] = tuple(m.SPEC for m in (pretrain, proposals, features, finetune, svm, bbox_reg, test,
                                                        combine))

__all__ = ["STAGES", "Step", "StageSpec", "plan", "run_all", "build_detector", "combined_svms", "load_head",
           "pretrained_head", "stage_bbox_reg", "stage_combine", "stage_features", "stage_finetune", "stage_pretrain",
           "stage_proposals", "stage_svm", "stage_svms", "stage_test"]


@dataclass(frozen=True)
class Step:
    """One call of a whole run: ``label`` (for cost reports), the stage, the folders it writes, the call."""

    label: str
    spec: StageSpec
    folders: tuple[Path, ...]
    call: Callable[[], object]


def plan(run: Run) -> list[Step]:
    """The calls that take a run folder from data to test detections, in :data:`STAGES` order: pre-training
    (only for ``backbone.weights: pretrain``), proposals and features of each split the run uses, fine-tuning,
    the SVM sets, box regression, test on ``data.test_split``; with ``route: fast_rcnn``, proposals, the Fast R-CNN
    stage and its test."""
    cfg = run.cfg
    splits = list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split, cfg.data.test_split]))
    spec = {s.name: s for s in STAGES}
    steps = []
    if cfg.backbone.weights == "pretrain":
        steps.append(Step("pretrain (classifier, multi-size)", spec["pretrain"], (run.pretrain_ckpt.parent,),
                          lambda: stage_pretrain(run)))
    steps.append(Step("proposals (selective search)", spec["proposals"], tuple(run.proposals_dir(s) for s in splits),
                      lambda: [stage_proposals(run, s) for s in splits]))
    if cfg.route == "fast_rcnn":
        te = cfg.data.test_split
        steps.append(Step("Fast R-CNN (conv above the stem + head)", fast_rcnn.SPEC,
                          (fast_rcnn.model_dir(run),), lambda: stage_fast_rcnn(run)))
        steps.append(Step("test + evaluation", spec["test"], (run.detections_dir(te, "_fast_rcnn"),),
                          lambda: stage_fast_rcnn_test(run, te)))
        return steps
    steps.append(Step("features (conv5 once per image)", spec["features"], tuple(run.features_dir(s) for s in splits),
                      lambda: [stage_features(run, s) for s in splits]))
    steps.append(Step("fine-tune fc6/fc7/fc8 (conv frozen)", spec["finetune"], (run.finetune_path.parent,),
                      lambda: stage_finetune(run)))
    steps.append(Step("SVMs (hard-negative mining)", spec["svm"],
                      tuple(run.svm_path(t).parent for _, t in combined_svms(cfg)), lambda: stage_svms(run)))
    if cfg.bbox_reg.source == "ridge":  # finetune: the fine-tuned head's box layer, nothing to fit apart
        steps.append(Step("box regressors", spec["bbox_reg"], (run.bbox_reg_path.parent,),
                          lambda: stage_bbox_reg(run)))
    steps.append(Step("test + evaluation", spec["test"], (run.detections_dir(cfg.data.test_split),),
                      lambda: stage_test(run, cfg.data.test_split)))
    return steps


def run_all(run: Run) -> dict:
    """Every step of :func:`plan`; returns the test stage's metrics."""
    out = None
    for step in plan(run):
        out = step.call()
    return out
