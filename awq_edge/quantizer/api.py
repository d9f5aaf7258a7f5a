"""The quantiser's Python API, on which `awq-edge quantize` is built: quantize() -> QuantizedModel.save()/.export().

The argument rules (device, group size, bit width) live here and the CLI calls them, so the API refuses what the
CLI refuses, before any work."""

import math
import re
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from awq_edge.arch import get_adapter
from awq_edge.checkpoint.hf_folder import load_config, load_tokenizer
from awq_edge.checkpoint.writer import (
    CheckpointWriter,
    awq_config,
    check_awq_shapes,
    check_checkpoint_output,
    save_quantized,
)
from awq_edge.errors import AwqEdgeError
from awq_edge.outputs import replace_dir, temp_dir
from awq_edge.quant import GROUP_SIZES, QConfig, check_group_size
from awq_edge.quantizer import calib
from awq_edge.quantizer.layer_loader import FileModel
from awq_edge.quantizer.layerwise import METHODS, default_method, quantize_layers, quantize_model
from awq_edge.quantizer.source import load_float_model, resolve_model_dir

GPU_SAMPLES, CPU_SAMPLES = 128, 16


def check_device(name) -> str:
    """The device rule of the API and the CLI, checked without touching a GPU: auto, cpu, cuda or cuda:N."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise AwqEdgeError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N", "use --device auto, cpu or cuda")
    return name


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(*, method=None, w_bit=4, group_size=None, zero_point=True, calib_source=None, n_samples=None,
                  seqlen=512, keep_8bit=0, sensitivity=False, device="auto", max_gpu_memory=None) -> None:
    """The quantiser's options, each checked for type and range before any work: the API and the CLI refuse the
    same values with the same line (the CLI's flags name them)."""
    if method is not None and method not in METHODS:
        raise AwqEdgeError(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    if not _int(w_bit) or w_bit != 4:
        raise AwqEdgeError(f"--w-bit {w_bit!r}: the AutoAWQ checkpoint holds 4-bit weights only",
                           "use --w-bit 4 (other widths are evaluated by bench/quality.py)")
    if group_size is not None:
        check_group_size(group_size)
    for name, value in (("zero_point", zero_point), ("sensitivity", sensitivity)):
        if not isinstance(value, bool):
            raise AwqEdgeError(f"{name} {value!r} is not True or False", f"pass {name}=True or {name}=False")
    if calib_source is not None and (not isinstance(calib_source, (str, Path)) or not str(calib_source)):
        raise AwqEdgeError(f"calibration source {calib_source!r} is neither a source name nor a file",
                           f"use --calib with {calib.SOURCES_HELP}")
    if n_samples is not None and not (_int(n_samples) and n_samples >= 1):
        raise AwqEdgeError(f"--n-samples {n_samples!r}: calibration needs at least one sample", "use --n-samples >= 1")
    if not (_int(seqlen) and 2 <= seqlen <= 2**20):
        raise AwqEdgeError(f"--seqlen {seqlen!r}: a calibration block needs at least 2 tokens (and at most 1048576)",
                           "use --seqlen >= 2 (512, the default, is AWQ's)")
    if not (_int(keep_8bit) and keep_8bit >= 0):
        raise AwqEdgeError(f"--keep-8bit {keep_8bit!r} is negative or not a whole number", "use --keep-8bit 0 or more")
    check_device(device)
    gib = max_gpu_memory
    if gib is not None and not (isinstance(gib, (int, float)) and not isinstance(gib, bool) and math.isfinite(gib)
                                and gib > 0):
        raise AwqEdgeError(f"--max-gpu-memory {gib!r} is not a finite number of GiB > 0",
                           "use e.g. --max-gpu-memory 20, or leave it out (90% of what is free)")


def pick_device(name: str) -> str:
    """The device to run on: check_device's rule, then whether torch sees the GPU asked for."""
    if check_device(name) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AwqEdgeError(f"--device {name} asked for, but torch sees no CUDA GPU",
                           "use --device cpu, or install a CUDA build of torch")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise AwqEdgeError(f"--device {name} asked for, but torch sees {torch.cuda.device_count()} GPU(s)",
                           "use --device cuda (the first GPU) or an index torch sees")
    return name


def pick_group_size(shapes: dict) -> int:
    """The largest of 128, 64, 32 that divides every quantised linear's input width."""
    for g in GROUP_SIZES:
        if all(in_f % g == 0 for _, in_f in shapes.values()):
            return g
    odd = next(f"{n} ({in_f})" for n, (_, in_f) in shapes.items() if in_f % 32)
    raise AwqEdgeError(f"no group size of {GROUP_SIZES} divides every linear's input width, e.g. {odd}",
                       "pass --group-size with a power of two of at least 16 that divides them")


def linear_shapes(layers, prefix: str) -> dict:
    return {f"{prefix}.{i}.{n}": (m.out_features, m.in_features)
            for i, layer in enumerate(layers) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def peak_rss_gib() -> float:
    """This process's peak resident memory; VmHWM starts afresh at exec, where ru_maxrss keeps the parent's."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Phases:
    """Wall time, peak GPU memory allocated and peak host RSS of each phase, printed as it ends."""

    def __init__(self, device: str, log=print):
        self.device, self.log, self.rows = device, log, []

    @contextmanager
    def __call__(self, name: str):
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        row = {"phase": name, "seconds": round(time.perf_counter() - t0, 1),
               "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               "peak_rss_gib": round(peak_rss_gib(), 2)}
        self.rows.append(row)
        gpu = f", peak GPU {row['peak_gpu_gib']:.2f} GiB" if cuda else ""
        self.log(f"[{name}] {row['seconds']} s{gpu}, peak RSS so far {row['peak_rss_gib']:.2f} GiB")

    def summary(self) -> str:
        total = sum(r["seconds"] for r in self.rows)
        gpu = max((r["peak_gpu_gib"] or 0 for r in self.rows), default=0)
        rss = max(r["peak_rss_gib"] for r in self.rows)
        return " | ".join(f"{r['phase']} {r['seconds']} s" for r in self.rows) + \
            f" | total {total:.1f} s, peak GPU {gpu:.2f} GiB, peak RSS {rss:.2f} GiB"


class QuantizedModel:
    """A quantised model: a checkpoint folder (AutoAWQ GEMM layout) or, for a model passed in memory, the model."""

    def __init__(self, report: dict, phases: list, path: Path | None = None, temporary: bool = False,
                 model=None, tokenizer=None, result=None, meta=None):
        self.report, self.phases, self.path, self._temporary = report, phases, path, temporary
        self._model, self._tokenizer, self._result, self._meta = model, tokenizer, result, meta

    def save(self, out_dir) -> Path:
        """Write (or move) the AutoAWQ checkpoint folder to out_dir; vLLM, TGI and transformers load it."""
        out_dir = Path(out_dir)
        if self._model is not None:
            self.path = save_quantized(self._model, self._tokenizer, self._result, out_dir, self._meta)
        elif self._temporary:
            tmp = temp_dir(check_checkpoint_output(out_dir))
            shutil.move(str(self.path), tmp / "ck")
            replace_dir(tmp / "ck", out_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(self.path.parent, ignore_errors=True)
            self.path, self._temporary = out_dir, False
        elif self.path.resolve() != out_dir.resolve():
            shutil.copytree(self.path, out_dir, dirs_exist_ok=False)
            self.path = out_dir
        return self.path

    def export(self, out_dir, target: str = "ort", exact: bool = False, **options) -> Path:
        """Lower the checkpoint to an ONNX folder with `awq-edge export`'s defaults (options: ExportOptions fields)."""
        from awq_edge.export.api import export, export_options

        if self.path is None:
            raise AwqEdgeError("this model has not been saved", "call .save(dir) before .export(...)")
        return export(self.path, out_dir, export_options(target, exact, **options))

    def __del__(self):
        if getattr(self, "_temporary", False) and self.path is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)


def quantize(model, *, tokenizer=None, method: str | None = None, w_bit: int = 4, group_size: int | None = None,
             zero_point: bool = True, calib_source: str | None = None, n_samples: int | None = None, seqlen: int = 512,
             keep_8bit: int = 0, sensitivity: bool = False, device: str = "auto",
             max_gpu_memory: float | None = None, output=None, progress: bool = True, log=print) -> QuantizedModel:
    """Quantise a model's decoder linears to 4 bits.

    method None: the best measured at the group size used (layerwise.default_method: awq-gptq at 128, awq
    below). model: a builtin name (`smollm2-135m`), a Hugging Face folder (read layer by
    layer from its safetensors; the whole model is never in memory), or a
    transformers model already loaded (then pass its tokenizer; it is quantised
    in place). group_size None picks the largest of 128, 64, 32 that divides
    every linear. calib_source: 'mixed' (default), 'builtin', 'sampled' or a
    text/.jsonl file. n_samples None: 128 blocks on a GPU (llm-awq's setting),
    16 on a CPU (within 1.6% of 128 on SmolLM2 at g64, bench/results/history/quality.md,
    and an hour less on two cores). sensitivity: calibrate RTN too, to report
    each linear's error. max_gpu_memory (GiB) bounds the layer loop's GPU memory.
    output: write the checkpoint there as the layers finish (the CLI's path);
    otherwise `.save(dir)` writes it later.
    """
    check_options(method=method, w_bit=w_bit, group_size=group_size, zero_point=zero_point, calib_source=calib_source,
                  n_samples=n_samples, seqlen=seqlen, keep_8bit=keep_8bit, sensitivity=sensitivity, device=device,
                  max_gpu_memory=max_gpu_memory)
    device = pick_device(device)
    if n_samples is None:
        n_samples = GPU_SAMPLES if device.startswith("cuda") else CPU_SAMPLES
    source = calib_source or calib.MIXED
    calibrate = method != "rtn" or keep_8bit > 0 or sensitivity
    phases = Phases(device, log)
    budget = int(max_gpu_memory * 2**30) if max_gpu_memory else None
    if budget is None and device.startswith("cuda"):
        budget = int(0.9 * torch.cuda.mem_get_info(torch.device(device))[0])

    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise AwqEdgeError("a model passed in memory needs its tokenizer", "pass tokenizer=...")
        adapter = get_adapter(model.config.model_type)
        shapes = linear_shapes(adapter.layers(model), adapter.layers_path)
        cfg = _config(w_bit, group_size, zero_point, shapes, log)
        method = _method(method, cfg, log)
        with phases("calibration"):
            ids = _calibration(tokenizer, source, n_samples, seqlen, model, device) if calibrate else _no_calibration()
        with phases("layers"):
            result = quantize_model(model, adapter, cfg, method, ids, keep_8bit=keep_8bit, device=device,
                                    progress=progress, budget_bytes=budget)
        meta = _meta(method, cfg, str(getattr(model.config, "_name_or_path", "")), source, calibrate, ids, seqlen,
                     result, phases)
        qm = QuantizedModel(result.report, phases.rows, model=model, tokenizer=tokenizer, result=result, meta=meta)
        if output is not None:
            qm.save(output)
        return qm

    temporary = output is None
    out = Path(tempfile.mkdtemp(prefix="awq-edge-")) / "checkpoint" if temporary else Path(output)
    try:
        # The writer refuses a bad output folder before any work, and removes what it wrote unless committed.
        with CheckpointWriter(out) as writer:
            with phases("load"):
                path = resolve_model_dir(str(model))
                config = load_config(path)
                tokenizer = load_tokenizer(path, config.vocab_size)
                adapter = get_adapter(config.model_type)
                fm = FileModel(path, adapter)
                fm.check_weights()
                shapes = linear_shapes(fm.decoder_layers, adapter.layers_path)
                cfg = _config(w_bit, group_size, zero_point, shapes, log)
                method = _method(method, cfg, log)
                if keep_8bit < 0 or keep_8bit > len(shapes):
                    raise AwqEdgeError(f"keep_8bit {keep_8bit} out of range", f"use 0..{len(shapes)}")
            writer.group_size = cfg.group_size
            with phases("calibration"):
                if calibrate and source == calib.SAMPLED:
                    # Sampling runs the whole model: in fp16 on a GPU (16 GB at 8B), in fp32 on the CPU.
                    dtype = torch.float16 if device.startswith("cuda") else torch.float32
                    float_model, _ = load_float_model(path, dtype)
                    ids = _calibration(tokenizer, source, n_samples, seqlen, float_model, device)
                    del float_model
                else:
                    ids = _calibration(tokenizer, source, n_samples, seqlen, None, device) if calibrate \
                        else _no_calibration()
            log(f"{method} w{cfg.w_bit} g{cfg.group_size} zero_point={cfg.zero_point} on {path} ({len(shapes)} "
                f"linears; calibration: {source if calibrate else 'none'}, {tuple(ids.shape)} tokens) on {device}")
            with phases("layers"):
                result = quantize_layers(fm, cfg, method, ids, keep_8bit=keep_8bit, device=device,
                                         budget_bytes=budget, sink=writer, progress=progress, log=log)
            with phases("save"):
                fm.close()  # the float embeddings are no longer needed: never hold them twice
                for name in fm.outside_names():
                    writer.tensor(name, fm.read(name))
                meta = _meta(method, cfg, str(model), source, calibrate, ids, seqlen, result, phases)
                config = awq_config(fm.config.to_dict(), cfg.group_size, writer.int8, meta)
                writer.commit(config, tokenizer, _generation_config(path), result.head_moments if calibrate else None)
    except BaseException:
        if temporary:
            shutil.rmtree(out.parent, ignore_errors=True)
        raise
    log(f"summary: {phases.summary()}")
    return QuantizedModel(result.report, phases.rows, path=out, temporary=temporary)


def _config(w_bit, group_size, zero_point, shapes, log) -> QConfig:
    if group_size is None:
        group_size = pick_group_size(shapes)
        log(f"group size {group_size}: the largest of {GROUP_SIZES} that divides every linear's input width")
    check_awq_shapes(shapes, group_size)
    return QConfig(w_bit, group_size, zero_point)


def _method(method, cfg, log) -> str:
    if method is None:
        method = default_method(cfg.group_size)
        log(f"method {method}: the default at group size {cfg.group_size}")
    return method


def _calibration(tokenizer, source, n_samples, seqlen, model, device):
    if model is not None:
        model.to(device)
    try:
        return calib.calibration_blocks(tokenizer, source, n_samples, seqlen, model, device)
    finally:
        if model is not None:
            model.to("cpu")


def _no_calibration():
    return torch.zeros(1, 2, dtype=torch.long)  # RTN alone needs only the layers' call arguments


def _generation_config(path: Path):
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None


def _meta(method, cfg, name, source, calibrate, ids, seqlen, result, phases) -> dict:
    return {"method": method, "group_size": cfg.group_size, "symmetric": not cfg.zero_point, "source_model": name,
            "calibration": source if calibrate else None, "n_samples": int(ids.shape[0]) if calibrate else 0,
            "seqlen": seqlen, "quantize_seconds": result.report["seconds"],
            "n_held_out": result.report["n_held_out"],
            "scales_kept": f"{result.report['scales_kept']}/{result.report['scale_groups']}",
            "clip_kept": "{}/{}".format(*result.report["clip_kept"])}
