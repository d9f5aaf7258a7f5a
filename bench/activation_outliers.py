"""Do a few tokens with huge activations (attention sinks, "massive activations") dominate the quantisation error?

For SmolLM2 on 4 x 512 tokens of the shipped mixed calibration text: per linear input of every fifth layer, the
median token norm, the largest token norms and their positions, the tokens above 20x the median, and the share of
round-to-nearest's squared output error (w4, group 64) that position 0 and those tokens carry. CPU, ~15 s.
Usage: python -P bench/activation_outliers.py [--model smollm2-135m] > bench/results/activation_outliers.txt
"""

import argparse

import torch

from awq_edge.quant import QConfig, fake_quantize
from awq_edge.quantizer import calib
from awq_edge.quantizer.source import load_float_model, resolve_model_dir


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="a builtin model name or a Hugging Face folder")
    args = ap.parse_args(argv)
    model, tok = load_float_model(resolve_model_dir(args.model))
    model.eval()
    ids = calib.calibration_blocks(tok, calib.MIXED, 4, 512)
    layers = model.model.layers
    seen = {}
    for i in range(0, len(layers), 5):
        for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            layers[i].get_submodule(n).register_forward_hook(
                lambda m, inp, out, key=f"{i}.{n}": seen.__setitem__(key, inp[0].float()))
    model(ids)
    cfg = QConfig(4, 64, True)
    print("linear input | median token norm | largest norms (positions) | tokens > 20x median | "
          "RTN error share: position 0, tokens > 20x median")
    for key, x in seen.items():
        norms = x.norm(dim=-1)
        med = norms.median()
        top = norms.flatten().topk(4)
        w = layers[int(key.split(".")[0])].get_submodule(key.split(".", 1)[1]).weight.float()
        err = (x @ (fake_quantize(w, cfg) - w).t()).pow(2).sum(-1)
        big = norms > 20 * med
        print(f"{key} | {med:.2f} | {', '.join(f'{v:.1f} ({int(p) % 512})' for v, p in zip(top.values, top.indices))} | "
              f"{int(big.sum())}/{big.numel()} | {err[:, 0].sum() / err.sum():.3f}, {err[big].sum() / err.sum():.3f}")


if __name__ == "__main__":
    main()
