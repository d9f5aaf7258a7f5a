"""Group quantisation primitives and both packing layouts."""

import torch

from awq_edge.packing import (AWQ_ORDER, from_awq_gemm, from_matmul_nbits, pack_awq_int32, to_awq_gemm,
                              to_matmul_nbits, unpack_awq_int32)
from awq_edge.quant import QConfig, dequantize, fake_quantize, quantize


def test_pack_unpack_awq_is_identity_on_random_int4():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 16, (37, 64), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_awq_int32(pack_awq_int32(x)), x)


def test_awq_nibble_order_is_0_2_4_6_1_3_5_7():
    x = torch.arange(8, dtype=torch.uint8).view(1, 8)
    word = pack_awq_int32(x).item() & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(AWQ_ORDER) == [0, 2, 4, 6, 1, 3, 5, 7]


def test_awq_gemm_round_trip_shapes_and_values():
    w = torch.randn(48, 256)
    q, s, z = quantize(w, QConfig(4, 64, True))
    t = to_awq_gemm(q, s, z, 64)
    assert t["qweight"].shape == (256, 6) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 6) and t["scales"].shape == (4, 48) and t["scales"].dtype == torch.float16
    q2, s2, z2 = from_awq_gemm(t["qweight"], t["qzeros"], t["scales"])
    assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s)


def test_matmul_nbits_round_trip_with_ragged_last_block():
    w = torch.randn(10, 576)
    for bits in (4, 8):
        q, s, z = quantize(w, QConfig(bits, 128, True))
        t = to_matmul_nbits(q, s, z, 128, bits)
        assert t["B"].shape == (10, 5, 128 * bits // 8)
        q2, s2, z2 = from_matmul_nbits(t["B"], t["scales"], t["zero_points"], 576, 128, bits)
        assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s)


def test_matmul_nbits_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4] * 8], dtype=torch.uint8)
    t = to_matmul_nbits(q, torch.ones(1, 1), torch.full((1, 1), 8, dtype=torch.uint8), 32, 4)
    assert t["B"][0, 0, 0].item() == 0x21 and t["B"][0, 0, 1].item() == 0x43


def test_quantize_error_is_half_a_step_but_at_the_clamped_edge():
    # The integer zero point can push a group's extreme half a step past the grid; it is clamped there.
    w = torch.randn(64, 200, generator=torch.Generator().manual_seed(0))
    for zp in (True, False):
        cfg = QConfig(4, 64, zp)
        q, s, z = quantize(w, cfg)
        assert int(q.max()) <= 15
        err = (dequantize(q, s, z, 64) - w).abs()
        step = s.repeat_interleave(64, dim=1)[:, :200]
        assert bool((err <= step + 1e-6).all())
        assert (err <= step / 2 + 1e-6).float().mean().item() > 0.99


def test_ragged_last_group_uses_only_real_columns():
    w = torch.randn(4, 72)
    w[:, 64:] *= 0.01  # the ragged 8-column group is small: padding with zeros or big values would widen its step
    q, s, z = quantize(w, QConfig(4, 64, True))
    assert s.shape == (4, 2)
    assert bool((s[:, 1] < s[:, 0] / 10).all())


def test_symmetric_zero_point_is_midpoint():
    q, s, z = quantize(torch.randn(8, 64), QConfig(4, 32, False))
    assert bool((z == 8).all())


def test_fake_quantize_matches_dequantize_of_quantize():
    w = torch.randn(8, 96)
    cfg = QConfig(3, 32, True)
    q, s, z = quantize(w, cfg)
    assert torch.equal(fake_quantize(w, cfg), dequantize(q, s, z, 32))
