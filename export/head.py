"""Rounding the float lm_head (and the tied embeddings it shares) to 8 or 4 bits for `--head-bits`.

Round-to-nearest takes each group's min and max. With `--head-calib`, each
group's scale (and zero point) is instead searched on a grid so that the
error it leaves in the logits, sum_k E[x_k^2] (w_k - w^_k)^2 over the group,
is least, where x is the final norm's output on calibration text through the
checkpoint's own quantised layers. On SmolLM2-135M a few outlier channels of x
dominate the logits; RTN spends its range on weights those channels barely
read, which is what the search fixes.
"""

import torch

from awq_edge.errors import AwqEdgeError
from awq_edge.quant import dequantize_groups, from_groups, quantize_groups, to_groups

N_GRID = 10  # candidate ranges per side: 100%, 95%, ..., 55% of the group's own range


@torch.no_grad()
def final_norm_moments(folder, source: str, n_samples: int = 16, seqlen: int = 512) -> torch.Tensor:
    """E[x^2] per channel [hidden] of the final norm's output (the lm_head's input) on calibration text."""
    from awq_edge.arch import get_adapter
    from awq_edge.checkpoint.reader import load_quantized_model
    from awq_edge.quantizer.calib import calibration_blocks

    try:
        model, tokenizer = load_quantized_model(folder)
    except (OSError, ValueError) as e:
        raise AwqEdgeError(f"--head-calib needs the checkpoint's tokenizer and weights in PyTorch ({e})",
                           "export from the folder `awq-edge quantize` wrote, or drop --head-calib") from None
    blocks = calibration_blocks(tokenizer, source, n_samples, seqlen, model=model)
    sums = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    count = 0

    def hook(_module, _inputs, out):
        nonlocal count
        flat = out.detach().reshape(-1, out.shape[-1]).double()
        sums.add_(flat.pow(2).sum(0))
        count += flat.shape[0]

    final_norm = model.get_submodule(get_adapter(model.config.model_type).final_norm)
    handle = final_norm.register_forward_hook(hook)
    try:
        for batch in blocks.split(4):
            model.base_model(input_ids=batch)  # the decoder only: the head itself is not needed
    finally:
        handle.remove()
    return (sums / count).float()


def quantize_weighted(w: torch.Tensor, moments: torch.Tensor, bits: int, group: int, symmetric: bool,
                      rows_per_batch: int = 4096, channels: torch.Tensor | None = None):
    """W [out, in] -> (q uint8 [out, in], scales [out, groups], zeros uint8 [out, groups]), like quant.quantize.
    With `channels`, W's columns are those input channels (taken a batch of rows at a time: no copy of W).

    Each group's range is picked from a grid to minimise sum_k moments_k * (w_k - w^_k)^2.
    Symmetric: zero point 2^(bits-1), scale = shrink * max|w| / (2^(bits-1) - 1) or / 2^(bits-1).
    Asymmetric: [shrink * min, shrink * max]. Scales are rounded to fp16.
    """
    if moments.numel() != w.shape[1]:
        raise ValueError(f"{moments.numel()} moments for a weight of width {w.shape[1]}")
    if channels is not None:
        moments = moments[channels]
    d = to_groups(moments.float().view(1, -1), group)[0]  # [groups, g]
    qs, ss, zs = [], [], []
    for rows in w.split(rows_per_batch):
        rows = (rows if channels is None else rows[:, channels]).float()
        wg = to_groups(rows, group)
        scales, zeros = _search(wg, d, bits, symmetric)
        qs.append(from_groups(quantize_groups(wg, scales, zeros, bits), rows.shape[1]).to(torch.uint8))
        ss.append(scales)
        zs.append(zeros.to(torch.uint8))
    return torch.cat(qs), torch.cat(ss), torch.cat(zs)


def _candidates(wg: torch.Tensor, bits: int, symmetric: bool):
    """(scales, zeros) [rows, groups] for every point of the grid."""
    max_int = 2**bits - 1
    shrink = [1 - i / (2 * N_GRID) for i in range(N_GRID)]
    if symmetric:
        amax = wg.abs().amax(dim=-1).clamp(min=1e-8)
        zeros = torch.full_like(amax, 2 ** (bits - 1))
        for levels in (2 ** (bits - 1) - 1, 2 ** (bits - 1)):
            for a in shrink:
                yield (amax * a / levels).half().float().clamp(min=1e-8), zeros
        return
    # Both ends shrunk alike: 10 candidates. The 10 x 10 grid of both ends apart (ten times the candidates, each a
    # pass over the whole head) read 29.650 against 29.663 on SmolLM2 (bench/results/history/
    # onnx_defaults_outliers_fullgrid.md, bench/results/onnx_defaults_outliers.md).
    lo0, hi0 = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)
    for a in shrink:
        scales = ((hi0 - lo0) * a).clamp(min=1e-8) / max_int
        scales = scales.half().float().clamp(min=1e-8)
        yield scales, (-torch.round(lo0 * a / scales)).clamp(0, max_int)


def _search(wg: torch.Tensor, d: torch.Tensor, bits: int, symmetric: bool):
    best_err = best_s = best_z = None
    for scales, zeros in _candidates(wg, bits, symmetric):
        err = dequantize_groups(quantize_groups(wg, scales, zeros, bits), scales, zeros) - wg
        err = (err * err * d).sum(dim=-1)
        if best_err is None:
            best_err, best_s, best_z = err, scales, zeros
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, scales, best_s)
        best_z = torch.where(better, zeros, best_z)
    return best_s, best_z
