"""Fast R-CNN mode's pieces: the pooling's backward pass, the frozen stem, a training step that moves the trunk."""

import numpy as np
import pytest
import torch

from sppdet.spp import bin_edges
from sppdet.window_pool import pool_windows


def _loop_reference(fmap: torch.Tensor, cells: torch.Tensor, levels) -> torch.Tensor:
    """Each window cropped, each bin of each level a max over its floor/ceil cells, one at a time."""
    rows = []
    for l, t, r, b in cells.tolist():
        crop = fmap[:, t:b + 1, l:r + 1]
        parts = []
        for n in levels:
            ys, xs = bin_edges(crop.shape[1], n), bin_edges(crop.shape[2], n)
            parts.append(torch.stack([crop[:, y0:y1, x0:x1].amax(dim=(1, 2)) for y0, y1 in ys for x0, x1 in xs],
                                     dim=1).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (7,)])
def test_spp_pooling_gradient_equals_autograd_through_a_loop_reference(levels):
    g = torch.Generator().manual_seed(0)
    c, h, w = 4, 9, 13
    cells = [[0, 0, 0, 0], [12, 8, 12, 8], [0, 0, w - 1, h - 1], [3, 2, 3, 7], [10, 0, 12, 2], [5, 6, 12, 8]]
    rng = np.random.default_rng(0)
    for _ in range(14):
        l, r = sorted(rng.integers(0, w, 2))
        t, b = sorted(rng.integers(0, h, 2))
        cells.append([l, t, r, b])
    cells = torch.tensor(cells)
    base = torch.randn(c, h, w, generator=g)
    weights = torch.randn(len(cells), c * sum(n * n for n in levels), generator=g)
    fast = base.clone().requires_grad_(True)
    out = pool_windows(fast, cells, levels, method="roi_pool")
    (out * weights).sum().backward()
    ref = base.clone().requires_grad_(True)
    ref_out = _loop_reference(ref, cells, levels)
    (ref_out * weights).sum().backward()
    assert torch.equal(out.detach(), ref_out.detach())
    assert torch.allclose(fast.grad, ref.grad, atol=1e-5)
    assert fast.grad.abs().sum() > 0
    # the test-time pooling (sparse table, no gradient) gives the same values
    with torch.no_grad():
        assert torch.equal(pool_windows(base, cells, levels), out.detach())


def test_deep_channels_pooling_carries_the_gradient_of_each_group():
    """With ``deep`` (a hypercolumn's coarse channels on a pyramid of their own), the training pooling's gradient
    is that of the two groups pooled apart; the test-time pooling gives the same values."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 9, 13, generator=g)
    cells = torch.tensor([[0, 0, 12, 8], [3, 2, 3, 7], [5, 6, 12, 8], [1, 1, 6, 4]])
    deep = (2, (3, 1))
    x = base.clone().requires_grad_(True)
    out = pool_windows(x, cells, (6, 3, 2, 1), method="roi_pool", deep=deep)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    y = base.clone().requires_grad_(True)
    ref = torch.cat([_loop_reference(y[:2], cells, (6, 3, 2, 1)), _loop_reference(y[2:], cells, (3, 1))], 1)
    (ref * weights).sum().backward()
    assert torch.equal(out.detach(), ref.detach()) and torch.allclose(x.grad, y.grad, atol=1e-5)
    assert x.grad[:2].abs().sum() > 0 and x.grad[2:].abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(pool_windows(base, cells, (6, 3, 2, 1), deep=deep), out.detach())


def test_frozen_stem_and_conv_switch():
    from sppdet.backbones import build_backbone
    from sppdet.fast_rcnn import set_trainable

    zf = build_backbone("zf5", width=0.125)
    names = set_trainable(zf, train_conv=True, frozen_convs=1)
    convs = [n for n, m in zf.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(n.startswith(convs[0] + ".") for n in names)
    assert any(n.startswith(convs[1] + ".") for n in names) and any(n.startswith(convs[-1] + ".") for n in names)
    assert set_trainable(zf, train_conv=False, frozen_convs=1) == []
    assert not any(p.requires_grad for p in zf.parameters())


def test_a_training_step_moves_the_trunk_above_the_stem_and_lowers_the_loss():
    from types import SimpleNamespace

    from sppdet.backbones import build_backbone
    from sppdet.fast_rcnn import FastRCNN, set_trainable, train_fast_rcnn
    from sppdet.roidb import make_windows
    from sppdet.synthetic import render_scene
    from sppdet.voc import Annotation

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    img, labels, boxes = render_scene(rng, 160, 128)[:3]
    boxes, labels = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)
    ann = Annotation("x", 160, 128, [str(k) for k in labels], boxes, np.zeros(len(boxes), bool))
    props = np.concatenate([boxes + rng.normal(0, 4, boxes.shape), rng.uniform(0, 100, (60, 2)).repeat(2, 1)
                            + np.array([0, 0, 40, 30])]).astype(np.float32)
    w = make_windows(ann, labels, props, 5)
    trunk = build_backbone("zf5", width=0.125)
    set_trainable(trunk, True, 1)
    model = FastRCNN(trunk, 5, (2, 1), 32, 0.0, 2.0)
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    cfg = SimpleNamespace(iterations=30, images_per_batch=1, rois_per_image=32, fg_fraction=0.25, fg_threshold=0.5,
                          bg_low=0.0, bg_high=0.5, lr=0.01, lr_steps=[100], lr_gamma=0.1, momentum=0.9,
                          weight_decay=0.0, bbox_loss_weight=1.0, flip=True, log_every=10)
    res = train_fast_rcnn(model, lambda i: img, {"x": w}, cfg, [128], 1000, progress=False,
                          log_fn=lambda s: None)
    h = res["history"]
    assert h[-1]["loss_cls"] < h[0]["loss_cls"]
    after = trunk.state_dict()
    convs = [n for n, m in trunk.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert torch.equal(before[convs[0] + ".weight"], after[convs[0] + ".weight"])  # the stem: frozen
    assert not torch.equal(before[convs[-1] + ".weight"], after[convs[-1] + ".weight"])  # conv5: trained


def test_a_checkpoint_from_before_the_box_layer_moved_into_the_head_loads():
    """Fast R-CNN mode's box layer is the head's (``head.bbox_pred``, shared with finetune.bbox_loss); run folders
    saved with it beside the head (``bbox_pred.*``) still load, to the same outputs."""
    from sppdet.backbones import build_backbone
    from sppdet.fast_rcnn import FastRCNN

    torch.manual_seed(0)
    a = FastRCNN(build_backbone("zf5", width=0.125), 3, (2, 1), 16, 0.0, 2.0).eval()
    old = {k.removeprefix("head.") if k.startswith("head.bbox_pred.") else k: v for k, v in a.state_dict().items()}
    assert "bbox_pred.weight" in old and "head.bbox_pred.weight" not in old
    b = FastRCNN(build_backbone("zf5", width=0.125), 3, (2, 1), 16, 0.0, 2.0).eval()
    b.load_state_dict(old)
    x = torch.rand(4, a.head.fc6.in_features)
    for p, q in zip(a.heads(x), b.heads(x)):
        assert torch.equal(p, q)
