"""Time and peak host memory of `awq-edge export` at 7B/8B shapes, for every target, and a decode check of each.

The checkpoint is an AutoAWQ GEMM folder of random integers at the model's shapes (random weights are enough for
time and memory): asymmetric for the default, --exact and --target trt exports, symmetric (every zero point 8) for
--trt-native, with head statistics as `awq-edge quantize` stores them. Each export runs in its own process through
the CLI a user types; its peak RSS is the child's. Each exported folder then decodes a few tokens on onnxruntime's
CPU provider (an --target ort folder only; the trt ones need TensorRT): the logits of one prompt fed at once must
equal those of the same tokens fed one at a time through the KV cache, and be finite.
Writes bench/results/export_scale.json (fields model, target, wall_s, peak_rss_gib per row).
Usage: python -P bench/export_scale.py --work DIR [--models llama2-7b,llama3-8b] [--targets ...]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ off sys.path (a script run without -P puts it first, and its files would shadow packages: transformers
# imports `kernels`), the repository on it: siblings come as bench.NAME.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.quantize_scale import SHAPES  # noqa: E402  (the quantiser benchmark's shapes)
GROUP = 128
# name -> (export flags, symmetric checkpoint)
TARGETS = {
    "ort_default": ([], False),
    "ort_exact": (["--exact"], False),
    "ort_exact_fp16": (["--exact", "--dtype", "fp16"], False),
    "trt_fp16": (["--target", "trt", "--dtype", "fp16"], False),
    "trt_native_fp16": (["--target", "trt", "--dtype", "fp16", "--trt-native"], True),
}


def packed(rows: int, cols: int, gen, value=None) -> torch.Tensor:
    """int32 [rows, cols / 8] of eight random 4-bit values each (or all `value`)."""
    if value is not None:
        return torch.full((rows, cols // 8), int.from_bytes(bytes([value * 17] * 4), "little", signed=True),
                          dtype=torch.int32)
    return torch.randint(-2**31, 2**31, (rows, cols // 8), dtype=torch.int64, generator=gen).to(torch.int32)


def write_checkpoint(name: str, folder: Path, symmetric: bool) -> None:
    """A random AutoAWQ GEMM checkpoint of the shape (group 128), one shard per 4 layers, a byte-level tokenizer."""
    if (folder / "config.json").is_file():
        return
    from transformers import LlamaConfig

    shape = SHAPES[name]
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    gen = torch.Generator().manual_seed(0)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def linear(prefix, out_f, in_f):
        return {f"{prefix}.qweight": packed(in_f, out_f, gen),
                f"{prefix}.qzeros": packed(in_f // GROUP, out_f, gen, value=8 if symmetric else None),
                f"{prefix}.scales": (torch.rand(in_f // GROUP, out_f, generator=gen) * 0.002 + 0.001).half()}

    weight_map, n_shards = {}, 1 + -(-layers // 4)

    def save(k, part):  # one shard at a time: 8B's would otherwise be 6 GB in memory at once
        file = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(part, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))

    save(0, {"model.embed_tokens.weight": (torch.randn(shape["vocab_size"], h, generator=gen) * 0.02).half(),
             "model.norm.weight": torch.ones(h, dtype=torch.float16),
             "lm_head.weight": (torch.randn(shape["vocab_size"], h, generator=gen) * 0.02).half()})
    for first in range(0, layers, 4):
        part = {}
        for i in range(first, min(first + 4, layers)):
            p = f"model.layers.{i}"
            part[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
            part[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
            for n, o, k in (("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                            ("self_attn.o_proj", h, h), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h),
                            ("mlp.down_proj", h, inter)):
                part.update(linear(f"{p}.{n}", o, k))
        save(1 + first // 4, part)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, architectures=["LlamaForCausalLM"]).to_dict()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
                                     "version": "gemm"}
    (tmp / "config.json").write_text(json.dumps(config))
    write_head_stats(tmp, h, gen)
    byte_tokenizer().save_pretrained(tmp)
    tmp.rename(folder)


def write_head_stats(folder: Path, hidden: int, gen: torch.Generator) -> None:
    """Random final-norm statistics where the quantiser would store measured ones (the export's head calibration
    reads them; without, it would run the whole model on the CPU to measure them)."""
    (folder / "awq_edge_head_stats.json").write_text(json.dumps(
        {"final_norm_sq_mean": (torch.rand(hidden, generator=gen) + 0.5).tolist()}))


def byte_tokenizer():
    """A byte-level BPE over the 256 byte symbols: ids below every shape's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i + 3 for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# Runs the command as its child and prints that child's peak RSS (KiB) last: a fresh parent per export, so the
# figure is that export's alone (RUSAGE_CHILDREN keeps the largest child a process ever waited for).
_MEASURE = ("import resource, subprocess, sys\nr = subprocess.run(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(r.returncode)")


def run_export(ck: Path, out: Path, flags: list) -> dict:
    """`awq-edge export` in a child process: wall seconds and its peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "awq_edge.cli", "export", str(ck),
                           "-o", str(out), *flags], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"export {flags} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
            "bytes": sum(f.stat().st_size for f in out.iterdir())}


def decode_check(folder: Path, n: int = 4) -> dict:
    """Prefill logits of n tokens equal the logits of the same tokens fed one at a time, all finite (onnxruntime
    CPU, in a child process so this one never holds the model)."""
    code = f"""
import json, numpy as np
from awq_edge.runtime.ort import OrtDecoder
ids = list(range(5, 5 + {n}))
dec = OrtDecoder({str(folder)!r}, threads=os.cpu_count())
whole = dec.forward(ids)
dec.reset()
steps = np.concatenate([dec.forward([t]) for t in ids])
scale = float(np.abs(whole).max())
print(json.dumps({{"finite": bool(np.isfinite(whole).all() and np.isfinite(steps).all()),
                  "max_rel_diff": float(np.abs(whole - steps).max() / scale), "tokens": {n}}}))
"""
    proc = subprocess.run([sys.executable, "-c", "import os\n" + code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b,llama3-8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    ap.add_argument("--work", required=True, help="scratch folder for the checkpoints and exports")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode check")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_scale.json"))
    args = ap.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def save():
        env = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "command": " ".join(["python", "-P", "bench/export_scale.py", *(
                   argv if argv is not None else sys.argv[1:])])}
        out.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")

    for model in [m for m in args.models.split(",") if m]:
        for target in [t for t in args.targets.split(",") if t]:
            flags, symmetric = TARGETS[target]
            ck = work / f"{model}-{'sym' if symmetric else 'asym'}"
            write_checkpoint(model, ck, symmetric)
            onnx_dir = work / f"{model}-{target}"
            row = {"model": model, "target": target, "flags": flags, **run_export(ck, onnx_dir, flags)}
            if not args.no_decode and "trt" not in target:
                row["decode"] = decode_check(onnx_dir)
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()
            shutil.rmtree(onnx_dir, ignore_errors=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
