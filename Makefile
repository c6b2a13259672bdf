# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first and pinned; an unpinned torch (or a package that
# pulls torch in before it) resolves to a multi-GB CUDA build. GPU machines: set TORCH_SPEC.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,ui
BIN := $(VENV)/bin
RUN ?= runs/hmmoe-demo
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench clean

$(BIN)/mmdeploy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(BIN)/mmdeploy
	$(BIN)/mmdeploy train --adapter hmmoe --data demo --backbone tiny --out $(RUN) --overwrite \
		--shots 16 --epochs 30 --lr 3e-3 --option rank=4 --option num_layers=2
	$(BIN)/mmdeploy export --adapter hmmoe --run $(RUN) --format onnx
	$(BIN)/mmdeploy verify $(RUN)
	$(BIN)/python -m mmdeploy.demo_images $(RUN)/demo-images
	$(BIN)/mmdeploy infer $(RUN) $(RUN)/demo-images -o $(RUN)/predictions.jsonl --overwrite
	$(BIN)/mmdeploy info $(RUN)

bench: $(BIN)/mmdeploy
	$(BIN)/python benchmarks/onnx_vs_eager.py $(RUN) --batch 1,32

lint: $(BIN)/mmdeploy
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs build dist *.egg-info
