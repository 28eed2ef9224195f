"""The config's sections, one frozen dataclass per stage: each field's default, unit and meaning, and its checks
(``metadata``: ``min``, ``choices``, list items). :class:`sppdet.config.Config` holds one of each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["DataConfig", "ProposalConfig", "BackboneConfig", "PretrainConfig", "FeatureConfig", "FinetuneConfig",
           "SVMConfig", "BBoxRegConfig", "TestConfig", "FastRCNNConfig", "RCNNConfig", "ConfigError", "PRECISIONS", "DEVICE_PATTERN",
           "COMBINABLE", "positive_ints"]


PRECISIONS = ("auto", "fp32", "bf16")
SVM_SOLVERS = ("dcd", "liblinear")  # sppdet.svm.solve_svm
DEVICE_PATTERN = r"cpu|auto|cuda(:[0-9]+)?"  # Config.device
COMBINABLE = ("pool5", "fc6", "fc7")  # SVM features that share one detector (the fine-tuned head, or none)


class ConfigError(ValueError):
    pass


def positive_ints(**extra) -> dict:
    """Field metadata: a non-empty list of integers >= 1 (scales, pyramid levels, sizes)."""
    return {"items": int, "min": 1, "nonempty": True, **extra}


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/VOCdevkit/VOC2007"  # a VOC year folder (JPEGImages/, Annotations/, ImageSets/Main/; or split
    # folders of photos beside their XML files: sppdet.voc.split_folder)
    # voc: VOC XML (root is a year folder); coco: one COCO instances JSON per split (see sppdet/coco.py)
    format: str = field(default="voc", metadata={"choices": ("voc", "coco")})
    classes: Optional[list] = None  # class names in label order; None: read from the train split's annotations
    train_split: str = "trainval"
    val_split: str = "val"  # chooses the fine-tuning checkpoint: never the test split unless set so
    test_split: str = "test"
    # augmented copies of each train-split photo trained on beside it (colour jitter, half of them zoomed out;
    # sppdet/augment.py), made once into <run>/augmented/; 0: none
    augment: int = field(default=0, metadata={"min": 0})
    # Only for the synthetic dataset: generated into ``root``'s parent if missing.
    synthetic_images: int = 0
    synthetic_seed: int = 0
    synthetic_splits: list = field(default_factory=lambda: [0.4, 0.2])  # train, val fractions; the rest is test


@dataclass(frozen=True)
class ProposalConfig:
    backend: str = field(default="fast", metadata={"choices": ("fast", "selectivesearch", "precomputed")})
    max_boxes: int = field(default=2000, metadata={"min": 0})  # 0: no cap
    min_size: float = field(default=20.0, metadata={"min": 0})
    # > 0: where a photo has more boxes than max_boxes, the cap first takes those overlapping no better-ranked box
    # it took by IoU > cap_nms (greedy NMS in rank order), then fills up in rank order; 0: rank order (R-CNN's)
    cap_nms: float = field(default=0.0, metadata={"min": 0, "max": 1})
    workers: int = field(default=0, metadata={"min": 0})  # processes; 0: one per core this process may use
    precomputed: Optional[str] = None  # .mat file or folder of per-image files
    params: dict = field(default_factory=dict)  # backend-specific parameters


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "zf5"
    width: float = 1.0
    weights: Optional[str] = None  # None | "imagenet" | a file | "pretrain" (the run's tools/pretrain.py checkpoint)
    # EfficientNet-Lite: 16 (its stride-16 stage as conv5) or 32 (every MBConv stage)
    stride: int = field(default=16, metadata={"choices": (16, 32)})
    # EfficientNet-Lite at stride 16: also every stride-32 stage, its map interpolated onto the stride-16 grid
    # (cell centres aligned) and stacked on the channels (Lite2: 120 + 352 = 472), pooled as one conv5
    hypercolumn: bool = False
    # conv5's channels projected onto their first N principal components, fitted on the train split's conv5 (one
    # fixed 1x1 layer on top of the trunk, sppdet/projection.py): pooling, the cache, fc6, the pool5 SVMs and the
    # box regressors all shrink by channels / N. null, or N at least conv5's channels: conv5 as the trunk gives it
    project: Optional[int] = None


@dataclass(frozen=True)
class PretrainConfig:
    sizes: list = field(default_factory=lambda: [224, 180], metadata=positive_ints())  # multi-size: alternate per epoch
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    hidden: int = 4096
    dropout: float = 0.5
    levels: list = field(default_factory=lambda: [6, 3, 2, 1])
    context: float = 0.15  # crops of VOC boxes are enlarged by this fraction per side
    # Scale augmentation (0 = off): in training, the context per side is drawn from
    # [context, context_max], so the object fills between 1/(1+2*context) and
    # 1/(1+2*context_max) of the crop, as objects of many sizes fill conv5 windows at test time.
    context_max: float = 0.0
    background_per_image: int = 2  # extra "background" crops per image (VOC source)
    jitters: int = 0  # extra shifted copies (IoU >= 0.6) of each ground-truth crop (VOC source)
    val_fraction: float = 0.2
    eval_every: int = 1  # held-out accuracy every this many epochs (and always after the last)
    workers: int = 0
    # Arithmetic of the training steps: "fp32", "bf16" (autocast: convolutions and matmuls in
    # bfloat16, reductions and the loss in float32) or "auto" (bf16 where the processor has
    # native bfloat16 instructions or on a CUDA device that supports it, else fp32).
    # Convolutions always run channels-last (a layout change, same arithmetic).
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    # ZF-5 from scratch only: train with BatchNorm after each conv, then fold it into the conv
    # weights and biases (the checkpoint holds a plain ZF-5; later stages never see BatchNorm).
    batchnorm: bool = False
    # Source of the crops: None = ground truth of data.train_split. A VOC year folder = its
    # ``split`` (the toy world's "ImageNet": a separate set the detector is never tested on,
    # which needs no proposals and so is cheap to make large). ``synthetic_images`` > 0
    # generates it there (seed ``synthetic_seed``) when missing.
    root: Optional[str] = None
    split: str = "trainval"
    synthetic_images: int = 0
    synthetic_seed: int = 1000
    # Generated sets only: annotate up to this many distractor blobs per image as one more class
    # ("distractor"), so the trunk learns to tell object-like clutter from the classes (0 = off).
    synthetic_distractors: int = 0
    # Generated sets only: objects are drawn from this many more shapes (synthetic.EXTRA_CLASSES:
    # star, hexagon, crescent, chevron), each painted like a random detection class, as classes of
    # their own (0 = off): pre-training classes beyond the detector's, told apart by shape.
    synthetic_extra_classes: int = 0


@dataclass(frozen=True)
class FeatureConfig:
    # shorter side (px); five-scale: [480, 576, 688, 864, 1200]; "auto": one of auto_scales, chosen from the train
    # split's object sizes when the run is made (sppdet.features.auto_scale) and saved in its config.yaml
    scales: Union[list, str] = field(default_factory=lambda: [688], metadata=positive_ints(words=("auto",)))
    # auto: the median object's side (px) at the scale chosen, and the candidates (not in stages' records: only the
    # scale chosen is)
    auto_object_px: float = field(default=224.0, metadata={"min": 1, "record": False})
    auto_scales: list = field(default_factory=lambda: [480, 576, 688], metadata=positive_ints(record=False))
    max_size: int = field(default=2000, metadata={"min": 0})  # cap on the longer side after resizing (px; 0: none)
    levels: list = field(default_factory=lambda: [6, 3, 2, 1], metadata=positive_ints())
    # backbone.hypercolumn only: the pyramid of its stride-32 channels, whose bins then follow all of the
    # stride-16 channels' (None: features.levels for every channel)
    deep_levels: Optional[list] = field(default=None, metadata=positive_ints())
    shrink: float = 6.5  # authors' "offset": windows are shrunk inward by this many pixels
    target_size: float = 208.0  # multi-scale: pick the scale whose window is closest to this (paper 224)
    dtype: str = field(default="float16", metadata={"choices": ("float16", "float32")})  # of the cached maps
    # conv arithmetic of the conv5 pass (cache and detect.py alike): "fp32", "bf16" (autocast: 1.5-2x
    # faster convolutions with native bfloat16 instructions, maps within ~1% of fp32, then stored as
    # ``dtype``) or "auto" (bf16 where native).
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS})


@dataclass(frozen=True)
class FinetuneConfig:
    hidden: int = 4096
    dropout: float = 0.5
    iterations: int = field(default=2000, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    images_per_batch: int = field(default=8, metadata={"min": 1})
    fg_fraction: float = 0.25
    fg_threshold: float = 0.5
    bg_low: float = 0.1
    bg_high: float = 0.5
    lr: float = 1e-3
    lr_steps: list = field(default_factory=lambda: [1000, 1500])
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    flip: bool = True
    # Where the mirror images' conv5 maps come from (flip, and svm.flip): "image", the mirror image's own conv5
    # pass (the features stage runs the trunk twice per training image and caches both maps); "maps", the image's
    # maps mirrored left-right when they are read (one pass, half the train split's cache; a CNN's maps of a
    # mirrored image are close to, not equal to, its maps mirrored).
    flip_from: str = field(default="image", metadata={"choices": ("image", "maps")})
    random_scale: bool = True  # multi-scale: each training window at a random scale
    val_every: int = 200
    val_batches: int = 20
    init_from_pretrain: bool = True
    # 0: fc6 sees the pooled features as they are (the paper; a pre-trained fc6 was trained on them). > 0: they
    # are scaled by one constant so that their mean L2 norm over training windows is this value, for fc6/fc7
    # from random initialisation on a trunk whose features are large: EfficientNet-Lite0's block outputs have
    # norms ~470 (ZF-5's ~40), at which SGD at the paper's rates kills fc6's units and nothing is learnt.
    # The mean is taken over the windows the SVMs' feature scale samples (svm.norm_images, svm.norm_boxes).
    input_norm: float = 0.0
    # 0: fc6 a full in_dim x hidden layer (the paper). r > 0: fc6 learnt as two layers, in_dim -> r -> hidden with
    # no activation between (a rank-r weight, trained so from random initialisation), so that the matmuls with
    # the wide pooled vector cost r / hidden of fc6's, in fine-tuning, the SVM stage and testing alike.
    fc6_rank: int = field(default=0, metadata={"min": 0})
    # Arithmetic of the fc layers' forward and backward passes: "fp32", "bf16" (autocast: the matmuls in
    # bfloat16; weights, their gradients, the update and the loss in float32) or "auto" (bf16 where native).
    precision: str = field(default="fp32", metadata={"choices": PRECISIONS})
    # 0: fc8's softmax alone (the paper). w > 0: also a per-class box-delta layer on fc7 (bbox_pred), its smooth-L1
    # loss on the foreground windows (targets as Fast R-CNN's) added with weight w: the fc layers learn
    # localisation too, and bbox_reg.source: finetune regresses with that layer instead of ridge regressors.
    bbox_loss: float = field(default=0.0, metadata={"min": 0.0})

    @property
    def mirror_maps(self) -> bool:
        """Whether mirror images' maps are the maps mirrored when read (``flip_from: maps``): none are cached."""
        return self.flip_from == "maps"


@dataclass(frozen=True)
class SVMConfig:
    # pool5 | fc6 | fc7 (of the fine-tuned head) | fc6_noft | fc7_noft (pre-trained head)
    feature: str = field(default="fc7", metadata={"choices": ("pool5", "fc6", "fc7", "fc6_noft", "fc7_noft")})
    C: float = 0.001
    pos_weight: float = 2.0
    bias_mult: float = 10.0
    neg_iou: float = 0.3
    hard_threshold: float = -1.0001
    evict_threshold: float = -1.2
    retrain_limit: int = 2000
    target_norm: float = 20.0
    norm_images: int = 200
    norm_boxes: int = 200
    max_iter: int = 10000
    # dcd: liblinear's algorithm for these SVMs (dual coordinate descent), compiled in sppdet on the float32 rows
    # where they are held: no float64 copy, ~8x faster on 23,600-d pool5; liblinear: scikit-learn's LinearSVC.
    # Same objective and stopping rule; the two differ within the tolerance (docs/experiments.md).
    solver: str = field(default="dcd", metadata={"choices": SVM_SOLVERS, "before": "liblinear"})
    # liblinear's stopping tolerance: 0.1 is its own default for -s 3, which R-CNN's and the authors' calls
    # leave in force; scikit-learn's 1e-4 is 1000x tighter and made the retrains ~90% of the SVM stage's time.
    # ("before": SVMs made before the option existed were solved to 1e-4, so they are stale, not at the default.)
    tol: float = field(default=0.1, metadata={"before": 1e-4})
    # dcd: each retrain of hard-negative mining starts from the last one's dual variables (new negatives at zero,
    # evicted ones dropped) instead of zeros: the same optimum within ``tol`` in fewer sweeps over the cache
    warm_start: bool = field(default=True, metadata={"before": False})
    # Per class, the most negatives its cache keeps: after a retrain the hardest this many (highest scores) stay,
    # so it never holds more than this plus the retrain_limit new ones before its next retrain (and one image's).
    # Bounds the SVM stage's memory however many images: the shared pool holds at most classes x (this +
    # retrain_limit) + one image's windows rows of features (VOC 2007, 20 classes, 4096-d fc7: 4.0 GB; 0: no cap).
    max_negatives: int = field(default=10000, metadata={"min": 0, "before": 0})
    # The most memory one SVM set's negative pool holds (GB; 0: no bound): each class's cap above is lowered where
    # needed so that the classes' caches, each at most the cap + retrain_limit, fill 90% of it
    # (sppdet.svm.negatives_cap; the cap in force is what the stage records). Without it the pool grows with
    # classes x cap x feature length: 20 classes of 23,600-d pool5 rows at 12,000 would be 23 GB; at 8 GB their
    # cap is 1,813, the hardest kept. The positives are held to the same bound apart: each class keeps at most its
    # share of it (sppdet.svm.positives_cap: 4,237 there), a uniform sample where it has more objects.
    max_pool_gb: float = field(default=8.0, metadata={"min": 0.0, "record": False})
    # Hard negatives: one window per conv5 rectangle and scale (the authors' dedup; windows on the
    # same rectangle pool to identical features). SVMs trained before the option existed had none.
    dedup: bool = True
    # Also the train split's mirrored images (their conv5 maps are in the cache when finetune.flip is on):
    # their ground-truth boxes as more positives, their windows as more negatives. The authors train the
    # SVMs without flips; off by default.
    flip: bool = False
    # Windows scored per training image in the mining pass (0: every window, as the papers); over it, this many
    # drawn at random (seeded per image). The fc6/fc7 forward of each scored window is most of this stage's
    # time: 500 halves it at VOC's 20 classes, at a small cost in AP (docs/experiments.md).
    mine_windows: int = field(default=0, metadata={"min": 0})
    # Also negatives for a class: windows holding at least this fraction of each of two or more of its objects
    # and overlapping none of them by IoU 0.5 (one box around two people walking side by side: between the
    # papers' negatives, IoU < neg_iou, and their positives, so never trained against). 0: off, as the papers.
    group_negatives: float = field(default=0.0, metadata={"min": 0.0})
    # fc6/fc7 arithmetic while mining and for the positives: as test.fc_precision ("auto": bfloat16 where the CPU
    # has it natively, as the test stage scores them there; fp32 elsewhere), so that the SVMs are trained on
    # the features they score. The fc forward is most of this stage's time.
    fc_precision: str = field(default="auto", metadata={"choices": PRECISIONS})


@dataclass(frozen=True)
class BBoxRegConfig:
    min_overlap: float = 0.5
    lam: float = 4000.0
    whiten: bool = True  # authors: whitened targets; False: plain standardisation
    target_norm: float = 20.0
    # ridge: per-class ridge regressors on pool5, fit by their own stage (R-CNN's and SPP-net's); finetune: the
    # fine-tuned head's box layer (finetune.bbox_loss > 0), learnt with the classifier, no stage of its own
    source: str = field(default="ridge", metadata={"choices": ("ridge", "finetune")})


@dataclass(frozen=True)
class TestConfig:
    nms: float = 0.3
    # hard: greedy NMS drops every box overlapping a better one by IoU > nms (the papers'); linear: soft-NMS
    # (Bodla et al. 2017) lowers such a box's score by the factor 1 - IoU instead (adjacent objects survive);
    # quadratic: by (1 - IoU)^2 (near-duplicates fall further: a box at IoU 0.7 keeps 9% of its height, not 30%)
    nms_method: str = field(default="hard", metadata={"choices": ("hard", "linear", "quadratic")})
    # false: NMS on the windows, the survivors regressed, NMS again (SPP-net's and R-CNN's order); true: every
    # window above the score threshold regressed, then NMS once (Fast R-CNN's order, which its mode always uses)
    regress_first: bool = False
    score_threshold: float = -1.5  # SVM scores are margins; the authors keep > -1.5 for evaluation
    # Classes compete for each window before NMS: a class's margin is lowered by this weight times what the
    # window's best other class beats it by (sppdet.detector.compete_classes). 0: each class's SVM on its own,
    # as the papers (then a window between two classes ranks high in both). SVM routes only: softmax competes
    class_competition: float = field(default=0.0, metadata={"min": 0.0})
    # Caps per image: per class first (R-CNN keeps the top 100 of each class for evaluation), then
    # across classes for tools/detect.py's output (0 = none). Evaluation applies only the per-class
    # cap: SVM margins of different classes are not calibrated against each other, so a cross-class
    # cap lets the most permissive class crowd out the others (demo: block took 94 of the 100).
    max_per_class: int = 100
    max_per_image: int = 100
    bbox_reg: bool = True  # apply the box regressors (test_net.py's "with" results, detect.py's and Predictor's boxes)
    svd_fc6: int = 0  # truncated-SVD rank for fc6 (0: off)
    svd_fc7: int = 0
    # fc6/fc7 arithmetic at test time: "fp32", "bf16" (autocast: 2.2x faster fc6+fc7 for 2000 windows
    # with native bfloat16 instructions) or "auto" (bf16 where native). See the README for its mAP cost.
    fc_precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    draw_threshold: float = 0.0
    # Model combination (the paper's section 4.4): SVM sets on these features too (pool5, fc6 or fc7
    # of the fine-tuned head; trained by the SVM stage as model/svm_<feature>) score every window
    # beside svm.feature's. ``combine_by: max`` is the paper's rule (NMS over the union of the models'
    # scored windows: a window's copies overlap fully, so that equals NMS on its highest score);
    # ``mean`` averages the margins.
    combine: list = field(default_factory=list)
    combine_by: str = field(default="max", metadata={"choices": ("max", "mean")})


@dataclass(frozen=True)
class FastRCNNConfig:
    """Fast R-CNN mode (tools/train_fast_rcnn.py), a separate route: the trunk above a frozen stem, fc6/fc7, a
    softmax classifier and box regressors trained together in one stage. fc6/fc7's width and dropout and the
    input scaling are finetune.hidden, finetune.dropout and finetune.input_norm; the image scales those of
    features (a random one per training image when there are several; testing as the SPP-net route)."""
    iterations: int = field(default=2000, metadata={"min": 1})
    images_per_batch: int = field(default=2, metadata={"min": 1})  # hierarchical sampling: N images ...
    rois_per_image: int = field(default=64, metadata={"min": 1})  # ... x R/N windows of each
    fg_fraction: float = 0.25  # share of foreground windows (IoU >= fg_threshold) in a mini-batch
    fg_threshold: float = 0.5
    bg_low: float = 0.1  # background: IoU in [bg_low, bg_high)
    bg_high: float = 0.5
    lr: float = 1e-3
    lr_steps: list = field(default_factory=lambda: [1500], metadata=positive_ints())  # iterations where lr x lr_gamma
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bbox_loss_weight: float = 1.0  # weight of the smooth-L1 box loss beside the classification loss
    pooling: str = field(default="spp", metadata={"choices": ("spp", "roi")})  # spp: features.levels; roi: one level
    roi_size: int = field(default=7, metadata={"min": 1})  # the single level's n x n (pooling: roi)
    train_conv: bool = True  # false: the conv layers frozen, only fc layers trained (SPP-net's limitation)
    frozen_convs: int = field(default=1, metadata={"min": 0})  # the first N convolutions (the stem) stay frozen
    flip: bool = True  # mirror each training image with probability 1/2
    # shorter image sides (px) to train and test at; []: features.scales
    scales: list = field(default_factory=list, metadata=positive_ints(nonempty=False))
    score_threshold: float = 0.01  # test: softmax probabilities at most this are dropped before NMS
    draw_threshold: float = 0.5  # drawn detections and Predictor / tools/detect.py keep probabilities above this
    log_every: int = field(default=50, metadata={"min": 1})  # iterations per loss record


@dataclass(frozen=True)
class RCNNConfig:
    """R-CNN mode (tools/train_rcnn.py): each window warped through the trunk on its own; the svm and bbox_reg
    sections' settings train its SVMs and regressors, test those of the SPP-net route test it."""
    max_windows: int = field(default=300, metadata={"min": 0})  # proposals per image scored (ranked order; 0: all)
    size: int = field(default=0, metadata={"min": 0})  # warped side in pixels; 0: pretrain.sizes[0] or 224 (ImageNet)
