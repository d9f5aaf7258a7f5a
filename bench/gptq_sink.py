"""Where GPTQ's error goes: the first token of each sequence (the attention sink) against the rest.

SmolLM2, the seven linears of one layer (default 18, where GPTQ's layer error on WikiText-2 valid is three times
RTN's in bench/results/history/quality.md): inputs recorded on 24 x 512 tokens of the shipped mixed text (Hessian from
the first 18 blocks) and 8 x 512 of WikiText-2 valid; per linear the relative output error at position 0 of each
block, at positions 1-3 and at the rest, for RTN, for GPTQ, and for GPTQ whose Hessian counts each block's first
token as if it were a tenth of the block ("sink x51"). w4 g64, dampening 0.1. CPU, about a minute.
Usage: python -P bench/gptq_sink.py [--model smollm2-135m] [--layer 18] [--wikitext DIR] > bench/results/gptq_sink.txt
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ off sys.path (a script run without -P puts it first, and its files would shadow packages: transformers
# imports `kernels`), the repository on it: siblings come as bench.NAME.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from awq_edge.quant import QConfig, dequantize, quantize  # noqa: E402
from awq_edge.quantizer import calib  # noqa: E402
from awq_edge.quantizer.gptq import HessianAccumulator, gptq_quantize  # noqa: E402
from awq_edge.quantizer.source import load_float_model, resolve_model_dir  # noqa: E402
from bench.gptq_domain import record_inputs  # noqa: E402
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
SEQLEN = 512


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="a builtin model name or a Hugging Face folder")
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    args = ap.parse_args(argv)
    model, tok = load_float_model(resolve_model_dir(args.model))
    model.eval()
    if not 0 <= args.layer < len(model.model.layers):
        ap.error(f"--layer {args.layer}: {args.model} has layers 0 to {len(model.model.layers) - 1}")
    texts = {"mixed": calib.calibration_blocks(tok, calib.MIXED, 24, SEQLEN),
             "wiki": calib.calibration_blocks(tok, str(Path(args.wikitext) / "valid.txt"), 8, SEQLEN)}
    names = [f"model.layers.{args.layer}.{n}" for n in LINEARS]
    inputs = record_inputs(model, names, texts)  # blocks, SEQLEN, in
    cfg = QConfig(4, 64, True)
    print(f"layer {args.layer}: relative output error on WikiText-2 valid at each block's position 0 | 1-3 | rest")
    for n in names:
        w = model.get_submodule(n).weight.float()
        calib_x, wiki_x = inputs["mixed"][n][:18], inputs["wiki"][n]
        plain, sink = HessianAccumulator(), HessianAccumulator()
        plain.add(calib_x)
        sink.add(calib_x)
        for _ in range(SEQLEN // 10):  # the first tokens again, ~51 times: a tenth of the Hessian's weight
            sink.add(calib_x[:, 0])
        rows = {"rtn": dequantize(*quantize(w, cfg), cfg.group_size),
                "gptq": dequantize(*gptq_quantize(w, plain.hessian, cfg), cfg.group_size),
                "gptq, sink x51": dequantize(*gptq_quantize(w, sink.hessian, cfg), cfg.group_size)}
        ref = wiki_x @ w.t()
        for label, wq in rows.items():
            e = (wiki_x @ wq.t() - ref).pow(2).sum(-1) / ref.pow(2).sum(-1)
            print(f"  {n.split('.', 3)[-1]:17s} {label:15s} {e[:, 0].mean():.4f} | {e[:, 1:4].mean():.4f} | "
                  f"{e[:, 4:].mean():.5f}")


if __name__ == "__main__":
    main()
