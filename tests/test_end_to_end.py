"""Runs the real tools as subprocesses on configs/tiny.yaml (a couple of minutes on 2 cores)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tool(name, *args, check=True):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{name} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def chance_map(tmp, classes) -> float:
    """The mAP of the test split's proposals (their first 100) with random classes and scores."""
    from sppdet.evaluation import evaluate_detections
    from sppdet.proposals import ProposalStore
    from sppdet.voc import VOCDataset

    ds = VOCDataset(tmp / "data" / "VOC2007", "test", classes)
    store = ProposalStore(tmp / "run" / "proposals" / "test")
    rng = np.random.default_rng(0)
    dets = {k: [] for k in range(len(classes))}
    for i in ds.ids:
        for b in store.load(i)[:100]:
            dets[int(rng.integers(0, len(classes)))].append((i, float(rng.random()), *map(float, b)))
    return evaluate_detections(dets, {k: ds.ground_truth(k) for k in range(len(classes))}, classes)["map07"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    common = ["--config", "configs/tiny.yaml", "--run", tmp / "run", "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    from sppdet.stages import STAGES

    r = None
    for spec in STAGES[:-1]:  # every tool in the pipeline's one order (the last, combining runs, is optional)
        for split in (("train", "val", "test") if spec.per_split else (None,)):
            r = tool(Path(spec.tool).name, *common, *(("--split", split) if split else ()))
            if spec.name == "pretrain":  # the trunk's weights on disk, before fine-tuning
                (tmp / "trunk_before.pt").write_bytes((tmp / "run" / "pretrain" / "checkpoint.pt").read_bytes())
    return tmp, r.stdout


def test_pipeline_outputs_and_map(trained):
    tmp, out = trained
    det = tmp / "run" / "detections" / "test"
    assert (det / "detections.npz").is_file() and (det / "pr_curves.png").is_file()
    assert len(list(det.glob("comp4_det_test_*.txt"))) == 5
    m = json.loads((det / "metrics.json").read_text())
    assert "mAP (VOC07 11-point)" in out
    from sppdet.voc import VOCDataset

    ds = VOCDataset(tmp / "data" / "VOC2007", "test", m["classes"])
    chance = chance_map(tmp, m["classes"])
    assert m["map07"] > 3 * chance, (m["map07"], chance)
    for k in ("without_bbox_reg", "with_bbox_reg"):
        assert k in m["results"]
    # where the AP goes: every non-difficult object has one outcome, the top detections one kind each
    err = json.loads((det / "error_analysis.json").read_text())
    assert (det / "error_analysis.png").is_file() and "where the AP goes" in out
    objects = sum(int((~ds.annotation(i).difficult.astype(bool)).sum()) for i in ds.ids)
    assert sum(err["summary"]["objects_by_outcome"].values()) == objects
    assert err["summary"]["map07"] == pytest.approx(m["map07"])
    assert m["map07"] <= err["summary"]["map07_without"]["all"] <= 1.0
    for name, row in err["per_class"].items():
        assert sum(row["top"].values()) <= min(row["objects"], row["detections"])  # "ignored" ones are not counted
        assert row["objects_by_outcome"]["detected"] >= row["top"]["correct"]
    # the stage manifests record that only fc layers were trained
    ft = json.loads((tmp / "run" / "model" / "finetune" / "manifest.json").read_text())
    assert ft["complete"]
    # ... checked on the weights on disk: the trunk fine-tuning read is byte for byte the one pre-training wrote,
    # and the fingerprint the stage recorded after training is that of the trunk loaded from it.
    from sppdet.backbones import build_backbone
    from sppdet.features import weights_fingerprint

    ckpt = tmp / "run" / "pretrain" / "checkpoint.pt"
    assert ckpt.read_bytes() == (tmp / "trunk_before.pt").read_bytes()
    assert ft["conv_fingerprint"] == weights_fingerprint(build_backbone("zf5", str(ckpt), 0.125))
    ev = tool("evaluate.py", "--detections", det / "detections.npz", "--voc-root", tmp / "data" / "VOC2007", "--split",
              "test", "--classes", ",".join(m["classes"]), "--out", tmp / "eval")
    assert f"{m['map07']:.3f}" in ev.stdout


def test_rerun_reuses_caches_and_stale_config_is_refused(trained):
    tmp, _ = trained
    common = ["--config", "configs/tiny.yaml", "--run", tmp / "run", "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    r = tool("extract_features.py", *common, "--split", "test")
    assert "0 new images" in r.stdout
    r = tool("extract_features.py", *common, "--split", "test", "--set", "features.scales=[300]", check=False)
    assert r.returncode == 2 and "features.scales" in r.stderr and "Traceback" not in r.stderr


def test_a_dataset_changed_under_the_same_ids_is_a_stale_cache(trained, tmp_path):
    """Caches record the contents of the images and annotations they were made from: a copied dataset keeps
    them; an edited image under the same id rebuilds its own shards only (the stages that read them refuse them
    until then); an edited annotation is refused by name, not silently reused."""
    import shutil

    import cv2

    tmp, _ = trained
    shutil.copytree(tmp / "run", tmp_path / "run")
    shutil.copytree(tmp / "data", tmp_path / "data")
    voc = tmp_path / "data" / "VOC2007"
    common = ["--config", "configs/tiny.yaml", "--run", tmp_path / "run", "--set", f"data.root={voc}"]
    assert "0 new images" in tool("extract_features.py", *common, "--split", "test").stdout  # moved, same files
    assert "pretrain: reusing" in tool("pretrain.py", *common).stdout
    test_id = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    img_path = voc / "JPEGImages" / f"{test_id}.jpg"
    img = cv2.imread(str(img_path))
    cv2.imwrite(str(img_path), 255 - img)  # same size, other pixels
    from sppdet.config import load_config
    from sppdet.run import Run
    from sppdet.stages import stage_test
    from sppdet.store import StaleCacheError

    run = Run(load_config("configs/tiny.yaml", [f"data.root={voc}"]), tmp_path / "run", save_config=False)
    with pytest.raises(StaleCacheError, match=r"proposals/test: made from other image files than split 'test'"):
        stage_test(run, progress=False)  # the test stage, which reads both caches, refuses them while stale
    for name in ("propose.py", "extract_features.py"):  # the changed image's shards are rebuilt, and only they
        r = tool(name, *common, "--split", "test")
        assert f"1 item(s) changed since their shards were made ({test_id})" in r.stderr
        m = json.loads((tmp_path / "run" / ("proposals" if name == "propose.py" else "features") / "test"
                        / "manifest.json").read_text())
        assert m["complete"] and m["new_images"] == 1
    r = tool("test_net.py", *common)  # the models were trained on other images: they stay valid
    assert "mAP (VOC07 11-point)" in r.stdout
    train_id = (voc / "ImageSets" / "Main" / "train.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{train_id}.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1))
    for name in ("finetune_fc.py", "train_svm.py"):
        r = tool(name, *common, check=False)
        assert r.returncode == 2 and "inputs.annotations" in r.stderr and "Traceback" not in r.stderr
    r = tool("pretrain.py", *common, check=False)  # the tiny config pre-trains on the train split
    assert r.returncode == 2 and "split's annotations differ from those it was trained on" in r.stderr


def test_a_stage_folder_from_another_manifest_schema_is_refused_by_name(tmp_path):
    import json as js

    from sppdet.manifest import SCHEMA, Stage
    from sppdet.store import StaleCacheError

    Stage(tmp_path / "s", "features", {"scales": [688]}, {"weights": "w", "images": "i1"}).finish(1)
    m = js.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["schema"] == SCHEMA
    (tmp_path / "s" / "manifest.json").write_text(js.dumps({**m, "schema": 1}))
    for reopen in (lambda: Stage(tmp_path / "s", "features", {"scales": [688]}, {"weights": "w", "images": "i1"}),
                   lambda: Stage.read_manifest(tmp_path / "s")):
        with pytest.raises(StaleCacheError, match=r"/s: made by another version of sppdet \(manifest schema 1") as e:
            reopen()
        assert "'features' stage" in str(e.value) and e.value.folder == tmp_path / "s"
    again = Stage(tmp_path / "s", "features", {"scales": [688]}, {"weights": "w", "images": "i1"}, overwrite=True)
    assert again.finish(1)["schema"] == SCHEMA


def test_demo_rebuilds_only_the_stale_stages_when_asked(trained, tmp_path):
    import shutil

    tmp, _ = trained
    shutil.copytree(tmp / "run", tmp_path / "run")
    # The train split's cache holds the flipped images' maps fine-tuning asks for (finetune.flip)...
    path = tmp_path / "run" / "features" / "train" / "manifest.json"
    saved = path.read_text()
    assert json.loads(saved)["config"]["flip"] is True
    assert json.loads((tmp_path / "run" / "features" / "test" / "manifest.json").read_text())["config"]["flip"] is False
    # ... and a cache without them is refused by name, not silently trained without flips.
    path.write_text(json.dumps({**json.loads(saved), "config": {**json.loads(saved)["config"], "flip": False}}))
    r = tool("finetune_fc.py", "--config", "configs/tiny.yaml", "--run", tmp_path / "run", "--set",
             f"data.root={tmp / 'data' / 'VOC2007'}", check=False)
    assert r.returncode == 2 and "finetune.flip" in r.stderr and str(path.parent) in r.stderr
    # With finetune.flip_from: maps such a cache is what the features stage writes, and fine-tuning mirrors the maps
    shutil.copytree(tmp_path / "run", tmp_path / "maps", ignore=shutil.ignore_patterns("model"))
    tool("finetune_fc.py", "--config", "configs/tiny.yaml", "--run", tmp_path / "maps", "--set",
         f"data.root={tmp / 'data' / 'VOC2007'}", "--set", "finetune.flip_from=maps")
    ft = json.loads((tmp_path / "maps" / "model" / "finetune" / "manifest.json").read_text())
    assert ft["complete"] and ft["config"]["finetune"]["flip_from"] == "maps"
    path.write_text(saved)
    common = ["--config", "configs/tiny.yaml", "--run", tmp_path / "run", "--set",
              f"data.root={tmp / 'data' / 'VOC2007'}", "--set", "svm.C=0.02"]
    r = tool("demo.py", *common, check=False)
    assert r.returncode == 2 and "svm.C: 0.001 -> 0.02" in r.stderr and "--rebuild-stale" in r.stderr
    assert "Traceback" not in r.stderr
    r = tool("demo.py", *common, "--rebuild-stale")
    assert r.stdout.count("rebuilding a stale stage") == 1 and "svm/manifest.json" in r.stdout
    assert "reusing" in r.stdout and "mAP (VOC07 11-point)" in r.stdout  # the stages before it were kept
    assert "fine-tuning: best validation error" in r.stdout and "(calling every window background: " in r.stdout
    assert "LEARNT (ALMOST) NOTHING" not in r.stdout  # the tiny config's head learns a little, and is not flagged
    svm = json.loads((tmp_path / "run" / "model" / "svm" / "manifest.json").read_text())
    assert svm["config"]["svm"]["C"] == 0.02 and svm["complete"]


def test_detect_on_odd_images(trained, tmp_path):
    tmp, _ = trained
    rgb = np.asarray(Image.open(next((tmp / "data" / "VOC2007" / "JPEGImages").glob("*.jpg"))).convert("RGB"))
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.jpg")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(tmp_path / "alpha.png")
    Image.fromarray(rgb[:12, :15]).save(tmp_path / "tiny.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    out = tmp_path / "out"
    r = tool("detect.py", "--run", tmp / "run", "--out", out, tmp_path / "gray.jpg", tmp_path / "alpha.png",
             tmp_path / "tiny.png", tmp_path / "broken.jpg", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "broken.jpg" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for stem in ("gray", "alpha", "tiny"):
        dets = json.loads((out / f"{stem}.json").read_text())
        assert (out / f"{stem}.png").is_file()
        for d in dets:
            assert set(d) == {"class", "score", "box"} and len(d["box"]) == 4


def test_svms_on_the_pretrained_head_without_fine_tuning(trained):
    """The ablation's rows that skip fine-tuning: SVMs on the pre-trained classifier's fc6 (the paper's Table 9
    row) and fc7, each scored by the detector with that same head."""
    tmp, _ = trained
    common = ["--config", "configs/tiny.yaml", "--run", tmp / "run", "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    for feature in ("fc6_noft", "fc7_noft"):
        tool("train_svm.py", *common, "--feature", feature, "--tag", f"_{feature}")
        svm = json.loads((tmp / "run" / "model" / f"svm_{feature}" / "manifest.json").read_text())
        assert svm["complete"] and svm["config"]["feature"] == feature
        r = tool("test_net.py", *common, "--svm-tag", f"_{feature}", "--tag", f"_{feature}")
        m = json.loads((tmp / "run" / "detections" / f"test_{feature}" / "metrics.json").read_text())
        assert 0.0 < m["map07"] <= 1.0 and "mAP (VOC07 11-point)" in r.stdout
    r = tool("train_svm.py", *common, "--feature", "fc8", check=False)
    assert r.returncode == 2 and "fc8" in r.stderr and "Traceback" not in r.stderr


def test_model_combination_scores_each_window_with_both_svm_sets(trained, tmp_path):
    """test.combine: the SVM stage also trains pool5 SVMs; testing scores every window with both sets and
    takes the max (the paper's union of two models' windows) or the mean of the two margins."""
    import shutil

    from sppdet.config import load_config
    from sppdet.run import Run
    from sppdet.stages import build_detector
    from sppdet.proposals import ProposalStore

    tmp, _ = trained
    run_dir = tmp_path / "run"
    shutil.copytree(tmp / "run", run_dir)
    sets = [f"data.root={tmp / 'data' / 'VOC2007'}", "test.combine=[pool5]"]
    common = ["--config", "configs/tiny.yaml", "--run", run_dir] + [a for s in sets for a in ("--set", s)]
    r = tool("test_net.py", *common, check=False)  # before the SVM stage has trained the pool5 set
    assert r.returncode == 2 and "svm_pool5/svm.npz: missing" in r.stderr and "train_svm.py" in r.stderr
    r = tool("train_svm.py", *common)
    assert f"svm: reusing {run_dir / 'model' / 'svm' / 'svm.npz'}" in r.stdout  # fc7's, unchanged
    assert json.loads((run_dir / "model" / "svm_pool5" / "manifest.json").read_text())["config"]["feature"] == "pool5"
    # both sets missing: mined in one pass (windows pooled once), the same SVMs as each trained alone
    joint = tmp_path / "joint"
    shutil.copytree(run_dir, joint)
    for tag in ("svm", "svm_pool5"):
        shutil.rmtree(joint / "model" / tag)
    tool("train_svm.py", *[joint if a == run_dir else a for a in common])
    for tag in ("svm", "svm_pool5"):
        alone, together = np.load(run_dir / "model" / tag / "svm.npz"), np.load(joint / "model" / tag / "svm.npz")
        for key in ("W", "b", "feature_scale"):
            np.testing.assert_array_equal(alone[key], together[key], err_msg=f"{tag} {key}")
        assert json.loads((joint / "model" / tag / "manifest.json").read_text())["mined_with"] == ["fc7", "pool5"]
    maps = {}
    for by in ("max", "mean"):
        tool("test_net.py", *common, "--set", f"test.combine_by={by}", "--tag", f"_{by}")
        m = json.loads((run_dir / "detections" / f"test_{by}" / "metrics.json").read_text())
        assert m["svm"] == "fc7+pool5" and m["combine_by"] == by
        maps[by] = m["map07"]
    assert all(0.0 < v <= 1.0 for v in maps.values())
    # the wiring: a window's combined scores are the max / mean of each SVM set's own scores
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets + [f"run_dir={run_dir}"])
    run = Run(cfg, save_config=False)
    store, i = ProposalStore(run.proposals_dir("test")), run.dataset("test").ids[0]
    alone = [build_detector(run, "test", combine=False), build_detector(run, "test", "_pool5")]
    feats, props = alone[0].cache.load(i), store.load(i)
    each = [d.score(feats, props)[1] for d in alone]
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(build_detector(run, "test").score(feats, props)[1], np.maximum(*each), rtol=1e-5)
    mean = load_config(ROOT / "configs" / "tiny.yaml", sets + [f"run_dir={run_dir}", "test.combine_by=mean"])
    np.testing.assert_allclose(build_detector(Run(mean, save_config=False), "test").score(feats, props)[1],
                               (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-6)


def test_combining_runs_by_nms_on_the_union_of_their_detections(trained, tmp_path):
    """test_net.py --combine-with: the paper's combination of two networks. With itself a run gets its own mAP
    back; with an oracle run (every object's box, scored above everything) every object ranks first: mAP 1.
    Detections made from other files, or missing, are refused by name."""
    import shutil

    from sppdet.voc import VOCDataset

    tmp, _ = trained
    data = tmp / "data" / "VOC2007"
    run_dir, oracle = tmp_path / "run", tmp_path / "oracle"
    shutil.copytree(tmp / "run", run_dir)
    common = ["--config", "configs/tiny.yaml", "--run", run_dir, "--set", f"data.root={data}"]
    r = tool("test_net.py", *common, "--combine-with", run_dir)
    own = json.loads((run_dir / "detections" / "test" / "metrics.json").read_text())
    both = json.loads((run_dir / "detections" / "test_combined" / "metrics.json").read_text())
    assert both["map07"] == pytest.approx(own["map07"]) and "combined with" in r.stdout
    assert both["inputs"] == own["inputs"] and (run_dir / "detections" / "test_combined" / "detections.npz").is_file()

    ds = VOCDataset(data, "test", own["classes"])
    arrays = {}
    for i in ds.ids:
        a = ds.annotation(i)
        arrays[f"{i}/boxes"] = np.asarray(a.boxes, np.float32)
        arrays[f"{i}/scores"] = np.full(len(a.boxes), 100.0, np.float32)
        arrays[f"{i}/labels"] = a.labels(own["classes"]).astype(np.int64)
    (oracle / "detections" / "test").mkdir(parents=True)
    np.savez(oracle / "detections" / "test" / "detections.npz", **arrays)
    meta = {"classes": own["classes"], "map07": 1.0, "inputs": own["inputs"]}
    (oracle / "detections" / "test" / "metrics.json").write_text(json.dumps(meta))
    r = tool("test_net.py", *common, "--combine-with", oracle)
    both = json.loads((run_dir / "detections" / "test_combined" / "metrics.json").read_text())
    assert both["map07"] == pytest.approx(1.0) and own["map07"] < 1.0

    meta["inputs"]["images"] = "0" * 16  # as if tested on other image files
    (oracle / "detections" / "test" / "metrics.json").write_text(json.dumps(meta))
    r = tool("test_net.py", *common, "--combine-with", oracle, check=False)
    assert r.returncode == 2 and "oracle/detections/test/metrics.json" in r.stderr and "other images" in r.stderr
    r = tool("test_net.py", *common, "--combine-with", tmp_path / "nowhere", check=False)
    assert r.returncode == 2 and "nowhere/detections/test: no detections" in r.stderr and "Traceback" not in r.stderr


def test_svm_flip_adds_the_mirror_images(trained):
    """svm.flip: the train split's mirrored images (cached for fine-tuning) give twice the positives and their
    own hard negatives; a split cached without them is refused with the fix named."""
    tmp, _ = trained
    common = ["--config", "configs/tiny.yaml", "--run", tmp / "run", "--set", f"data.root={tmp / 'data' / 'VOC2007'}",
              "--set", "svm.flip=true"]
    tool("train_svm.py", *common, "--tag", "_flip")
    plain = json.loads((tmp / "run" / "model" / "svm" / "manifest.json").read_text())
    flip = json.loads((tmp / "run" / "model" / "svm_flip" / "manifest.json").read_text())
    assert flip["complete"] and flip["config"]["svm"]["flip"] is True
    for name, s in plain["stats"].items():
        assert flip["stats"][name]["positives"] == 2 * s["positives"] > 0
    r = tool("test_net.py", *common, "--svm-tag", "_flip", "--tag", "_flip")
    assert "mAP (VOC07 11-point)" in r.stdout
    # a bounded number of windows scored per image, and boxes around two objects of a class as negatives
    tool("train_svm.py", *common[:-2], "--set", "svm.mine_windows=8", "--set", "svm.group_negatives=0.5",
         "--tag", "_mine8")
    few = json.loads((tmp / "run" / "model" / "svm_mine8" / "manifest.json").read_text())
    assert few["config"]["svm"]["mine_windows"] == 8 and few["config"]["svm"]["group_negatives"] == 0.5
    n_train = len((tmp / "data" / "VOC2007" / "ImageSets" / "Main" / "train.txt").read_text().split())
    assert few["mined"]["windows_scored"] == 8 * n_train < plain["mined"]["windows_scored"]
    assert max(few["negative_pool"]["class_negatives"]) <= 8 * n_train < max(plain["negative_pool"]["class_negatives"])
    r = tool("train_svm.py", *common, "--set", "data.train_split=test", "--tag", "_flip_test", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cached without the flipped images' maps" in r.stderr and "--flip" in r.stderr


def test_svm_fc_precision_is_recorded_resolved_and_old_folders_count_as_fp32(trained):
    """svm.fc_precision: fc7 computed in bfloat16 for mining gives SVMs close to fp32's, not equal; the manifest
    records the resolved precision, and a folder from before the option (no record) is one made in fp32."""
    import numpy as np

    tmp, _ = trained
    common = ["--config", "configs/tiny.yaml", "--run", tmp / "run", "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    model = tmp / "run" / "model"
    for p in ("fp32", "bf16"):
        tool("train_svm.py", *common, "--set", f"svm.fc_precision={p}", "--tag", f"_{p}")
        m = json.loads((model / f"svm_{p}" / "manifest.json").read_text())
        assert m["complete"] and m["config"]["fc_precision"] == m["fc_precision"] == p
    w32, w16 = (np.load(model / f"svm_{p}" / "svm.npz")["W"] for p in ("fp32", "bf16"))
    assert not np.array_equal(w32, w16)
    # the same classifiers up to the hard negatives a slightly different score picks (each class's cosine 0.96-0.99)
    cos = (w32 * w16).sum(1) / np.linalg.norm(w32, axis=1) / np.linalg.norm(w16, axis=1)
    assert cos.min() > 0.9
    # a manifest written before the option existed: reused in fp32, stale in bf16 (naming the key)
    path = model / "svm_fp32" / "manifest.json"
    m = json.loads(path.read_text())
    del m["config"]["fc_precision"]
    path.write_text(json.dumps(m))
    r = tool("train_svm.py", *common, "--set", "svm.fc_precision=fp32", "--tag", "_fp32")
    assert "reusing" in r.stdout + r.stderr
    r = tool("train_svm.py", *common, "--set", "svm.fc_precision=bf16", "--tag", "_fp32", check=False)
    assert r.returncode == 2 and "fc_precision" in r.stderr and "Traceback" not in r.stderr
    # the test stage checks such a folder as the SVM stage does: usable in fp32, stale in bf16
    tool("test_net.py", *common, "--set", "svm.fc_precision=fp32", "--svm-tag", "_fp32", "--tag", "_fp32")
    r = tool("test_net.py", *common, "--set", "svm.fc_precision=bf16", "--svm-tag", "_fp32", "--tag", "_fp32", check=False)
    assert r.returncode == 2 and "fc_precision" in r.stderr and "Traceback" not in r.stderr


def test_the_stage_tools_run_on_this_calls_device(trained, tmp_path):
    """--device: fine-tuning, the SVMs and the test stage rebuilt on this machine's device (CUDA where torch finds
    one) give a head saved on the CPU and the test mAP of the CPU run (equal on the CPU, near it on a GPU); a device
    the machine lacks is refused in one line, before the stage's folder is touched."""
    import shutil

    import torch

    tmp, _ = trained
    run_dir = tmp_path / "run"
    shutil.copytree(tmp / "run", run_dir)
    common = ["--config", "configs/tiny.yaml", "--run", run_dir, "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("finetune_fc.py", "train_svm.py"):
        tool(name, *common, "--overwrite", "--device", device)
    tool("test_net.py", *common, "--device", device)
    head = torch.load(run_dir / "model" / "finetune" / "finetune.pt", weights_only=False)["head"]
    assert all(v.device.type == "cpu" for v in head.values())
    before, after = (json.loads((r / "detections" / "test" / "metrics.json").read_text())["map07"]
                     for r in (tmp / "run", run_dir))
    assert after == before if device == "cpu" else abs(after - before) < 0.1
    if device == "cpu":
        manifest = (run_dir / "model" / "finetune" / "manifest.json").read_bytes()
        r = tool("finetune_fc.py", *common, "--overwrite", "--device", "cuda", check=False)
        assert r.returncode == 2 and "device is 'cuda' but torch finds 0 CUDA device" in r.stderr
        assert "Traceback" not in r.stderr and (run_dir / "model" / "finetune" / "manifest.json").read_bytes() == manifest


def test_fine_tuning_is_reproducible(trained, tmp_path):
    """Fine-tuning again with the same config, in another process (torch seeds each differently), gives the
    same head: its random fc8 is seeded from the config's seed."""
    import shutil

    import torch

    tmp, _ = trained
    run_dir = tmp_path / "run"
    shutil.copytree(tmp / "run", run_dir)
    common = ["--config", "configs/tiny.yaml", "--run", run_dir, "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    tool("finetune_fc.py", *common, "--overwrite")
    a = torch.load(tmp / "run" / "model" / "finetune" / "finetune.pt", weights_only=False)["head"]
    b = torch.load(run_dir / "model" / "finetune" / "finetune.pt", weights_only=False)["head"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_with_input_norm_keeps_its_scale_for_the_svms_and_test_time(trained, tmp_path):
    """fc6/fc7 from random init on scaled pooled features (finetune.input_norm): the stage records the scale,
    the checkpoint keeps it, and every reader of the head (SVMs, the detector) applies it."""
    import os

    import torch

    from sppdet.config import load_config
    from sppdet.run import Run
    from sppdet.stages import build_detector, load_head, stage_finetune, stage_svms

    tmp, _ = trained
    (tmp_path / "run").mkdir()
    for d in ("pretrain", "proposals", "features"):
        os.symlink(tmp / "run" / d, tmp_path / "run" / d)
    overrides = [f"data.root={tmp / 'data' / 'VOC2007'}", "finetune.input_norm=40", "finetune.init_from_pretrain=false",
                 "test.combine=[]"]
    run = Run(load_config("configs/tiny.yaml", overrides), tmp_path / "run", save_config=False)
    done = stage_finetune(run)
    head = load_head(run)
    # the tiny trunk's pooled features have a mean norm of ~33: scaled up to 40
    assert 0.5 < head.input_scale < 2.5 and done["input_scale"] == pytest.approx(head.input_scale)
    # it learns: the validation loss well below that of predicting the labels' frequencies (the error alone, at
    # this size, can stay at that of calling every window background: 0.25 with input_norm 10 on one machine)
    from sppdet.finetune import learnt_nothing

    assert not learnt_nothing(done)
    stage_svms(run)
    det = build_detector(run, "test", use_bbox_reg=False)
    assert det.head.input_scale == pytest.approx(head.input_scale)
    x = torch.rand(3, head.fc6.in_features)
    plain = type(head)(head.fc6.in_features, head.fc6.out_features, head.fc8.out_features)
    plain.load_state_dict(head.state_dict())
    assert torch.allclose(det.head.features(x), plain.eval().features(x * head.input_scale), atol=1e-5)


def test_factored_fc6_through_the_stages(trained, tmp_path):
    """finetune.fc6_rank: the stage trains a factored fc6, the checkpoint keeps its rank, the SVM stage and the
    detector read it back as trained; the fine-tuning stage is stale once the rank changes."""
    import os

    import torch

    from sppdet.config import load_config
    from sppdet.run import Run
    from sppdet.stages import build_detector, load_head, stage_finetune, stage_svms
    from sppdet.store import StaleCacheError

    tmp, _ = trained
    (tmp_path / "run").mkdir()
    for d in ("pretrain", "proposals", "features"):
        os.symlink(tmp / "run" / d, tmp_path / "run" / d)
    overrides = [f"data.root={tmp / 'data' / 'VOC2007'}", "finetune.init_from_pretrain=false", "finetune.input_norm=40",
                 "finetune.fc6_rank=16", "finetune.iterations=60", "finetune.lr_steps=[1000]", "test.combine=[]"]
    run = Run(load_config("configs/tiny.yaml", overrides), tmp_path / "run", save_config=False)
    stage_finetune(run)
    head = load_head(run)
    assert head.fc6_rank == 16 and head.fc6[0].weight.shape[0] == 16
    stage_svms(run)
    det = build_detector(run, "test", use_bbox_reg=False)
    x = torch.rand(4, head.fc6[0].in_features)
    assert torch.allclose(det.head.features(x), head.features(x), atol=1e-5)
    rank8 = [o for o in overrides if not o.startswith("finetune.fc6_rank")] + ["finetune.fc6_rank=8"]
    other = Run(load_config("configs/tiny.yaml", rank8), tmp_path / "run", save_config=False)
    with pytest.raises(StaleCacheError, match="fc6_rank"):
        load_head(other)


def test_head_box_regression_through_the_stages(trained, tmp_path):
    """finetune.bbox_loss with bbox_reg.source: finetune: the head is fine-tuned with its box layer, the plan has
    no ridge stage (which refuses to run), and the test stage's regressed detections come from the head's deltas."""
    import os

    from sppdet.config import load_config
    from sppdet.detector import HeadBoxRegressor
    from sppdet.run import Run
    from sppdet.stages import build_detector, load_head, plan, run_all, stage_bbox_reg

    tmp, _ = trained
    (tmp_path / "run").mkdir()
    for d in ("pretrain", "proposals", "features"):
        os.symlink(tmp / "run" / d, tmp_path / "run" / d)
    overrides = [f"data.root={tmp / 'data' / 'VOC2007'}", "finetune.iterations=60", "finetune.lr_steps=[1000]",
                 "test.combine=[]", "finetune.bbox_loss=1", "bbox_reg.source=finetune"]
    run = Run(load_config("configs/tiny.yaml", overrides), tmp_path / "run", save_config=False)
    assert "bbox_reg" not in [s.spec.name for s in plan(run)]
    metrics = run_all(run)
    assert load_head(run).box_classes == len(run.classes)
    assert isinstance(build_detector(run, "test").regressor, HeadBoxRegressor)
    res = metrics["results"]
    assert 0.0 <= res["with_bbox_reg"]["map07"] <= 1.0  # the regressed detections were evaluated
    with pytest.raises(ValueError, match="no ridge regressors"):
        stage_bbox_reg(run)


def test_predictor_detects_with_a_run_folder_from_any_directory(trained, tmp_path, monkeypatch):
    from sppdet import Predictor

    tmp, _ = trained
    voc = tmp / "data" / "VOC2007"
    image_id = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    monkeypatch.chdir(tmp_path)  # relative paths of the run's config resolve against the project, not here
    p = Predictor(tmp / "run", score_threshold=-1.0)
    out = p(voc / "JPEGImages" / f"{image_id}.jpg")
    from sppdet.voc import load_image

    img = load_image(voc / "JPEGImages" / f"{image_id}.jpg")
    again = p(img)  # an RGB array gives the same detections as its file
    assert np.array_equal(out["boxes"], again["boxes"]) and len(out["boxes"]) > 0
    assert out["boxes"].shape[1] == 4 and (out["boxes"][:, 2] <= img.shape[1]).all()
    assert (out["boxes"][:, 3] <= img.shape[0]).all() and set(out["classes"]) <= set(p.classes)
    assert list(out["scores"]) == sorted(out["scores"], reverse=True) and (out["scores"] > -1.0).all()
    assert set(out["seconds"]) == {"proposals", "conv", "pool_fc", "rest"} and out["wall_seconds"] > 0
    # proposals computed in a thread beside the conv layers: the same detections as one step after the other
    plain, reg, _ = p.detector.detect_image(p.backbone, img, p.proposals(img), p.cfg.features,
                                            score_threshold=p.score_threshold)
    seq = reg if reg is not None else plain
    assert np.array_equal(seq.boxes, out["boxes"]) and np.array_equal(seq.scores, out["scores"])
    assert not list(tmp_path.iterdir())  # nothing generated in the current directory
    with pytest.raises(ValueError, match="RGB uint8"):
        p(img.astype(np.float32))


def test_bench_family_row_for_joint_box_regression_uses_the_runs_cache_and_its_own_models(trained, tmp_path,
                                                                                          load_script):
    """bench_family's "regressors fit apart" row: SPP-net with the box layer fine-tuned and regressing, in a second
    run folder that links the first's proposals and conv5 cache and leaves the first's models as they were."""
    import os

    from sppdet.config import load_config
    from sppdet.run import Run

    tmp, _ = trained
    (tmp_path / "run").mkdir()
    for d in ("pretrain", "proposals", "features", "model"):
        os.symlink(tmp / "run" / d, tmp_path / "run" / d)
    before = (tmp / "run" / "model" / "finetune" / "finetune.pt").read_bytes()
    run = Run(load_config("configs/tiny.yaml", [f"data.root={tmp / 'data' / 'VOC2007'}", "finetune.iterations=40"]),
              tmp_path / "run", save_config=False)
    bench = load_script("benchmarks/bench_family.py")
    row = bench.sppnet_joint_boxes(run, {"features": 1.0, "conv_per_image": 0.01})
    joint = tmp_path / "run_joint_boxes"
    assert (joint / "features").resolve() == (tmp / "run" / "features").resolve()
    assert (joint / "model" / "finetune" / "finetune.pt").is_file() and not (joint / "model" / "bbox_reg").exists()
    assert row["stages"] == 3 and set(row["train_seconds_by_stage"]) == {"features", "finetune", "svm"}
    assert 0.0 <= row["map07"] <= 1.0 and 0.0 <= row["map07_without_bbox_reg"] <= 1.0
    assert (tmp / "run" / "model" / "finetune" / "finetune.pt").read_bytes() == before


def test_bench_detect_times_fresh_processes_with_and_without_the_warm_up(trained, tmp_path, load_script):
    tmp, _ = trained
    voc = tmp / "data" / "VOC2007"
    ids = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[:2]
    out = tmp_path / "detect.json"
    bench = load_script("benchmarks/bench_detect.py")
    assert bench.main(["--run", str(tmp / "run"), "--rounds", "1", "--out", str(out),
                       *[str(voc / "JPEGImages" / f"{i}.jpg") for i in ids]]) == 0
    rec = json.loads(out.read_text())
    assert [r["warm_up"] for r in rec["rows"]] == [False, True]
    for r in rec["rows"]:
        assert [x["photo"] for x in r["photos"]] == [f"{i}.jpg" for i in ids]
        assert 0 < r["load_seconds"] < r["process_seconds"] <= r["wall_with_interpreter"]
        assert all(x["wall"] > 0 and x["conv"] > 0 for x in r["photos"])
    s = rec["summary"]
    assert abs(s["first_photo_ratio_off_on"] - s["off"]["first_photo_seconds"] / s["on"]["first_photo_seconds"]) < 1e-9


def test_bench_finetune_pool_pools_a_runs_batches_both_ways_alike(trained, tmp_path, load_script):
    """The benchmark draws fine-tuning's batches from a run's caches and pools them per image and per batch (it
    exits naming the way whose rows differ); on a machine with CUDA also there, with a short fine-tuning each way."""
    tmp, _ = trained
    out = tmp_path / "pool.json"
    bench = load_script("benchmarks/bench_finetune_pool.py")
    assert bench.main(["--run", str(tmp / "run"), "--batches", "4", "--iterations", "6", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    ways = rec["pooling_ms_per_batch"]
    assert {"cpu, one call per image", "cpu, one call per batch"} <= set(ways) and all(v > 0 for v in ways.values())
    import torch

    assert rec["windows_per_batch"] > 0 and ("finetune" in rec) == torch.cuda.is_available()


def test_fast_rcnn_mode_trains_the_trunk_writes_no_feature_cache_and_detects(trained, tmp_path):
    """Fast R-CNN mode from the same trunk and proposals, as a whole run (``route: fast_rcnn``: tools/demo.py trains
    it, Predictor serves it): one stage trains the conv layers above the stem too (the trunk's weights change),
    nothing is cached but the model, and the mAP is far above chance."""
    import os

    import torch

    from sppdet import Predictor

    tmp, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    for d in ("pretrain", "proposals"):
        os.symlink(tmp / "run" / d, run / d)
    r = tool("demo.py", "--config", "configs/tiny.yaml", "--run", run, "--set",
             f"data.root={tmp / 'data' / 'VOC2007'}", "--set", "route=fast_rcnn", "--set", "fast_rcnn.iterations=300",
             "--set", "fast_rcnn.lr_steps=[200]")
    report = r.stdout.split("cost of")[1]
    assert "Fast R-CNN (conv above the stem + head)" in report and "hard-negative" not in report
    again = tool("train_fast_rcnn.py", "--run", run, "--no-test")  # the run's own settings: the same model, reused
    assert "reusing" in again.stdout + again.stderr
    man = json.loads((run / "model" / "fast_rcnn" / "manifest.json").read_text())
    assert man["complete"] and man["conv_changed"] and man["trained_conv_tensors"] > 0
    assert not (run / "features").exists()
    written = {p.relative_to(run).parts[0] for p in run.rglob("*") if p.is_file() and not p.is_symlink()}
    assert written <= {"config.yaml", "cost_report.json", "cost_report.txt", "model", "detections"}, written
    # the trunk on disk is untouched; the model's own trunk differs from it above the stem
    from sppdet.backbones import build_backbone

    disk = build_backbone("zf5", str(tmp / "run" / "pretrain" / "checkpoint.pt"), 0.125).state_dict()
    mine = torch.load(run / "model" / "fast_rcnn" / "model.pt", weights_only=False)["model"]
    changed = [k for k, v in disk.items() if not torch.equal(v, mine["backbone." + k])]
    stem = next(k for k, v in disk.items() if v.dim() == 4)  # the first convolution's weights
    assert changed and stem not in changed
    m = json.loads((run / "detections" / "test_fast_rcnn" / "metrics.json").read_text())
    assert m["method"] == "fast_rcnn" and f"mAP (VOC07 11-point): {m['map07']:.3f}" in r.stdout
    assert m["map07"] > 3 * chance_map(tmp, m["classes"]), m["map07"]
    voc = tmp / "data" / "VOC2007"
    image_id = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    p = Predictor(run, score_threshold=0.05)
    out = p(voc / "JPEGImages" / f"{image_id}.jpg")
    assert len(out["boxes"]) > 0 and ((out["scores"] > 0.05) & (out["scores"] <= 1)).all()
    assert set(out["seconds"]) == {"proposals", "conv", "pool_fc", "rest"} and set(out["classes"]) <= set(p.classes)
    assert Predictor(run).score_threshold == 0.5  # probabilities: fast_rcnn.draw_threshold, not the SVMs' margin


def test_rcnn_mode_writes_its_features_to_disk_trains_from_them_and_resumes(trained, tmp_path):
    """R-CNN mode from the same trunk and proposals: its warped windows' pool5 written as one shard per training image
    (as R-CNN wrote them), SVMs and regressors trained from the shards; a shard lost is the only one warped again and
    the model trained again is the same; a changed setting is refused by name, rebuilt with --overwrite."""
    import os

    import numpy as np

    from sppdet.store import load_npz

    tmp, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    for d in ("pretrain", "proposals"):
        os.symlink(tmp / "run" / d, run / d)
    common = ["--config", "configs/tiny.yaml", "--run", run, "--set", f"data.root={tmp / 'data' / 'VOC2007'}",
              "--set", "rcnn.max_windows=30"]
    r = tool("train_rcnn.py", *common)
    feats, model = run / "features_rcnn" / "train", run / "model" / "rcnn"
    train_ids = (tmp / "data" / "VOC2007" / "ImageSets" / "Main" / "train.txt").read_text().split()
    shards = sorted(feats.glob("*.npz"))
    assert [p.stem for p in shards] == sorted(train_ids)
    z = load_npz(shards[0])
    assert z["f"].dtype == np.float32 and len(z["f"]) == len(z["sel"]) and 30 <= len(z["sel"]) <= 30 + 10
    fm, mm = (json.loads((d / "manifest.json").read_text()) for d in (feats, model))
    assert fm["complete"] and fm["new_images"] == len(train_ids) and fm["bytes"] > 0
    assert mm["feature_bytes"] == fm["bytes"] and mm["windows"] == fm["windows"] and mm["conv_seconds"] > 0
    assert mm["config"]["negatives_cap"] == 10000 and mm["config"]["bbox_reg_samples"] == 3000
    m = json.loads((run / "detections" / "test_rcnn" / "metrics.json").read_text())
    assert m["method"] == "rcnn" and f"mAP (VOC07 11-point): {m['map07']:.3f}" in r.stdout
    assert m["map07"] > chance_map(tmp, m["classes"]), m["map07"]
    before = load_npz(model / "rcnn.npz")
    for p in model.iterdir():
        p.unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # a shard cut short: named, and deleting it is the way out
    bad = tool("train_rcnn.py", "--run", run, "--no-test", check=False)
    assert bad.returncode != 0 and f"{shards[1]}: R-CNN feature shard unreadable" in bad.stderr + bad.stdout
    assert "delete it" in bad.stderr + bad.stdout and not (model / "rcnn.npz").exists()
    shards[1].unlink()
    tool("train_rcnn.py", "--run", run, "--no-test")
    assert json.loads((feats / "manifest.json").read_text())["new_images"] == 1
    after = load_npz(model / "rcnn.npz")
    for k in ("W", "b", "reg_W", "feature_scale"):
        np.testing.assert_allclose(after[k], before[k], rtol=1e-5, atol=1e-6, err_msg=k)
    bad = tool("train_rcnn.py", *common[:-2], "--set", "rcnn.max_windows=20", "--no-test", check=False)
    assert bad.returncode == 2 and "max_windows" in bad.stderr + bad.stdout
    tool("train_rcnn.py", *common[:-2], "--set", "rcnn.max_windows=20", "--no-test", "--overwrite")
    fm = json.loads((feats / "manifest.json").read_text())
    assert fm["new_images"] == len(train_ids) and fm["config"]["max_windows"] == 20
    # svm.max_pool_gb bounds the positives too: at two rows per class each class keeps a sample of two
    gb = 2 * len(m["classes"]) * 4 * z["f"].shape[1] / 1e9 * 1.001
    mtimes = {p: p.stat().st_mtime_ns for p in feats.glob("*.npz")}
    r = tool("train_rcnn.py", *common[:-2], "--set", "rcnn.max_windows=20", "--set", f"svm.max_pool_gb={gb}",
             "--no-test", "--overwrite")
    assert "2 positives (a uniform sample of" in r.stdout, r.stdout[-2000:]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # --overwrite kept the features: they were current
    assert json.loads((model / "manifest.json").read_text())["config"]["positives_cap"] == 2


def test_readme_own_data_steps_run_as_written_on_the_tiny_config(trained, tmp_path):
    """The README's "Train on your own data" commands, run as written with the tiny config and data put in for
    configs/custom.yaml and the user's folder and photos."""
    import re
    import shlex

    tmp, _ = trained
    voc = tmp / "data" / "VOC2007"
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train on your own data", 1)[1].split("\n## ", 1)[0]
    commands = [ln for block in re.findall(r"```\n(.*?)```", section, re.S) for ln in block.splitlines()
                if ln.startswith("python tools/")]
    assert len(commands) >= 2, commands
    photos = sorted((voc / "JPEGImages").glob("*.jpg"))[:2]
    for cmd in commands:
        argv = shlex.split(cmd)[1:]
        subst = {"configs/custom.yaml": "configs/tiny.yaml", "runs/mine": str(tmp_path / "mine"),
                 "out/": str(tmp_path / "out"), "/path/to/VOC2007": str(voc)}
        argv = [subst.get(a, a) for a in argv]
        argv = [f"data.root={voc}" if a == "data.root=/path/to/VOC2007" else a for a in argv]
        argv = [str(photos[0]) if a == "photo1.jpg" else str(photos[1]) if a == "photo2.png" else a for a in argv]
        tool(Path(argv[0]).name, *argv[1:])  # exit code 0, or the test fails with the tool's output
    outs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {f"{p.stem}.json" for p in photos} <= set(outs) and {f"{p.stem}.png" for p in photos} <= set(outs)
    assert json.loads((tmp_path / "mine" / "detections" / "test" / "metrics.json").read_text())["map07"] > 0


def test_a_changed_setting_is_refused_by_every_later_stage_that_would_use_the_old_output(trained):
    """The issue's cases: each later tool names the key and the tool that rebuilds, exit code 2, nothing reused."""
    tmp, _ = trained
    common = ["--config", "configs/tiny.yaml", "--run", tmp / "run", "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    cases = [("test_net.py", "svm.C=0.1", "svm.C", "tools/train_svm.py"),
             ("finetune_fc.py", "features.scales=[300]", "features.scales", "tools/extract_features.py"),
             ("train_svm.py", "finetune.hidden=64", "finetune.hidden", "tools/finetune_fc.py"),
             ("extract_features.py", "proposals.max_boxes=300", "proposals.max_boxes", "tools/propose.py"),
             ("test_net.py", "proposals.cap_nms=0.7", "proposals.cap_nms", "tools/propose.py"),
             ("test_net.py", "bbox_reg.lam=10", "bbox_reg.lam", "tools/train_bbox_reg.py"),
             ("test_net.py", "svm.max_pool_gb=0.0001", "negatives_cap", "tools/train_svm.py")]
    before = (tmp / "run" / "config.yaml").read_text()
    for name, setting, key, rebuild in cases:
        extra = ("--split", "train") if name == "extract_features.py" else ()
        r = tool(name, *common, "--set", setting, *extra, check=False)
        assert r.returncode == 2 and key in r.stderr and rebuild in r.stderr, (name, r.stderr[-500:])
    assert (tmp / "run" / "config.yaml").read_text() == before  # calls with --set leave the run's settings alone


def test_a_pooling_setting_reuses_the_conv5_cache_and_each_stage_that_pooled_is_refused(trained, tmp_path):
    """features.levels / shrink / target_size change how windows are pooled, not the maps: extract_features.py
    reuses the cache, and fine-tuning, the SVMs and box regression, each made with the old pooling, are refused by
    name (exit code 2); demo.py --rebuild-stale rebuilds those and keeps the cache."""
    import shutil

    tmp, _ = trained
    common = ["--config", "configs/tiny.yaml", "--run", tmp / "run", "--set", f"data.root={tmp / 'data' / 'VOC2007'}"]
    r = tool("extract_features.py", *common, "--split", "train", "--set", "features.levels=[2,1]")
    assert "0 new images" in r.stdout
    cases = [("finetune_fc.py", "features.levels=[2,1]", "pooling.levels", "--overwrite"),
             ("train_svm.py", "features.shrink=2", "pooling.shrink", "tools/finetune_fc.py"),
             ("train_bbox_reg.py", "features.target_size=100", "pooling.target_size", "--overwrite"),
             ("test_net.py", "features.levels=[2,1]", "pooling.levels", "tools/train_svm.py")]
    for name, setting, key, rebuild in cases:
        r = tool(name, *common, "--set", setting, check=False)
        assert r.returncode == 2 and key in r.stderr and rebuild in r.stderr, (name, r.stderr[-500:])
    shutil.copytree(tmp / "run", tmp_path / "run")
    maps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "features").rglob("*.npz")}
    r = tool("demo.py", "--config", "configs/tiny.yaml", "--run", tmp_path / "run", "--set",
             f"data.root={tmp / 'data' / 'VOC2007'}", "--set", "features.levels=[2,1]", "--rebuild-stale")
    rebuilt = [line for line in r.stdout.splitlines() if "rebuilding a stale stage" in line]
    assert rebuilt and all("/model/" in line for line in rebuilt) and "mAP (VOC07 11-point)" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in maps} == maps
    ft = json.loads((tmp_path / "run" / "model" / "finetune" / "manifest.json").read_text())
    assert ft["complete"] and ft["config"]["pooling"]["levels"] == [2, 1]
