"""What one Llama-3-8B layer's quantisation steps cost on a GPU, measured one by one (the layer loop's profile).

- GPTQ rounding of each linear group (q/k/v stacked, o, gate/up stacked, down), the fused Triton column loop
  against the PyTorch loop, and whether they agree;
- one AWQ scale candidate's fake quantisation (done 20 x chunks times per group in the search).
Random weights and a Hessian from random correlated activations; CUDA events after a warm-up.
Writes bench/results/layer_costs.json.
Usage: python -P bench/layer_costs.py [--out FILE]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from awq_edge.quant import QConfig, fake_quantize
from awq_edge.quantizer.gptq import gptq_quantize

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"q/k/v": (4096 + 2 * 1024, 4096), "o": (4096, 4096), "gate/up": (2 * 14336, 4096), "down": (4096, 14336)}


def timed(fn, repeats=1):
    fn()  # warm-up (Triton compiles here)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "layer_costs.json"))
    ap.add_argument("--loop", action="store_true", help="also time the PyTorch column loop (about 10 s)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # as the layer loop runs
    cfg = QConfig(4, 128, True)
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for name, (out_f, in_f) in GROUPS.items():
        w = torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02
        x = torch.randn(4096, in_f, device="cuda", generator=g) @ (
            torch.randn(in_f, in_f, device="cuda", generator=g) / in_f**0.5)
        H = 2 / x.shape[0] * x.t() @ x
        del x
        row = {"group": name, "shape": [out_f, in_f]}
        row["gptq_fused_s"], fused = timed(lambda: gptq_quantize(w, H, cfg, fused=True))
        if args.loop:
            row["gptq_loop_s"], loop = timed(lambda: gptq_quantize(w, H, cfg, fused=False))
            row["q_equal_fraction"] = (fused[0] == loop[0]).float().mean().item()
            row["scales_equal"] = bool(torch.equal(fused[1], loop[1]))
        s = torch.rand(in_f, device="cuda", generator=g) + 0.5
        row["candidate_fake_quant_s"], _ = timed(lambda: fake_quantize(w * s, cfg) / s, repeats=10)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: round(sum(r[k] for r in rows), 4) for k in rows[0] if k.endswith("_s")}
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(["python"] + sys.argv)}
    Path(args.out).write_text(json.dumps({"env": env, "rows": rows, "per_layer": total}, indent=2) + "\n")
    print("per layer:", total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
