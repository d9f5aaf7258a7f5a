"""TensorRT backend: an `awq-edge build` engine (and its plugin) as a batch-1 decoder with OrtDecoder's interface."""

import importlib
from pathlib import Path

import numpy as np

from awq_edge.engine.manifest import ENGINE_FILE, read_manifest
from awq_edge.errors import AwqEdgeError
from awq_edge.export.folder import read_genai_config
from awq_edge.runtime.decoder import PrefixCachedDecoder


def profile_for(manifest: dict, n_new: int) -> int:
    """Index of the optimisation profile for a step: decode for one new token, prefill otherwise."""
    names = [p["name"] for p in manifest["optimization_profiles"]]
    return names.index("decode" if n_new == 1 else "prefill")


def prefill_chunks(manifest: dict, n_past: int, n_new: int) -> list:
    """Split n_new prompt tokens into the lengths the prefill profile accepts after n_past cached ones."""
    shapes = manifest["optimization_profiles"][profile_for(manifest, 2)]["shapes"]
    max_chunk = shapes["input_ids"][2][1]
    max_past = shapes["past_key_values.0.key"][2][2]
    chunks, past = [], n_past
    while n_new > 0:
        if past > max_past:
            raise AwqEdgeError(f"a prompt chunk after {past} cached tokens exceeds the engine's prefill profile "
                               f"(at most {max_past})", "shorten the prompt, or rebuild with a smaller prefill_tokens")
        step = min(n_new, max_chunk)
        chunks.append(step)
        past, n_new = past + step, n_new - step
    return chunks


class TrtDecoder(PrefixCachedDecoder):
    """Batch-1 decoder over an engine folder; `tokens` are the ids its KV cache holds."""

    def __init__(self, engine_dir, onnx_dir=None, plugin_library=None):
        import torch

        self.torch = torch
        self.engine_dir = Path(engine_dir)
        self.manifest = read_manifest(self.engine_dir)
        module = self.manifest["tensorrt"]["module"]
        try:
            trt = importlib.import_module(module)
        except ImportError:
            raise AwqEdgeError(f"this engine needs the Python module `{module}`, which is not importable here",
                               "run it on the device it was built for (see docs/deploying-to-jetson.md)")
        if not torch.cuda.is_available():
            raise AwqEdgeError("the TensorRT backend needs a CUDA GPU and a CUDA build of torch", "run it on the device")
        self.config = read_genai_config(Path(onnx_dir or self.manifest["model"]["onnx_dir"]))
        if self.manifest["plugin_library"]:
            plugin = Path(plugin_library or self.engine_dir / self.manifest["plugin_library"])
            if not plugin.is_file():
                raise AwqEdgeError(f"the engine uses plugin library {plugin}, which does not exist",
                                   "pass plugin_library= the libawq_edge_trt_plugin.so it was built with")
            trt.get_plugin_registry().load_library(str(plugin))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine((self.engine_dir / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise AwqEdgeError(f"TensorRT could not load {self.engine_dir / ENGINE_FILE} (its messages are above)",
                               "rebuild the engine with this TensorRT version on this GPU")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        dtypes = {trt.DataType.HALF: torch.float16, trt.DataType.FLOAT: torch.float32,
                  trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
        self.dtype = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        kv = self.manifest["kv_cache"]
        self.kv_shape = (1, kv["kv_heads"], 0, kv["head_dim"])
        self.kv_names = [f"past_key_values.{i}.{k}" for i in range(kv["layers"]) for k in ("key", "value")]
        self.context_length = kv["max_seq_len"]
        self.eos_ids = set(np.atleast_1d(self.config["model"]["eos_token_id"]).tolist())
        self.profile = None
        self.reset()

    def reset(self):
        self.cache = [self.torch.empty(self.kv_shape, dtype=self.dtype[n], device="cuda") for n in self.kv_names]
        self.tokens = []

    def _bind(self, name, tensor):
        # TensorRT wants a real address even for an empty tensor (the first step's zero-length cache).
        if tensor.numel() == 0:
            tensor = self.torch.empty(1, dtype=tensor.dtype, device="cuda")
        self.context.set_tensor_address(name, tensor.data_ptr())

    def _step(self, ids) -> "np.ndarray":
        torch = self.torch
        past, total = len(self.tokens), len(self.tokens) + len(ids)
        profile = profile_for(self.manifest, len(ids))
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        feed = {"input_ids": torch.tensor([ids], dtype=torch.int64),
                "attention_mask": torch.ones((1, total), dtype=torch.int64),
                "position_ids": torch.arange(past, total, dtype=torch.int64)[None]}
        feed = {n: t.to("cuda", self.dtype[n]) for n, t in feed.items() if n in self.inputs}
        feed.update(zip(self.kv_names, self.cache))
        for name, tensor in feed.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self._bind(name, tensor)
        out = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtype[n], device="cuda")
               for n in self.outputs}
        for name, tensor in out.items():
            self._bind(name, tensor)
        torch.cuda.current_stream().synchronize()  # the feed copies ran on torch's stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise AwqEdgeError("TensorRT failed to run the engine (its messages are above)", "rebuild the engine")
        self.stream.synchronize()
        self.cache = [out[n.replace("past_key_values", "present")] for n in self.kv_names]
        self.tokens.extend(ids)
        return out["logits"][0].float().cpu().numpy()

    def forward(self, ids, last_only: bool = False) -> np.ndarray:
        """Run new token ids after the cached ones, in prefill chunks the engine takes; float32 logits [len(ids), vocab]
        (every position; last_only is accepted for the common decoder interface)."""
        ids = [int(i) for i in ids]
        if len(self.tokens) + len(ids) > self.context_length:
            raise AwqEdgeError(f"{len(self.tokens) + len(ids)} tokens exceed the engine's context of "
                               f"{self.context_length}", "shorten the prompt or lower --max-new-tokens")
        if len(ids) == 1:
            return self._step(ids)
        logits, start = [], 0
        for n in prefill_chunks(self.manifest, len(self.tokens), len(ids)):
            logits.append(self._step(ids[start:start + n]))
            start += n
        return np.concatenate(logits)
