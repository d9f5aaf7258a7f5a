"""The CUDA backend: decoder structure against transformers on the CPU (TorchOps), kernels and graphs on a GPU."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import chat_session
from test_export import PROMPT, write_checkpoint

from awq_edge.cli import main
from awq_edge.errors import AwqEdgeError
from awq_edge.packing import to_matmul_nbits
from awq_edge.quant import QConfig, dequantize, quantize
from awq_edge.runtime import kernels
from awq_edge.runtime import cuda
from awq_edge.runtime.cuda import CudaDecoder, CudaOps, TorchOps, attention_span, load_weights
from awq_edge.runtime.generate import generate

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
needs_library = pytest.mark.skipif(not kernels.library_path().is_file(),
                                   reason=f"{kernels.library_path()} not built (run `make plugins`)")


def torch_decoder(folder, dtype=torch.float32, device="cpu", max_len=None, fold_norms=False):
    weights = load_weights(folder, device, dtype, packed=False, max_len=max_len)
    return CudaDecoder(weights, ops=TorchOps(fold_norms), eos_ids=[0], use_graphs=False)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


CASES = {
    "llama": dict(family="llama"),
    "mistral_window": dict(family="mistral", sliding_window=5),  # the window is shorter than the prompt
    "qwen2_bias": dict(family="qwen2"),
    "untied": dict(family="llama", tied=False),
    "qwen3_qk_norms": dict(family="qwen3"),
    "phi3_fused": dict(family="phi3"),
    "gemma_gelu": dict(family="gemma"),
    "gemma2_softcaps": dict(family="gemma2"),
    "gemma3_local_global": dict(family="gemma3_text", tied=False),
}


@pytest.mark.parametrize("fold", [False, True], ids=["norms", "folded_norms"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_and_cached_steps_match_transformers_on_the_same_weights(tmp_path, case, fold):
    model, _ = write_checkpoint(tmp_path / "ck", **CASES[case])
    ref = hf_logits(model, PROMPT)
    dec = torch_decoder(tmp_path / "ck", fold_norms=fold)
    np.testing.assert_allclose(dec.forward(PROMPT), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    dec.reset()
    steps = [dec.forward(PROMPT[:5])[-1]] + [dec.forward([t])[-1] for t in PROMPT[5:]]
    np.testing.assert_allclose(np.stack(steps), ref[4:], rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generation_matches_transformers_generate(tmp_path, case):
    model, _ = write_checkpoint(tmp_path / "ck", **CASES[case])
    with torch.no_grad():
        theirs = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
    dec = torch_decoder(tmp_path / "ck")
    dec.eos_ids = set()
    assert list(generate(dec, PROMPT, 12)) == theirs


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_fp16_decoder_keeps_a_residual_stream_beyond_fp16_range_in_fp32(tmp_path, family):
    from test_export import blow_up_residual

    model, _ = write_checkpoint(tmp_path / "ck", family=family)
    assert blow_up_residual(tmp_path / "ck", model) > 65504
    ref = hf_logits(model, PROMPT)
    dec = torch_decoder(tmp_path / "ck", dtype=torch.float16)
    steps = [dec.forward(PROMPT[:5])[-1]] + [dec.forward([t])[-1] for t in PROMPT[5:]]
    assert np.isfinite(steps).all()
    np.testing.assert_allclose(np.stack(steps), ref[4:], rtol=0, atol=1e-2 * np.abs(ref).max())


def test_a_float_linear_among_int4_ones_is_fused_as_dense(tmp_path):
    model, _ = write_checkpoint(tmp_path / "ck")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.k_proj"  # an 8-bit fallback is stored as a float weight
    for k in ("qweight", "qzeros", "scales"):
        del tensors[f"{name}.{k}"]
    tensors[f"{name}.weight"] = model.get_submodule(name).weight.data.half()
    model.get_submodule(name).weight.data = tensors[f"{name}.weight"].float()  # what the checkpoint now holds
    save_file(tensors, path)
    weights = load_weights(tmp_path / "ck", "cpu", torch.float32, packed=False)
    assert weights.layers[1].qkv.weight.shape == (128 + 2 * 64, 128)
    ref = hf_logits(model, PROMPT)
    np.testing.assert_allclose(torch_decoder(tmp_path / "ck").forward(PROMPT), ref, atol=1e-4 * np.abs(ref).max())


def test_extend_reuses_the_cache_and_overflow_is_a_clear_error(tmp_path):
    model, _ = write_checkpoint(tmp_path / "ck")
    dec = torch_decoder(tmp_path / "ck", max_len=16)
    dec.extend(PROMPT[:6])
    last = dec.extend(PROMPT)
    assert dec.tokens == PROMPT
    np.testing.assert_allclose(last, hf_logits(model, PROMPT)[-1], atol=1e-3)
    with pytest.raises(AwqEdgeError, match="exceed the decoder's context of 16"):
        dec.forward(list(range(5)))


def test_phi3_longrope_is_refused_by_the_export_and_the_cuda_backend_alike(tmp_path):
    from awq_edge.export.api import export

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 16, "long_factor": [2.0] * 16,
            "original_max_position_embeddings": 64}
    write_checkpoint(tmp_path / "ck", family="phi3", rope_parameters=rope)
    for stage in (lambda: export(tmp_path / "ck", tmp_path / "onnx"),
                  lambda: load_weights(tmp_path / "ck", "cpu", torch.float32, packed=False)):
        with pytest.raises(AwqEdgeError, match="rope type 'longrope' changes with sequence length"):
            stage()
    assert not (tmp_path / "onnx").exists()


def test_a_group_size_the_kernels_lack_is_refused_with_a_requantise_fix(tmp_path):
    write_checkpoint(tmp_path / "ck", group_size=16)
    with pytest.raises(AwqEdgeError, match="group-size 128"):
        load_weights(tmp_path / "ck", "cpu", torch.float16, packed=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_backend_without_a_gpu_fails_in_one_line(tmp_path, capsys):
    write_checkpoint(tmp_path / "ck")
    assert main(["generate", str(tmp_path / "ck"), "--backend", "cuda", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


class EmulatedKernels:
    """awq_edge.runtime.kernels' functions in PyTorch on the CPU, holding to their fp16 contract; a "packed" weight is the
    dense fp16 W [n, k]. Lets CudaOps' choices around the kernels run without a GPU."""

    GATES = kernels.GATES

    @staticmethod
    def _f16(*tensors):
        assert all(t.dtype == torch.float16 for t in tensors if t is not None), "a kernel was handed non-fp16 data"

    def rmsnorm(self, x, w, eps, out):
        self._f16(x, w, out)
        return out.copy_(TorchOps().rmsnorm(x, w, eps))

    def dequantize(self, w, out):
        return out.copy_(w.reshape(-1))

    def gemm(self, x, w, bias=None):
        self._f16(x, bias)
        return self.gemm_norm(x, w, bias)

    sumsq_parts = staticmethod(kernels.sumsq_parts)

    @staticmethod
    def _tile_sums(h):
        """Sums of h^2 over each 16 columns (the last tile partial), fp32 [rows, sumsq_parts(cols)]."""
        return F.pad(h.float().pow(2), (0, 16 * kernels.sumsq_parts(h.shape[-1]) - h.shape[-1])).view(
            h.shape[0], -1, 16).sum(-1)

    def gemm_norm(self, x, w, bias=None, gated=False, rms_input=None, eps=0.0, norm_weight=None, activation="silu",
                  rms_sumsq=None, sumsq_out=None):
        self._f16(x, bias, rms_input, norm_weight)
        assert activation in self.GATES
        assert rms_sumsq is None or (rms_input is not None and rms_sumsq.dtype == torch.float32)
        assert sumsq_out is None or (not gated and sumsq_out.shape == (x.shape[0], kernels.sumsq_parts(w.shape[0])))
        y = torch.nn.functional.linear(x.float(), w.float())
        if rms_sumsq is not None:  # the mean from the sums the product before wrote, as the kernel takes it
            torch.testing.assert_close(rms_sumsq, self._tile_sums(rms_input))
            y = y * torch.rsqrt(rms_sumsq.sum(-1, keepdim=True) / rms_input.shape[-1] + eps)
        elif rms_input is not None:
            y = y * TorchOps._rstd(rms_input, eps)
        y = (y if bias is None else y + bias.float()).half()
        y = TorchOps().gate_act(y, activation) if gated else y
        if sumsq_out is not None:
            sumsq_out.copy_(self._tile_sums(y))
        return y if norm_weight is None else (y, norm_weight * y)

    def gemm_gated(self, x, w, bias=None, activation="silu"):
        return self.gemm_norm(x, w, bias, gated=True, activation=activation)

    def residual_norm(self, y, out_norm, h, next_norm, eps):
        self._f16(y, out_norm, next_norm)
        assert h.dtype == torch.float32, "the residual stream must be float32"
        return TorchOps().residual_norm(y, out_norm, h, next_norm, eps)

    calls = 0  # gemm_residual_norm's, so a test can see the fold was taken

    def gemm_residual_norm(self, x, w, bias, out_norm, h, next_norm, eps, ticket):
        assert x.shape[0] == 1 and ticket.dtype == torch.int32 and int(ticket) == 0, "one token, a zeroed ticket"
        self.calls += 1
        return self.residual_norm(self.gemm(x, w, bias), out_norm, h, next_norm, eps)

    def silu_mul(self, gate_up, out):
        return out.copy_(TorchOps().silu_mul(gate_up))

    def rope_kv(self, qkv, positions, cos, sin, q_out, k_cache, v_cache):
        self._f16(qkv, k_cache, v_cache)
        return q_out.copy_(TorchOps().rope_kv(qkv, positions, cos, sin, k_cache, v_cache, q_out.shape[1]))

    def decode_attention(self, qkv, position, cos, sin, k_cache, v_cache, out, workspace, scale, window, q_norm=None,
                         k_norm=None, eps=0.0, softcap=0.0, span=None):
        self._f16(qkv, k_cache, v_cache, out, q_norm, k_norm)
        n_heads = out.numel() // k_cache.shape[2]
        if span is not None and int(position[0]) >= span:  # the kernel's launch does not reach the position: NaN
            return out.fill_(float("nan"))
        return out.copy_(TorchOps().decode_attention(qkv, position, cos, sin, k_cache, v_cache, n_heads, scale, window,
                                                     softcap, q_norm, k_norm, eps))


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_ops_around_emulated_kernels_match_transformers_for_every_family(tmp_path, case, monkeypatch):
    from awq_edge.runtime.cuda import DeviceLinear

    model, _ = write_checkpoint(tmp_path / "ck", **CASES[case])
    ref = hf_logits(model, PROMPT)
    weights = load_weights(tmp_path / "ck", "cpu", torch.float16, packed=False, max_len=64)
    as_packed = lambda lin: DeviceLinear(lin.n, lin.k, packed=lin.weight, bias=lin.bias)  # noqa: E731
    for L in weights.layers:
        L.qkv, L.o, L.gate_up, L.down = (as_packed(x) for x in (L.qkv, L.o, L.gate_up, L.down))
    monkeypatch.setattr(kernels, "attention_workspace", lambda *args: None)
    monkeypatch.setattr(cuda, "MIN_SPAN", 2)  # the steps' spans 8, 16: the emulated kernel gives NaN past a span
    for fold, sums, boundaries in ((True, False, False), (True, True, False), (False, False, False),
                                   (True, False, True)):
        ops = CudaOps(weights, fold_norms=fold, norm_sums=sums, fold_boundaries=boundaries)
        ops.k = EmulatedKernels()
        dec = CudaDecoder(weights, ops, use_graphs=False)
        steps = [dec.forward(PROMPT[:4])[-1]] + [dec.forward([t])[-1] for t in PROMPT[4:]]
        np.testing.assert_allclose(np.stack(steps), ref[3:], rtol=0, atol=2e-2 * np.abs(ref).max())
        # the fold runs twice a layer in each single-token step of a Gemma 2/3 block, never in the prompt's
        sandwich = weights.layers[0].attn_out_norm is not None
        assert ops.k.calls == (2 * len(weights.layers) * (len(PROMPT) - 4) if boundaries and sandwich else 0)


def test_attention_span_is_the_next_power_of_two_within_the_cache():
    assert [attention_span(n, 4096) for n in (1, 128, 129, 256, 257, 4000, 4096)] == [128, 128, 256, 256, 512, 4096,
                                                                                       4096]
    assert [attention_span(n, 384) for n in (1, 200, 257, 384)] == [128, 256, 384, 384]
    assert attention_span(30, 64) == 64  # a cache shorter than the least span


# ---- On a GPU: every kernel against TorchOps in float32, on fresh random data with poisoned outputs ----

def gpu_case(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


@needs_library
@needs_gpu
@pytest.mark.parametrize("rows, dim", [(1, 576), (1, 4096), (7, 576), (3, 5120), (2, 10240)])  # 10240: two passes
def test_rmsnorm_kernel_matches_reference(rows, dim):
    g = gpu_case(rows * dim)
    x = (torch.randn(rows, dim, device="cuda", generator=g) * 3).half()
    w = (torch.rand(dim, device="cuda", generator=g) + 0.5).half()
    out = torch.full_like(x, float("nan"))
    kernels.rmsnorm(x, w, 1e-5, out)
    ref = TorchOps().rmsnorm(x.float(), w.float(), 1e-5)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 1e-2 * max(1.0, ref.abs().max().item())


@needs_library
@needs_gpu
@pytest.mark.parametrize("m, heads, kv, d", [(1, 9, 3, 64), (5, 32, 8, 128), (3, 4, 4, 256)])
def test_rope_kv_kernel_rotates_q_k_and_writes_the_cache_at_each_position(m, heads, kv, d):
    g = gpu_case(m + heads + d)
    max_len = 40
    qkv = torch.randn(m, (heads + 2 * kv) * d, device="cuda", generator=g).half()
    angles = torch.outer(torch.arange(max_len, device="cuda").float(), torch.rand(d // 2, device="cuda", generator=g))
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    positions = torch.randperm(max_len, device="cuda", generator=g)[:m].int()
    kc = torch.full((kv, max_len, d), float("nan"), device="cuda", dtype=torch.half)
    vc = kc.clone()
    q = torch.full((m, heads, d), float("nan"), device="cuda", dtype=torch.half)
    kernels.rope_kv(qkv, positions, cos, sin, q, kc, vc)
    kr, vr = torch.zeros(kv, max_len, d, device="cuda"), torch.zeros(kv, max_len, d, device="cuda")
    qr = TorchOps().rope_kv(qkv.float(), positions, cos, sin, kr, vr, heads)
    p = positions.long()
    assert (q.float() - qr).abs().max().item() < 1e-2
    assert (kc[:, p].float() - kr[:, p]).abs().max().item() < 1e-2
    assert torch.equal(vc[:, p].float(), vr[:, p])
    untouched = torch.ones(max_len, dtype=torch.bool, device="cuda")
    untouched[p] = False
    assert torch.isnan(kc[:, untouched]).all() and torch.isnan(vc[:, untouched]).all()


def attention_case(g, heads, kv, d, length, max_len, qkv_scale):
    """Caches [kv, max_len, d] holding length - 1 random rows and NaN past them, their fp32 copies, one token's qkv,
    rotary tables and the position length - 1."""
    kc = torch.full((kv, max_len, d), float("nan"), device="cuda", dtype=torch.half)
    vc = kc.clone()
    kc[:, : length - 1] = (torch.randn(kv, length - 1, d, device="cuda", generator=g) * 2).half()
    vc[:, : length - 1] = torch.randn(kv, length - 1, d, device="cuda", generator=g).half()
    qkv = (torch.randn(1, (heads + 2 * kv) * d, device="cuda", generator=g) * qkv_scale).half()
    angles = torch.outer(torch.arange(max_len, device="cuda").float(), torch.rand(d // 2, device="cuda", generator=g))
    pos = torch.tensor([length - 1], dtype=torch.int32, device="cuda")
    return kc, vc, kc.float(), vc.float(), qkv, angles.cos().contiguous(), angles.sin().contiguous(), pos


@needs_library
@needs_gpu
@pytest.mark.parametrize("heads, kv, d", [(4, 2, 32), (9, 3, 64), (6, 2, 96), (32, 8, 128), (8, 8, 256)])
@pytest.mark.parametrize("length, window", [(1, 0), (31, 0), (32, 0), (33, 0), (300, 0), (300, 70), (64, 64),
                                            (1000, 0), (1000, 100), (2049, 0)])  # > 16 splits: merged in rounds
def test_decode_attention_kernel_matches_reference_and_reads_only_the_live_positions(heads, kv, d, length, window):
    g = gpu_case(length * 7 + d + window)
    max_len = max(320, length + 24)
    kc, vc, kr, vr, qkv, cos, sin, pos = attention_case(g, heads, kv, d, length, max_len, 2)
    out = torch.full((1, heads * d), float("nan"), device="cuda", dtype=torch.half)
    ws = kernels.attention_workspace(heads, d, max_len, "cuda")
    for step in range(2):  # twice: the merge's ticket counters must be back at zero after the first call
        kernels.decode_attention(qkv, pos, cos, sin, kc, vc, out, ws, d ** -0.5, window)
    ref = TorchOps().decode_attention(qkv.float(), pos, cos, sin, kr, vr, heads, d ** -0.5, window)
    assert torch.isfinite(out).all(), "a NaN-poisoned position past the length or outside the window was read"
    assert (out.float() - ref).abs().max().item() < 2e-3 * max(1.0, ref.abs().max().item())
    assert (kc[:, length - 1].float() - kr[:, length - 1]).abs().max().item() < 1e-2  # the new k, rotated
    assert torch.equal(vc[:, length - 1].float(), vr[:, length - 1])
    assert torch.isnan(kc[:, length:]).all()


@needs_library
@needs_gpu
@pytest.mark.parametrize("length", [1, 33, 300])
def test_decode_attention_over_a_span_equals_the_whole_cache_and_poisons_a_position_past_it(length):
    heads, kv, d, max_len = 8, 2, 128, 640
    kc, vc, kr, vr, qkv, cos, sin, pos = attention_case(gpu_case(length + 5), heads, kv, d, length, max_len, 2)
    ws = kernels.attention_workspace(heads, d, max_len, "cuda")
    outs = {}
    short = [length - 1] if length > 1 else []  # a span the position is past
    for span in [None, length, 512] + short + [None]:  # the last: the tickets are sound after a poisoned launch
        out = torch.full((1, heads * d), 7.0, device="cuda", dtype=torch.half)
        outs.setdefault(span, []).append(kernels.decode_attention(qkv, pos, cos, sin, kc, vc, out, ws, d ** -0.5,
                                                                  span=span))
    whole = outs[None][0]
    assert torch.isfinite(whole).all()
    # the same blocks do the same work whatever the span: the same bits
    assert all(torch.equal(o, whole) for o in outs[None] + outs[length] + outs[512])
    if short:
        assert torch.isnan(outs[length - 1][0]).all(), "a position past the launch's span must give NaN"
    with pytest.raises(AwqEdgeError, match="span 641 is outside"):
        kernels.decode_attention(qkv, pos, cos, sin, kc, vc, whole.clone(), ws, d ** -0.5, span=max_len + 1)


@needs_library
@needs_gpu
def test_a_graph_per_span_gives_the_tokens_and_logits_of_the_whole_cache_graph(tmp_path, monkeypatch):
    """Greedy steps queued ahead through four spans (graphs captured between two queued replays), then single
    steps through five, against one graph over the whole cache: the same tokens, and the same logits."""
    monkeypatch.setattr(cuda, "MIN_SPAN", 8)
    write_checkpoint(tmp_path / "ck")
    weights = load_weights(tmp_path / "ck", "cuda", torch.float16, packed=True, max_len=100)
    runs = {}
    for spans in (True, False):
        dec = CudaDecoder(weights, CudaOps(weights), spans=spans)
        dec.eos_ids = set()
        tokens = list(generate(dec, PROMPT, 100 - len(PROMPT)))
        dec.reset()
        seq = PROMPT + tokens[:-1]
        logits = [dec.forward(seq[:4])[-1]] + [dec.forward([t])[-1] for t in seq[4:]]
        runs[spans] = tokens, np.stack(logits), sorted(dec.graphs)
    assert runs[True][0] == runs[False][0]
    np.testing.assert_array_equal(runs[True][1], runs[False][1])
    assert runs[True][2] == [8, 16, 32, 64, 100] and runs[False][2] == [100]


@needs_library
@needs_gpu
@pytest.mark.parametrize("heads, kv, d", [(8, 2, 128), (4, 1, 256), (9, 3, 64)])
@pytest.mark.parametrize("length, window, softcap", [(1, 0, 0.0), (300, 0, 0.0), (300, 70, 0.0), (300, 0, 50.0),
                                                     (1000, 100, 30.0)])
def test_decode_attention_with_head_norms_and_softcap_matches_reference(heads, kv, d, length, window, softcap):
    """Qwen3 / Gemma 3's q/k norms before the rotation and Gemma 2's score soft-capping, in the attention kernel."""
    g = gpu_case(length * 3 + d + window + int(softcap))
    max_len = length + 24
    kc, vc, kr, vr, qkv, cos, sin, pos = attention_case(g, heads, kv, d, length, max_len, 4)
    q_norm = (torch.rand(d, device="cuda", generator=g) * 2 + 0.5).half()
    k_norm = (torch.rand(d, device="cuda", generator=g) * 2 + 0.5).half()
    out = torch.full((1, heads * d), float("nan"), device="cuda", dtype=torch.half)
    ws = kernels.attention_workspace(heads, d, max_len, "cuda")
    scale = 0.0625  # Gemma's query_pre_attn_scalar ** -0.5 at 256
    kernels.decode_attention(qkv, pos, cos, sin, kc, vc, out, ws, scale, window, q_norm, k_norm, 1e-6, softcap)
    ref = TorchOps().decode_attention(qkv.float(), pos, cos, sin, kr, vr, heads, scale, window, softcap,
                                      q_norm.float(), k_norm.float(), 1e-6)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 5e-3 * max(1.0, ref.abs().max().item())
    new_k = kr[:, length - 1]  # normalised, then rotated by the reference
    assert (kc[:, length - 1].float() - new_k).abs().max().item() < 2e-2 * new_k.abs().max().item()
    with pytest.raises(AwqEdgeError, match="both"):
        kernels.decode_attention(qkv, pos, cos, sin, kc, vc, out, ws, scale, window, q_norm, None, 1e-6)


@needs_library
@needs_gpu
@pytest.mark.parametrize("rows, dim", [(1, 640), (3, 2560), (1, 8192), (2, 10240)])  # 10240: through memory
@pytest.mark.parametrize("block", ["normalised", "plain_add", "none"])
def test_residual_norm_kernel_matches_float64(rows, dim, block):
    """Gemma 2/3's block boundary: h += out_norm * rmsnorm(y) on the float32 stream, then fp16 next_norm * rmsnorm(h)."""
    g = gpu_case(rows * dim + len(block))
    h = torch.randn(rows, dim, device="cuda", generator=g) * 300  # Gemma's stream outgrows fp16's comfort
    y = (torch.randn(rows, dim, device="cuda", generator=g) * 20).half() if block != "none" else None
    out_norm = (torch.rand(dim, device="cuda", generator=g) * 3).half() if block == "normalised" else None
    nxt = (torch.rand(dim, device="cuda", generator=g) * 2 + 0.1).half()
    eps = 1e-6
    hd = h.double()
    if y is not None:
        yd = y.double()
        hd = hd + (yd if out_norm is None else out_norm.double() * yd * torch.rsqrt(yd.pow(2).mean(-1, True) + eps))
    ref = nxt.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, True) + eps)
    out = torch.full((rows, dim), float("nan"), device="cuda", dtype=torch.half)
    kernels.residual_norm(y, out_norm, h, nxt, eps, out=out)
    assert torch.isfinite(out).all()
    assert ((h.double() - hd).abs().max() / hd.abs().max()).item() < 1e-6
    assert ((out.double() - ref).abs() <= 1e-3 * ref.abs() + 1e-4).all()  # one fp16 rounding


@needs_library
@needs_gpu
@pytest.mark.parametrize("n, k, group", [(640, 1024, 128), (2560, 2048, 128), (3584, 14336, 128), (640, 576, 64),
                                         (1152, 640, 32), (640, 256, 128)])
# Gemma-3-270M's o, the 4B's o, the 9B's down; groups of 64 and 32; the last two with the row through memory (2
# warps a tile and 576 pairs; one warp) where the others hold it in registers
@pytest.mark.parametrize("block", ["normalised", "plain_add"])
def test_gemm_residual_norm_equals_the_product_then_the_boundary_kernel(n, k, group, block):
    """The boundary folded into the product (the last block to finish runs it) against the product and
    residual_norm as two launches, on fresh random data with poisoned outputs, three times over (the ticket is back
    at zero after each call)."""
    gen = torch.Generator().manual_seed(n + k + group)
    q, scales, zeros = quantize(torch.randn(n, k, generator=gen), QConfig(4, group, True))
    nb = to_matmul_nbits(q, scales.half(), zeros, group, 4)
    w = kernels.repack_matmul_nbits(nb["B"].cuda(), nb["scales"].cuda(), nb["zero_points"].cuda(), k, group)
    out_norm = (torch.rand(n, generator=gen) * 3).half().cuda() if block == "normalised" else None
    nxt = (torch.rand(n, generator=gen) * 2 + 0.1).half().cuda()
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    for step in range(3):
        x = (torch.randn(1, k, generator=gen) * 0.5).half().cuda()
        h = (torch.randn(1, n, generator=gen) * 300).cuda()
        h_ref = h.clone()
        y, out = (torch.full((1, n), float("nan"), dtype=torch.half, device="cuda") for _ in range(2))  # poisoned
        kernels.gemm_residual_norm(x, w, None, out_norm, h, nxt, 1e-6, ticket, y=y, out=out)
        y_ref = kernels.gemm(x, w)
        ref = kernels.residual_norm(y_ref, out_norm, h_ref, nxt, 1e-6)
        assert torch.equal(y, y_ref), "the product is the plain GEMV's, bit for bit"
        assert torch.isfinite(out).all() and out.shape == (1, n) and int(ticket) == 0
        # the same products; the boundary's sums in another order: float32 rounding on h, one fp16 step on x
        assert ((h - h_ref).abs().max() / h_ref.abs().max()).item() < 1e-5
        assert ((out.float() - ref.float()).abs() <= 2e-3 * ref.float().abs() + 1e-3).all()


@needs_library
@needs_gpu
def test_gemm_residual_norm_rejects_a_prompt_and_a_stream_of_the_wrong_width():
    q, scales, zeros = quantize(torch.randn(256, 128, generator=torch.Generator().manual_seed(0)),
                                QConfig(4, 128, True))
    nb = to_matmul_nbits(q, scales.half(), zeros, 128, 4)
    w = kernels.repack_matmul_nbits(nb["B"].cuda(), nb["scales"].cuda(), nb["zero_points"].cuda(), 128, 128)
    nxt, ticket = torch.ones(256, dtype=torch.half, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
    x = torch.zeros(2, 128, dtype=torch.half, device="cuda")
    with pytest.raises(AwqEdgeError, match="one token"):
        kernels.gemm_residual_norm(x, w, None, None, torch.zeros(1, 256, device="cuda"), nxt, 1e-6, ticket)
    with pytest.raises(AwqEdgeError, match="h must be a contiguous fp32 CUDA tensor of 256"):
        kernels.gemm_residual_norm(x[:1], w, None, None, torch.zeros(1, 128, device="cuda"), nxt, 1e-6, ticket)


@needs_library
@needs_gpu
@pytest.mark.parametrize("m, inter", [(1, 1536), (6, 14336)])
def test_silu_mul_kernel_matches_reference(m, inter):
    g = gpu_case(m + inter)
    gu = (torch.randn(m, 2 * inter, device="cuda", generator=g) * 3).half()
    out = torch.full((m, inter), float("nan"), device="cuda", dtype=torch.half)
    kernels.silu_mul(gu, out)
    ref = TorchOps().silu_mul(gu.float())
    assert (out.float() - ref).abs().max().item() < 1e-2 * ref.abs().max().item()


@needs_library
@needs_gpu
@pytest.mark.parametrize("m, activation", [(1, "silu"), (3, "silu"), (16, "silu"), (20, "silu"), (1, "gelu_tanh"),
                                           (5, "gelu_tanh"), (1, "gelu"), (16, "gelu")])
def test_gated_gemm_equals_gemm_then_the_gate(m, activation):
    from awq_edge.quant import QuantLinear
    from awq_edge.runtime.cuda import interleave_gate_up

    gen = torch.Generator().manual_seed(m)
    inter, k = 1536, 576
    q, scales, zeros = quantize(torch.randn(2 * inter, k, generator=gen), QConfig(4, 64, True))
    lin = interleave_gate_up(QuantLinear(q, scales, zeros, 64, bias=torch.randn(2 * inter, generator=gen)))
    nb = to_matmul_nbits(lin.q, lin.scales.half(), lin.zeros, 64, 4)
    w = kernels.repack_matmul_nbits(nb["B"].cuda(), nb["scales"].cuda(), nb["zero_points"].cuda(), k, 64)
    x = torch.randn(m, k, generator=gen).half().cuda()
    bias = lin.bias.half().cuda()
    y = kernels.gemm_gated(x, w, bias, activation)
    ref = TorchOps().gate_act(x.double() @ dequantize(lin.q, lin.scales, lin.zeros, 64).double().cuda().T
                              + bias.double(), activation)
    assert torch.isfinite(y).all() and y.shape == (m, inter)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3


@needs_library
@needs_gpu
@pytest.mark.parametrize("activation", sorted(kernels.GATES))
def test_gated_epilogue_rounds_its_own_activation_as_pytorch_does(activation):
    """With x = 0 every gate and up value is its bias, so the epilogue's fp16(act(gate)) * up is compared value by
    value: close enough to tell GELU-tanh from GELU-erf, which differ after fp16 rounding on about half of [-4, 4]."""
    from awq_edge.quant import QuantLinear
    from awq_edge.runtime.cuda import interleave_gate_up

    inter, k = 4096, 128
    q, scales, zeros = quantize(torch.randn(2 * inter, k, generator=torch.Generator().manual_seed(0)),
                                QConfig(4, 128, True))
    gate, up = torch.linspace(-4, 4, inter).half(), torch.linspace(0.5, 2, inter).half()
    lin = interleave_gate_up(QuantLinear(q, scales, zeros, 128, bias=torch.cat([gate, up]).float()))
    nb = to_matmul_nbits(lin.q, lin.scales.half(), lin.zeros, 128, 4)
    w = kernels.repack_matmul_nbits(nb["B"].cuda(), nb["scales"].cuda(), nb["zero_points"].cuda(), k, 128)
    y = kernels.gemm_gated(torch.zeros(1, k, dtype=torch.float16, device="cuda"), w, lin.bias.half().cuda(),
                           activation)[0]
    acts = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu}
    g, u = gate.cuda().float(), up.cuda()
    refs = {name: act(g).half() * u for name, act in acts.items()}  # fp16(act(gate)) * up, rounded by PyTorch
    ulp = torch.finfo(torch.float16).eps * refs[activation].float().abs().clamp_min(2 ** -14)
    assert ((y.float() - refs[activation].float()).abs() <= ulp).all()
    assert (y != refs[activation]).float().mean().item() < 0.01
    other = {"gelu_tanh": "gelu", "gelu": "gelu_tanh", "silu": "gelu"}[activation]
    assert (y != refs[other]).float().mean().item() > 0.2


@needs_library
@needs_gpu
@pytest.mark.parametrize("m, gated, bias, block", [(1, False, False, 128), (1, True, True, 64), (3, False, True, 32),
                                                   (16, True, False, 128), (20, False, False, 64)])
def test_gemm_with_folded_norms_matches_float64(m, gated, bias, block):
    """y = rsqrt(mean(h^2) + eps) * ((gamma * h) W^T) + b (gated: then the SiLU gate), and gamma' * y beside it."""
    gen = torch.Generator().manual_seed(m * 7 + block)
    n, k, eps = 2 * 1536 if gated else 1000, 4096 if m == 1 else 576 + 8, 1e-5  # k = 584: a partial last chunk
    q, scales, zeros = quantize(torch.randn(n, k, generator=gen), QConfig(4, block, True))
    nb = to_matmul_nbits(q, scales.half(), zeros, block, 4)
    w = kernels.repack_matmul_nbits(nb["B"].cuda(), nb["scales"].cuda(), nb["zero_points"].cuda(), k, block)
    wd = dequantize(q, scales, zeros, block).double().cuda()
    h = (torch.randn(m, k, generator=gen) * 3).half().cuda()
    gamma = (torch.rand(k, generator=gen) + 0.5).half().cuda()
    b = torch.randn(n, generator=gen).half().cuda() if bias else None
    x = gamma * h  # what the product before would have written as norm_out
    rstd = torch.rsqrt(h.double().pow(2).mean(-1, keepdim=True) + eps)
    ref = (x.double() @ wd.T) * rstd + (b.double() if bias else 0)
    # h's sums of squares over each 16 columns, as the product before writes them (sumsq_out): the mean from these
    h_sums = F.pad(h.float().pow(2), (0, 16 * kernels.sumsq_parts(k) - k)).view(m, -1, 16).sum(-1).contiguous()
    if gated:
        ref = TorchOps().silu_mul(ref)
        y = kernels.gemm_norm(x, w, b, gated=True, rms_input=h, eps=eps)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3
        y_sums = kernels.gemm_norm(x, w, b, gated=True, rms_input=h, eps=eps, rms_sumsq=h_sums)
        assert ((y_sums.double() - ref).norm() / ref.norm()).item() < 3e-3
        assert not torch.equal(kernels.gemm_norm(x, w, b, gated=True, rms_input=h, eps=eps, rms_sumsq=h_sums * 4),
                               y_sums)
        return
    nxt = (torch.rand(n, generator=gen) + 0.5).half().cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    norm_out = torch.full_like(out, float("nan"))
    sumsq = torch.full((m, kernels.sumsq_parts(n)), float("nan"), device="cuda")
    y, g = kernels.gemm_norm(x, w, b, rms_input=h, eps=eps, norm_weight=nxt, out=out, norm_out=norm_out,
                             sumsq_out=sumsq)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3
    assert torch.equal(g, nxt * y)  # exactly fp16(gamma' * y), as PyTorch rounds
    tiles = F.pad(y.double().pow(2), (0, 16 * sumsq.shape[1] - n)).view(m, -1, 16).sum(-1)  # the last tile partial
    assert torch.allclose(sumsq.double(), tiles, rtol=1e-5, atol=0)
    # The next product's mean from h's tile sums instead of h's rows: the same y up to fp32 summation order.
    y_sums = kernels.gemm_norm(x, w, b, rms_input=h, eps=eps, rms_sumsq=h_sums)
    assert ((y_sums.double() - ref).norm() / ref.norm()).item() < 2e-3
    assert ((y_sums.float() - y.float()).abs() <= 2e-3 * y.float().abs() + 1e-3).all()
    assert not torch.equal(kernels.gemm_norm(x, w, b, rms_input=h, eps=eps, rms_sumsq=h_sums * 4), y_sums)
    plain = kernels.gemm_norm(h, w, b)  # no folds: the plain product
    ref_plain = h.double() @ wd.T + (b.double() if bias else 0)
    assert ((plain.double() - ref_plain).norm() / ref_plain.norm()).item() < 2e-3


@needs_library
@needs_gpu
def test_gemm_norm_refuses_bad_folds_before_the_library():
    q, scales, zeros = quantize(torch.randn(32, 128), QConfig(4, 128, True))
    nb = to_matmul_nbits(q, scales.half(), zeros, 128, 4)
    w = kernels.repack_matmul_nbits(nb["B"].cuda(), nb["scales"].cuda(), nb["zero_points"].cuda(), 128, 128)
    x = torch.randn(1, 128).half().cuda()
    with pytest.raises(AwqEdgeError, match="not gated"):
        kernels.gemm_norm(x, w, gated=True, norm_weight=torch.ones(32).half().cuda())
    sums = torch.ones(1, 8, device="cuda")
    with pytest.raises(AwqEdgeError, match="not available with the gated epilogue"):
        kernels.gemm_norm(x, w, gated=True, sumsq_out=sums[:, :2])
    with pytest.raises(AwqEdgeError, match="needs rms_input"):
        kernels.gemm_norm(x, w, rms_sumsq=sums)
    with pytest.raises(AwqEdgeError, match=r"sumsq_out must be a contiguous fp32 CUDA tensor of \[1, 2\]"):
        kernels.gemm_norm(x, w, sumsq_out=sums)


@needs_library
@needs_gpu
@pytest.mark.parametrize("case", ["llama", "qwen2_bias", "untied", "qwen3_qk_norms", "phi3_fused", "gemma_gelu"])
def test_cuda_decode_steps_with_folded_norms_match_the_unfolded_steps_and_torch_folding(tmp_path, case, monkeypatch):
    write_checkpoint(tmp_path / "ck", **CASES[case])
    calls = {"rms_input": 0, "norm_weight": 0, "rms_sumsq": 0, "sumsq_out": 0}
    real = kernels.gemm_norm

    def counting(*args, **kw):
        for key in calls:
            calls[key] += kw.get(key) is not None
        return real(*args, **kw)

    monkeypatch.setattr(kernels, "gemm_norm", counting)
    weights = load_weights(tmp_path / "ck", "cuda", torch.float16, packed=True, max_len=64)
    dense = load_weights(tmp_path / "ck", "cuda", torch.float32, packed=False, max_len=64)
    out = {}
    for name, dec in {"folded": CudaDecoder(weights, CudaOps(weights, fold_norms=True), use_graphs=True),
                      "unfolded": CudaDecoder(weights, CudaOps(weights, fold_norms=False), use_graphs=True),
                      "folded_sums": CudaDecoder(weights, CudaOps(weights, norm_sums=True), use_graphs=True),
                      "torch_folded": CudaDecoder(dense, TorchOps(fold_norms=True), use_graphs=False)}.items():
        out[name] = np.stack([dec.forward(PROMPT[:4])[-1]] + [dec.forward([t])[-1] for t in PROMPT[4:]])
    assert calls["rms_input"] > 0 and calls["norm_weight"] > 0  # the folded decoders did fold
    assert calls["rms_sumsq"] > 0 and calls["sumsq_out"] > 0  # and folded_sums took the means from tile sums
    scale = np.abs(out["unfolded"]).max()
    np.testing.assert_allclose(out["folded"], out["unfolded"], atol=1e-2 * scale)
    np.testing.assert_allclose(out["folded"], out["folded_sums"], atol=2e-3 * scale)
    np.testing.assert_allclose(out["folded"], out["torch_folded"], atol=1e-2 * scale)


@needs_library
@needs_gpu
@pytest.mark.parametrize("case", ["llama", "mistral_window", "qwen2_bias", "qwen3_qk_norms", "phi3_fused",
                                  "gemma_gelu", "gemma2_softcaps", "gemma3_local_global"])
def test_cuda_decoder_matches_transformers_and_graph_replay_equals_eager(tmp_path, case):
    model, _ = write_checkpoint(tmp_path / "ck", **CASES[case])
    ref = hf_logits(model, PROMPT)
    tol = 2e-2 * np.abs(ref).max()
    weights = load_weights(tmp_path / "ck", "cuda", torch.float16, packed=True, max_len=64)
    runs = {}
    for graphs in (False, True):
        dec = CudaDecoder(weights, CudaOps(weights), use_graphs=graphs)
        np.testing.assert_allclose(dec.forward(PROMPT), ref, atol=tol)  # prefill rows < dense_rows: int4 GEMM
        dec.reset()
        steps = [dec.forward(PROMPT[:4])[-1]] + [dec.forward([t])[-1] for t in PROMPT[4:]]
        np.testing.assert_allclose(np.stack(steps), ref[3:], atol=tol)
        dec.reset()
        runs[graphs] = list(generate(dec, PROMPT, 24))
    assert runs[True] == runs[False]
    # Greedy tokens are transformers' own wherever its top two differ by more than the fp16 tolerance.
    ref = hf_logits(model, PROMPT + runs[True][:-1])[len(PROMPT) - 1:]
    chosen = ref[np.arange(len(runs[True])), runs[True]]
    assert np.all((chosen == ref.max(-1)) | (ref.max(-1) - chosen < tol))


@needs_library
@needs_gpu
@pytest.mark.parametrize("case", ["gemma2_softcaps", "gemma3_local_global"])
def test_gemma_boundaries_folded_into_the_products_give_the_same_decoding(tmp_path, case):
    """Gemma 2/3 with each block's boundary run by the output GEMV's last block (fold_boundaries): through the
    CUDA graphs, the greedy tokens of the two-launch boundary and logits step by step within fp32 reordering."""
    write_checkpoint(tmp_path / "ck", **CASES[case])
    weights = load_weights(tmp_path / "ck", "cuda", torch.float16, packed=True, max_len=64)
    decs = {fold: CudaDecoder(weights, CudaOps(weights, fold_boundaries=fold)) for fold in (False, True)}
    tokens = {}
    for fold, dec in decs.items():
        dec.eos_ids = set()
        tokens[fold] = list(generate(dec, PROMPT, 24))
    seq = PROMPT + tokens[False][:-1]  # both decoders on the same tokens: logits step by step
    logits = {}
    for fold, dec in decs.items():
        dec.reset()
        logits[fold] = np.stack([dec.forward(seq[:4])[-1]] + [dec.forward([t])[-1] for t in seq[4:]])
    tol = 2e-3 * np.abs(logits[False]).max()
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=tol)
    # the same greedy tokens, unless they part where the two-launch step's top two are within that tolerance
    ref = logits[False][len(PROMPT) - 4:]
    differ = [i for i, (a, b) in enumerate(zip(tokens[False], tokens[True])) if a != b]
    if differ:
        top2 = np.sort(ref[differ[0]])[-2:]
        assert top2[1] - top2[0] < tol, f"the tokens part at {differ[0]} without a near tie"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[needs_gpu, needs_library])])
def test_sampled_generation_chooses_on_the_decoder_and_repeats_with_its_seed(tmp_path, device, monkeypatch):
    """With temperature > 0, generate() lets the decoder sample (only the id leaves the device); the same seed
    gives the same tokens, through CUDA graphs on a GPU."""
    from awq_edge.runtime.sampling import Sampling

    write_checkpoint(tmp_path / "ck")
    if device == "cuda":
        dec = CudaDecoder.from_checkpoint(tmp_path / "ck", max_len=64)
    else:
        dec = torch_decoder(tmp_path / "ck")
    dec.eos_ids = set()
    calls = []
    real = dec.sample_step
    monkeypatch.setattr(dec, "sample_step", lambda *a: calls.append(a[0]) or real(*a))
    s = Sampling(0.9, 0.9, 20)
    runs = [list(generate(dec, PROMPT, 16, s, seed=seed)) for seed in (3, 3)]
    assert runs[0] == runs[1] and len(runs[0]) == 16
    assert len(calls) == 2 * 15 and calls[:15] == runs[0][:15]  # each sampled token is fed back
    # Every sampled token is among the 20 most likely under fp32 logits of the same context (25: fp16's rounding
    # may move a 20th token a few places).
    ref = torch_decoder(tmp_path / "ck")
    for i in range(1, 16):
        logits = ref.extend(PROMPT + runs[0][:i])
        assert runs[0][i] in np.argsort(-logits)[:20 if device == "cpu" else 25]


@needs_library
@needs_gpu
def test_cuda_prefill_through_dequantised_cublas_matches_the_int4_gemm(tmp_path):
    """Both prefill paths against transformers in fp32 on the same weights (two fp16 paths compared with each other
    differed by 5.1e-3 of the largest logit in one of 3072 logits on the H200: their accumulation orders differ)."""
    model, _ = write_checkpoint(tmp_path / "ck")
    ref = hf_logits(model, PROMPT)
    tol = 1e-2 * np.abs(ref).max()
    weights = load_weights(tmp_path / "ck", "cuda", torch.float16, packed=True, max_len=64)
    a = CudaDecoder(weights, CudaOps(weights, dense_rows=1 << 30)).forward(PROMPT)
    b = CudaDecoder(weights, CudaOps(weights, dense_rows=2)).forward(PROMPT)
    np.testing.assert_allclose(a, ref, atol=tol)
    np.testing.assert_allclose(b, ref, atol=tol)


@needs_library
@needs_gpu
def test_generate_command_runs_the_cuda_backend(tmp_path, capsys):
    from conftest import save_tiny_tokenizer

    write_checkpoint(tmp_path / "ck")
    save_tiny_tokenizer(tmp_path / "ck")
    assert main(["generate", str(tmp_path / "ck"), "--backend", "cuda", "--raw", "--prompt", "w5 w9 w12",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    json.loads((tmp_path / "ck" / "config.json").read_text())  # nothing rewritten


def _cuda_checkpoint_with_template(folder):
    """A tiny checkpoint with a tokenizer and a plain chat template (the chat command refuses a model without one)."""
    from conftest import tiny_tokenizer

    write_checkpoint(folder)
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(folder)
    return folder


@needs_library
@needs_gpu
def test_generate_command_samples_on_the_gpu_and_a_seed_repeats_its_text(tmp_path, capsys):
    """`awq-edge generate --backend cuda --temperature ...` as a user types it: the sampler runs on the GPU; the
    same seed gives the same text, other seeds other texts (12 tokens at temperature 1.5 over 256 ids)."""
    ck = _cuda_checkpoint_with_template(tmp_path / "ck")
    args = ["generate", str(ck), "--backend", "cuda", "--raw", "--prompt", "w5 w9 w12", "--max-new-tokens", "12",
            "--temperature", "1.5", "--top-p", "0.95", "--top-k", "0", "--seed"]

    def text(seed):
        assert main(args + [str(seed)]) == 0
        return capsys.readouterr().out

    first = text(7)
    assert first.endswith("\n") and text(7) == first
    assert any(text(seed) != first for seed in (8, 9, 10))


@needs_library
@needs_gpu
def test_chat_command_samples_on_the_gpu_turn_by_turn(tmp_path, capsys, monkeypatch):
    """`awq-edge chat --backend cuda --temperature ...`: two turns and a /reset, seeded, answered twice alike."""
    ck = _cuda_checkpoint_with_template(tmp_path / "ck")

    def session():
        chat_session(monkeypatch, ["w5 w9", "/reset", "w12 w3"])
        assert main(["chat", str(ck), "--backend", "cuda", "--max-new-tokens", "6", "--temperature", "0.8",
                     "--seed", "3"]) == 0
        return capsys.readouterr().out

    out = session()
    assert out.count("\n") >= 2 and session() == out


@needs_library
@needs_gpu
def test_pipelined_greedy_stops_cleanly_and_the_cache_holds_exactly_the_fed_tokens(tmp_path):
    write_checkpoint(tmp_path / "ck")
    weights = load_weights(tmp_path / "ck", "cuda", torch.float16, packed=True, max_len=64)
    dec = CudaDecoder(weights, CudaOps(weights))
    ref = list(generate(dec, PROMPT, 16))
    k = ref.index(ref[6])  # stop at the first occurrence of this id
    assert list(generate(dec, PROMPT, 16, stop_ids=[ref[k]])) == ref[:k]
    assert dec.tokens == PROMPT + ref[:k]  # the step queued past the stop left no trace in `tokens`
    cont = PROMPT + ref[: k + 1]
    fresh = CudaDecoder(weights, CudaOps(weights), use_graphs=False)
    np.testing.assert_allclose(dec.extend(cont), fresh.extend(cont), atol=1e-2 * np.abs(fresh.extend(cont)).max())
