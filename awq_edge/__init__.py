"""awq-edge: AWQ 4-bit quantisation and edge deployment for Hugging Face causal LMs.

The Python API, the same one the `awq-edge` command runs on:

    import awq_edge
    q = awq_edge.quantize("smollm2-135m")          # AWQ int4; group size 128 where it fits, else 64 or 32
    q.save("smol-awq")                              # an AutoAWQ GEMM checkpoint (vLLM, TGI, transformers)
    q.export("smol-onnx")                           # ONNX for onnxruntime(-genai)
    model = awq_edge.load("smol-onnx")              # backend="ort" (provider "cpu"/"cuda"), "cuda" or "trt"
    model.generate("What is the capital of France?")
    model.stream("Tell me a story.")                # an iterator of text pieces
    model.chat([{"role": "user", "content": "Hi!"}])

Imports are lazy: `import awq_edge` loads neither torch nor onnxruntime.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_API = {"load": "awq_edge.runtime.api", "Model": "awq_edge.runtime.api", "AwqEdgeError": "awq_edge.errors",
        "quantize": "awq_edge.quantizer.api", "QuantizedModel": "awq_edge.quantizer.api"}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'awq_edge' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
