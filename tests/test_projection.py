import numpy as np
import pytest
import torch
import yaml

from sppdet.backbones import build_backbone
from sppdet.projection import ProjectedBackbone, fit_projection


def test_fit_projection_finds_the_subspace_the_maps_vary_in():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(12, 3)))[0]  # (12, 3) orthonormal: the vectors vary in 3 directions
    mean = rng.normal(size=12)
    maps = [torch.from_numpy((mean[:, None] + basis @ (rng.normal(size=(3, 50)) * [[4], [2], [1]]))
                             .reshape(12, 5, 10).astype(np.float32)) for _ in range(4)]
    w, mu, explained = fit_projection(maps, 3, per_map=40, seed=0)
    assert w.shape == (3, 12) and mu.shape == (12,)
    assert explained == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(w @ w.T, np.eye(3), atol=1e-5)  # orthonormal rows
    np.testing.assert_allclose((w @ basis) @ (w @ basis).T, np.eye(3), atol=1e-5)  # the subspace exactly
    assert np.abs(w @ basis).argmax(1).tolist() == [0, 1, 2]  # in order of variance: 4, 2, 1
    assert (w[np.arange(3), np.abs(w).argmax(1)] > 0).all()  # each component's sign fixed
    w2, _, explained2 = fit_projection(maps, 2, per_map=40, seed=0)
    np.testing.assert_allclose(w2, w[:2], atol=1e-6)
    assert explained2 == pytest.approx(20 / 21, abs=0.05)  # 16 + 4 of 16 + 4 + 1 (sampled)
    with pytest.raises(ValueError, match="between 1 and conv5's 11 channels, not 12"):
        fit_projection(maps, 12)
    with pytest.raises(ValueError, match="no conv5 map"):
        fit_projection([], 2)


def test_projected_backbone_is_a_1x1_layer_on_the_trunk_with_its_geometry():
    torch.manual_seed(0)
    trunk = build_backbone("zf5", width=0.125).eval()
    c = trunk.out_channels
    w, mean = torch.randn(5, c), torch.randn(c)
    proj = ProjectedBackbone(trunk, w, mean).eval()
    x = torch.randn(1, 3, 120, 160)
    with torch.no_grad():
        y, want = proj(x), torch.einsum("kc,nchw->nkhw", w, trunk(x) - mean[None, :, None, None])
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    assert proj.out_channels == 5 and proj.geometry == trunk.geometry
    assert (proj.pixel_mean, proj.pixel_std) == (trunk.pixel_mean, trunk.pixel_std)
    assert {"weight", "bias"} <= set(proj.state_dict())  # in the weights' fingerprint
    with pytest.raises(ValueError, match=f"needs weight \\(k, {c}\\)"):
        ProjectedBackbone(trunk, torch.randn(5, c + 1), torch.randn(c + 1))


def test_run_fits_the_projection_once_and_the_stages_see_its_channels(toy_voc, tmp_path):
    import sppdet.stages as pl
    from sppdet.config import ConfigError, load_config
    from sppdet.features import FeatureCache, weights_fingerprint
    from sppdet.run import Run
    from sppdet.store import StaleCacheError
    from sppdet.synthetic import TOY_CLASSES

    torch.manual_seed(0)
    weights = tmp_path / "zf5.pt"
    torch.save(build_backbone("zf5", width=0.125).state_dict(), weights)
    conf = {"data": {"root": str(toy_voc), "classes": list(TOY_CLASSES), "train_split": "train"},
            "proposals": {"backend": "fast", "max_boxes": 100, "params": {"ks": [100]}},
            "backbone": {"name": "zf5", "width": 0.125, "weights": str(weights), "project": 8},
            "features": {"scales": [200]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    cfg = load_config(tmp_path / "c.yaml")
    logs: list[str] = []
    run = Run(cfg, tmp_path / "run", log_fn=logs.append)
    bb = run.backbone()
    assert isinstance(bb, ProjectedBackbone) and bb.out_channels == 8
    assert run.projection_path.is_file() and sum("principal components" in s for s in logs) == 1
    pl.stage_proposals(run, "train")
    pl.stage_features(run, "train")
    cache = FeatureCache.from_manifest(run.features_dir("train"), cfg.features)
    i = run.dataset("train").ids[0]
    assert cache.load(i).maps[0].shape[0] == 8
    assert cache.pooled(i, np.array([[0, 0, 60, 60]], np.float32)).shape == (1, cache.feature_dim(8))

    # Another process on the same folder reads the projection, fits nothing, and sees the same trunk.
    again = Run(cfg, tmp_path / "run", log_fn=logs.append)
    assert weights_fingerprint(again.backbone()) == weights_fingerprint(bb)
    assert sum("principal components" in s for s in logs) == 1
    # Detection from the run folder where its data is absent: the projection as fitted.
    conf_gone = {**conf, "data": {**conf["data"], "root": str(tmp_path / "gone")}}
    (tmp_path / "gone.yaml").write_text(yaml.safe_dump(conf_gone))
    moved = Run(load_config(tmp_path / "gone.yaml"), tmp_path / "run", log_fn=logs.append, save_config=False)
    assert weights_fingerprint(moved.backbone()) == weights_fingerprint(bb)
    # Another number of channels: fitted again, and the conv5 cache made with the old one is stale.
    conf["backbone"]["project"] = 6
    (tmp_path / "c6.yaml").write_text(yaml.safe_dump(conf))
    six = Run(load_config(tmp_path / "c6.yaml"), tmp_path / "run", log_fn=logs.append)
    assert six.backbone().out_channels == 6 and sum("principal components" in s for s in logs) == 2
    with pytest.raises(StaleCacheError, match="backbone.project: 8 -> 6; inputs.weights"):
        pl.stage_features(six, "train")

    # No more channels than that: the trunk as it is.
    conf["backbone"]["project"] = 999
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(conf))
    wide = Run(load_config(tmp_path / "wide.yaml"), tmp_path / "wide", log_fn=logs.append)
    assert not isinstance(wide.backbone(), ProjectedBackbone) and "conv5 used as it is" in logs[-1]
    assert not wide.projection_path.exists()

    conf["backbone"]["project"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(ConfigError, match="backbone.project"):
        load_config(tmp_path / "bad.yaml")
