"""Where the networks run (`device`): values checked where the config loads, a CUDA device this machine lacks
refused naming the key before anything is written, and one call's --device never saved in the run's config.
The CUDA paths themselves are checked where torch finds a CUDA device (test_end_to_end.py has the stage tools)."""

from pathlib import Path

import pytest
import torch

from sppdet.cli import make_run, parser
from sppdet.config import ConfigError, load_config, with_device
from sppdet.models import FCHead, fc_features, module_device, resolve_device
from sppdet.run import Run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def test_device_values_resolve_or_are_refused_by_name():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if CUDA else "cpu")
    n = torch.cuda.device_count() if CUDA else 0
    with pytest.raises(ValueError, match=f"device is 'cuda:{n}' but torch finds {n} CUDA device"):
        resolve_device(f"cuda:{n}")
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "mps"):
        with pytest.raises(ValueError, match=f"device must be cpu, cuda, cuda:N or auto, got '{bad}'"):
            resolve_device(bad)
    with pytest.raises(ConfigError, match="--set device=gpu: device: must be cpu, cuda, cuda:N or auto"):
        load_config(TINY, ["device=gpu"])
    assert load_config(TINY, ["device=cuda:1"]).device == "cuda:1"  # a GPU config still loads on a CPU machine


def test_the_device_flag_is_this_calls_only_and_checked_before_anything_is_written(tmp_path):
    def args(*extra):
        return parser("t").parse_args(["--config", str(TINY), "--run", str(tmp_path / "run"), *extra])

    run = make_run(args("--device", "auto"))
    assert run.cfg.device == "auto" and run.device == ("cuda" if CUDA else "cpu")
    assert load_config(tmp_path / "run" / "config.yaml").device == "cpu"  # the run's own setting stays
    with pytest.raises(ConfigError, match="--device tpu: must be cpu, cuda, cuda:N or auto, got 'tpu'"):
        make_run(parser("t").parse_args(["--config", str(TINY), "--run", str(tmp_path / "new"), "--device", "tpu"]))
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_by_the_stages_naming_the_key(tmp_path):
    from sppdet.stages import stage_features, stage_finetune, stage_svm

    run = Run(with_device(load_config(TINY), "cuda"), tmp_path / "run")
    for stage in (lambda: stage_features(run, "train"), lambda: stage_finetune(run), lambda: stage_svm(run)):
        with pytest.raises(ConfigError, match=r"device is 'cuda' but torch finds 0 CUDA device.*--set device=cpu"):
            stage()
    assert not (tmp_path / "run" / "features").exists() and not (tmp_path / "run" / "model").exists()


@needs_cuda
def test_fc_features_on_cuda_match_the_cpu():
    torch.manual_seed(0)
    head = FCHead(60, 32, 4).eval()
    x = torch.randn(300, 60)
    on_cpu = fc_features(head, x, "fc7")
    head.to("cuda")
    assert module_device(head).type == "cuda"
    on_gpu = fc_features(head, x.to("cuda"), "fc7").cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4)


@needs_cuda
def test_pooling_on_cuda_matches_the_cpu(tmp_path):
    """Fine-tuning keeps the maps on its device and pools there: the same rows as the CPU's, bit for bit (max
    pooling only compares values)."""
    from sppdet.backbones import build_backbone
    from test_features import _pooling_requests

    torch.manual_seed(0)
    zf = build_backbone("zf5", width=0.125).eval()
    cache, cpu = _pooling_requests(zf, tmp_path / "cpu")
    _, gpu = _pooling_requests(zf, tmp_path / "gpu", device="cuda")
    got = cache.pooled_many(gpu)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), cache.pooled_many(cpu))
