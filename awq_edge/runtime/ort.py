"""onnxruntime backend: one decoder session holding its KV cache, fed prefill chunks or single tokens."""

import contextlib
import io
import re
import sys
from functools import cache, partial
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort

from awq_edge.errors import AwqEdgeError
from awq_edge.export.folder import MODEL_FILE, read_export_info, read_genai_config
from awq_edge.runtime.decoder import PrefixCachedDecoder

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# --provider names -> onnxruntime execution providers; "cuda" needs the onnxruntime-gpu wheel (awq-edge[gpu]).
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@cache
def _preload_cuda_libraries() -> None:
    """CUDA and cuDNN from the nvidia-* wheels (PyTorch's) where the system has none: once a process."""
    if hasattr(ort, "preload_dlls"):  # it prints what it could not find; a provider that then fails to start is
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # our error
            ort.preload_dlls()


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
        return True
    except metadata.PackageNotFoundError:
        return False


def execution_providers(provider: str) -> list:
    """onnxruntime's provider list for a --provider name, or one error saying what to install."""
    if provider not in PROVIDERS:
        raise AwqEdgeError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}", "use --provider cpu or cuda")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        has = f"this onnxruntime ({ort.__version__}) has no {name} (it has {', '.join(ort.get_available_providers())})"
        if name == "CUDAExecutionProvider" and _installed("onnxruntime-gpu") and _installed("onnxruntime"):
            # `pip install 'awq-edge[gpu]'` leaves both wheels, and both install the module `onnxruntime`
            raise AwqEdgeError(f"{has}: the CPU wheel onnxruntime hides onnxruntime-gpu, both installed",
                               "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu")
        raise AwqEdgeError(has, "pip install 'awq-edge[gpu]' (onnxruntime-gpu, in place of onnxruntime) on a machine "
                                "with CUDA, or use --provider cpu")
    if name == "CUDAExecutionProvider":
        ort.set_default_logger_severity(4)  # a provider that fails to start is our one-line error, not its log
        _preload_cuda_libraries()
    return [name, "CPUExecutionProvider"] if name != "CPUExecutionProvider" else [name]


def session_options(folder: Path, threads: int = 0) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # onnxruntime fuses int4 DequantizeLinear + MatMul into MatMulNBits with int8
    # activations unless told otherwise; keep the precision the export asked for.
    level = read_export_info(folder).get("accuracy_level", 0)
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return opts


def check_graph(folder: Path, inputs: dict, outputs: dict, n_layers: int, kv_dims: tuple) -> None:
    """Refuse a genai_config.json that does not describe the graph beside it (layers, KV heads, head size): the
    first step would fail inside onnxruntime instead."""
    layers = {int(n.split(".")[1]) for n in inputs if re.fullmatch(r"past_key_values\.\d+\.(key|value)", n)}
    kv = inputs.get("past_key_values.0.key")
    dims = tuple(kv.shape[i] for i in (1, 3)) if kv is not None and len(kv.shape) == 4 else None
    if not {"input_ids", "attention_mask"} <= set(inputs) or "logits" not in outputs:
        problem = "lacks input_ids, attention_mask or logits"
    elif layers != set(range(n_layers)):
        problem = f"takes the KV cache of {len(layers)} layers, and genai_config.json says {n_layers}"
    elif kv is None or kv.type not in _NP:
        problem = f"keeps its KV cache as {getattr(kv, 'type', None)}, not float or float16"
    elif dims is None:
        problem = f"keeps a KV cache of shape {kv.shape}, not (batch, KV heads, length, head size)"
    elif dims != kv_dims and all(isinstance(d, int) for d in dims):
        problem = f"caches (KV heads, head size) {dims}, and genai_config.json says {kv_dims}"
    else:
        return
    raise AwqEdgeError(f"{folder / MODEL_FILE} {problem}", "re-export it with `awq-edge export`")


def _rows(logits: np.ndarray, last_only: bool) -> np.ndarray:
    """float32 logits [n, vocab] of a [1, n, vocab] output, or its last row [1, vocab] with last_only."""
    return (logits[0, -1:] if last_only else logits[0]).astype(np.float32)


def argmax(row: np.ndarray) -> int:
    """np.argmax of a float32 or float16 row [vocab] without converting float16 to float32 (on the 2-core
    machine, a row in cache: 75 us for the float32 copy of SmolLM2's 49,152 logits and its argmax, 14 for this:
    bench/results/ort_host_costs_cpu.json). float16
    bits read as int16 order as the values once a negative value's magnitude bits are flipped; +0 and -0 (keys 0
    and -1) are told apart only where a zero is the largest logit, then the first zero wins, as in float. NaNs
    aside, the same index as np.argmax(row.astype(np.float32))."""
    if row.dtype != np.float16:
        return int(np.argmax(row))
    bits = row.view(np.int16)
    i = int(np.argmax(bits ^ ((bits >> 15) & 0x7FFF)))
    return int(np.argmax(row == 0)) if row[i] == 0 else i


class OrtDecoder(PrefixCachedDecoder):
    """Batch-1 decoder over an exported folder; `tokens` are the ids its cache holds."""

    def __init__(self, folder, threads: int = 0, provider: str = "cpu", config_entries: dict | None = None,
                 profile: str | None = None, provider_options: dict | None = None, bound_inputs: bool = True,
                 fixed_buffers: bool = False, cuda_graph: bool | None = None):
        """config_entries: onnxruntime session config entries on top of session_options' (benchmarks); profile:
        a path prefix for onnxruntime's profile of every run (session.end_profiling() writes it);
        provider_options: options of the provider asked for (benchmarks: e.g. the CUDA provider's
        user_compute_stream); bound_inputs=False: a single step's attention mask is a new host array each step, as
        before (benchmarks: what binding it once saves; with SmolLM2 1.000x on an H100, 0.979x on an H200, in noise).
        fixed_buffers: a single step reads and writes buffers of fixed address and shape where the provider runs
        (the id, a mask as long as the cache with zeros after the held tokens, the logits), rewritten in place;
        cuda_graph: that, replayed as one CUDA graph per cache size (the CUDA provider's enable_cuda_graph, prompts
        run without one). None (the default): on with the CUDA provider wherever the folder allows fixed buffers
        (our GroupQueryAttention exports), off elsewhere; a step onnxruntime cannot capture or replay falls back to
        the same buffers without the graph, said once on stderr. Measured: 1.35x onnxruntime-genai-cuda's tok/s on
        SmolLM2 (H200, bench/results/onnx_gpu.json), 1.16x and 1.14x at the Llama-2-7B and Llama-3-8B shapes (H100,
        onnx_gpu_llama2-7b.json, onnx_gpu_llama3-8b.json) on the same folder, where the steps without the graph ran
        at 0.84x, 0.98x and 0.95x; the same greedy tokens (tests/test_runtime_ort_cuda.py). fixed_buffers alone
        (benchmarks): on the CPU provider the same logits as the default steps."""
        self.folder = Path(folder)
        if cuda_graph and provider != "cuda":
            raise AwqEdgeError("a CUDA graph needs the CUDA provider", "use --provider cuda, or no CUDA graph")
        self.device = "cuda" if provider == "cuda" else "cpu"  # where the KV cache stays between steps
        self.config = read_genai_config(self.folder)
        dec = self.config["model"]["decoder"]
        auto = cuda_graph is None
        if auto:  # the session must be made with the graph on: ask for it where the folder's config may allow it
            cuda_graph = provider == "cuda" and bound_inputs and self._shares_buffer()
        make = partial(self._session, dec["filename"], provider, threads, config_entries, profile, provider_options)
        self.session, cuda_graph = make(cuda_graph, fallback=auto)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.n_layers = dec["num_hidden_layers"]
        self.kv_heads, self.head_dim = dec["num_key_value_heads"], dec["head_size"]
        outputs = {o.name: o for o in self.session.get_outputs()}
        check_graph(self.folder, inputs, outputs, self.n_layers, (self.kv_heads, self.head_dim))
        width = outputs["logits"].shape[-1] if outputs["logits"].shape else None
        self.vocab_size = width if isinstance(width, int) and width > 0 else None  # top-k is clamped to it
        self.kv_names = [f"past_key_values.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        self.output_names = ["logits"] + [f"present.{i}.{kind}" for i in range(self.n_layers) for kind in ("key", "value")]
        self.cache_dtype = _NP[inputs["past_key_values.0.key"].type]
        self.needs_positions = "position_ids" in inputs
        self.eos_ids = set(np.atleast_1d(self.config["model"]["eos_token_id"]).tolist())
        self.context_length = self.config["model"]["context_length"]
        # GroupQueryAttention graphs (genai_config's past_present_share_buffer) read and write one KV buffer per
        # layer in place, bound once: a step binds only its ids, and copies no cache. Other graphs get the
        # growing past -> present tensors of each step.
        # The CUDA provider has no float32 GroupQueryAttention: onnxruntime runs it on the host, on a copy of the
        # buffer, so a float32 graph on the GPU keeps separate past and present tensors.
        self.shared = self._shares_buffer() and not (
            self.device == "cuda" and self.cache_dtype == np.float32)
        self.binding, self.capacity, self.step_logits = None, 0, None
        self.bound_inputs = bound_inputs and self.shared and not self.needs_positions  # (our graphs take none)
        fixed_ok = self.bound_inputs and isinstance(width, int) and width > 0
        if auto and cuda_graph and not fixed_ok:  # (a float32 cache, position ids): the same session without it
            inputs = outputs = self.session = None  # (their node args hold the session: one model in memory at once)
            self.session, cuda_graph = make(False)
            outputs = {o.name: o for o in self.session.get_outputs()}
        self.fixed, self.cuda_graph = fixed_buffers or cuda_graph, cuda_graph
        if self.fixed and not fixed_ok:
            raise AwqEdgeError(f"{self.folder} cannot step through fixed buffers: that needs a shared KV buffer "
                               "(GroupQueryAttention), no position ids and a fixed vocabulary",
                               "re-export it with `awq-edge export`, or step without fixed buffers")
        # With a CUDA graph every run says which graph it is: -1 none (prompts), else one per cache size.
        self.eager, self.graphs = ort.RunOptions(), 0
        if cuda_graph:
            self.eager.add_run_config_entry("gpu_graph_id", "-1")
        if self.shared:  # bound once, for every step
            self.binding = self.session.io_binding()
            self.binding.bind_output("logits", "cpu")  # first: get_outputs() lists the outputs in the order bound
            if self.vocab_size:  # a single token's logits land in one host array, read without get_outputs()
                self.step_logits = np.empty((1, 1, self.vocab_size), _NP.get(outputs["logits"].type, np.float32))
                self.step_logits_value = ort.OrtValue.ortvalue_from_numpy(self.step_logits)
                self.step_ids = np.zeros((1, 1), np.int64)
                self.step_ids_value = ort.OrtValue.ortvalue_from_numpy(self.step_ids)
        self.step_bound = False
        self.reset()

    def _shares_buffer(self) -> bool:
        return self.config.get("search", {}).get("past_present_share_buffer") is True

    def _session(self, filename: str, provider: str, threads: int, config_entries, profile, provider_options,
                 cuda_graph: bool, fallback: bool = False):
        """(the onnxruntime session on the provider asked for, whether its graph capture is on), or one clear error.
        fallback: where onnxruntime cannot make it with graph capture on, make it without."""
        providers = execution_providers(provider)
        name = providers[0]
        if provider_options or cuda_graph:
            extra = {"enable_cuda_graph": "1"} if cuda_graph else {}
            providers = [(name, {**(provider_options or {}), **extra}), *providers[1:]]
        opts = session_options(self.folder, threads)
        for key, value in (config_entries or {}).items():
            opts.add_session_config_entry(key, value)
        if profile:
            opts.enable_profiling, opts.profile_file_prefix = True, profile
        session, cause = None, None
        try:
            session = ort.InferenceSession(str(self.folder / filename), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types; name the file and the cause
            cause = " ".join(str(e).split())  # its messages span lines; ours is one
        if session is None and cuda_graph and fallback:  # (outside the except: the failed load is released)
            return self._session(filename, provider, threads, config_entries, profile, provider_options, False)
        if session is None:
            raise AwqEdgeError(f"onnxruntime cannot load {self.folder}: {cause}", "re-export it with `awq-edge export`")
        if name not in session.get_providers():  # onnxruntime falls back to the CPU without a word
            raise AwqEdgeError(f"onnxruntime could not start its {name} (no usable NVIDIA GPU, or its CUDA 13 "
                               "and cuDNN 9 libraries are missing)",
                               "run on a machine with an NVIDIA GPU and CUDA 13 + cuDNN 9 (system or PyTorch's "
                               "nvidia-* wheels), or use --provider cpu")
        return session, cuda_graph

    def reset(self):
        if self.shared:  # the buffers stay: the attention mask says how much of them holds the cache
            self.tokens = []
            return
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.kv_names]
        self.tokens = []

    def _grow(self, ids: np.ndarray, total: int, last_only: bool) -> np.ndarray:
        """New shared buffers for at least `total` positions (multiples of 1024, doubling, at most the context: the
        cache grows as the conversation does), filled by running the held tokens again with the new ones;
        the new ones' logits."""
        held = self.tokens
        self.capacity = min(self.context_length, max(2 * self.capacity, -(-total // 1024) * 1024))
        shape = (1, self.kv_heads, self.capacity, self.head_dim)
        self.cache = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.cache_dtype), self.device, 0)
                      for _ in self.kv_names]
        self._bind_cache(self.binding)
        if self.bound_inputs:  # where the provider reads it: a step's mask is a view into this (made once, as the
            # cache buffers; the binding's old view is replaced by the run that follows)
            self.mask = ort.OrtValue.ortvalue_from_numpy(np.ones((1, self.capacity), np.int64), self.device, 0)
        if self.fixed:
            self._fix_buffers()
        self.tokens = []
        logits = self.forward(held + ids[0].tolist(), last_only)
        return logits if last_only else logits[len(held):]

    def forward(self, ids, last_only: bool = False) -> np.ndarray:
        """Run new token ids through the model after the cached ones; float32 logits [len(ids), vocab], or of
        the last id only [1, vocab] with last_only (the graph computes every position; converting all of a
        128-token prompt's fp16 rows to float32 takes 12.8 ms on the 2-core machine for SmolLM2's vocabulary, the
        last row 0.1 ms, where the GPU run's time to first token was 14.5 ms against onnxruntime-genai's 3.7)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = len(self.tokens) + ids.shape[1]
        if total > self.context_length:
            raise AwqEdgeError(f"{total} tokens exceed the model's context of {self.context_length}",
                               "shorten the prompt or lower --max-new-tokens")
        if self.shared:
            return self._run_shared(ids, total, last_only)
        feed = self._feed(ids, total)
        feed.update(zip(self.kv_names, self.cache))
        # A binding per step (a bound output already allocated would be reused as the next step's buffer): the
        # cache is written where the next step reads it (on the GPU with --provider cuda, no host round trip per
        # step); only the logits come back to the host.
        binding = self.session.io_binding()
        for name, device in zip(self.output_names, ["cpu"] + [self.device] * len(self.kv_names)):
            binding.bind_output(name, device)
        outs = self._run(binding, feed, total)
        self.cache = outs[1:]
        self.tokens.extend(ids[0].tolist())
        return _rows(outs[0].numpy(), last_only)

    def _feed(self, ids: np.ndarray, total: int) -> dict:
        """New host arrays for the ids, the attention mask over all `total` positions and the ids' positions."""
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, total), np.int64))}
        if self.needs_positions:
            positions = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
            feed["position_ids"] = ort.OrtValue.ortvalue_from_numpy(positions)
        return feed

    def _run_shared(self, ids: np.ndarray, total: int, last_only: bool) -> np.ndarray:
        if total > self.capacity:
            return self._grow(ids, total, last_only)
        if ids.shape[1] == 1 and self.step_logits is not None:
            return _rows(self._step(int(ids[0, 0]), total)[None, None], last_only)
        self.binding.bind_output("logits", "cpu")  # a new host tensor (prompt and step differ in shape), same slot
        self.step_bound = False
        outs = self._run(self.binding, self._feed(ids, total), total)
        self.tokens.extend(ids[0].tolist())
        return _rows(outs[0].numpy(), last_only)

    def _step(self, token: int, total: int) -> np.ndarray:
        """One token through the bound buffers (total <= capacity); its logits row [vocab] as the graph wrote them,
        valid until the next run. Every output is bound to an array of ours, so the step reads no list of all
        2 x layers + 1 outputs back (get_outputs() cost about as much as the rest of the Python around a step), and
        the id is one host array of ours, rewritten in place and bound again."""
        self.step_ids[0, 0] = token
        if self.fixed:
            row = self._fixed_step(total)
        else:
            if not self.step_bound:  # a prompt's run bound its own logits
                self.binding.bind_ortvalue_output("logits", self.step_logits_value)
                self.step_bound = True
            if self.bound_inputs:  # the mask is a view of a buffer where the provider runs
                # The id is bound again each step: binding copies a host value to the device where a node there
                # reads it (the CUDA provider's embedding), so a value bound once keeps feeding what it held then.
                self.binding.bind_ortvalue_input("input_ids", self.step_ids_value)
                self.binding.bind_input("attention_mask", self.device, 0, np.int64, [1, total], self.mask.data_ptr())
                self._run(self.binding, {}, total, outputs=False)
            else:  # new host values each step (the ids' wraps the same array)
                self._run(self.binding, self._feed(self.step_ids, total), total, outputs=False)
            row = self.step_logits[0, 0]
        self.tokens.append(token)
        return row

    def _bind_cache(self, binding):
        """Each layer's shared KV buffer as both its past input and its present output (read and written in place)."""
        for past, present, value in zip(self.kv_names, self.output_names[1:], self.cache):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def _fix_buffers(self):
        """The fixed step's buffers for this cache size, bound once in a binding of their own, and its graph id."""
        self.fixed_mask = np.zeros((1, self.capacity), np.int64)
        self.fixed_logits = ort.OrtValue.ortvalue_from_shape_and_type(
            [1, 1, self.vocab_size], self.step_logits.dtype, self.device, 0)
        binding = self.fixed_binding = self.session.io_binding()
        binding.bind_ortvalue_output("logits", self.fixed_logits)
        self._bind_cache(binding)
        self.fixed_inputs = []  # (value where the provider runs, the host array it mirrors)
        for name, array in (("input_ids", self.step_ids), ("attention_mask", self.fixed_mask)):
            value = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
            binding.bind_ortvalue_input(name, value)
            self.fixed_inputs.append((value, array))
        self.replay = self.eager  # without a graph (on a session with graphs on: id -1)
        if self.cuda_graph:  # a new graph for the new buffers; the last one is not replayed again
            self.replay = ort.RunOptions()
            self.replay.add_run_config_entry("gpu_graph_id", str(self.graphs))
            self.graphs += 1

    def _fixed_step(self, total: int) -> np.ndarray:
        """_step's run through the fixed buffers: the id (step_ids) and the mask rewritten in place (update_inplace
        copies and waits), the logits read back from where the provider wrote them."""
        self.fixed_mask[0, :total] = 1
        self.fixed_mask[0, total:] = 0
        if self.device != "cpu":  # (on the CPU the values are these arrays)
            for value, array in self.fixed_inputs:
                value.update_inplace(array)
        try:
            self._run(self.fixed_binding, {}, total, outputs=False, options=self.replay)
        except AwqEdgeError as e:
            if not self.cuda_graph:
                raise
            # onnxruntime could not capture or replay the step (a build or GPU without it): the same buffers without
            # the graph from here on, said once; a fault of the model itself fails again below
            self._run(self.fixed_binding, {}, total, outputs=False, options=self.eager)
            print(f"awq-edge: stepping without a CUDA graph ({e})", file=sys.stderr, flush=True)
            self.cuda_graph, self.replay = False, self.eager
        return self.fixed_logits.numpy()[0, 0]

    def greedy_tokens(self, token: int, n: int):
        """Feed `token`, then each argmax in turn: yields the n ids that follow (generate's greedy loop). A step
        picks its argmax from the logits as the graph wrote them (argmax: no float32 copy of them)."""
        for _ in range(n):
            total = len(self.tokens) + 1
            if self.step_logits is not None and total <= self.capacity:
                token = argmax(self._step(token, total))
            else:  # the cache grows (or no bound buffers): the general path
                token = argmax(self.forward([token], last_only=True)[-1])
            yield token

    def _run(self, binding, feed: dict, total: int, outputs: bool = True, options=None) -> list | None:
        """Bind feed and run; the outputs as bound, the logits first (outputs=False: none, all were bound to
        values of ours). options: the run's RunOptions (a CUDA graph's id), else no graph."""
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, value)
        try:
            self.session.run_with_iobinding(binding, options or self.eager)
            return binding.get_outputs() if outputs else None
        except Exception as e:  # a graph that does not run as genai_config.json describes it (e.g. its context)
            raise AwqEdgeError(f"onnxruntime failed at token {total} of {self.folder}: {' '.join(str(e).split())}",
                               "re-export it with `awq-edge export`") from None
