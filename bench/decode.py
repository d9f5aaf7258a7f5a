"""Batch-1 decode speed of the CUDA backend against transformers fp16 and the memory-bandwidth limit (one GPU run).

For each model: tokens/s of greedy decoding after a prompt (median of --repeats), time to first token, peak GPU
memory, for
  ours           awq_edge.runtime.cuda: int4 GEMV kernels, static KV cache, one CUDA graph per step
  torch_int4     the same runtime and graph with torch's int4 kernel (tinygemm, bf16, group 128) in the linears
  hf_fp16_*      transformers fp16, generate() with its static cache: eager (disable_compile) and, with
                 --hf-compile, the torch.compile'd forward transformers picks by default for a static cache
and the bandwidth limit = measured copy bandwidth / bytes one decode step must read (MatMulNBits int4 weights,
fp16 head, norms, one embedding row, the KV cache at the mean context of the run).
Llama-2-7B and Llama-3-8B are timed on random weights (speed only); SmolLM2 on its real quantised checkpoint,
with the greedy parity check of issue 4 against PyTorch on the same dequantised weights.

    PYTHONPATH=. python -P bench/decode.py --smollm2-ckpt CK --smollm2-float HF_DIR --out bench/results/decode.json
"""

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from awq_edge import kernels  # noqa: E402
from bench.kernels import matmul_nbits_bytes  # noqa: E402
from awq_edge.export.decoder import Dims  # noqa: E402
from awq_edge.runtime.cuda import CudaDecoder, CudaOps, Layer, Linear, Weights, load_weights  # noqa: E402

GROUP = 128
SAVE = lambda: None  # noqa: E731  (main() sets it: write the results so far)
SHAPES = {  # the configs of the public models, as transformers LlamaConfig fields
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
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


def dims_of_shape(s: dict) -> Dims:
    return Dims(s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"],
                s["hidden_size"] // s["num_attention_heads"], s["vocab_size"], s["rms_norm_eps"],
                s["max_position_embeddings"], 0, s["tie_word_embeddings"])


def random_linear(n: int, k: int) -> Linear:
    nb = k // GROUP
    b = torch.randint(0, 256, (n, nb, GROUP // 2), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(n * nb, device="cuda") * 0.004 + 0.001).half()
    zp = torch.full((n * math.ceil(nb / 2),), 0x88, dtype=torch.uint8, device="cuda")  # zero 8: centred weights
    return Linear(n, k, packed=kernels.repack_matmul_nbits(b, scales, zp, k, GROUP))


def random_weights(shape: dict, max_len: int) -> Weights:
    d = dims_of_shape(shape)
    q, kv, inter = d.heads * d.head_dim, d.kv_heads * d.head_dim, shape["intermediate_size"]
    ones = lambda n: torch.ones(n, dtype=torch.float16, device="cuda")  # noqa: E731
    layers = [Layer(ones(d.hidden), ones(d.hidden), random_linear(q + 2 * kv, d.hidden), random_linear(d.hidden, q),
                    random_linear(2 * inter, d.hidden), random_linear(d.hidden, inter)) for _ in range(d.layers)]
    embed = (torch.randn(d.vocab, d.hidden, device="cuda") * 0.02).half()
    head = Linear(d.vocab, d.hidden, weight=(torch.randn(d.vocab, d.hidden, device="cuda") * 0.02).half())
    inv = 1.0 / shape["rope_theta"] ** (torch.arange(0, d.head_dim, 2, dtype=torch.float64) / d.head_dim)
    ang = torch.outer(torch.arange(max_len, dtype=torch.float64), inv)
    return Weights(d, embed, layers, ones(d.hidden), head, ang.cos().float().cuda(), ang.sin().float().cuda())


def step_bytes(w: Weights, mean_context: float) -> dict:
    """Bytes one decode step must read: int4 linears in MatMulNBits form (the least any int4 format needs)."""
    d = w.dims
    lin = sum(matmul_nbits_bytes(x.n, x.k, GROUP) if x.packed is not None else x.nbytes()
              for L in w.layers for x in (L.qkv, L.o, L.gate_up, L.down))
    head = matmul_nbits_bytes(w.lm_head.n, w.lm_head.k, GROUP) if w.lm_head.packed is not None else w.lm_head.nbytes()
    small = sum(L.input_norm.nbytes + L.post_norm.nbytes for L in w.layers) + w.norm.nbytes + w.embed[0].nbytes
    kv = 2 * d.layers * d.kv_heads * d.head_dim * 2 * mean_context
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
        return y if residual is None else y + residual

    def gate_up_act(self, x, lin):
        return self.silu_mul(self.linear(x, lin))


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


def time_ours(weights: Weights, prompt: list, new: int, repeats: int, ops=None) -> dict:
    torch.cuda.reset_peak_memory_stats()
    dec = CudaDecoder(weights, ops or CudaOps(weights))
    out = time_runtime(dec, prompt, new, repeats)
    out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    del dec
    return out


class StepClock:
    """A stopping criterion that never stops and records when each new token is ready (transformers syncs on
    every step anyway to check for finished sequences)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def time_hf(model, prompt: list, new: int, repeats: int, compile_forward: bool) -> dict:
    """generate() with transformers' static cache; TTFT and per-step times from a stopping-criterion clock."""
    from transformers import StoppingCriteriaList

    ids = torch.tensor([prompt], device="cuda")

    def run():
        clock = StepClock()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 cache_implementation="static", disable_compile=not compile_forward,
                                 eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == len(prompt) + new and len(clock.times) == new
        return clock.times[0] - start, (new - 1) / (clock.times[-1] - clock.times[0])

    torch.cuda.reset_peak_memory_stats()
    run()  # warm-up (and compilation)
    runs = [run() for _ in range(repeats)]
    return {"tok_s": statistics.median(r[1] for r in runs), "tok_s_all": [r[1] for r in runs],
            "ttft_s": statistics.median(r[0] for r in runs), "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def hf_random(shape: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.float16).eval()


def free():
    gc.collect()
    torch.cuda.empty_cache()


def _rounded(d: dict) -> dict:
    return {k: _rounded(v) if isinstance(v, dict) else round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


def bench_random(name: str, args, copy_bw: float, res: dict) -> dict:
    shape = SHAPES[name]
    prompt = torch.randint(0, shape["vocab_size"], (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    max_len = args.prompt + args.new
    weights = random_weights(shape, max_len)
    res["shape"] = shape
    res["bytes_per_step"] = step_bytes(weights, args.prompt + args.new / 2)
    res["bandwidth_limit_tok_s"] = copy_bw / res["bytes_per_step"]["total"]
    res["ours"] = time_ours(weights, prompt, args.new, args.repeats)
    print(name, "ours", res["ours"], flush=True)
    if "ours_unfolded" in args.variants:  # the same runtime with RMSNorm as a kernel of its own (r6's step)
        res["ours_unfolded"] = time_ours(weights, prompt, args.new, args.repeats,
                                         CudaOps(weights, fold_norms=False))
        print(name, "ours_unfolded", res["ours_unfolded"], flush=True)
    if args.breakdown:
        res["breakdown_us"] = breakdown_of(weights, args.prompt + args.new // 2)
        print(name, "breakdown us/layer", _rounded(res["breakdown_us"]), flush=True)
    SAVE()
    if "torch_int4" in args.variants:
        res["torch_int4"] = time_ours(weights, prompt, args.new, args.repeats, TinyGemmOps(weights))
        print(name, "torch_int4", res["torch_int4"], flush=True)
    del weights
    free()
    bench_hf(name, hf_random(shape), prompt, args, res)
    return res


def bench_hf(name, model, prompt, args, res: dict) -> dict:
    for compiled in ([False, True] if args.hf_compile else [False]):
        key = "hf_fp16_static_compiled" if compiled else "hf_fp16_static_eager"
        if key.replace("_static", "") in args.variants or "hf" in args.variants:
            t = time.perf_counter()
            res[key] = time_hf(model, prompt, args.new, args.repeats, compiled)
            res[key]["wall_s"] = time.perf_counter() - t
            print(name, key, res[key], flush=True)
            SAVE()
    del model
    free()
    return res


def greedy_parity(ckpt: Path, weights: Weights, n_tokens: int) -> dict:
    """Ours vs transformers on the same dequantised weights (fp16 and fp32), 5 chat prompts x n_tokens greedy."""
    from awq_edge.checkpoint import load_quantized_model
    from awq_edge.runtime.generate import generate

    dec = CudaDecoder(weights, CudaOps(weights))
    rows = []
    for dtype in (torch.float16, torch.float32):
        model, tok = load_quantized_model(ckpt, dtype=dtype)
        model = model.cuda().eval()
        for p in PARITY_PROMPTS:
            ids = list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
            with torch.inference_mode():
                ref = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n_tokens,
                                     min_new_tokens=n_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(ids):].tolist()
            dec.reset()
            dec.eos_ids = set()
            ours = list(generate(dec, ids, n_tokens))
            first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
            row = {"reference": str(dtype).replace("torch.", ""), "prompt": p, "identical": first is None,
                   "first_divergence": first, "text_ours": tok.decode(ours)}
            if first is not None:  # the reference's own logits at the divergence: how close was the call?
                with torch.inference_mode():
                    lg = model(torch.tensor([ids + ref[:first]], device="cuda")).logits[0, -1].float()
                dec.reset()
                ol = torch.tensor(dec.extend(ids + ref[:first]))
                top = torch.topk(lg, 2)
                row.update(ref_top2=[top.indices.tolist(), top.values.tolist()],
                           ref_logit_of_ours=lg[ours[first]].item(), ours_logit_gap=(ol[ours[first]] - ol[ref[first]]).item(),
                           max_abs_logit_diff=(ol.cuda() - lg).abs().max().item(), max_abs_logit=lg.abs().max().item())
            rows.append(row)
            print("parity", {k: v for k, v in row.items() if k != "text_ours"}, flush=True)
        del model
        free()
    return {"rows": rows, "identical_fp16": sum(r["identical"] for r in rows if r["reference"] == "float16"),
            "identical_fp32": sum(r["identical"] for r in rows if r["reference"] == "float32"),
            "prompts": len(PARITY_PROMPTS)}


def bench_smollm2(args, copy_bw: float, res: dict) -> dict:
    from transformers import AutoModelForCausalLM

    weights = load_weights(args.smollm2_ckpt, "cuda", torch.float16, packed=True, max_len=args.prompt + args.new)
    prompt = torch.randint(0, weights.dims.vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    res["checkpoint"] = json.loads((Path(args.smollm2_ckpt) / "config.json").read_text())["quantization_config"]
    res["bytes_per_step"] = step_bytes(weights, args.prompt + args.new / 2)
    res["bandwidth_limit_tok_s"] = copy_bw / res["bytes_per_step"]["total"]
    if args.parity:
        res["parity"] = greedy_parity(Path(args.smollm2_ckpt), weights, args.parity)
        SAVE()
    res["ours"] = time_ours(weights, prompt, args.new, args.repeats)
    print("smollm2 ours", res["ours"], flush=True)
    del weights
    free()
    if args.smollm2_float:
        model = AutoModelForCausalLM.from_pretrained(args.smollm2_float, dtype=torch.float16).cuda().eval()
    else:  # the same shapes: transformers' speed does not depend on the weights' values
        from awq_edge.checkpoint import load_quantized_model

        model = load_quantized_model(Path(args.smollm2_ckpt), dtype=torch.float16)[0].cuda().eval()
    bench_hf("smollm2", model, prompt, args, res)
    return res


def graph_time(fn, reps: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph of fn() (warmed up on a side stream first)."""
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
    return statistics.median(times)


@torch.inference_mode()
def breakdown_of(w: Weights, context: int) -> dict:
    """Microseconds per layer of each operation of a decode step (graphs of all layers' calls, weights from
    HBM), beside the whole step: where the time goes."""
    dec = CudaDecoder(w, CudaOps(w))
    ops, d = dec.ops, w.dims
    dec.pos.fill_(context)
    h = torch.randn(1, d.hidden, dtype=torch.float16, device="cuda")
    x = torch.randn(1, d.hidden, dtype=torch.float16, device="cuda")
    qkv = torch.randn(1, w.layers[0].qkv.n, dtype=torch.float16, device="cuda")
    a = torch.randn(1, d.heads * d.head_dim, dtype=torch.float16, device="cuda")
    act = torch.randn(1, w.layers[0].down.k, dtype=torch.float16, device="cuda")
    for kc, vc in zip(dec.k_cache, dec.v_cache):
        kc.normal_()
        vc.normal_()
    L, n = w.layers, len(w.layers)
    nxt = [l.input_norm for l in L[1:]] + [None]  # the last down GEMV writes no gamma * h (the final norm is a kernel)
    # The step's operations as the decoder calls them, norms folded into the GEMVs beside them (layer 0's input norm
    # is a kernel in the real step; here every qkv GEMV is timed folded).
    parts = {
        "qkv_gemv_norm": lambda: [ops.norm_linear(h, l.input_norm, d.eps, l.qkv, prescaled=x) for l in L],
        "attention": lambda: [ops.decode_attention(qkv, dec.pos, w.cos, w.sin, dec.k_cache[i], dec.v_cache[i],
                                                   d.heads, dec.scale, 0) for i in range(n)],
        "o_gemv_residual_norm": lambda: [ops.residual_linear(a, l.o, h, next_norm=l.post_norm) for l in L],
        "gate_up_gemv_silu_norm": lambda: [ops.norm_linear(h, l.post_norm, d.eps, l.gate_up, gated=True,
                                                           prescaled=x) for l in L],
        "down_gemv_residual_norm": lambda: [ops.residual_linear(act, l.down, h, next_norm=nxt[i])
                                            for i, l in enumerate(L)],
    }
    unfolded = {  # the same without the folds: RMSNorm as a kernel, plain GEMVs (r6's step)
        "rmsnorm": lambda: [ops.rmsnorm(h, l.input_norm, d.eps) for l in L],
        "qkv_gemv": lambda: [ops.linear(x, l.qkv) for l in L],
        "o_gemv_residual": lambda: [ops.linear(a, l.o, residual=h) for l in L],
        "rmsnorm_2": lambda: [ops.rmsnorm(h, l.post_norm, d.eps) for l in L],
        "gate_up_gemv_silu": lambda: [ops.gate_up_act(x, l.gate_up) for l in L],
        "down_gemv_residual": lambda: [ops.linear(act, l.down, residual=h) for l in L],
    }
    res = {k: graph_time(f) / n * 1e6 for k, f in parts.items()}
    res["sum_per_layer"] = sum(res.values())
    res["unfolded"] = {k: graph_time(f) / n * 1e6 for k, f in unfolded.items()}
    res["lm_head_and_final_norm_us"] = graph_time(lambda: dec._logits(h)) * 1e6
    res["full_step_us"] = graph_time(dec._step) * 1e6
    kernels.set_programmatic_launch(False)
    res["full_step_no_pdl_us"] = graph_time(dec._step) * 1e6
    kernels.set_programmatic_launch(True)
    ops.fold_norms = False
    res["full_step_unfolded_us"] = graph_time(dec._step) * 1e6
    ops.fold_norms = True
    res["context"] = context
    del dec
    free()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b,llama3-8b,smollm2")
    ap.add_argument("--variants", default="ours,torch_int4,hf",
                    help="comma list of: ours (always run), ours_unfolded and torch_int4 (random-weight models "
                         "only), hf")
    ap.add_argument("--hf-compile", action="store_true", help="also time transformers' compiled static-cache forward")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smollm2-ckpt", help="quantised SmolLM2 checkpoint (awq-edge quantize)")
    ap.add_argument("--smollm2-float", help="float SmolLM2 folder for the transformers fp16 baseline (default: the "
                                            "checkpoint dequantised to fp16, the same shapes)")
    ap.add_argument("--parity", type=int, default=64, help="greedy tokens per parity prompt (0 = skip)")
    ap.add_argument("--breakdown", action="store_true", help="per-operation times of a decode step (random shapes)")
    ap.add_argument("--label", default="", help="a note stored with the results (the library's build flags)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "decode.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs an NVIDIA GPU")
    args.variants = args.variants.split(",")
    copy_bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "copy_bandwidth_Bps": copy_bw, "prompt_tokens": args.prompt, "new_tokens": args.new,
              "repeats": args.repeats, "group_size": GROUP, "models": {}}
    import transformers

    result["transformers"] = transformers.__version__
    result["kernels_library"] = str(kernels.library_path())
    result["label"] = args.label
    print(f"{result['device']}: copy {copy_bw / 1e12:.2f} TB/s", flush=True)
    global SAVE

    def save():  # after every variant, so a run cut short keeps what it measured
        for m in result["models"].values():
            for key in [k for k in m if isinstance(m[k], dict) and "tok_s" in m[k]]:
                m[key]["frac_of_bandwidth_limit"] = m[key]["tok_s"] / m["bandwidth_limit_tok_s"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    SAVE = save
    for name in args.models.split(","):
        if name == "smollm2" and not args.smollm2_ckpt:
            continue
        res = result["models"][name] = {}
        if name == "smollm2":
            bench_smollm2(args, copy_bw, res)
        else:
            bench_random(name, args, copy_bw, res)
        save()
        free()
    print(json.dumps({n: {k: (v["tok_s"] if isinstance(v, dict) and "tok_s" in v else None)
                          for k, v in m.items()} | {"limit": m["bandwidth_limit_tok_s"]}
                      for n, m in result["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
