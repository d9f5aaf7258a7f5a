"""GPTQ rounding: equal to round-to-nearest without correlations, better than it with them, in its format."""

import pytest
import torch

from awq_edge.errors import AwqEdgeError
from awq_edge.gptq import HessianAccumulator, gptq_quantize
from awq_edge.quant import QConfig, dequantize, quantize


def correlated_inputs(seed: int, in_f: int, n_tokens: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.t() @ x


def output_error(x, w, q, s, z, group_size):
    return (x @ dequantize(q, s, z, group_size).t() - x @ w.t()).pow(2).sum().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("in_f", [64, 80])
@pytest.mark.parametrize("zero_point", [True, False])
def test_with_identity_hessian_gptq_equals_round_to_nearest_exactly(zero_point, in_f, act_order):
    w = torch.randn(24, in_f, generator=torch.Generator().manual_seed(in_f))
    cfg = QConfig(4, 32, zero_point)
    got = gptq_quantize(w, torch.eye(in_f), cfg, block_size=32, act_order=act_order)
    for a, b in zip(got, quantize(w, cfg)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_correlated_inputs_gptq_output_error_is_well_below_round_to_nearest(seed, zero_point, act_order):
    # Measured GPTQ / RTN output error over seeds 0-5: 0.49-0.54 without act_order, 0.46-0.51 with it.
    x = correlated_inputs(seed, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(100 + seed))
    cfg = QConfig(4, 32, zero_point)
    gptq = output_error(x, w, *gptq_quantize(w, hessian(x), cfg, act_order=act_order), 32)
    rtn = output_error(x, w, *quantize(w, cfg), 32)
    assert gptq < 0.7 * rtn


def test_output_format_matches_quantize_and_round_trips_through_dequantize():
    x = correlated_inputs(3, 80)
    w = torch.randn(16, 80, dtype=torch.bfloat16)
    for bits in (3, 4, 8):
        q, s, z = gptq_quantize(w, hessian(x), QConfig(bits, 32, True))
        assert q.shape == (16, 80) and q.dtype == torch.uint8 and int(q.max()) < 2**bits
        assert s.shape == z.shape == (16, 3) and s.dtype == torch.float32 and z.dtype == torch.uint8
        assert int(z.max()) < 2**bits
        assert torch.equal(s.half().float(), s)
        w_hat = dequantize(q, s, z, 32)
        codes = torch.round(w_hat / s.repeat_interleave(32, dim=1)[:, :80]) + z.repeat_interleave(32, dim=1)[:, :80]
        assert torch.equal(codes, q.float())


def test_act_order_keeps_round_to_nearest_group_qparams():
    # Static groups: qparams are fixed from the original weights before columns are permuted.
    x = correlated_inputs(4, 80)
    w = torch.randn(16, 80)
    cfg = QConfig(4, 32, True)
    _, s, z = gptq_quantize(w, hessian(x), cfg, act_order=True)
    _, s_rtn, z_rtn = quantize(w, cfg)
    assert torch.equal(s, s_rtn) and torch.equal(z, z_rtn)


def test_block_size_changes_speed_not_the_result():
    # Blocks are rounded to whole groups, so every group's qparams see the same updated weights.
    x = correlated_inputs(7, 256)
    w = torch.randn(32, 256)
    cfg = QConfig(4, 32, True)
    small = gptq_quantize(w, hessian(x), cfg, block_size=32)
    large = gptq_quantize(w, hessian(x), cfg, block_size=256)
    assert (small[0] != large[0]).float().mean().item() < 1e-3
    assert output_error(x, w, *small, 32) == pytest.approx(output_error(x, w, *large, 32), rel=1e-3)


def test_hessian_accumulated_over_micro_batches_equals_one_shot():
    x = torch.randn(3, 50, 40, dtype=torch.bfloat16)
    acc = HessianAccumulator()
    for chunk in (x[:1], x[1:, :17], x[1:, 17:]):
        acc.add(chunk)
    flat = x.reshape(-1, 40).float()
    assert acc.n == 150
    torch.testing.assert_close(acc.hessian, 2 / 150 * flat.t() @ flat, rtol=1e-5, atol=1e-5)


def test_hessian_of_no_tokens_is_an_error():
    with pytest.raises(AwqEdgeError):
        HessianAccumulator().hessian


def test_dead_input_channels_give_finite_valid_zero_weights():
    x = correlated_inputs(5, 96)
    x[:, 7] = 0
    x[:, 64:] = 0  # a whole dead group: its scale is the 1e-5 floor
    w = torch.randn(16, 96)
    for zero_point in (True, False):
        q, s, z = gptq_quantize(w, hessian(x), QConfig(4, 32, zero_point))
        w_hat = dequantize(q, s, z, 32)
        assert bool(torch.isfinite(s).all()) and bool(torch.isfinite(w_hat).all()) and int(q.max()) < 16
        assert bool((w_hat[:, 7] == 0).all()) and bool((w_hat[:, 64:] == 0).all())


def test_a_hessian_with_nan_raises_a_clear_error():
    x = correlated_inputs(6, 32)
    x[0, 3] = float("nan")
    with pytest.raises(AwqEdgeError, match="not positive definite"):
        gptq_quantize(torch.randn(8, 32), hessian(x), QConfig(4, 32, True))


def test_a_hessian_that_default_damping_cannot_fix_is_retried_with_ten_times_more():
    H = torch.eye(64)
    H[5, 5] = -0.5  # the default 0.1 * mean(diag) = 0.098 leaves it negative; 0.98 makes it positive
    assert torch.linalg.cholesky_ex(H + 0.1 * H.diagonal().mean() * torch.eye(64)).info != 0
    q, s, z = gptq_quantize(torch.randn(8, 64), H, QConfig(4, 32, True))
    assert bool(torch.isfinite(dequantize(q, s, z, 32)).all())


def test_a_weighted_add_counts_rows_that_many_times():
    x = correlated_inputs(6, 16)
    once, thrice = HessianAccumulator(), HessianAccumulator()
    once.add(torch.cat([x, x[:2], x[:2]]))
    thrice.add(x)
    thrice.add(x[:2], weight=2.0)
    assert thrice.n == once.n and torch.allclose(thrice.hessian, once.hessian, rtol=1e-5, atol=1e-6)
