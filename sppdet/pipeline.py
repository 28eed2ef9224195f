"""Kept for code written against it: the stages now live in :mod:`sppdet.stages` (one module each) and the run
folder in :mod:`sppdet.run`."""

from .run import Run
from .stages import (build_detector, combined_svms, load_head, pretrained_head, run_all, stage_bbox_reg,
                     stage_combine, stage_features, stage_finetune, stage_pretrain, stage_proposals, stage_svm,
                     stage_svms, stage_test)
from .stages.common import sample_norm

__all__ = ["Run", "build_detector", "combined_svms", "load_head", "pretrained_head", "run_all", "sample_norm",
           "stage_bbox_reg", "stage_combine", "stage_features", "stage_finetune", "stage_pretrain", "stage_proposals",
           "stage_svm", "stage_svms", "stage_test"]
