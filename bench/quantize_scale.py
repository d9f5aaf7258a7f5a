"""Time and peak memory of `awq-edge quantize` at 7B/8B shapes (random fp16 weights) and on real SmolLM2.

Each model goes through the CLI a user types, default settings (AWQ, 128 x 512
mixed calibration, group size picked automatically), from a safetensors folder
to a saved checkpoint. The per-phase lines the CLI prints (wall time, peak GPU
memory allocated, the CLI's own peak RSS from /proc VmHWM) are collected.
Writes bench/results/quantize_scale.json.
Usage: python -P bench/quantize_scale.py --tokenizer DIR --work DIR [--models llama2-7b,llama3-8b]
       [--smollm2 DIR --wikitext DIR]
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # vocab: the tokenizer is SmolLM2's (ids < 49152); Llama-3's 128256 is kept for its embedding's size.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=49152, rope_theta=10000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # For the tests (tests/test_bench_scripts.py, and bench/export_scale.py's): seconds on a CPU, group size 128.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, rope_theta=10000.0),
}


def write_random_model(name: str, folder: Path, tokenizer: Path, layers: int | None = None,
                       shape: dict | None = None) -> None:
    """A Llama folder with random fp16 weights (std 0.02, norms 1), one shard per 4 layers, and the tokenizer.
    layers: fewer decoder layers than the model has (a quick profile of the layer loop); shape: the config's sizes
    where the name is not one of SHAPES."""
    if (folder / "config.json").is_file():
        return
    from transformers import LlamaConfig

    shape = dict(shape or SHAPES[name], **({"num_hidden_layers": layers} if layers else {}))
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="float16",
                         bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(dev).manual_seed(0)

    def rand(*s):
        return (torch.randn(*s, generator=g, device=dev, dtype=torch.float16) * 0.02).cpu()

    shards, weight_map = [], {}
    outside = {"model.embed_tokens.weight": rand(shape["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.float16),
               "lm_head.weight": rand(shape["vocab_size"], h)}
    shards.append(outside)
    for first in range(0, shape["num_hidden_layers"], 4):
        part = {}
        for i in range(first, min(first + 4, shape["num_hidden_layers"])):
            p = f"model.layers.{i}."
            part.update({p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                         p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
                         p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                         p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                         p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                         p + "mlp.down_proj.weight": rand(h, inter)})
        shards.append(part)
    n = len(shards)
    for k, part in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(part, tmp / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(folder)


def run_cli(args: list, log: Path) -> dict:
    """Run `awq-edge ARGS`, keep its output, and parse the per-phase lines and the summary."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "awq_edge.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"awq-edge {' '.join(args)} failed ({proc.returncode}):\n{text[-3000:]}")
    phases = [{"phase": m[0], "seconds": float(m[1]), "peak_gpu_gib": float(m[2]) if m[2] else None,
               "peak_rss_gib_so_far": float(m[3])}
              for m in re.findall(r"^\[(\w+)\] ([\d.]+) s(?:, peak GPU ([\d.]+) GiB)?, peak RSS so far ([\d.]+) GiB",
                                  text, re.M)]
    steps = re.search(r"^layer loop: (.*)$", text, re.M)
    return {"command": "awq-edge " + " ".join(args), "wall_seconds": round(wall, 1), "phases": phases,
            "layer_steps": steps[1] if steps else None,
            "peak_gpu_gib": max((p["peak_gpu_gib"] or 0 for p in phases), default=None),
            "peak_rss_gib": max((p["peak_rss_gib_so_far"] for p in phases), default=None),
            "log_tail": [line for line in text.replace("\r", "\n").splitlines() if line.strip()
                         and "it/s" not in line and "layer/s" not in line][-8:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="llama2-7b,llama3-8b", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokenizer", required=True, help="folder with the tokenizer files to put beside the weights")
    ap.add_argument("--work", required=True, help="scratch folder for the random models and checkpoints")
    ap.add_argument("--smollm2", help="SmolLM2 float folder: also quantise it and evaluate its perplexity")
    ap.add_argument("--wikitext", help="folder with WikiText-2 test.txt, for --smollm2")
    ap.add_argument("--quantize-args", default="", help="extra arguments for every quantize run")
    ap.add_argument("--layers", type=int, help="write the random models with this many layers (a quick profile)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize_scale.json"))
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if unknown := [m for m in models if m not in SHAPES]:
        ap.error(f"--models: unknown {', '.join(unknown)}; use a comma list of {', '.join(SHAPES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
               "python": platform.python_version(), "command": " ".join(["python"] + sys.argv)}
        out.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")

    extra = args.quantize_args.split()
    for name in models:
        folder = work / (name if not args.layers else f"{name}-{args.layers}layers")
        t0 = time.perf_counter()
        # In a child process, so this one never holds the weights (the CLI's RSS is its own either way), with the
        # repository on its path: this file is bench.quantize_scale there.
        subprocess.run([sys.executable, "-c", "from pathlib import Path; from bench.quantize_scale import "
                        f"write_random_model; write_random_model({name!r}, Path({str(folder)!r}), "
                        f"Path({args.tokenizer!r}), {args.layers})"],
                       check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"{name}: random fp16 folder ready in {time.perf_counter() - t0:.0f} s", flush=True)
        row = {"model": folder.name, "weights": "random fp16", **run_cli(
            ["quantize", str(folder), "-o", str(work / f"{folder.name}-q"), *extra], work / f"{folder.name}.log")}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        shutil.rmtree(work / f"{folder.name}-q", ignore_errors=True)
        save()
    if args.smollm2:
        ck = work / "smollm2-awq"
        row = {"model": "smollm2-135m", "weights": "real", **run_cli(
            ["quantize", args.smollm2, "-o", str(ck), *extra], work / "smollm2.log")}
        if args.wikitext:
            ev = subprocess.run([sys.executable, "-m", "awq_edge.cli", "eval", str(ck), "--text",
                                 str(Path(args.wikitext) / "test.txt"), "--max-tokens", "65536", "--json"],
                                capture_output=True, text=True, cwd=ROOT)
            row["eval"] = json.loads(ev.stdout.strip().splitlines()[-1]) if ev.returncode == 0 else ev.stderr[-2000:]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
