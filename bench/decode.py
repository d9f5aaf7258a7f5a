"""Batch-1 decode speed of the CUDA backend against transformers and the memory-bandwidth limit (one GPU run).

For each model: tokens/s of greedy decoding after a prompt (median of --repeats), time to first token, peak GPU
memory, for
  ours           awq_edge.runtime.cuda: int4 GEMV kernels, static KV cache, one CUDA graph per step
  torch_int4     the same runtime and graph with torch's int4 kernel (tinygemm, bf16, group 128) in the linears
  hf_fp16_*      transformers fp16, generate() with its static cache: eager (disable_compile) and, with
                 --hf-compile, the torch.compile'd forward transformers picks by default for a static cache
  hf_bf16_*      the same in bf16 (real models only): the baseline whose output is right for Gemma, whose
                 residual stream overflows fp16 (its hf_fp16_* speed still counts; `nonfinite_logit_steps` says
                 how many greedy steps saw an inf/NaN logit)
and the bandwidth limit = measured copy bandwidth / bytes one decode step must read (MatMulNBits int4 weights,
the head as the runtime holds it, norms, one embedding row, the KV cache at the mean context of the run, within
each layer's window).
Llama-2-7B and Llama-3-8B are timed on random weights (speed only). A real model (--real NAME=CKPT[,FLOAT]: an
`awq-edge quantize` checkpoint of any family the runtime reads, e.g. SmolLM2 or Gemma-3-270M) is timed on its
checkpoint, with the greedy parity check of issue 4 against transformers on the same dequantised weights (fp16 and
fp32 references; bf16 and fp32 for Gemma families); its transformers baselines run the float folder FLOAT.

    PYTHONPATH=. python -P bench/decode.py --models smollm2,gemma3-270m --real smollm2=CK,HF_DIR \
        --real gemma3-270m=CK2,HF_DIR2 --out bench/results/decode.json
"""

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from awq_edge.arch import Spec, describe, rope_tables  # noqa: E402
from awq_edge.runtime import kernels  # noqa: E402
from awq_edge.runtime.sampling import Sampling, next_token  # noqa: E402
from awq_edge.runtime.cuda import (DEFAULT_MAX_LEN, CudaDecoder, CudaOps, DeviceLinear, Layer, Prescaled,  # noqa: E402
                                   Weights, attention_span, features_of, load_weights)
from bench.kernels import matmul_nbits_bytes  # noqa: E402

GROUP = 128
SAVE = lambda: None  # noqa: E731  (main() sets it: write the results so far)
SHAPES = {  # the configs of the public models (transformers config fields; model_type llama unless named)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, use_sliding_window=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, use_sliding_window=False),
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=2047),
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                      max_position_embeddings=131072, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=1024, query_pre_attn_scalar=256,
                      hidden_activation="gelu_pytorch_tanh"),
    "gemma2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                      max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"),
    "gemma3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=512, query_pre_attn_scalar=256,
                        hidden_activation="gelu_pytorch_tanh"),
    # every variant on shapes that run in seconds (tests/test_bench_decode.py), so a broken one fails a test
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=128, vocab_size=1024,
                        max_position_embeddings=512, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=128,
                        hidden_activation="gelu_pytorch_tanh", layer_types=["sliding_attention", "full_attention"]),
}
PARITY_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Robert Boulter is an English film and television actor. He had a guest-starring role",
    "def fibonacci(n):",
]


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy (median of 20 after warm-up)."""
    src = torch.randn(512 * 2**20, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    del src, dst
    return 2 * 512 * 2**20 * 2 / statistics.median(times)


def config_of_shape(shape: dict) -> dict:
    return {"model_type": "llama", **shape}


def spec_of_shape(shape: dict) -> Spec:
    """The decoder the runtime builds for a SHAPES entry: its family's block, windows, RoPE and features."""
    return describe(config_of_shape(shape))


def random_linear(n: int, k: int, bias: bool = False) -> DeviceLinear:
    nb = k // GROUP
    b = torch.randint(0, 256, (n, nb, GROUP // 2), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n * nb, device="cuda") * 0.004 + 0.001).half()
    zp = torch.full((n * math.ceil(nb / 2),), 0x88, dtype=torch.uint8, device="cuda")  # zero 8: centred weights
    return DeviceLinear(n, k, packed=kernels.repack_matmul_nbits(b, scales, zp, k, GROUP),
                        bias=(torch.randn(n, device="cuda") * 0.1).half() if bias else None)


def random_weights(shape: dict, max_len: int) -> Weights:
    """Random int4 weights of a SHAPES entry, every part its family has (q/k biases for Qwen2, q/k norms, Gemma's
    norms around each block, per-layer windows and RoPE tables, a tied head where the model ties it)."""
    spec = spec_of_shape(shape)
    d, f = spec.dims, spec.family
    q, kv, inter = d.heads * d.head_dim, d.kv_heads * d.head_dim, shape["intermediate_size"]
    norm = lambda n: (torch.rand(n, device="cuda") * 0.5 + 0.75).half()  # noqa: E731
    maybe = lambda cond, n: norm(n) if cond else None  # noqa: E731
    qkv_bias = config_of_shape(shape)["model_type"] == "qwen2"  # Qwen2's q/k/v projections carry biases
    tables = {kind: [t.cuda() for t in rope_tables(rope, max_len)] for kind, rope in spec.ropes.items()}
    layers = []
    for i in range(d.layers):
        cos, sin = tables[spec.rope_kinds[i]]
        layers.append(Layer(norm(d.hidden), norm(d.hidden), random_linear(q + 2 * kv, d.hidden, qkv_bias),
                            random_linear(d.hidden, q), random_linear(2 * inter, d.hidden),
                            random_linear(d.hidden, inter),
                            maybe(f.qk_norms, d.head_dim), maybe(f.qk_norms, d.head_dim),
                            maybe(f.attn_out_norm, d.hidden), maybe(f.mlp_out_norm, d.hidden), spec.windows[i],
                            cos, sin))
    embed = (torch.randn(d.vocab, d.hidden, device="cuda") * 0.02).half()
    head = DeviceLinear(d.vocab, d.hidden, weight=embed if d.tied else
                        (torch.randn(d.vocab, d.hidden, device="cuda") * 0.02).half())
    return Weights(d, embed, layers, norm(d.hidden), head, cos, sin, features_of(spec))


def step_bytes(w: Weights, mean_context: float) -> dict:
    """Bytes one decode step must read: int4 linears in MatMulNBits form (the least any int4 format needs)."""
    d = w.dims
    lin = sum(matmul_nbits_bytes(x.n, x.k, GROUP) if x.packed is not None else x.nbytes()
              for L in w.layers for x in (L.qkv, L.o, L.gate_up, L.down))
    head = matmul_nbits_bytes(w.lm_head.n, w.lm_head.k, GROUP) if w.lm_head.packed is not None else w.lm_head.nbytes()
    small = w.norm.nbytes + w.embed[0].nbytes + sum(
        t.nbytes for L in w.layers
        for t in (L.input_norm, L.post_norm, L.q_norm, L.k_norm, L.attn_out_norm, L.mlp_out_norm) if t is not None)
    window = lambda L: d.window if L.window is None else L.window  # noqa: E731  (0: the whole context)
    kv = sum(2 * d.kv_heads * d.head_dim * 2 * (min(mean_context, window(L)) if window(L) else mean_context)
             for L in w.layers)
    return {"linears": lin, "lm_head": head, "norms_embedding": small, "kv_cache": kv,
            "total": lin + head + small + kv}


class TinyGemmOps(CudaOps):
    """CudaOps with torch's int4 kernel in every int4 linear (random weights: for timing only)."""

    def __init__(self, weights):
        super().__init__(weights, fold_norms=False)  # RMSNorm as its own kernel: the folds need our GEMV
        self.w4 = {}
        for L in weights.layers:
            for lin in (L.qkv, L.o, L.gate_up, L.down):
                packed = torch.ops.aten._convert_weight_to_int4pack(
                    torch.randint(0, 256, (lin.n, lin.k // 2), dtype=torch.uint8, device="cuda"), 8)
                sz = (torch.rand(lin.k // GROUP, lin.n, 2, device="cuda") * 0.004).bfloat16()
                self.w4[id(lin)] = (packed, sz)

    def linear(self, x, lin, residual=None):
        if lin.packed is None:
            return super().linear(x, lin, residual)
        packed, sz = self.w4[id(lin)]
        y = torch.ops.aten._weight_int4pack_mm(x.bfloat16(), packed, GROUP, sz).half()
        if lin.bias is not None:
            y = y + lin.bias
        return y if residual is None else y + residual

    def gate_up_act(self, x, lin, activation: str = "silu"):
        return self.gate_act(self.linear(x, lin), activation)  # torch's kernel, then the gate (not our gated GEMM)


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def time_runtime(dec: CudaDecoder, prompt: list, new: int, repeats: int) -> dict:
    """TTFT = prefill + the first token's argmax; decode tok/s over the next new - 1 graph steps (greedy_tokens:
    each step queued before the previous one's id is read, as generate() runs them)."""
    import numpy as np

    ttfts, rates = [], []
    for r in range(repeats + 1):  # the first run captures the graph and warms up
        dec.reset()
        ttft, logits = sync_time(lambda: dec.extend(prompt))
        token = int(np.argmax(logits))

        def loop():
            return list(dec.greedy_tokens(token, new - 1))

        dt, _ = sync_time(loop)
        if r:
            ttfts.append(ttft)
            rates.append((new - 1) / dt)
    return {"tok_s": statistics.median(rates), "tok_s_all": rates, "ttft_s": statistics.median(ttfts)}


SAMPLED = Sampling(temperature=0.8, top_p=0.95, top_k=50)  # a chat assistant's usual setting


def time_sampled(dec: CudaDecoder, prompt: list, new: int, repeats: int, on_device: bool) -> dict:
    """Decode tok/s sampling with SAMPLED: the choice on the GPU (CudaDecoder.sample_step, generate()'s path for
    this backend), or from the logits copied to the host each step (next_token in numpy, the path of a decoder
    that cannot sample)."""
    import numpy as np

    rates = []
    for r in range(repeats + 1):  # the first run captures the graph and warms up
        dec.reset()
        rng, gen = np.random.default_rng(r), dec.device_generator(r)
        first = next_token(dec.extend(prompt), SAMPLED, rng)

        def loop(token=first):
            for _ in range(new - 1):
                token = (dec.sample_step(token, SAMPLED, gen) if on_device
                         else next_token(dec.forward([token])[-1], SAMPLED, rng))

        dt, _ = sync_time(loop)
        if r:
            rates.append((new - 1) / dt)
    return {"tok_s": statistics.median(rates), "tok_s_all": rates, "sampling": asdict(SAMPLED)}


def cache_len(max_positions: int, args, least: int) -> int:
    """The KV cache's positions: --max-len, else what `awq-edge generate` allocates (DEFAULT_MAX_LEN, or the model's
    maximum if smaller), at least `least`."""
    return max(args.max_len or min(DEFAULT_MAX_LEN, max_positions), least)


def time_ours(weights: Weights, prompt: list, new: int, repeats: int, ops=None, spans: bool = True) -> dict:
    torch.cuda.reset_peak_memory_stats()
    dec = CudaDecoder(weights, ops or CudaOps(weights), spans=spans)
    out = time_runtime(dec, prompt, new, repeats)
    out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    del dec
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A stopping criterion that never stops and records when each new token is ready (transformers syncs on
    every step anyway to check for finished sequences)."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def hf_generate(model, ids, new: int, compile_forward: bool = False, **kwargs):
    """generate() of exactly `new` greedy tokens with transformers' static cache. No end-of-sequence id, neither
    passed nor left in the model's generation config, and min_new_tokens = new: nothing can end it early, not
    even NaN logits (Gemma in fp16)."""
    model.generation_config.eos_token_id = None
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                          disable_compile=not compile_forward, eos_token_id=None, pad_token_id=0, **kwargs)


def time_hf(model, prompt: list, new: int, repeats: int, compile_forward: bool) -> dict:
    """generate() with transformers' static cache; TTFT and per-step times from a stopping-criterion clock."""
    from transformers import StoppingCriteriaList

    device = model.device
    ids = torch.tensor([prompt], device=device)

    def run():
        clock = StepClock(device)
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf_generate(model, ids, new, compile_forward, stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == len(prompt) + new and len(clock.times) == new, (tuple(out.shape), len(clock.times))
        return clock.times[0] - start, (new - 1) / (clock.times[-1] - clock.times[0])

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up (and compilation)
    runs = [run() for _ in range(repeats)]
    return {"tok_s": statistics.median(r[1] for r in runs), "tok_s_all": [r[1] for r in runs],
            "ttft_s": statistics.median(r[0] for r in runs),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def nonfinite_logit_steps(model, prompt: list, new: int) -> int:
    """How many of the `new` greedy steps of the timed generate() (eager) see an inf or NaN logit: the speed of
    such a run counts, its output does not."""
    with torch.inference_mode():
        out = hf_generate(model, torch.tensor([prompt], device=model.device), new, output_logits=True,
                          return_dict_in_generate=True)
    return sum(int(not torch.isfinite(step).all()) for step in out.logits)


def hf_random(shape: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_of_shape(shape)),
                                                dtype=torch.float16).eval()


def hf_real(ckpt: Path, float_dir: Path | None, dtype, device="cuda"):
    """transformers' model for a real checkpoint's speed baseline: its float folder, else the checkpoint
    dequantised (the same shapes: transformers' speed does not depend on the weights' values)."""
    from transformers import AutoModelForCausalLM

    if float_dir:
        model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=dtype, local_files_only=True)
    else:
        from awq_edge.checkpoint.reader import load_quantized_model

        model = load_quantized_model(ckpt, dtype=dtype)[0]
    return model.to(device).eval()


def free():
    gc.collect()
    torch.cuda.empty_cache()


def _rounded(d: dict) -> dict:
    return {k: _rounded(v) if isinstance(v, dict) else round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


def bench_random(name: str, args, copy_bw: float, res: dict) -> dict:
    shape = SHAPES[name]
    prompt = torch.randint(0, shape["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    max_len = cache_len(shape["max_position_embeddings"], args, args.prompt + args.new)
    weights = random_weights(shape, max_len)
    res["shape"], res["max_len"] = shape, max_len
    res["bytes_per_step"] = step_bytes(weights, args.prompt + args.new / 2)
    res["bandwidth_limit_tok_s"] = copy_bw / res["bytes_per_step"]["total"]
    res["ours"] = time_ours(weights, prompt, args.new, args.repeats)
    print(name, "ours", res["ours"], flush=True)
    if "ours_unfolded" in args.variants:  # the same runtime with RMSNorm as a kernel of its own (r6's step)
        res["ours_unfolded"] = time_ours(weights, prompt, args.new, args.repeats,
                                         CudaOps(weights, fold_norms=False))
        print(name, "ours_unfolded", res["ours_unfolded"], flush=True)
    if "ours_fold_boundaries" in args.variants and any(L.attn_out_norm is not None for L in weights.layers):
        # Gemma 2/3: each block's boundary run by its output GEMV's last block (two launches a layer fewer)
        res["ours_fold_boundaries"] = time_ours(weights, prompt, args.new, args.repeats,
                                                CudaOps(weights, fold_boundaries=True))
        print(name, "ours_fold_boundaries", res["ours_fold_boundaries"], flush=True)
    if "ours_fullspan" in args.variants:  # every step's attention launched over the whole cache, in one graph
        res["ours_fullspan"] = time_ours(weights, prompt, args.new, args.repeats, spans=False)
        print(name, "ours_fullspan", res["ours_fullspan"], flush=True)
    if "ours_sampled" in args.variants:  # sampling on the GPU against sampling from host logits, side by side
        dec = CudaDecoder(weights, CudaOps(weights))
        for key, on_device in (("ours_sampled", True), ("ours_sampled_host", False)):
            res[key] = time_sampled(dec, prompt, args.new, args.repeats, on_device)
            print(name, key, res[key], flush=True)
        del dec
        free()
    if args.breakdown:
        res["breakdown_us"] = breakdown_of(weights, args.prompt + args.new // 2)
        print(name, "breakdown us/layer", _rounded(res["breakdown_us"]), flush=True)
    SAVE()
    if "torch_int4" in args.variants:
        res["torch_int4"] = time_ours(weights, prompt, args.new, args.repeats, TinyGemmOps(weights))
        print(name, "torch_int4", res["torch_int4"], flush=True)
    del weights
    free()
    bench_hf(name, lambda: hf_random(shape), prompt, args, res)
    return res


def bench_hf(name, load, prompt, args, res: dict, dtype: str = "fp16") -> dict:
    """transformers' decode speed with the model load() returns (in `dtype`, which names the keys), if
    --variants asks for it; the model is released after."""
    keys = {}
    for compiled in ([False, True] if args.hf_compile else [False]):
        key = f"hf_{dtype}_static_{'compiled' if compiled else 'eager'}"
        if key.replace("_static", "") in args.variants or "hf" in args.variants:
            keys[key] = compiled
    if not keys:
        return res
    model = load()
    nonfinite = None
    for key, compiled in keys.items():
        t = time.perf_counter()
        res[key] = time_hf(model, prompt, args.new, args.repeats, compiled)
        res[key]["wall_s"] = time.perf_counter() - t
        if nonfinite is None:  # the same forward compiled or not: one check per model
            nonfinite = nonfinite_logit_steps(model, prompt, args.new)
        res[key].update(nonfinite_logit_steps=nonfinite, attn_implementation=model.config._attn_implementation)
        print(name, key, res[key], flush=True)
        SAVE()
    del model
    free()
    return res


DTYPE_KEYS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def reference_dtypes(model_type: str) -> tuple:
    """The parity references: fp16 and fp32, but bf16 for fp16 in Gemma families, whose residual stream
    overflows fp16 in transformers (inf/NaN logits; our runtime keeps that stream in fp32)."""
    return (torch.bfloat16 if model_type.startswith("gemma") else torch.float16, torch.float32)


def prompt_ids(tok, text: str) -> list:
    """A user turn through the tokenizer's chat template, or, for a base model without one (Gemma-3-270M), the
    plain text after BOS."""
    if getattr(tok, "chat_template", None):
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    ids = list(tok(text).input_ids)
    bos = tok.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def greedy_parity(ckpt: Path, dec, n_tokens: int, dtypes=(torch.float16, torch.float32)) -> dict:
    """Ours (the decoder `dec`) vs transformers on the same dequantised weights in each of `dtypes`, on the
    decoder's device: 5 prompts x n_tokens greedy tokens."""
    from awq_edge.checkpoint.reader import load_quantized_model
    from awq_edge.runtime.generate import generate

    device = dec.w.embed.device
    rows, prompt_format = [], None
    for dtype in dtypes:
        model, tok = load_quantized_model(ckpt, dtype=dtype)
        model = model.to(device).eval()
        prompt_format = "chat_template" if getattr(tok, "chat_template", None) else "text_after_bos"
        for p in PARITY_PROMPTS:
            ids = prompt_ids(tok, p)
            with torch.inference_mode():
                ref = model.generate(torch.tensor([ids], device=device), max_new_tokens=n_tokens,
                                     min_new_tokens=n_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(ids):].tolist()
            dec.reset()
            dec.eos_ids = set()
            ours = list(generate(dec, ids, n_tokens))
            first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
            row = {"reference": str(dtype).replace("torch.", ""), "prompt": p, "prompt_tokens": len(ids),
                   "identical": first is None and len(ours) == len(ref) == n_tokens, "first_divergence": first,
                   "text_ours": tok.decode(ours)}
            if first is not None:  # the reference's own logits at the divergence: how close was the call?
                with torch.inference_mode():
                    lg = model(torch.tensor([ids + ref[:first]], device=device)).logits[0, -1].float()
                dec.reset()
                ol = torch.tensor(dec.extend(ids + ref[:first])).to(device)
                top = torch.topk(lg, 2)
                row.update(ref_top2=[top.indices.tolist(), top.values.tolist()],
                           ref_logit_of_ours=lg[ours[first]].item(), ours_logit_gap=(ol[ours[first]] - ol[ref[first]]).item(),
                           max_abs_logit_diff=(ol - lg).abs().max().item(), max_abs_logit=lg.abs().max().item())
            rows.append(row)
            print("parity", {k: v for k, v in row.items() if k != "text_ours"}, flush=True)
        del model
        free()
    out = {"rows": rows, "prompts": len(PARITY_PROMPTS), "prompt_format": prompt_format,
           "references": [DTYPE_KEYS[d] for d in dtypes]}
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        out[f"identical_{DTYPE_KEYS[dtype]}"] = sum(r["identical"] for r in rows if r["reference"] == name)
    return out


def speed_prompt(ckpt: Path, vocab: int, n: int) -> tuple:
    """n random ids (the speed does not depend on them), the first one BOS where the tokenizer starts every text
    with it (Gemma: BOS's activations are the ones that outgrow fp16, as in any real prompt, so an fp16 baseline
    shows it); and that BOS id, or None."""
    from awq_edge.checkpoint.hf_folder import load_tokenizer
    from awq_edge.quantizer.eval import adds_bos

    prompt = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    tok = load_tokenizer(ckpt)
    bos = tok.bos_token_id if adds_bos(tok) else None
    if bos is not None:
        prompt[0] = bos
    return prompt, bos


def bench_real(name: str, ckpt: Path, float_dir: Path | None, args, copy_bw: float, res: dict) -> dict:
    """A real quantised checkpoint: parity, our speed, transformers' speed in fp16 and bf16."""
    config = json.loads((ckpt / "config.json").read_text())
    max_len = cache_len(config.get("max_position_embeddings") or DEFAULT_MAX_LEN, args,
                        max(args.prompt + args.new, args.parity + 128))  # room for a parity prompt and its tokens
    weights = load_weights(ckpt, "cuda", torch.float16, packed=True, max_len=max_len)
    res["max_len"] = weights.max_len
    prompt, bos = speed_prompt(ckpt, weights.dims.vocab, args.prompt)
    res.update(model_type=config["model_type"], checkpoint_dir=str(ckpt), float_dir=float_dir and str(float_dir),
               checkpoint=config["quantization_config"], speed_prompt_bos=bos)
    res["bytes_per_step"] = step_bytes(weights, args.prompt + args.new / 2)
    res["bandwidth_limit_tok_s"] = copy_bw / res["bytes_per_step"]["total"]
    if args.parity:
        dec = CudaDecoder(weights, CudaOps(weights))
        res["parity"] = attempt(res, "parity", lambda: greedy_parity(ckpt, dec, args.parity,
                                                                      reference_dtypes(config["model_type"])))
        del dec
        free()
        SAVE()
    res["ours"] = time_ours(weights, prompt, args.new, args.repeats)
    print(name, "ours", res["ours"], flush=True)
    SAVE()
    del weights
    free()
    for dtype in (torch.float16, torch.bfloat16):
        key = f"hf_{DTYPE_KEYS[dtype]}"
        attempt(res, key, lambda d=dtype: bench_hf(name, lambda: hf_real(ckpt, float_dir, d), prompt, args, res,
                                                   DTYPE_KEYS[d]))
        free()
    return res


def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of fn() (warmed up on a side stream first)."""
    return statistics.median(graph_times(fn, reps))


def graph_times(fn, reps: int = 20, after=None) -> list:
    """Seconds of each of reps timed replays of a CUDA graph of fn() (warmed up on a side stream first, then 5
    untimed replays); after(), if given, runs once each timed replay has finished (bench/placement.py reads its
    probe there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
        if after:
            after()
    return times


@torch.inference_mode()
def breakdown_of(w: Weights, context: int) -> dict:
    """Microseconds per layer of each operation of a decode step (graphs of all layers' calls, weights from
    HBM), beside the whole step: where the time goes."""
    dec = CudaDecoder(w, CudaOps(w))
    ops, d = dec.ops, w.dims
    dec.pos.fill_(context)
    dec.span = attention_span(context + 1, dec.context_length)  # the attention launch a step at `context` makes
    h = torch.randn(1, d.hidden, dtype=torch.float16, device="cuda")
    x = torch.randn(1, d.hidden, dtype=torch.float16, device="cuda")
    qkv = torch.randn(1, w.layers[0].qkv.n, dtype=torch.float16, device="cuda")
    a = torch.randn(1, d.heads * d.head_dim, dtype=torch.float16, device="cuda")
    act = torch.randn(1, w.layers[0].down.k, dtype=torch.float16, device="cuda")
    for kc, vc in zip(dec.k_cache, dec.v_cache):
        kc.normal_()
        vc.normal_()
    L, n = w.layers, len(w.layers)
    if dec.sandwich:
        return _sandwich_breakdown(dec, x, h, qkv, a, act, context)
    nxt = [l.input_norm for l in L[1:]] + [None]  # the last down GEMV writes no gamma * h (the final norm is a kernel)
    # gamma * h with its per-tile sums of squares, as the GEMV before a norm leaves it with norm_sums (mean square 1)
    x_sums = Prescaled(x, torch.full((1, kernels.sumsq_parts(d.hidden)), 16.0, device="cuda"))
    xp = x_sums if ops.norm_sums else x
    # The step's operations as the decoder calls them, norms folded into the GEMVs beside them (layer 0's input norm
    # is a kernel in the real step; here every qkv GEMV is timed folded).
    parts = {
        "qkv_gemv_norm": lambda: [ops.norm_linear(h, l.input_norm, d.eps, l.qkv, prescaled=xp) for l in L],
        "attention": lambda: [dec._attend(i, l, qkv, dec.pos, None) for i, l in enumerate(L)],  # as the step calls it
        "o_gemv_residual_norm": lambda: [ops.residual_linear(a, l.o, h, next_norm=l.post_norm) for l in L],
        "gate_up_gemv_silu_norm": lambda: [ops.norm_linear(h, l.post_norm, d.eps, l.gate_up, gated=True,
                                                           prescaled=xp) for l in L],
        "down_gemv_residual_norm": lambda: [ops.residual_linear(act, l.down, h, next_norm=nxt[i])
                                            for i, l in enumerate(L)],
    }
    unfolded = {  # the same without the folds: RMSNorm as a kernel, plain GEMVs (r6's step)
        "rmsnorm": lambda: [ops.rmsnorm(h, l.input_norm, d.eps) for l in L],
        "qkv_gemv": lambda: [ops.linear(x, l.qkv) for l in L],
        "o_gemv_residual": lambda: [ops.linear(a, l.o, residual=h) for l in L],
        "rmsnorm_2": lambda: [ops.rmsnorm(h, l.post_norm, d.eps) for l in L],
        "gate_up_gemv_silu": lambda: [ops.gate_up_act(x, l.gate_up, w.features.activation) for l in L],
        "down_gemv_residual": lambda: [ops.linear(act, l.down, residual=h) for l in L],
    }
    res = {k: graph_time(f) / n * 1e6 for k, f in parts.items()}
    res["sum_per_layer"] = sum(res.values())
    res["unfolded"] = {k: graph_time(f) / n * 1e6 for k, f in unfolded.items()}
    def consumers(given):  # the folded norms' GEMVs with the mean from h's rows (x) or from the tile sums (x_sums)
        return {"qkv_gemv_norm": lambda: [ops.norm_linear(h, l.input_norm, d.eps, l.qkv, prescaled=given) for l in L],
                "gate_up_gemv_silu_norm": lambda: [ops.norm_linear(h, l.post_norm, d.eps, l.gate_up, gated=True,
                                                                   prescaled=given) for l in L]}

    def producers(sums):  # o and down with or without writing the tile sums
        was, ops.norm_sums = ops.norm_sums, sums
        t = {"o_gemv_residual_norm": graph_time(parts["o_gemv_residual_norm"]) / n * 1e6,
             "down_gemv_residual_norm": graph_time(parts["down_gemv_residual_norm"]) / n * 1e6}
        ops.norm_sums = was
        return t

    # r18's A/B per product: norm_rows without the sums, norm_sums with them
    res["norm_rows"] = {**{k: graph_time(f) / n * 1e6 for k, f in consumers(x).items()}, **producers(False)}
    res["norm_sums"] = {**{k: graph_time(f) / n * 1e6 for k, f in consumers(x_sums).items()}, **producers(True)}
    res["lm_head_and_final_norm_us"] = graph_time(lambda: dec._logits(dec._norm(h, w.norm))) * 1e6
    res["full_step_us"] = graph_time(dec._step) * 1e6
    kernels.set_programmatic_launch(False)
    res["full_step_no_pdl_us"] = graph_time(dec._step) * 1e6
    kernels.set_programmatic_launch(True)
    was = ops.norm_sums  # r18's A/B: the means from h's rows (the default) or from the tile sums
    for sums in (False, True):
        ops.norm_sums = sums
        res["full_step_norm_sums_us" if sums else "full_step_norm_rows_us"] = graph_time(dec._step) * 1e6
    ops.norm_sums = was
    ops.fold_norms = False
    res["full_step_unfolded_us"] = graph_time(dec._step) * 1e6
    ops.fold_norms = True
    res.update(fullspan_times(dec, qkv), context=context, span=dec.span)
    del dec
    free()
    return res


def fullspan_times(dec: CudaDecoder, qkv) -> dict:
    """The attention per layer and the whole step with each attention launch over the whole cache (as every step
    ran before the spans), beside the span's own figures in the breakdown."""
    span, dec.span = dec.span, None
    L = dec.w.layers
    out = {"attention_fullspan": graph_time(lambda: [dec._attend(i, layer, qkv, dec.pos, None)
                                                      for i, layer in enumerate(L)]) / len(L) * 1e6,
           "full_step_fullspan_us": graph_time(dec._step) * 1e6}
    dec.span = span
    return out


def _sandwich_breakdown(dec: CudaDecoder, x, y, qkv, a, act, context: int) -> dict:
    """breakdown_of for Gemma 2/3's block: the products, attention (q/k norms, soft-capping) and the two block
    boundaries (residual_norm) per layer, the head, the whole step."""
    w, ops, d, feats = dec.w, dec.ops, dec.w.dims, dec.w.features
    L, n = w.layers, len(w.layers)
    h = torch.randn(1, d.hidden, dtype=torch.float32, device="cuda")

    parts = {
        "qkv_gemv": lambda: [ops.linear(x, l.qkv) for l in L],
        "attention": lambda: [dec._attend(i, l, qkv, dec.pos, None) for i, l in enumerate(L)],  # as the step calls it
        "o_gemv": lambda: [ops.linear(a, l.o) for l in L],
        "residual_norm_x2": lambda: [ops.residual_norm(y, l.attn_out_norm, h, l.post_norm, d.eps) for l in L for _ in
                                     range(2)],
        "gate_up_gemv_gate": lambda: [ops.gate_up_act(x, l.gate_up, feats.activation) for l in L],
        "down_gemv": lambda: [ops.linear(act, l.down) for l in L],
    }
    res = {k: graph_time(f) / n * 1e6 for k, f in parts.items()}
    res["sum_per_layer"] = sum(res.values())
    res["lm_head_us"] = graph_time(lambda: dec._logits(x)) * 1e6  # the final norm is the last boundary's
    res["full_step_us"] = graph_time(dec._step) * 1e6
    was = ops.fold_boundaries, ops.ticket  # the step with each boundary in its product's last block
    ops.fold_boundaries, ops.ticket = True, torch.zeros(1, dtype=torch.int32, device="cuda")
    res["full_step_fold_boundaries_us"] = graph_time(dec._step) * 1e6
    ops.fold_boundaries, ops.ticket = was
    res.update(fullspan_times(dec, qkv), context=context, span=dec.span)
    del dec
    free()
    return res


def parse_real(values, error) -> dict:
    """{NAME: (checkpoint, float folder or None)} from --real values NAME=CKPT[,FLOAT], several to a value separated
    by commas (a piece with '=' starts the next model; paths holding ',' or '=' cannot be passed)."""
    real = {}
    for value in values:
        name = None
        for piece in value.split(","):
            if "=" in piece:
                name, ckpt = piece.split("=", 1)
                if not name or not ckpt:
                    error(f"--real {value!r}: an empty NAME or CKPT")
                if name in real:
                    error(f"--real: the name {name!r} is given twice")
                real[name] = [ckpt, None]
            elif name is not None and real[name][1] is None and piece:
                real[name][1] = piece
            else:
                error(f"--real {value!r}: expected NAME=CKPT[,FLOAT] (comma-separated for several)")
    for name, (ckpt, float_dir) in real.items():
        if not (Path(ckpt) / "config.json").is_file():
            error(f"--real {name}: {ckpt} has no config.json (pass an `awq-edge quantize` output folder)")
        if float_dir and not (Path(float_dir) / "config.json").is_file():
            error(f"--real {name}: float folder {float_dir} has no config.json")
    return {n: (Path(c), Path(f) if f else None) for n, (c, f) in real.items()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b,llama3-8b,smollm2",
                    help=f"comma list of random-weight shapes ({', '.join(SHAPES)}) and names given to --real (one "
                         "without a --real checkpoint is skipped; a --real model not listed runs after the list)")
    ap.add_argument("--real", action="append", default=[], metavar="NAME=CKPT[,FLOAT]",
                    help="a real model: NAME labels its results, CKPT is its `awq-edge quantize` checkpoint, FLOAT "
                         "its float folder for the transformers baselines (default: the checkpoint dequantised, "
                         "the same shapes); repeat, or separate several with commas")
    ap.add_argument("--variants", default="ours,torch_int4,hf",
                    help="comma list of: ours (always run), ours_unfolded, ours_fullspan (every step's attention "
                         "over the whole cache, one graph), ours_fold_boundaries (Gemma 2/3 shapes: each block "
                         "boundary in its output GEMV), ours_sampled (sampling on the GPU and, "
                         "beside it, from host logits) and torch_int4 (random-weight models only), hf (or one of "
                         "hf_fp16_eager, hf_bf16_eager, hf_fp16_compiled, ...)")
    ap.add_argument("--hf-compile", action="store_true", help="also time transformers' compiled static-cache forward")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=0,
                    help="KV cache positions (default: what `awq-edge generate` allocates, 4096 or the model's "
                         "maximum if smaller; at least --prompt + --new)")
    ap.add_argument("--smollm2-ckpt", help="the same as --real smollm2=CKPT")
    ap.add_argument("--smollm2-float", help="with --smollm2-ckpt: the same as --real smollm2=CKPT,FLOAT")
    ap.add_argument("--parity", type=int, default=64, help="greedy tokens per parity prompt (0 = skip)")
    ap.add_argument("--breakdown", action="store_true", help="per-operation times of a decode step (random shapes)")
    ap.add_argument("--label", default="", help="a note stored with the results (the library's build flags)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "decode.json"))
    args = ap.parse_args(argv)
    if args.new < 2 or args.prompt < 1 or args.repeats < 1 or args.parity < 0:
        ap.error("--new must be at least 2, --prompt and --repeats at least 1, --parity at least 0")
    if args.max_len and args.max_len < args.prompt + args.new:
        ap.error(f"--max-len {args.max_len} holds fewer positions than --prompt + --new ({args.prompt + args.new})")
    args.variants = args.variants.split(",")
    if args.smollm2_float and not args.smollm2_ckpt:
        ap.error("--smollm2-float needs --smollm2-ckpt")
    if args.smollm2_ckpt:
        args.real.append(f"smollm2={args.smollm2_ckpt}" + (f",{args.smollm2_float}" if args.smollm2_float else ""))
    args.real = parse_real(args.real, ap.error)
    listed = args.models.split(",")
    unknown = [n for n in listed if n not in SHAPES and n not in args.real and n != "smollm2"]
    if unknown:
        ap.error(f"--models {','.join(unknown)}: neither a random shape ({', '.join(SHAPES)}) nor given to --real")
    args.models = listed + [n for n in args.real if n not in listed]
    return args


def attempt(res: dict, key: str, fn):
    """fn(), or, if it raises, its traceback under res[key + '_error'] (one failing part leaves the others' results)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001  (a benchmark run is one shot on a lent machine: record and go on)
        res[f"{key}_error"] = traceback.format_exc()
        print(f"{key} failed:\n{res[f'{key}_error']}", file=sys.stderr, flush=True)
        return None


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs an NVIDIA GPU")
    copy_bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "copy_bandwidth_Bps": copy_bw, "prompt_tokens": args.prompt, "new_tokens": args.new,
              "repeats": args.repeats, "group_size": GROUP, "models": {}}
    import transformers

    result["transformers"] = transformers.__version__
    result["kernels_library"] = str(kernels.library_path())
    result["label"] = args.label
    result["command"] = " ".join(["python -P bench/decode.py", *sys.argv[1:]])
    print(f"{result['device']}: copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    global SAVE

    def save():  # after every variant, so a run cut short keeps what it measured
        for m in result["models"].values():
            for key in [k for k in m if isinstance(m[k], dict) and "tok_s" in m[k]]:
                if "bandwidth_limit_tok_s" in m:
                    m[key]["frac_of_bandwidth_limit"] = m[key]["tok_s"] / m["bandwidth_limit_tok_s"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    SAVE = save
    for name in args.models:
        if name not in args.real and name not in SHAPES:
            print(f"{name}: skipped (no --real checkpoint)", flush=True)
            continue
        res = result["models"][name] = {}
        if name in args.real:
            attempt(res, "model", lambda: bench_real(name, *args.real[name], args, copy_bw, res))
        else:
            bench_random(name, args, copy_bw, res)
        save()
        free()
    print(json.dumps({n: {k: v["tok_s"] for k, v in m.items() if isinstance(v, dict) and "tok_s" in v}
                      | {"limit": m.get("bandwidth_limit_tok_s")} for n, m in result["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
