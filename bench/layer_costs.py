"""What one Llama-3-8B layer's quantisation steps cost on a GPU, measured one by one (the layer loop's profile);
--shape times another Llama layer's widths instead (the tests use a tiny one).

- GPTQ rounding of each linear group (q/k/v stacked, o, gate/up stacked, down), the fused Triton column loop
  against the PyTorch loop, and whether they agree;
- one AWQ scale candidate's fake quantisation (done 20 x chunks times per group in the search).
Random weights and a Hessian from random correlated activations; CUDA events after a warm-up.
Writes bench/results/layer_costs.json.
Usage: python -P bench/layer_costs.py [--loop] [--shape HIDDEN,INTERMEDIATE,KV_WIDTH] [--out FILE]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from awq_edge.quant import QConfig, fake_quantize
from awq_edge.quantizer.gptq import gptq_quantize

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_8B = "4096,14336,1024"  # hidden, intermediate, k/v width (8 heads of 128)
GROUP = 128


def groups(shape: str) -> dict:
    """HIDDEN,INTERMEDIATE,KV_WIDTH -> {linear group: (out features, in features)} of one Llama layer."""
    try:
        h, inter, kv = (int(v) for v in shape.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shape!r} is not HIDDEN,INTERMEDIATE,KV_WIDTH (e.g. {LLAMA3_8B})") from None
    if min(h, inter, kv) <= 0 or h % GROUP or inter % GROUP:
        raise argparse.ArgumentTypeError(f"{shape!r}: the widths must be positive and HIDDEN and INTERMEDIATE "
                                         f"multiples of the group size {GROUP}")
    return {"q/k/v": (h + 2 * kv, h), "o": (h, h), "gate/up": (2 * inter, h), "down": (h, inter)}


GROUPS = groups(LLAMA3_8B)


def timed(fn, repeats=1):
    fn()  # warm-up (Triton compiles here)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        out = fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "layer_costs.json"))
    ap.add_argument("--loop", action="store_true", help="also time the PyTorch column loop (about 10 s)")
    ap.add_argument("--shape", type=groups, default=GROUPS, metavar="HIDDEN,INTERMEDIATE,KV_WIDTH",
                    help=f"the layer's widths (default: Llama-3-8B's, {LLAMA3_8B})")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/layer_costs.py: needs an NVIDIA GPU with CUDA (it times with CUDA events and runs "
                         "the Triton GPTQ loop)")
    torch.backends.cuda.matmul.allow_tf32 = True  # as the layer loop runs
    cfg = QConfig(4, GROUP, True)
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for name, (out_f, in_f) in args.shape.items():
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
            row["scales_max_rel_diff"] = ((fused[1] - loop[1]).abs() / loop[1].abs()).max().item()
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
