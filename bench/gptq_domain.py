"""GPTQ's per-linear error on the text its Hessian came from and on another text, against round-to-nearest.

For a few SmolLM2 linears: inputs recorded on 24 x 512 tokens of the shipped mixed calibration text and of
WikiText-2 valid; a Hessian from two thirds of one text; the relative output error ||x W_q - x W||^2 / ||x W||^2
on the last third of each text, for RTN and for GPTQ at dampening 0.01 and 0.1 (w4 g64). CPU, about a minute.
Usage: python -P bench/gptq_domain.py [--model M] [--linears A,B] [--wikitext DIR] > bench/results/gptq_domain.txt
"""

import argparse
from pathlib import Path

import torch

from awq_edge.quant import QConfig, dequantize, quantize
from awq_edge.quantizer import calib
from awq_edge.quantizer.gptq import HessianAccumulator, gptq_quantize
from awq_edge.quantizer.source import load_float_model, resolve_model_dir

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["model.layers.3.self_attn.q_proj", "model.layers.10.mlp.gate_proj", "model.layers.10.mlp.down_proj",
         "model.layers.20.self_attn.o_proj", "model.layers.25.mlp.down_proj"]


@torch.no_grad()
def record_inputs(model, names: list, texts: dict) -> dict:
    """text key -> linear name -> its inputs [blocks, seqlen, in] over that text's token blocks."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0])) for n in names]
    inputs = {}
    for key, ids in texts.items():
        seen.update({n: [] for n in names})
        for b in ids.split(8):
            model(b)
        inputs[key] = {n: torch.cat(seen[n]) for n in names}
    for h in hooks:
        h.remove()
    return inputs


def error(x, w, wq):
    ref = x @ w.t()
    return ((x @ wq.t() - ref).pow(2).sum() / ref.pow(2).sum()).item()


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="a builtin model name or a Hugging Face folder")
    ap.add_argument("--linears", default=",".join(NAMES), help="comma-separated linear names (default: %(default)s)")
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    args = ap.parse_args(argv)
    names = [n for n in args.linears.split(",") if n]
    model, tok = load_float_model(resolve_model_dir(args.model))
    model.eval()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [n for n in names if n not in linears]
    if unknown:
        ap.error(f"--linears: {', '.join(unknown)} not a linear of {args.model}")
    if not names or len(set(names)) < len(names):
        ap.error(f"--linears {args.linears!r}: give each linear once")
    texts = {"mixed": calib.calibration_blocks(tok, calib.MIXED, 24, 512),
             "wiki": calib.calibration_blocks(tok, str(Path(args.wikitext) / "valid.txt"), 24, 512)}
    inputs = {key: {n: x.flatten(0, 1) for n, x in per.items()}
              for key, per in record_inputs(model, names, texts).items()}
    cfg = QConfig(4, 64, True)
    print("relative output error on the held-out third of each text (w4 g64)")
    for n in names:
        w = model.get_submodule(n).weight.float()
        xm, xw = inputs["mixed"][n], inputs["wiki"][n]
        cut = xm.shape[0] * 2 // 3
        rows = {"rtn": dequantize(*quantize(w, cfg), cfg.group_size)}
        for src, x in (("mixed", xm[:cut]), ("wiki", xw[:cut])):
            h = HessianAccumulator()
            h.add(x)
            for damp in (0.01, 0.1):
                rows[f"gptq, H from {src}, damp {damp}"] = dequantize(*gptq_quantize(w, h.hessian, cfg, damp=damp),
                                                                       cfg.group_size)
        print(n)
        for k, wq in rows.items():
            print(f"  {k:28s} mixed {error(xm[cut:], w, wq):.5f}  wikitext {error(xw[cut:], w, wq):.5f}")


if __name__ == "__main__":
    main()
