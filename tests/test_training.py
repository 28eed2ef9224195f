import numpy as np
import pytest
import torch

from sppdet.bbox_reg import fit_class_regressor, BoxRegressor
from sppdet.boxes import decode, encode
from sppdet.config import FinetuneConfig, SVMConfig
from sppdet.finetune import sample_windows
from sppdet.roidb import Windows
from sppdet.svm import HardNegativeTrainer


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 100, (50, 2))
    p = np.concatenate([p, p + rng.uniform(5, 80, (50, 2))], 1).astype(np.float32)
    g = p + rng.normal(0, 4, p.shape).astype(np.float32)
    g[:, 2:] = np.maximum(g[:, 2:], g[:, :2] + 1)
    np.testing.assert_allclose(decode(p, encode(p, g)), g, atol=1e-3)


def test_sampler_fractions_and_ranges():
    rng = np.random.default_rng(0)
    ious = np.concatenate([np.full(100, 0.7), np.full(300, 0.3), np.full(200, 0.05)]).astype(np.float32)
    w = Windows(np.zeros((600, 4), np.float32), np.zeros(600, bool), ious, np.zeros(600, np.int64),
                np.full(600, 2), np.zeros((600, 3), np.float32))
    idx, lab = sample_windows(w, 128, 0.25, 0.5, 0.1, 0.5, 3, rng)
    assert len(idx) == 128 and len(set(idx.tolist())) == 128
    fg = ious[idx] >= 0.5
    assert fg.sum() == 32 and (lab[fg] == 2).all() and (lab[~fg] == 3).all()
    assert ((ious[idx][~fg] >= 0.1) & (ious[idx][~fg] < 0.5)).all()
    # few foreground windows: the rest is background
    idx, lab = sample_windows(Windows(w.boxes[95:], w.is_gt[95:], ious[95:], w.gt_index[95:], w.label[95:],
                                      w.class_iou[95:]), 128, 0.25, 0.5, 0.1, 0.5, 3, rng)
    assert (lab != 3).sum() == 5 and len(idx) == 128


def test_hard_negative_mining_on_separable_data():
    rng = np.random.default_rng(0)
    d = 20
    direction = np.zeros(d, np.float32)
    direction[0] = 1
    x_pos = (rng.normal(0, 1, (40, d)) + 4 * direction).astype(np.float32)
    cfg = SVMConfig(C=1.0, retrain_limit=200)
    trainer = HardNegativeTrainer([x_pos], d, cfg)
    total_neg = 0
    all_neg = []
    n_images = 30
    for i in range(n_images):
        neg = (rng.normal(0, 1, (300, d)) - 4 * direction).astype(np.float32)
        all_neg.append(neg)
        total_neg += len(neg)
        trainer.add_image(i, neg, np.ones((300, 1), bool), last=i == n_images - 1)
    c = trainer.finish()[0]
    assert len(c.retrains) >= 2
    all_neg = np.concatenate(all_neg)
    assert ((x_pos @ c.w + c.b) > 0).all() and ((all_neg @ c.w + c.b) < 0).all()
    assert len(c.x_neg) < total_neg / 10
    objs = [r["objective"] for r in c.retrains]
    assert all(np.isfinite(objs))


def test_box_regression_recovers_known_shift():
    rng = np.random.default_rng(0)
    n, d = 400, 30
    feats = rng.normal(0, 1, (n, d))
    p = rng.uniform(0, 200, (n, 2))
    p = np.concatenate([p, p + rng.uniform(30, 100, (n, 2))], 1)
    true = np.stack([0.1 * feats[:, 0], -0.05 * feats[:, 1], 0.2 + 0.1 * feats[:, 2], 0.05 * feats[:, 3]], 1)
    g = decode(p, true)
    for whiten in (True, False):
        r = fit_class_regressor(feats, p, g, lam=1e-3, whiten=whiten)
        reg = BoxRegressor(r["W"][None], r["b"][None], r["mu"][None], r["T_inv"][None], 1.0, np.array([True]))
        np.testing.assert_allclose(reg.predict(0, feats, p), g, atol=0.5)


def test_box_regression_samples_are_a_bounded_uniform_reservoir():
    """The box-regression stage holds at most max_per_class windows per class, drawn uniformly from all of a
    class's windows (its memory no longer grows with the number of images); under the cap it keeps all, in order."""
    from sppdet.stages.bbox_reg import Reservoir

    everything = Reservoir(0, np.random.default_rng(0))
    for x in range(50):
        everything.offer(x)
    assert everything.items == list(range(50)) and everything.seen == 50
    few = Reservoir(10, np.random.default_rng(0))
    for x in range(7):
        few.offer(x)
    assert few.items == list(range(7))
    rng = np.random.default_rng(1)
    kept = np.zeros(20)
    trials = 4000
    for _ in range(trials):
        r = Reservoir(5, rng)
        for x in range(20):
            r.offer(x)
        assert len(r.items) == 5 and len(set(r.items)) == 5 and r.seen == 20
        kept[r.items] += 1
    np.testing.assert_allclose(kept / trials, 5 / 20, atol=0.03)  # every item equally likely, early or late


def test_mining_sample_is_a_seeded_uniform_draw_without_repeats():
    """svm.mine_windows: a sorted, repeat-free subset of the image's windows, the same for the same seed, every
    window equally likely."""
    from sppdet.stages.svm import mining_sample

    a = mining_sample(1000, 100, np.random.default_rng(7))
    assert len(a) == 100 == len(np.unique(a)) and np.all(np.diff(a) > 0) and a.max() < 1000
    np.testing.assert_array_equal(a, mining_sample(1000, 100, np.random.default_rng(7)))
    assert not np.array_equal(a, mining_sample(1000, 100, np.random.default_rng(8)))
    hits = np.zeros(200)
    for s in range(500):
        hits[mining_sample(200, 60, np.random.default_rng(s))] += 1
    np.testing.assert_allclose(hits / 500, 60 / 200, atol=0.08)


def test_group_negatives_are_boxes_around_two_objects_of_a_class():
    """svm.group_negatives: a window around two side-by-side people is a negative for person (not for the other
    class); a window on one of them, or around one person and a dog, is not."""
    from sppdet.roidb import group_windows_mask, make_windows
    from sppdet.voc import Annotation

    gt = np.array([[0, 0, 40, 100], [44, 0, 84, 100], [200, 0, 260, 60]], np.float32)  # person, person, dog
    ann = Annotation("a.jpg", 300, 120, ["person", "person", "dog"], gt, np.zeros(3, bool), np.zeros(3, bool))
    props = np.array([[0, 0, 84, 100],     # both people: IoU 0.48 with each
                      [0, 0, 42, 100],     # one person
                      [40, 0, 260, 100],   # one person and the dog
                      [100, 0, 140, 40]], np.float32)  # background
    w = make_windows(ann, np.array([0, 0, 1]), props, 2)
    rows = np.nonzero(~w.is_gt)[0]
    m = group_windows_mask(w, rows, 2, 0.7)
    assert m.tolist() == [[True, False], [False, False], [False, False], [False, False]]
    assert not group_windows_mask(w, rows, 2, 0.7, max_iou=0.4).any()  # 0.48 >= 0.4: not a negative then


def _one_object_cache(directory, gain: float = 1.0):
    """Four images with one bright object each, their conv5 maps (times ``gain``) cached in ``directory``:
    ``(trunk, windows, cache)``."""
    from sppdet.backbones import build_backbone
    from sppdet.features import FeatureCache, conv5_maps
    from sppdet.roidb import make_windows
    from sppdet.voc import Annotation

    torch.manual_seed(0)
    zf = build_backbone("zf5", width=0.125).eval()
    rng = np.random.default_rng(0)
    windows = {}
    for i in range(4):
        img = rng.integers(0, 60, (160, 200, 3), dtype=np.uint8)
        img[40:120, 50:150] = (220, 200, 30)  # one bright object per image
        maps, f = conv5_maps(zf, img, [160], 1000)
        FeatureCache.write(directory / f"{i}.npz", [m * gain for m in maps], f, img.shape[:2])
        ann = Annotation("x", 200, 160, ["a"], np.array([[50, 40, 150, 120]], np.float32), np.zeros(1, bool))
        props = np.concatenate([np.array([[50, 40, 150, 120]]) + rng.normal(0, 6, (40, 4)),
                                rng.uniform(0, 80, (120, 2)).repeat(2, 1) + np.array([0, 0, 60, 50])]).astype(np.float32)
        windows[str(i)] = make_windows(ann, np.array([0]), props, 1)
    return zf, windows, FeatureCache(directory, zf.stride, zf.center0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_lowers_loss(tmp_path, precision):
    """The fc head learns on cached windows, in float32 and with its matmuls in bfloat16 (``finetune.precision``;
    the weights stay float32). That the conv layers stay frozen is checked on a real stage run, on the weights on
    disk: tests/test_end_to_end.py."""
    from sppdet.finetune import finetune_head
    from sppdet.models import FCHead

    zf, windows, cache = _one_object_cache(tmp_path)
    head = FCHead(zf.out_channels * 50, 64, 2)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    cfg = FinetuneConfig(iterations=60, batch_size=32, images_per_batch=2, lr=0.01, lr_steps=[1000], val_every=20,
                         val_batches=4, flip=False, precision=precision)
    logs = []
    res = finetune_head(head, windows, windows, cache, cache, 1, cfg, progress=False, log_fn=logs.append)
    h = res["history"]
    assert h[-1]["val_loss"] < h[0]["val_loss"] or h[-1]["train_loss"] < h[0]["train_loss"]
    assert not all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert all(v.dtype == torch.float32 for v in head.state_dict().values())
    assert f"fc arithmetic {precision})" in logs[0]


def test_box_targets_are_fast_rcnn_deltas_of_each_foreground_window_mirrored_when_drawn_mirrored():
    from sppdet.boxes import BOX_STDS, encode, flip_boxes
    from sppdet.finetune import box_targets
    from sppdet.roidb import make_windows
    from sppdet.voc import Annotation

    ann = Annotation("x", 200, 160, ["a", "b"], np.array([[50, 40, 150, 120], [10, 10, 40, 60]], np.float32),
                     np.zeros(2, bool))
    props = np.array([[55, 45, 160, 118], [12, 5, 44, 58], [100, 100, 190, 150]], np.float32)
    w = make_windows(ann, np.array([0, 1]), props, 2)
    idx = np.array([2, 3, 4])  # the three proposals (the two objects' own boxes come first)
    t = box_targets(w, idx, np.array([True, True, False]))
    assert np.allclose(t[0], encode(props[:1], ann.boxes[:1])[0] / BOX_STDS, atol=1e-6)
    assert np.allclose(t[1], encode(props[1:2], ann.boxes[1:2])[0] / BOX_STDS, atol=1e-6)
    assert np.all(t[2] == 0)
    mirrored = box_targets(w, idx, np.array([True, True, False]), flipped=True)
    expect = encode(flip_boxes(props[:2], 200), flip_boxes(ann.boxes, 200)) / BOX_STDS
    assert np.allclose(mirrored[:2], expect, atol=1e-5)


def test_finetune_with_a_box_loss_learns_to_move_windows_onto_their_object(tmp_path):
    """finetune.bbox_loss: a box layer beside fc8 trained with it (smooth L1, Fast R-CNN's targets); its deltas
    bring the jittered windows closer to the object; a head without the layer is refused."""
    from sppdet.boxes import BOX_STDS, decode, iou_matrix
    from sppdet.finetune import finetune_head
    from sppdet.models import FCHead

    zf, windows, cache = _one_object_cache(tmp_path)
    cfg = FinetuneConfig(iterations=150, batch_size=32, images_per_batch=2, lr=0.01, lr_steps=[1000], val_every=10,
                         val_batches=4, flip=False, bbox_loss=1.0)
    with pytest.raises(ValueError, match="box layer"):
        finetune_head(FCHead(zf.out_channels * 50, 64, 2), windows, windows, cache, cache, 1, cfg, progress=False,
                      log_fn=lambda m: None)
    torch.manual_seed(0)
    head = FCHead(zf.out_channels * 50, 64, 2, box_classes=1)
    res = finetune_head(head, windows, windows, cache, cache, 1, cfg, progress=False, log_fn=lambda m: None)
    h = res["history"]
    assert h[-1]["val_box_loss"] < h[0]["val_box_loss"]
    gain = []
    for i, w in windows.items():  # the kept checkpoint's deltas (chosen by validation error) on each image's windows
        fg = np.nonzero(~w.is_gt & (w.max_iou >= 0.5))[0]
        logits, deltas = head.eval().outputs(cache.pooled(i, w.boxes[fg]))
        assert logits.shape == (len(fg), 2) and deltas.shape == (len(fg), 1, 4)
        moved = decode(w.boxes[fg], deltas[:, 0].detach().numpy() * BOX_STDS)
        gain.append(iou_matrix(moved, w.boxes[:1]).mean() - iou_matrix(w.boxes[fg], w.boxes[:1]).mean())
    assert np.mean(gain) > 0.01  # measured 0.019 (random conv weights, 6 px jitter); wrong targets move boxes off


def test_finetune_input_norm_lets_a_random_head_learn_on_large_features_and_a_head_that_learns_nothing_is_reported(
        tmp_path):
    """EfficientNet's pooled features have norms ~470: from random init, fc6 at the paper's rates learnt nothing
    there (validation error = calling everything background). finetune.input_norm scales them down; the head
    keeps the scale for test time; a fine-tuning that never beats 'all background' says so."""
    from sppdet.finetune import finetune_head, learnt_nothing
    from sppdet.models import FCHead
    from sppdet.stages.common import sample_norm as _sample_norm

    zf, windows, cache = _one_object_cache(tmp_path, gain=60.0)
    norm = _sample_norm(cache, windows, np.random.default_rng(0), 4, 50)
    assert norm > 200
    with pytest.raises(ValueError, match="every sampled window's features are zero"):
        _sample_norm(cache, windows, np.random.default_rng(0), 4, 50, lambda x: np.zeros((len(x), 8)))
    cfg = FinetuneConfig(iterations=60, batch_size=32, images_per_batch=2, lr=0.01, lr_steps=[1000], val_every=20,
                         val_batches=4, flip=False)
    torch.manual_seed(0)
    head = FCHead(zf.out_channels * 50, 64, 2, input_scale=20.0 / norm)
    logs = []
    res = finetune_head(head, windows, windows, cache, cache, 1, cfg, progress=False, log_fn=logs.append)
    assert res["best_val_error"] < 0.5 * res["background_error"] and not any("learnt" in m for m in logs)
    assert res["best_val_loss"] < 0.5 * res["prior_loss"] and not learnt_nothing(res)
    x = cache.pooled("0", windows["0"].boxes[:5])
    plain = FCHead(zf.out_channels * 50, 64, 2)
    plain.load_state_dict(head.state_dict())
    assert torch.allclose(head.eval().features(x), plain.eval().features(x * head.input_scale), atol=1e-5)
    torch.manual_seed(0)
    logs = []
    res = finetune_head(FCHead(zf.out_channels * 50, 64, 2), windows, windows, cache, cache, 1,
                        FinetuneConfig(**{**cfg.__dict__, "lr": 0.0}), progress=False, log_fn=logs.append)
    assert res["best_val_error"] >= res["background_error"] and learnt_nothing(res)
    # the prior loss is the entropy of the validation labels: 3/4 background, 1/4 the one class here
    assert res["prior_loss"] == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)), abs=0.05)
    assert any(m.startswith("warning: fine-tuning learnt (almost) nothing") and "finetune.input_norm" in m for m in logs)


def test_finetune_with_a_factored_fc6_learns_and_fc6_has_that_rank(tmp_path):
    """finetune.fc6_rank: fc6 learnt as in_dim -> r -> hidden (no activation between), so its weight has rank r;
    the head still learns; a rank at or above fc6's smaller side is a full layer."""
    from sppdet.finetune import finetune_head
    from sppdet.models import FCHead

    zf, windows, cache = _one_object_cache(tmp_path)
    d = zf.out_channels * 50
    torch.manual_seed(0)
    head = FCHead(d, 64, 2, fc6_rank=8)
    assert head.fc6_rank == 8 and [tuple(m.weight.shape) for m in head.fc6] == [(8, d), (64, 8)]
    assert head.fc6[0].bias is None and sum(p.numel() for p in head.fc6.parameters()) == 8 * d + 64 * 8 + 64
    cfg = FinetuneConfig(iterations=60, batch_size=32, images_per_batch=2, lr=0.01, lr_steps=[1000], val_every=20,
                         val_batches=4, flip=False)
    res = finetune_head(head, windows, windows, cache, cache, 1, cfg, progress=False, log_fn=lambda m: None)
    # learnt: the best checkpoint's validation loss well under that of predicting the labels' frequencies (at lr
    # 0.01 this toy's loss jumps between checks, so the last check against the first depends on the draw)
    assert res["best_val_loss"] < 0.5 * res["prior_loss"]
    w = (head.fc6[1].weight @ head.fc6[0].weight).detach()
    assert torch.linalg.matrix_rank(w).item() == 8
    x = cache.pooled("0", windows["0"].boxes[:5])
    expected = torch.relu(x @ w.T + head.fc6[1].bias)
    assert torch.allclose(head.eval().features(x, "fc6"), expected, atol=1e-4)
    head.input_scale = 0.05  # applied to the first factor's outputs: the same as scaling the pooled rows
    expected = torch.relu((x * 0.05) @ w.T + head.fc6[1].bias)
    assert torch.allclose(head.features(x, "fc6"), expected, atol=1e-5)
    full = FCHead(d, 64, 2, fc6_rank=64)
    assert full.fc6_rank == 0 and isinstance(full.fc6, torch.nn.Linear)


def test_factored_fc6_is_refused_where_fc6_is_pretrained_or_factored_again():
    from sppdet.config import Config, ConfigError, FinetuneConfig as F, TestConfig as T

    assert Config(finetune=F(fc6_rank=256, init_from_pretrain=False)).finetune.fc6_rank == 256
    with pytest.raises(ConfigError, match="init_from_pretrain: false"):
        Config(finetune=F(fc6_rank=256))
    with pytest.raises(ConfigError, match="test.svd_fc6 must be 0"):
        Config(finetune=F(fc6_rank=256, init_from_pretrain=False), test=T(svd_fc6=128))


def test_head_box_regression_is_refused_without_a_box_layer_to_train():
    from sppdet.config import BBoxRegConfig as B, Config, ConfigError, FinetuneConfig as F

    assert Config(finetune=F(bbox_loss=1.0), bbox_reg=B(source="finetune")).bbox_reg.source == "finetune"
    with pytest.raises(ConfigError, match="finetune.bbox_loss > 0"):
        Config(bbox_reg=B(source="finetune"))


def test_finetune_input_norm_is_refused_with_a_pretrained_fc6():
    from sppdet.config import Config, ConfigError, FinetuneConfig as F

    assert Config(finetune=F(input_norm=40.0, init_from_pretrain=False)).finetune.input_norm == 40.0
    with pytest.raises(ConfigError, match="init_from_pretrain: false"):
        Config(finetune=F(input_norm=40.0))
    with pytest.raises(ConfigError, match="input_norm must be >= 0"):
        Config(finetune=F(input_norm=-1.0, init_from_pretrain=False))


def test_pretrain_multi_size_and_precision(toy_voc, tmp_path):
    from sppdet.config import BackboneConfig, PretrainConfig
    from sppdet.models import resolve_precision
    from sppdet.pretrain import train_classifier, voc_items
    from sppdet.synthetic import TOY_CLASSES
    from sppdet.voc import VOCDataset

    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16")
    assert resolve_precision("auto") in ("fp32", "bf16")
    ds = VOCDataset(toy_voc, "trainval", TOY_CLASSES)
    items, classes = voc_items(ds, 1, np.random.default_rng(0))
    cfg = PretrainConfig(sizes=[96, 64], epochs=3, batch_size=8, hidden=32, precision="bf16", lr=0.01, eval_every=2)
    ck = train_classifier(items[:24], classes, BackboneConfig(name="zf5", width=0.125), cfg, tmp_path, progress=False,
                          log_fn=lambda *a: None)
    assert ck["precision"] == "bf16"
    assert [h["size"] for h in ck["history"]] == [96, 64, 96]  # multi-size: the size alternates per epoch
    # Held-out accuracy every eval_every epochs and after the last one.
    assert ["val_acc" in h for h in ck["history"]] == [False, True, True]
    assert 0.0 <= ck["history"][-1]["val_acc_small"] <= 1.0
    assert all(np.isfinite(h["loss"]) for h in ck["history"])
    # Weights are stored float32 and contiguous (channels-last is a training-time layout only).
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in ck["backbone"].values())
    assert (tmp_path / "checkpoint.pt").is_file()


def test_pretrain_with_batchnorm_stores_a_plain_zf5(toy_voc, tmp_path):
    from sppdet.backbones import ZF5, build_backbone
    from sppdet.config import BackboneConfig, PretrainConfig
    from sppdet.models import SPPNetClassifier
    from sppdet.pretrain import CropDataset, _batch, train_classifier, voc_items
    from sppdet.synthetic import TOY_CLASSES
    from sppdet.voc import VOCDataset

    ds = VOCDataset(toy_voc, "trainval", TOY_CLASSES)
    items, classes = voc_items(ds, 1, np.random.default_rng(0))
    cfg = PretrainConfig(sizes=[96, 64], epochs=2, batch_size=8, hidden=32, precision="fp32", batchnorm=True)
    bb_cfg = BackboneConfig(name="zf5", width=0.125)
    ck = train_classifier(items[:24], classes, bb_cfg, cfg, tmp_path, progress=False, log_fn=lambda *a: None)
    assert ck["pretrain_cfg"]["batchnorm"] is True
    assert set(ck["backbone"]) == set(ZF5(0.125).state_dict())  # folded: no BatchNorm tensors
    trunk = build_backbone("zf5", str(tmp_path / "checkpoint.pt"), 0.125)
    # The stored trunk loads as a plain ZF-5 and, with the stored head, scores crops (finite, varied).
    net = SPPNetClassifier(trunk, len(classes), cfg.levels, cfg.hidden).eval()
    net.head.load_state_dict(ck["head"])
    x = _batch(net, torch.stack([CropDataset(items[:8], 96, cfg.context)[i][0] for i in range(8)]), 96, "cpu")
    with torch.no_grad():
        logits = net(x)
    assert torch.isfinite(logits).all() and logits.std() > 0
    with pytest.raises(ValueError, match="batchnorm is for ZF-5"):
        train_classifier(items[:24], classes, BackboneConfig(name="efficientnet_lite0"), cfg, tmp_path / "x",
                         progress=False, log_fn=lambda *a: None)


def test_caps_per_class_then_per_image():
    from sppdet.detector import cap_detections as _cap

    def cls(k, scores):
        s = np.asarray(scores, np.float32)
        return np.tile(np.array([[0, 0, 10, 10]], np.float32), (len(s), 1)), s, k

    dets = [cls(0, [5, 4, 3, 2, 1]), cls(1, [0.5, 0.4])]
    d = _cap(dets, 3, 0)  # evaluation: per class only, so class 1's low margins survive
    assert sorted(d.labels.tolist()) == [0, 0, 0, 1, 1]
    d = _cap(dets, 3, 4)
    assert d.scores.tolist() == [5, 4, 3, 0.5] and d.labels.tolist() == [0, 0, 0, 1]
    d = _cap(dets, 0, 2)
    assert d.scores.tolist() == [5, 4]
    assert len(_cap([], 3, 4).scores) == 0


def test_linear_soft_nms_hand_worked_and_against_a_loop_reference():
    """``test.nms_method: linear``: a box overlapping a kept one by IoU > t keeps ``floor + (s - floor) (1 - IoU)``
    (worked by hand); a box under t is untouched; an exact duplicate falls to the floor and is dropped; on random
    boxes the result equals a plain loop over the definition, and the limit stops it early."""
    from sppdet.boxes import iou_matrix, soft_nms

    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 10, 8]], np.float32)
    scores = np.array([2.0, 1.5, 0.5, 1.0, 1.2], np.float32)
    idx, s = soft_nms(boxes, scores, 0.3, -1.5)
    # heights above the floor 3.5, 3.0, 2.0, 2.5, 2.7. After box 0: box 1 (IoU 0.5) 1.5, box 4 (IoU 0.8) 0.54, box 3
    # (IoU 1, a duplicate) 0: dropped. Box 2 (2.0) next, then box 1 (score 0.0), which lowers box 4 (IoU 5/8) again
    assert idx.tolist() == [0, 2, 1, 4] and 3 not in idx.tolist()
    np.testing.assert_allclose(s, [2.0, 0.5, 0.0, -1.5 + 2.7 * 0.2 * (1 - 5 / 8)], rtol=1e-5)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (60, 2))
    b = np.concatenate([xy, xy + rng.uniform(5, 40, (60, 2))], 1)
    sc = rng.uniform(-1, 2, 60)
    refs = {}
    for power in (1.0, 2.0):  # linear and quadratic (test.nms_method)
        h, live, ref_i, ref_s = sc + 1.5, list(range(60)), [], []
        while live:
            j = max(live, key=lambda i: h[i])
            ref_i.append(j), ref_s.append(h[j] - 1.5)
            live.remove(j)
            for i in list(live):
                o = iou_matrix(b[j], b[i])[0, 0]
                h[i] *= (1 - o) ** power if o > 0.4 else 1.0
                if h[i] <= 0:
                    live.remove(i)
        idx, s = soft_nms(b, sc, 0.4, -1.5, power=power)
        assert idx.tolist() == ref_i and np.allclose(s, ref_s, atol=1e-5) and list(s) == sorted(s, reverse=True)
        refs[power] = ref_s
    assert soft_nms(b, sc, 0.4, -1.5, limit=7)[0].tolist() == soft_nms(b, sc, 0.4, -1.5)[0].tolist()[:7]
    assert refs[1.0] != refs[2.0] and sum(refs[2.0]) < sum(refs[1.0])  # the square lowers overlapping boxes further
    with pytest.raises(ValueError, match="floor"):
        soft_nms(b, sc, 0.4, 0.0)


def test_regress_first_and_soft_nms_in_the_detectors_post_processing():
    """``test.regress_first``: every window above the threshold regressed, then NMS once, against the survivors of
    NMS regressed and NMS again; hard NMS in the SPP-net order is what it was; soft-NMS keeps adjacent windows."""
    from sppdet.config import TestConfig
    from sppdet.detector import class_detections

    props = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [40, 40, 50, 50]], np.float32)
    scores = np.array([[2.0], [1.0], [0.5]])
    shift = {0: (20, 20), 1: (40, 40), 2: (60, 0)}  # window 1 regresses away from window 0

    def regress(k, idx):
        return np.stack([props[i] + np.array(shift[i] * 2, np.float32) for i in idx])

    hard = TestConfig(score_threshold=-1.5)
    plain, refined = class_detections(props, scores, -1.5, hard, regress, (200, 200))
    assert plain[0][0].tolist() == props[[0, 2]].tolist()  # window 1 suppressed before regression
    assert len(refined[0][0]) == 2
    _, refined = class_detections(props, scores, -1.5, TestConfig(regress_first=True), regress, (200, 200))
    assert len(refined[0][0]) == 3 and refined[0][1].tolist() == [2.0, 1.0, 0.5]  # window 1 regressed apart: kept
    plain, _ = class_detections(props, scores, -1.5, TestConfig(nms_method="linear"), None)
    iou = 90 / 110
    np.testing.assert_allclose(plain[0][1], [2.0, 0.5, -1.5 + 2.5 * (1 - iou)], rtol=1e-5)
    # drawing above the evaluation threshold: scores fall towards the latter, so the duplicate drops out
    plain, _ = class_detections(props, scores, 0.0, TestConfig(nms_method="linear"), None, floor=-1.5)
    assert plain[0][1].tolist() == [2.0, 0.5]
    plain, _ = class_detections(props, scores, 0.0, TestConfig(nms_method="linear"), None)
    np.testing.assert_allclose(plain[0][1], [2.0, 0.5, 1.0 * (1 - iou)], rtol=1e-5)
    plain, _ = class_detections(props, scores, -1.5, TestConfig(nms_method="quadratic"), None)
    np.testing.assert_allclose(plain[0][1], [2.0, 0.5, -1.5 + 2.5 * (1 - iou) ** 2], rtol=1e-5)
    with pytest.raises(ValueError, match="quadratic"):
        class_detections(props, scores, -1.5, TestConfig(nms_method="cubic"), None)


def test_classes_compete_for_a_window_against_a_loop_reference():
    """``test.class_competition``: a class's margin lowered by ``weight`` times what the window's best other class
    beats it by; each window's best class unchanged; one class, weight 0 and classes without SVMs left alone."""
    from sppdet.config import TestConfig
    from sppdet.detector import class_detections, compete_classes

    rng = np.random.default_rng(0)
    s = rng.normal(size=(50, 4)).astype(np.float32)
    s[3, 1] = s[3, 2] = s[3].max() + 1  # a tie for the best class: neither lowered
    s[:, 3] = -np.inf  # a class without an SVM
    out = compete_classes(s, 0.5)
    ref = s.copy()
    for i in range(len(s)):
        for k in range(3):
            other = max(s[i, j] for j in range(3) if j != k)
            ref[i, k] = s[i, k] - 0.5 * max(0.0, other - s[i, k])
    assert out.dtype == np.float32 and np.isneginf(out[:, 3]).all()
    np.testing.assert_allclose(out[:, :3], ref[:, :3], rtol=1e-6)
    assert (out.argmax(1) == s.argmax(1)).all() and out[3, 1] == s[3, 1] == out[3, 2]
    assert compete_classes(s, 0.0) is s
    one = s[:, :1].copy()
    assert np.array_equal(compete_classes(one, 1.0), one)
    # in post-processing: a window scoring as apple (2.0) and orange (1.5) drops from the oranges' ranking
    props = np.array([[0, 0, 10, 10], [40, 40, 50, 50]], np.float32)
    scores = np.array([[2.0, 1.5], [-3.0, 1.0]], np.float32)
    plain, _ = class_detections(props, scores, -1.5, TestConfig(), None)
    assert [p[1].tolist() for p in plain] == [[2.0], [1.5, 1.0]]
    plain, _ = class_detections(props, scores, -1.5, TestConfig(), None, competition=2.0)
    assert [p[1].tolist() for p in plain] == [[2.0], [1.0, 0.5]]  # the orange window no other class beats first


def test_union_of_two_models_windows_equals_nms_on_each_windows_best_score():
    """The paper's model combination (NMS over the union of both models' scored windows) is what
    ``test.combine_by: max`` computes: a window's two copies overlap fully, so NMS keeps its best one."""
    from sppdet.config import TestConfig
    from sppdet.detector import Detector

    rng = np.random.default_rng(0)
    n, k = 300, 3
    xy = rng.uniform(0, 200, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 80, (n, 2))], 1).astype(np.float32)
    s1, s2 = rng.normal(-1, 1, (n, k)), rng.normal(-1, 1, (n, k))
    det = Detector(None, {"layer": "pool5"}, None, None, TestConfig(), ["a", "b", "c"])
    pooled = np.zeros((n, 1), np.float32)
    best, _, _ = det.postprocess(pooled, np.maximum(s1, s2), boxes, 300, 300, max_per_image=0)
    union, _, _ = det.postprocess(np.concatenate([pooled, pooled]), np.concatenate([s1, s2]),
                                  np.concatenate([boxes, boxes]), 300, 300, max_per_image=0)
    assert len(best.scores) > 20
    np.testing.assert_array_equal(best.boxes, union.boxes)
    np.testing.assert_array_equal(best.scores, union.scores)
    np.testing.assert_array_equal(best.labels, union.labels)


def test_combined_svm_sets_are_checked_naming_the_config_file():
    from pathlib import Path

    from sppdet.config import Config, ConfigError, SVMConfig, TestConfig, load_config
    from sppdet.stages import combined_svms

    def cfg(feature, combine):
        return Config(svm=SVMConfig(feature=feature), test=TestConfig(combine=combine))

    assert combined_svms(cfg("fc7", [])) == [("fc7", "")]
    assert combined_svms(cfg("fc7", ["pool5", "fc6", "pool5"])) == [("fc7", ""), ("pool5", "_pool5"), ("fc6", "_fc6")]
    for feature, combine, msg in (("fc7", ["fc8"], "'fc8' is not pool5"), ("fc7", ["fc7"], "svm.feature already"),
                                  ("fc7_noft", ["pool5"], "one fc head per detector")):
        with pytest.raises(ConfigError, match=msg):
            cfg(feature, combine)
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    # a bad value given with --set is named as such, not blamed on the YAML file
    with pytest.raises(ConfigError, match=r"^--set test.combine=\[fc8\]: test.combine: 'fc8' is not pool5"):
        load_config(demo, ["test.combine=[fc8]"])


def test_config_rejects_an_unknown_precision_naming_the_file_or_the_set(tmp_path):
    import re
    from pathlib import Path

    from sppdet.config import ConfigError, load_config

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    for key in ("pretrain.precision", "test.fc_precision", "features.precision"):
        want = f"--set {key}=fp16: {key}: must be one of 'auto', 'fp32', 'bf16', got 'fp16'"
        with pytest.raises(ConfigError, match=re.escape(want)):
            load_config(demo, [f"{key}=fp16"])
        section, name = key.split(".")
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"{section}:\n  {name}: fp16\n")
        with pytest.raises(ConfigError, match=re.escape(f"{bad}: {key}: must be one of")):
            load_config(bad)
    assert load_config(demo, ["test.fc_precision=bf16"]).test.fc_precision == "bf16"


def test_pretrain_set_with_distractors_has_the_extra_class_and_is_checked_for_staleness(tmp_path):
    from sppdet.run import Run
    from sppdet.config import load_config
    from sppdet.pretrain import voc_items
    from sppdet.store import StaleCacheError
    from sppdet.synthetic import DISTRACTOR_CLASS, TOY_CLASSES

    def run(distractors):
        cfg = load_config(overrides=[f"data.classes={list(TOY_CLASSES)}", f"pretrain.root={tmp_path / 'pre' / 'VOC2007'}",
                                     "pretrain.synthetic_images=4", f"pretrain.synthetic_distractors={distractors}"])
        return Run(cfg, tmp_path / "run", log_fn=lambda s: None)

    ds = run(2).pretrain_dataset()
    assert list(ds.classes) == list(TOY_CLASSES) + [DISTRACTOR_CLASS]
    names = [n for i in ds.ids for n in ds.annotation(i).names]
    assert DISTRACTOR_CLASS in names and set(names) - {DISTRACTOR_CLASS} <= set(TOY_CLASSES)
    items, classes = voc_items(ds, 1, np.random.default_rng(0))
    assert classes[-2:] == [DISTRACTOR_CLASS, "background"]
    assert {k for _, _, k in items} >= {len(TOY_CLASSES), len(TOY_CLASSES) + 1}
    with pytest.raises(StaleCacheError, match="distractors"):
        run(0).pretrain_dataset()


def test_pretrain_set_with_extra_classes(tmp_path):
    from sppdet.run import Run
    from sppdet.config import load_config
    from sppdet.store import StaleCacheError
    from sppdet.synthetic import DISTRACTOR_CLASS, EXTRA_CLASSES, TOY_CLASSES

    def run(extra):
        cfg = load_config(overrides=[f"data.classes={list(TOY_CLASSES)}", f"pretrain.root={tmp_path / 'pre' / 'VOC2007'}",
                                     "pretrain.synthetic_images=6", "pretrain.synthetic_distractors=1",
                                     f"pretrain.synthetic_extra_classes={extra}"])
        return Run(cfg, tmp_path / "run", log_fn=lambda s: None)

    ds = run(3).pretrain_dataset()
    assert list(ds.classes) == list(TOY_CLASSES) + list(EXTRA_CLASSES[:3]) + [DISTRACTOR_CLASS]
    assert len(ds.ids) >= 5  # every annotation reads with these classes
    for i in ds.ids:
        ds.annotation(i)
    with pytest.raises(StaleCacheError, match="extra_classes"):
        run(2).pretrain_dataset()


def test_saved_config_sections_compare_with_defaults_for_added_options():
    """A run saved before an option existed still matches while the option is left at its default."""
    from dataclasses import asdict

    from sppdet.config import PretrainConfig, load_config, section_changes

    cfg = load_config(overrides=["pretrain.epochs=3"]).pretrain
    saved = asdict(cfg)
    del saved["synthetic_extra_classes"], saved["eval_every"]  # options added after that run
    assert section_changes(saved, cfg) == []
    cfg2 = load_config(overrides=["pretrain.epochs=3", "pretrain.synthetic_extra_classes=2"]).pretrain
    assert section_changes(saved, cfg2, "pretrain.") == ["pretrain.synthetic_extra_classes: 0 -> 2"]
    assert section_changes({**saved, "epochs": 5}, cfg, "pretrain.") == ["pretrain.epochs: 5 -> 3"]
    assert PretrainConfig().synthetic_extra_classes == 0
    # an option that changed what the code did when it was added names its former value: not "at its default"
    from sppdet.config import SVMConfig

    svm = asdict(SVMConfig())
    del svm["tol"], svm["max_negatives"]
    assert section_changes(svm, SVMConfig(), "svm.") == ["svm.max_negatives: 0 -> 10000", "svm.tol: 0.0001 -> 0.1"]
    assert section_changes(svm, SVMConfig(tol=1e-4, max_negatives=0)) == []


@pytest.mark.parametrize("solver", ["dcd", "liblinear"])
def test_svm_training_repeats_whatever_the_global_random_state(solver):
    """Both solvers visit the examples in a random order; it is seeded, so retraining gives the same weights."""
    from sppdet.svm import train_linear_svm

    rng = np.random.default_rng(0)
    x_pos, x_neg = rng.normal(0.5, 1, (40, 16)), rng.normal(-0.5, 1, (400, 16))
    runs = []
    for state in (1, 2):
        np.random.seed(state)  # what an unseeded solver would draw from
        runs.append(train_linear_svm(x_pos, x_neg, C=0.01, pos_weight=2.0, bias_mult=10.0, max_iter=20, solver=solver))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


def test_feature_lru_is_bounded_by_bytes_and_evicts_the_least_recently_used():
    from sppdet.features import ImageFeatures
    from sppdet.finetune import FeatureLRU

    loads = []

    class Cache:  # 1 KB of maps per image, half of it the mirror image's
        def load(self, image_id, device="cpu", flipped=False, mirror_maps=False):
            loads.append(image_id)
            m = [torch.zeros(8, 4, 4, dtype=torch.float32)]  # 512 bytes
            return ImageFeatures(m, [1.0], 10, 10, [torch.zeros(8, 4, 4)] if flipped else None)

    lru = FeatureLRU(Cache(), max_bytes=3 * 1024)
    for i in "abcab":
        lru.get(i)
    assert loads == ["a", "b", "c"] and lru.bytes == 3 * 1024
    lru.get("d")  # evicts c, the least recently used
    lru.get("a"), lru.get("b")
    lru.get("c")
    assert loads == ["a", "b", "c", "d", "c"] and lru.bytes == 3 * 1024
    tiny = FeatureLRU(Cache(), max_bytes=1)  # always keeps the image it returns
    assert tiny.get("x").maps[0].shape == (8, 4, 4) and tiny.bytes == 1024


@pytest.mark.parametrize("solver", ["dcd", "liblinear"])
def test_pooled_hard_negative_trainer_equals_the_per_class_reference(solver):
    """The shared negative pool (one row per window, however many classes hold it) and the one matrix product per
    image give the per-class trainer's SVMs, caches and retrain records exactly, with fewer rows stored."""
    import reference_svm

    rng = np.random.default_rng(3)
    d, k = 24, 4
    centres = rng.normal(0, 3, (k, d)).astype(np.float32)
    x_pos = [(rng.normal(0, 1, (30, d)) + centres[c]).astype(np.float32) for c in range(k)]
    cfg = SVMConfig(C=0.1, retrain_limit=150, solver=solver, warm_start=False)  # the reference starts from zeros
    new, old = HardNegativeTrainer(x_pos, d, cfg), reference_svm.HardNegativeTrainer(x_pos, d, cfg)
    for i in range(25):
        feats = rng.normal(0, 1.5, (120, d)).astype(np.float32)
        mask = rng.random((120, k)) < 0.8  # most windows are negatives for several classes
        for t in (new, old):
            t.add_image(i, feats, mask, last=i == 24)
    for a, b in zip(new.finish(), old.finish()):
        assert np.array_equal(a.w, b.w) and a.b == b.b
        assert np.array_equal(a.x_neg, b.x_neg) and a.retrains == b.retrains
    mem = new.memory()
    assert mem["pool_live_rows"] < sum(mem["class_negatives"])  # shared rows are stored once
    assert mem["pool_live_rows"] <= mem["pool_rows"] <= 2 * mem["pool_live_rows"] <= 2 * mem["pool_peak_rows"]
    with pytest.raises(ValueError, match="each image once"):
        new.add_image(3, feats, mask, last=False)


def test_negative_cap_bounds_every_cache_and_keeps_the_hardest():
    """``svm.max_negatives``: however many images, no class holds more than the cap plus the negatives that come
    before its next retrain (retrain_limit, overshot by at most one image's windows), the pool stays bounded by
    it, what a capped retrain keeps are the negatives its SVM scores highest, and a class at its cap retrains on
    R-CNN's schedule, not on every image."""
    rng = np.random.default_rng(4)
    d, k, cap, per, limit = 16, 3, 60, 40, 50
    x_pos = [(rng.normal(0, 1, (20, d)) + 2.0).astype(np.float32) for _ in range(k)]
    # everything hard: evict_threshold far below any score, so only the cap removes negatives
    cfg = SVMConfig(C=0.1, retrain_limit=limit, evict_threshold=-1e9, hard_threshold=-1e9, max_negatives=cap)
    t = HardNegativeTrainer(x_pos, d, cfg)
    sizes = []
    for i in range(30):
        t.add_image(i, rng.normal(0, 1, (per, d)).astype(np.float32), np.ones((per, k), bool), last=i == 29)
        sizes.append(max(len(c.idx) for c in t.caches))
    assert max(sizes) <= cap + limit + per and t.memory()["pool_live_rows"] <= k * (cap + limit) + per
    assert all(len(c.retrains) <= 30 // 2 + 2 for c in t.caches)  # every other image: 2 x 40 new > 50
    for c in t.finish():
        assert len(c.idx) <= cap
        last = c.retrains[-1]
        assert last["kept"] == len(c.idx) and last["evicted"] == last["negatives"] - len(c.idx) > 0
    uncapped = HardNegativeTrainer(x_pos, d, SVMConfig(C=0.1, retrain_limit=10 ** 6, evict_threshold=-1e9,
                                                       hard_threshold=-1e9, max_negatives=0))
    for i in range(30):
        uncapped.add_image(i, rng.normal(0, 1, (per, d)).astype(np.float32), np.ones((per, k), bool), last=i == 29)
    assert all(len(c.idx) == 30 * per for c in uncapped.finish())


def test_the_pool_bound_lowers_the_cap_to_fit_and_the_bounded_pool_trains_the_same_svms():
    """``svm.max_pool_gb``: each class's cap is lowered so that every class's cache, at the cap plus the negatives
    that may come before its next retrain, fits 90% of the bound; a bounded pool never grows past it (rows no class
    holds are dropped first), and its SVMs are those of an unbounded pool with the same cap (compaction only
    renumbers rows)."""
    from sppdet.svm import negatives_cap, pool_fits, pool_rows

    assert pool_rows(23600, 8.0) == 84745 and negatives_cap(10000, 20, 23600, 8.0, 2000) == 1813
    assert negatives_cap(10000, 3, 23600, 8.0, 2000) == 10000 and negatives_cap(10000, 20, 23600, 0.0, 2000) == 10000
    assert negatives_cap(0, 20, 23600, 8.0, 2000) == 1813 and negatives_cap(10000, 10 ** 9, 23600, 8.0, 2000) == 1
    assert pool_fits(20, 23600, 8.0, 2000) and not pool_fits(40, 23600, 8.0, 2000) and pool_fits(40, 23600, 0, 2000)
    # a pool bounded at 200 rows, where caches of 60 + 50 hard negatives of 40-window images fit and an unbounded
    # pool, dropping rows no class holds only once they are half of it, grows past 200
    rng = np.random.default_rng(4)
    d, k, per = 16, 3, 40
    x_pos = [(rng.normal(0, 1, (20, d)) + 2.0).astype(np.float32) for _ in range(k)]
    cfg = SVMConfig(C=0.1, retrain_limit=50, max_negatives=0, evict_threshold=-1e9, hard_threshold=-1e9)
    images = [rng.normal(0, 1, (per, d)).astype(np.float32) for _ in range(30)]
    bounded = HardNegativeTrainer(x_pos, d, cfg, max_negatives=60, max_rows=200)
    free = HardNegativeTrainer(x_pos, d, cfg, max_negatives=60)
    for i, x in enumerate(images):
        for t in (bounded, free):
            t.add_image(i, x, np.ones((per, k), bool), last=i == len(images) - 1)
        assert bounded.pool.n <= 200 and len(bounded.pool.x) <= 200
    assert free.pool.peak_rows > 200 and bounded.memory()["pool_max_rows"] == 200  # the bound did something
    for a, b in zip(bounded.finish(), free.finish()):
        assert np.allclose(a.w, b.w, atol=1e-6) and a.b == pytest.approx(b.b, abs=1e-6) and len(a.idx) <= 60
        assert np.array_equal(bounded.pool.x[a.idx], free.pool.x[b.idx])


def test_the_positives_are_capped_per_class_by_the_pool_bound_with_a_uniform_sample():
    """``svm.max_pool_gb`` also caps each class's positives at its share of the bound's rows: a class under the cap
    keeps every row in order (the SVMs of before), one over it a seeded uniform sample of distinct offered rows."""
    from sppdet.stages.svm import ClassSample
    from sppdet.svm import positives_cap

    assert positives_cap(20, 23600, 8.0) == 4237 and positives_cap(3, 23600, 8.0) == 28248
    assert positives_cap(20, 23600, 0.0) == 0 and positives_cap(10 ** 9, 23600, 8.0) == 1

    class _Run:
        classes = ["a", "b"]
        lines: list = []

        def log(self, s):
            self.lines.append(s)

    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    labels = np.array([0] * 4 + [1] * 16)
    samples = []
    for seed in (0, 0, 1):
        c = ClassSample(2, 6, np.random.default_rng(seed))
        for j in range(0, 20, 3):
            c.offer(rows[j:j + 3], labels[j:j + 3])
        samples.append(c.finish(_Run(), 2, "svm"))
    a, b = samples[0]
    assert np.array_equal(a, rows[:4]) and b.shape == (6, 2) and b.dtype == np.float32
    assert len({tuple(r) for r in b}) == 6 and all(tuple(r) in {tuple(x) for x in rows[4:]} for r in b)
    assert np.array_equal(samples[1][1], b) and not np.array_equal(samples[2][1], b)
    assert any("6 positives (a uniform sample of 16" in line for line in _Run.lines)


@pytest.mark.parametrize("pos_weight,bias_mult", [(2.0, 10.0), (1.0, 1.0)])
def test_dcd_solver_reaches_liblinears_optimum(pos_weight, bias_mult):
    """svm.solver dcd minimises liblinear's objective: solved tightly, both reach the same weights and objective;
    at the default tolerance within it; negatives read in place through an index give what a copy gives."""
    from sppdet.svm import dual_cd_svm, row_scores, svm_objective, train_linear_svm

    rng = np.random.default_rng(5)
    d = 40
    x_pos = rng.normal(0.4, 1, (60, d)).astype(np.float32)
    pool = rng.normal(-0.4, 1, (700, d)).astype(np.float32)
    idx = rng.permutation(700)[:500]
    x_neg = pool[idx]
    args = dict(C=0.05, pos_weight=pos_weight, bias_mult=bias_mult)
    w_l, b_l = train_linear_svm(x_pos, x_neg, **args, tol=1e-6, solver="liblinear")
    w_d, b_d = train_linear_svm(x_pos, x_neg, **args, tol=1e-6, solver="dcd")
    obj = lambda w, b: svm_objective(w, b, x_pos, x_neg, **args)["objective"]
    assert obj(w_d, b_d) == pytest.approx(obj(w_l, b_l), rel=1e-4)
    np.testing.assert_allclose(w_d, w_l, atol=2e-3 * np.abs(w_l).max())
    assert b_d == pytest.approx(b_l, abs=2e-3 * max(1.0, abs(b_l)))
    w_i, b_i = dual_cd_svm(x_pos, pool, idx, **args, tol=1e-6)  # the pool's rows in place
    np.testing.assert_array_equal(w_i, w_d)
    assert b_i == b_d
    np.testing.assert_allclose(row_scores(pool, idx, w_d, b_d), x_neg @ w_d + b_d, rtol=1e-5, atol=1e-5)
    loose = train_linear_svm(x_pos, x_neg, **args, tol=0.1, solver="dcd")
    assert obj(*loose) <= obj(w_l, b_l) * 1.05
    with pytest.raises(ValueError, match="C-contiguous float32"):
        dual_cd_svm(x_pos, pool.astype(np.float64), idx, **args)
    with pytest.raises(ValueError, match="svm.solver"):
        train_linear_svm(x_pos, x_neg, **args, solver="sgd")


def test_dropout_from_random_bytes():
    """models.Dropout: identity in eval mode; in training about p of the units zeroed and the rest scaled by
    1 / (1 - p), a fresh mask per call, gradients through the kept units only; p outside [0, 1) refused."""
    from sppdet.models import Dropout

    torch.manual_seed(0)
    d = Dropout(0.5)
    x = torch.ones(256, 1024, requires_grad=True)
    assert d.eval()(x) is x
    y = d.train()(x)
    zero = y == 0
    assert abs(float(zero.float().mean()) - 0.5) < 0.01 and torch.equal(y[~zero], torch.full_like(y[~zero], 2.0))
    assert not torch.equal(zero, d(x) == 0)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    y = Dropout(0.25).train()(torch.ones(512, 1024, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and abs(float((y == 0).float().mean()) - 0.25) < 0.01
    assert abs(float(y.float().mean()) - 1.0) < 0.01
    assert torch.equal(Dropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_negative_pool_grows_and_compacts_in_place_keeping_rows_and_renumbering():
    from sppdet.svm import ClassCache, NegativePool

    rng = np.random.default_rng(0)
    pool = NegativePool(5)
    all_rows = rng.normal(size=(1000, 5)).astype(np.float32)
    a, b = ClassCache(np.zeros((1, 5), np.float32), pool), ClassCache(np.zeros((1, 5), np.float32), pool)
    for s in range(0, 1000, 100):  # grows past its 256 starting rows, twice
        idx = pool.add(all_rows[s:s + 100], np.ones(100, np.int64))
        a.idx = np.concatenate([a.idx, idx])
    assert len(pool.x) >= 1000 and np.array_equal(pool.x[:1000], all_rows)
    view = pool.x[:10]  # a live view: growing must copy, not resize under it
    pool.add(all_rows[:500], np.ones(500, np.int64))
    assert np.array_equal(view, all_rows[:10]) and np.array_equal(pool.x[1000:1500], all_rows[:500])
    del view
    drop = rng.random(1500) < 0.7
    drop[:3] = False  # a prefix that stays where it is
    pool.refs[:1500][drop] = 0
    a.idx = a.idx[~drop[:1000]]
    b.idx = np.nonzero(~drop[1000:])[0] + 1000
    want_a, want_b = pool.x[a.idx].copy(), pool.x[b.idx].copy()
    pool.compact([a, b], chunk=7)
    assert pool.n == int((~drop).sum())
    np.testing.assert_array_equal(pool.x[a.idx], want_a)
    np.testing.assert_array_equal(pool.x[b.idx], want_b)
    assert (pool.refs[:pool.n] == 1).all() and np.array_equal(np.sort(np.concatenate([a.idx, b.idx])),
                                                              np.arange(pool.n))


def test_warm_started_retrains_reach_the_same_optimum_in_fewer_sweeps():
    """``svm.warm_start``: each retrain starts from the last one's dual variables (kept negatives' carried, new ones
    at zero, evicted ones dropped); its SVMs match the cold-started ones within the solver's tolerance."""
    from sppdet.svm import svm_objective

    rng = np.random.default_rng(5)
    d, k = 32, 3
    centres = rng.normal(0, 0.5, (k, d)).astype(np.float32)
    x_pos = [(rng.normal(0, 1, (40, d)) + centres[c]).astype(np.float32) for c in range(k)]
    runs = {}
    for warm in (False, True):
        t = HardNegativeTrainer(x_pos, d, SVMConfig(C=0.1, retrain_limit=60, tol=0.01, warm_start=warm))
        r = np.random.default_rng(6)
        for i in range(20):
            feats = r.normal(0, 1.5, (150, d)).astype(np.float32)
            t.add_image(i, feats, r.random((150, k)) < 0.8, last=i == 19)
        runs[warm] = t.finish()
    for cold, warm in zip(runs[False], runs[True]):
        assert len(cold.retrains) > 3 and all("sweeps" in r for r in warm.retrains)
        assert len(warm.alpha) == len(warm.x_pos) + len(warm.idx) and (warm.alpha >= 0).all()
        # the final solve on the same final cache, from zeros, gives the cold objective the warm one must match
        objs = [svm_objective(c.w, c.b, c.x_pos, c.x_neg, 0.1, 2.0, 10.0)["objective"] for c in (cold, warm)]
        assert abs(objs[1] - objs[0]) <= 0.05 * objs[0]
        # each retrain is solved within tol, so windows near the mining and eviction thresholds can go either way
        # and the two caches differ a little: the directions agree closely, not exactly
        cos = float(cold.w @ warm.w) / float(np.linalg.norm(cold.w) * np.linalg.norm(warm.w))
        assert cos > 0.9 and abs(len(warm.idx) - len(cold.idx)) <= 0.2 * len(cold.idx)


def test_dcd_from_a_previous_solution_reaches_the_same_optimum():
    from sppdet.svm import dual_cd_svm, solve_svm, svm_objective

    rng = np.random.default_rng(7)
    d = 40
    x_pos = (rng.normal(0, 1, (60, d)) + 1.0).astype(np.float32)
    x_neg = rng.normal(0, 1.5, (3000, d)).astype(np.float32)
    first, more = np.arange(2000), np.arange(3000)
    w0, b0, a0, s0 = dual_cd_svm(x_pos, x_neg, first, 0.1, 2.0, 10.0, tol=0.01, return_alpha=True)
    again = dual_cd_svm(x_pos, x_neg, first, 0.1, 2.0, 10.0, tol=0.01, alpha0=a0, return_alpha=True)
    assert again[3] <= 2 < s0 and np.allclose(again[0], w0, atol=0.05 * np.abs(w0).max())
    cold = dual_cd_svm(x_pos, x_neg, more, 0.1, 2.0, 10.0, tol=0.01, return_alpha=True)
    warm = dual_cd_svm(x_pos, x_neg, more, 0.1, 2.0, 10.0, tol=0.01, alpha0=np.concatenate([a0, np.zeros(1000)]),
                       return_alpha=True)  # 1000 new negatives start at zero
    objs = [svm_objective(r[0], r[1], x_pos, x_neg, 0.1, 2.0, 10.0)["objective"] for r in (cold, warm)]
    assert abs(objs[1] - objs[0]) <= 0.02 * objs[0]
    with pytest.raises(ValueError, match="alpha0 has 5 values"):
        dual_cd_svm(x_pos, x_neg, first, 0.1, 2.0, 10.0, alpha0=np.zeros(5))
    # solve_svm, the trainer's one entry point, passes the start and returns the state; liblinear has neither
    via = solve_svm(x_pos, x_neg, first, 0.1, 2.0, 10.0, tol=0.01, alpha0=a0, return_state=True)
    assert np.array_equal(via[0], again[0]) and via[1] == again[1] and via[3] == again[3]
    assert solve_svm(x_pos, x_neg, first, 0.1, 2.0, 10.0, solver="liblinear", return_state=True)[2:] == (None, None)
    with pytest.raises(ValueError, match="liblinear cannot start"):
        solve_svm(x_pos, x_neg, first, 0.1, 2.0, 10.0, solver="liblinear", alpha0=a0)
