"""The AWQ search (Lin et al., MLSys 2024): activation-aware scales, then weight clipping.

Follows llm-awq's auto_scale.py / auto_clip.py: for linears sharing an input
x, try s = mean|x|^alpha for alpha on a grid in [0, 1), quantise W * s, and
keep the alpha whose block output (x / s through the quantised block) is
closest in MSE to the float output. Then, per linear, shrink each group's
max |w| on a grid and keep the range with the least output error.
"""

import torch
from torch import nn

from awq_edge.quant import QConfig, dequantize_groups, fake_quantize, group_qparams, quantize_groups, to_groups


@torch.no_grad()
def search_scale(call_block, x: torch.Tensor, linears: list, cfg: QConfig, n_grid: int = 20):
    """Best per-input-channel scales for `linears`, which all read x [..., in].

    call_block(x) runs the inspected module; the linears' weights are
    temporarily replaced by quantised candidates and restored on return.
    Returns (scales [in], best alpha, loss per alpha).
    """
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    reference = call_block(x)
    originals = [lin.weight.data.clone() for lin in linears]
    losses, best = [], (float("inf"), None, None)
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals):
                lin.weight.data = (fake_quantize(w.float() * s, cfg) / s).to(w.dtype)
            loss = (call_block(x) - reference).float().pow(2).mean().item()
            losses.append(loss)
            if loss < best[0]:
                best = (loss, alpha, s.clone())
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    if best[2] is None:
        raise FloatingPointError(f"scale search produced no finite loss: {losses}")
    return best[2], best[1], losses


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, cfg: QConfig, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512, rows_per_batch: int = 256) -> torch.Tensor:
    """Per-group clipping bound [out, n_groups] minimising the error of x @ W_q^T, group by group."""
    g = cfg.group_size
    in_f = w.shape[1]
    x = x.reshape(-1, in_f).float()
    x = x[:: max(1, x.shape[0] // n_tokens)]
    pad = -(-in_f // g) * g - in_f
    xg = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], -1, g).transpose(0, 1)  # groups, tokens, g
    xg_t = xg.transpose(1, 2)  # groups, g, tokens
    best_all = []
    for w_rows in w.float().split(rows_per_batch):
        wg = to_groups(w_rows, g)  # rows, groups, g
        ref = torch.bmm(wg.transpose(0, 1), xg_t)  # groups, rows, tokens: each group's share of x @ W^T
        max0 = wg.abs().amax(dim=-1)  # rows, groups
        best_max = max0.clone()
        best_err = torch.full_like(max0, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            bound = (max0 * (1 - i / n_grid)).unsqueeze(-1)
            cw = torch.max(torch.min(wg, bound), -bound)
            scales, zeros = group_qparams(cw, cfg)
            qw = dequantize_groups(quantize_groups(cw, scales, zeros, cfg.w_bit), scales, zeros)
            out = torch.bmm(qw.transpose(0, 1), xg_t)
            err = (out - ref).pow(2).mean(dim=-1).transpose(0, 1)  # rows, groups
            better = err < best_err
            best_err[better] = err[better]
            best_max[better] = bound.squeeze(-1)[better]
        best_all.append(best_max)
    return torch.cat(best_all)


@torch.no_grad()
def apply_clip(lin: nn.Linear, bound: torch.Tensor, group_size: int) -> None:
    w = lin.weight
    in_f = w.shape[1]
    b = bound.repeat_interleave(group_size, dim=1)[:, :in_f].to(w.dtype)
    w.copy_(torch.max(torch.min(w, b), -b))
