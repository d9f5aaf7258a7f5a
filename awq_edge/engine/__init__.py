"""Stage 3, ONNX folder -> TensorRT engine folder: device profiles, the graph checks and shapes (plan), the engine
folder's format (manifest), the TensorRT build and its CLI (`build`, `devices`)."""
