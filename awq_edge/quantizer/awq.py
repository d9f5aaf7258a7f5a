"""The AWQ search (Lin et al., MLSys 2024): activation-aware scales, then weight clipping.

Follows llm-awq's auto_scale.py / auto_clip.py: for linears sharing an input
x, try s = mean|x|^alpha for alpha on a grid in [0, 1), quantise W * s, and
keep the alpha whose block output (x / s through the quantised block) is
closest in MSE to the float output. Then, per linear, shrink each group's
max |w| on a grid and keep the range with the least output error.

One addition to the paper: the calibration tokens are split into a search
part and a held-out part, and a scale or a clipping bound is kept only where
it beats plain round-to-nearest on the held-out part too, so the search
cannot overfit its own text into a loss against RTN.
"""

import torch
from torch import nn

from awq_edge.quant import QConfig, dequantize_groups, fake_quantize, group_qparams, quantize_groups, to_groups

CANDIDATE_CACHE_BYTES = 256 * 2**20
CLIP_BATCH_ELEMENTS = 2**25  # 128 MiB of float32 per [groups, rows, tokens] tensor of the clip search


@torch.no_grad()
def scale_candidates(x_mean: torch.Tensor, linears: list, cfg: QConfig, n_grid: int = 20, duo: bool = False) -> list:
    """Scale vectors to try: s = 1 (round-to-nearest), mean|x|^a for a in (0, 1), and with `duo` also
    AutoAWQ's mean|x|^a / mean|w~|^(1-a), w~ being |w| over its group's max (a in [0, 1)).
    Each is normalised to a geometric mean of 1 between its extremes, as in llm-awq."""
    x_mean = x_mean.float()
    grids = [x_mean.pow(i / n_grid) for i in range(n_grid)]
    if duo:
        w = torch.cat([lin.weight.float() for lin in linears])
        g = to_groups(w, cfg.group_size).abs()
        w_rel = (g / g.amax(-1, keepdim=True).clamp(min=1e-6)).reshape(w.shape[0], -1)[:, : w.shape[1]]
        w_mean = w_rel.mean(0)
        grids += [x_mean.pow(i / n_grid) / (w_mean.pow(1 - i / n_grid) + 1e-4) for i in range(n_grid)]
    out = []
    for s in grids:
        s = s.clamp(min=1e-4)
        out.append(s / (s.max() * s.min()).sqrt())
    return out


@torch.no_grad()
def search_scale(chunks, x_mean: torch.Tensor, linears: list, cfg: QConfig, n_grid: int = 20, guard: bool = True,
                 duo: bool = False):
    """Best per-input-channel scales for `linears`, which all read an activation with channel means x_mean [in].

    `chunks` yields (call_block, x, held_out) per slice of the calibration
    tokens, with the linears at their float weights: call_block(x) runs the
    inspected module. Every alpha is scored on every chunk (the linears'
    weights are swapped for quantised candidates and restored), so only one
    chunk's activations are ever in memory. The alpha is chosen on the search
    chunks; it is kept only if it also beats round-to-nearest (alpha = 0,
    s = 1) on the held-out chunks, so AWQ is never worse than RTN on text the
    search did not see. Returns (scales [in], index of the chosen candidate in
    scale_candidates (0: none), losses [candidates, 2]: mean squared error on
    search and held-out tokens).
    """
    candidates = scale_candidates(x_mean, linears, cfg, n_grid, duo)
    n_cand = len(candidates)
    originals = [lin.weight.data for lin in linears]
    # Small models reuse each candidate's weights across chunks; large ones recompute them (cheap on a GPU).
    cache = {} if n_cand * sum(w.numel() for w in originals) * 4 <= CANDIDATE_CACHE_BYTES else None

    def candidate(i):
        if cache is not None and i in cache:
            return cache[i]
        ws = [(fake_quantize(w.float() * candidates[i], cfg) / candidates[i]).to(w.dtype) for w in originals]
        if cache is not None:
            cache[i] = ws
        return ws

    sse = torch.zeros(n_cand, 2, dtype=torch.float64, device=x_mean.device)
    counts = [0, 0]
    try:
        for call_block, x, held_out in chunks:
            reference = call_block(x).float()
            counts[held_out] += reference.numel()
            for i in range(n_cand):
                for lin, w in zip(linears, candidate(i)):
                    lin.weight.data = w
                sse[i, int(held_out)] += (call_block(x).float() - reference).pow(2).sum().double()
            for lin, w in zip(linears, originals):
                lin.weight.data = w
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w
    losses = (sse / torch.tensor([max(counts[0], 1), max(counts[1], 1)], dtype=torch.float64, device=sse.device)).cpu()
    if not torch.isfinite(losses[:, 0]).any():
        raise FloatingPointError(f"scale search produced no finite loss: {losses[:, 0].tolist()}")
    best = int(torch.nan_to_num(losses[:, 0], nan=float("inf")).argmin())
    if guard and counts[1] and not losses[best, 1] < losses[0, 1]:
        best = 0
    return candidates[best], best, losses


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, cfg: QConfig, x_held_out: torch.Tensor | None = None,
                n_grid: int = 20, max_shrink: float = 0.5, rows_per_batch: int | None = None) -> torch.Tensor:
    """Per-group clipping bound [out, n_groups] minimising the error of x @ W_q^T, group by group.

    With x_held_out, a shrunk bound is kept only where it also lowers that
    group's error on the held-out tokens; elsewhere the group keeps its full
    range (plain round-to-nearest). rows_per_batch None: llm-awq's 256 on the
    CPU; on a GPU as many rows as keep one [groups, rows, tokens] product
    within CLIP_BATCH_ELEMENTS (fewer, larger launches: the search was
    launch-bound at 8B).
    """
    g = cfg.group_size
    in_f = w.shape[1]
    pad = -(-in_f // g) * g - in_f
    if rows_per_batch is None:
        tokens = max(x.numel(), x_held_out.numel() if x_held_out is not None else 0) // in_f
        per_row = -(-in_f // g) * tokens
        rows_per_batch = max(256, CLIP_BATCH_ELEMENTS // per_row) if w.is_cuda else 256

    def grouped(t):  # groups, g, tokens
        t = torch.nn.functional.pad(t.reshape(-1, in_f).float(), (0, pad))
        return t.reshape(t.shape[0], -1, g).permute(1, 2, 0)

    xg = grouped(x)
    xv = grouped(x_held_out) if x_held_out is not None and x_held_out.numel() else None

    def quantised(wg, bound):
        cw = torch.max(torch.min(wg, bound.unsqueeze(-1)), -bound.unsqueeze(-1))
        scales, zeros = group_qparams(cw, cfg)
        return dequantize_groups(quantize_groups(cw, scales, zeros, cfg.w_bit), scales, zeros).transpose(0, 1)

    def error(qw, xs, ref):  # rows, groups
        return (torch.bmm(qw, xs) - ref).pow(2).mean(dim=-1).transpose(0, 1)

    best_all = []
    for w_rows in w.float().split(rows_per_batch):
        wg = to_groups(w_rows, g)  # rows, groups, g
        ref = torch.bmm(wg.transpose(0, 1), xg)  # groups, rows, tokens: each group's share of x @ W^T
        max0 = wg.abs().amax(dim=-1)  # rows, groups
        best_max, best_err = max0.clone(), torch.full_like(max0, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            bound = max0 * (1 - i / n_grid)
            err = error(quantised(wg, bound), xg, ref)
            better = err < best_err
            best_err[better] = err[better]
            best_max[better] = bound[better]
        if xv is not None:  # keep a shrunk bound only where it also wins on the held-out tokens
            ref_v = torch.bmm(wg.transpose(0, 1), xv)
            keep = error(quantised(wg, best_max), xv, ref_v) < error(quantised(wg, max0), xv, ref_v)
            best_max = torch.where(keep, best_max, max0)
        best_all.append(best_max)
    return torch.cat(best_all)


@torch.no_grad()
def apply_clip(lin: nn.Linear, bound: torch.Tensor, group_size: int) -> None:
    w = lin.weight
    in_f = w.shape[1]
    b = bound.repeat_interleave(group_size, dim=1)[:, :in_f].to(w.dtype)
    w.copy_(torch.max(torch.min(w, b), -b))
