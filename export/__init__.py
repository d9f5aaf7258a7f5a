"""ONNX lowering of quantised checkpoints: MatMulNBits decoders with KV cache for onnxruntime and TensorRT."""
