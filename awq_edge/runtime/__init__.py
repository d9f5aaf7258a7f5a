"""Run exported ONNX decoders: onnxruntime backend, sampling, streaming generation, chat."""
