# The two set-up commands (README): `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A torch >= 2.6 of your choice; this pin is the CPU build that this project's machines carry offline.
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/default

.PHONY: install train test bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml CMakeLists.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q scikit-build-core pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

# Main job: pretrain a small model on the embedded corpus (this interpreter's standard library), then sample.
train: install
	$(VENV)/bin/fastllm train --out=$(RUN_DIR)
	$(VENV)/bin/fastllm generate --checkpoint=$(RUN_DIR) --prompt="def " --max-new-tokens=200

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,ops

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build $(VENV) .pytest_cache .benchmarks
