"""Stage 4, run a model: api (awq_edge.load, Model), cli (`generate`, `chat`), the backends (ort: an ONNX folder on
onnxruntime; cuda: a checkpoint on awq-edge's kernels through the ctypes binding in kernels; trt: an engine folder),
sampling and streaming generation."""
