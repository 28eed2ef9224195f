import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sample_root() -> Path:
    env = os.environ.get("SPPDET_VOC_SAMPLE")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "voc2007-sample"


@pytest.fixture(scope="session")
def load_script():
    """``load_script("benchmarks/bench_x.py")``: a script of the repository (a tool or benchmark, not a package
    module) imported as a module, for tests that call its functions or its ``main(argv)``."""
    import importlib.util

    def load(relative: str):
        path = ROOT / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    p = sample_root() / "VOCdevkit" / "VOC2007"
    if not p.is_dir():
        pytest.skip("real VOC sample not present (set SPPDET_VOC_SAMPLE)")
    return p


@pytest.fixture(scope="session")
def toy_voc(tmp_path_factory) -> Path:
    from sppdet.synthetic import make_toy_voc

    return make_toy_voc(tmp_path_factory.mktemp("toy"), num_images=12, seed=3)
