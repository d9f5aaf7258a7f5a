"""Our ONNX export on an NVIDIA GPU: onnxruntime-genai-cuda and our onnxruntime backend (--provider cuda) beside
onnxruntime-genai's own int4 CUDA build of the same float model (the peer) and our CUDA backend.
At a random shape (--shape) the float model is random fp16 weights: our rows quantise it with `awq-edge quantize
--method rtn` (group 128) and the peer is the builder's own int4 of it (its groups of 32), as for a real model;
--shape-peer checkpoint builds the peer from a random AutoAWQ checkpoint instead (the builder's quantised-model path
keeps our group 128 and layout, so only the graphs and runtimes differ).

Per row: batch-1 decode tok/s (greedy, PROMPT tokens then NEW), time to first token, WikiText-2 perplexity (real
models; the graph run whole on the same provider) and the nodes onnxruntime placed on the CPU (from its profile).
Every timed row runs in turn within each round, so load on the machine hits all of them alike; medians of the
rounds after one warm-up round. Writes OUT.json and OUT.md.

Usage on the GPU machine (onnxruntime-gpu and onnxruntime-genai-cuda installed):
  python -P bench/onnx_gpu.py --quant-dir CK --hf-dir FLOAT --work DIR    # a real checkpoint and its float model
  python -P bench/onnx_gpu.py --shape llama2-7b --work DIR                # random weights at a model's shape
`--provider cpu` runs the same rows on the CPU (the test runs every row that way on a tiny shape).
"""

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

# Run as a script, this file's folder comes first on sys.path and its name would shadow the onnx package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from awq_edge.export.api import export, export_options  # noqa: E402
from awq_edge.runtime.ort import OrtDecoder, execution_providers, session_options  # noqa: E402
from bench.onnx import OnnxLM, empty_feed, kv_shape_of, onnx_size, run_peer_builder  # noqa: E402

# name -> export_options overrides, all with fp16 activations (the GPU's): the default export, the exact one, and
# the default with the CPU default's head (4 bits, its 64 largest input channels 8-bit: two MatMulNBits), and the
# default without int8 activations (MatMulNBits accuracy_level 0; the peer's CUDA build leaves it unset), and the
# default with float32 logits cast in the graph (no fp16 -> float32 conversion on the host per step), and the
# default with a plain 4-bit head (one MatMulNBits as the 8-bit one, half its bytes) in groups of 32, so that a tied
# table has an even number of groups a row (export/decoder.py, odd_gather_groups)
EXPORTS = {"ours_default": {}, "ours_exact": {"exact": True}, "ours_split_head": {"head_bits": 4, "head_outliers": 64},
           "ours_float_act": {"accuracy_level": 0}, "ours_float_logits": {"float_logits": True},
           "ours_head4": {"head_bits": 4, "head_outliers": 0, "head_group": 32}}
# what --rows may name: the exports, the peer, the checkpoint on our CUDA backend, genai's CUDA-graph mode for
# ours_default and the peer, and the A/B rows (our loop's eager variants, onnxruntime's fpA_intB path on genai and on
# our loop): each row holds a session, and at 8B an 80 GB GPU holds about a dozen. The layer-format rows (--shape with
# the float peer only), FORMATS: the same float model quantised again by RTN without zero points (`--no-zero-point`),
# exported at the defaults, whose layers then store none. ours_sym in groups of 128: onnxruntime's MatMulNBits without
# zero points against ours_default (zero points, AWQ's format; RTN at --shape) at the same group. ours_sym32 in groups
# of 32, the peer's layer format (with ab, on CUDA, also on onnxruntime's fpA_intB path, whose pip build takes only
# this format). A/B rows for the format, not configurations we ship; on genai only (our loop runs genai's kernels).
FORMATS = {"ours_sym": 128, "ours_sym32": 32}
ROWS = (*EXPORTS, *FORMATS, "peer", "cuda_backend", "genai_graph", "ab")
ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention")


# onnxruntime's CUTLASS weight-only (fpA_intB) path for MatMulNBits on CUDA, off by default; the environment
# variables are read when a session builds its kernels (genai's sessions), the config entries are the session's own.
# Each eligible node times its tactics when the session is made, by default for M up to 2048; the rows run two M, the
# prompt's and 1, so only those are profiled (a comma list).
FPA_INTB_ENV, FPA_INTB_ENTRY = "ORT_FPA_INTB_GEMM", "ep.cuda.fpa_intb_gemm"
FPA_INTB_M_ENV, FPA_INTB_M_ENTRY = "ORT_FPA_INTB_PROFILE_M", "ep.cuda.fpa_intb_profile_m"


def genai_model(folder: Path, provider: str, fpa_intb: str | None = None, graph: bool = False,
                as_written: bool = False):
    """onnxruntime-genai's model of the folder on the provider, as the benchmark's rows run it: the folder's own
    provider with `enable_cuda_graph` 0 (eager steps; the builder writes 0, our fp16 export 1), or with graph,
    genai's CUDA-graph decode (`enable_cuda_graph` 1); fpa_intb: onnxruntime's fpA_intB path on, profiled at these M
    (a comma list); as_written: the folder's genai_config.json as its writer left it, nothing overridden (what a
    genai user who opens the folder gets)."""
    import onnxruntime_genai as og

    if as_written:
        return og.Model(str(folder))
    config = og.Config(str(folder))
    config.clear_providers()  # (it keeps the options the file gave a provider appended again: ours turn graphs on)
    if provider == "cuda":
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1" if graph else "0")
    fpa = {FPA_INTB_ENV: "1", FPA_INTB_M_ENV: fpa_intb} if fpa_intb else {}
    with mock.patch.dict(os.environ, fpa):  # the caller's environment after
        return og.Model(config)


def time_genai(model, prompt: list, new: int) -> tuple:
    """(time to first token, decode tok/s over the next new - 1 tokens, the tokens) through og.Generator."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    tokens = [int(gen.get_next_tokens()[0])]
    t1 = time.perf_counter()
    while len(tokens) < new and not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    t2 = time.perf_counter()
    return t1 - t0, (len(tokens) - 1) / (t2 - t1), tokens


class TimedRun:
    """Wraps a session's run_with_iobinding: the seconds spent inside onnxruntime's run since the last reset."""

    def __init__(self, session):
        self.run, self.seconds = session.run_with_iobinding, 0.0
        session.run_with_iobinding = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def timed_decoder(folder: Path, **kwargs) -> OrtDecoder:
    """An OrtDecoder whose session's run is timed (TimedRun), as time_ort reads it."""
    dec = OrtDecoder(folder, **kwargs)
    TimedRun(dec.session)
    return dec


def time_ort(dec: OrtDecoder, prompt: list, new: int) -> tuple:
    """The same through our onnxruntime backend (the KV cache bound where the provider runs), as `awq-edge
    generate` runs it greedily (extend, then greedy_tokens); with the time per decode step spent inside
    onnxruntime's run (the rest of the step is ours: binding, argmax) and whether its steps still replay CUDA graphs
    at the end (a refused graph falls back without one)."""
    timer = dec.session.run_with_iobinding
    dec.reset()
    t0 = time.perf_counter()
    tokens = [int(np.argmax(dec.extend(prompt)))]
    t1 = time.perf_counter()
    timer.seconds = 0.0
    tokens += list(dec.greedy_tokens(tokens[0], new - 1))
    t2 = time.perf_counter()
    return t1 - t0, (len(tokens) - 1) / (t2 - t1), tokens, timer.seconds / (len(tokens) - 1), dec.cuda_graph


def time_cuda_backend(dec, prompt: list, new: int) -> tuple:
    """The same through our CUDA backend (its graph-captured greedy steps, as `awq-edge generate` runs them)."""
    dec.reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = [int(np.argmax(dec.extend(prompt)))]
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    tokens += list(dec.greedy_tokens(tokens[0], new - 1))
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t1 - t0, (len(tokens) - 1) / (t2 - t1), tokens


def profile_summary(path: Path, skip_runs: int) -> dict:
    """onnxruntime's profile of one session: per run after the first skip_runs (the prompt), the medians of the
    whole run (model_run), of the time in each op type's nodes (on the CUDA provider that is the host's time to
    launch them, not the GPU's) and of the number of nodes a run; the runs profiled and those that ran nodes (a
    replayed CUDA graph runs no node of onnxruntime's own, whether or not its run is recorded: a graph loop's steps
    outnumber its runs with nodes)."""
    events = json.loads(path.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip_runs:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = []
    for r in runs:
        ops, count = {}, 0
        for e in nodes:
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                op = e.get("args", {}).get("op_name", "?")
                ops[op] = ops.get(op, 0) + e["dur"]
                count += 1
        per_run.append((r["dur"], ops, count))
    if not per_run:
        return {"runs": 0, "runs_with_nodes": 0}
    names = {op for _, ops, _ in per_run for op in ops}
    by_op = {op: statistics.median(ops.get(op, 0) for _, ops, _ in per_run) for op in names}
    return {"runs": len(per_run), "runs_with_nodes": sum(n > 0 for _, _, n in per_run),
            "model_run_us": statistics.median(d for d, _, _ in per_run),
            "nodes_us": statistics.median(sum(ops.values()) for _, ops, _ in per_run),
            "nodes_per_run": statistics.median(n for _, _, n in per_run),
            "by_op_us": dict(sorted(by_op.items(), key=lambda t: -t[1]))}


def profile_loops(folder: Path, provider: str, prompt: list, steps: int, work: Path, genai_graph: bool = False) -> dict:
    """ORT's own profile of `steps` greedy decode steps after the prompt, through our loop without a CUDA graph (a
    replayed graph's nodes are not profiled) and through onnxruntime-genai, on the same folder: is our loop's extra
    time inside onnxruntime's run, and in which nodes? With genai_graph, genai's CUDA-graph decode too: whether it
    replays (fewer of its runs ran nodes than it took steps)."""
    out = {}
    prefix = work / f"profile_ours_{folder.name}"
    dec = timed_decoder(folder, provider=provider, profile=str(prefix), cuda_graph=False)
    _, tok_s, _, inside, _ = time_ort(dec, prompt, steps + 1)
    out["awq-edge-ort-eager"] = {"ms_per_step": 1e3 / tok_s, "ort_run_ms_per_step": 1e3 * inside, "steps": steps,
                                 **profile_summary(Path(dec.session.end_profiling()), skip_runs=1)}
    loops = [("onnxruntime-genai", False)] + ([("onnxruntime-genai-graph", True)] if genai_graph else [])
    for loop, graph in loops:
        twin = work / f"profile_{loop}_{folder.name}"  # the same files, with profiling on in genai_config.json
        shutil.rmtree(twin, ignore_errors=True)
        twin.mkdir(parents=True)
        for f in folder.iterdir():
            if f.name != "genai_config.json":
                (twin / f.name).symlink_to(f.resolve())
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"]["decoder"].setdefault("session_options", {})["enable_profiling"] = str(twin / "ort_profile")
        (twin / "genai_config.json").write_text(json.dumps(config))
        model = genai_model(twin, provider, graph=graph)
        _, tok_s, _ = time_genai(model, prompt, steps + 1)
        del model  # onnxruntime writes the profile when the session ends
        files = sorted(twin.glob("ort_profile*.json"))
        if files:
            out[loop] = {"ms_per_step": 1e3 / tok_s, "steps": steps, **profile_summary(files[-1], skip_runs=1)}
    return out


def placement(folder: Path, provider: str, work: Path) -> dict:
    """Nodes onnxruntime ran on the CPU in one 8-token prompt step, from its profile: {op: count}."""
    opts = session_options(folder)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(work / f"profile_{folder.name}")
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=execution_providers(provider))
    session.run(["logits"], empty_feed(session, np.arange(1, 9, dtype=np.int64)[None], kv_shape_of(folder)))
    events = json.loads(Path(session.end_profiling()).read_text())
    where = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args:
            where[e["name"].removesuffix("_kernel_time")] = (args.get("op_name", "?"), args["provider"])
    cpu = {}
    for op, prov in where.values():
        if prov == "CPUExecutionProvider":
            cpu[op] = cpu.get(op, 0) + 1
    return {"cpu_nodes": sum(cpu.values()), "cpu_nodes_by_op": cpu, "nodes": len(where),
            "cpu_nodes_matmul_attention": sum(n for op, n in cpu.items() if op in ("MatMulNBits", *ATTENTION_OPS))}


def onnx_perplexity(folder: Path, provider: str, tokenizer, ids: torch.Tensor, seqlen: int) -> float:
    """WikiText-2 perplexity of the whole-sequence graph on the provider (awq_edge.quantizer.eval's windows)."""
    from awq_edge.quantizer.eval import perplexity

    model = OnnxLM(folder, execution_providers(provider))
    return perplexity(model, tokenizer, ids, seqlen, batch_size=1, progress=False)["ppl"]


def gpu_name(provider: str) -> str:
    if provider == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def prompt_of(args, tokenizer, vocab: int) -> list:
    """PROMPT tokens of WikiText-2 valid for a real model, fixed ids below the vocabulary for a random one."""
    if tokenizer is not None:
        from awq_edge.quantizer.eval import text_tokens

        return text_tokens(tokenizer, Path(args.wikitext) / "valid.txt", args.prompt_tokens).tolist()
    return [(7 * i + 3) % min(vocab, 256) for i in range(args.prompt_tokens)]


def quantize_float_shape(shape: str, float_dir: Path, quant_dir: Path, peer: bool, cli_args: tuple = (),
                         group: int = 128) -> None:
    """A random fp16 model at the shape (bench/quantize_scale.py's writer, a byte-level tokenizer), quantised by
    `awq-edge quantize --method rtn` in groups of `group` (cli_args added), with random head statistics (RTN measures
    none, and the export would otherwise run the whole model on the CPU for them). The float model is written where the
    checkpoint or the peer (peer) needs it."""
    from bench.export_scale import SHAPES, byte_tokenizer, write_head_stats
    from bench.quantize_scale import run_cli, write_random_model

    have_ck = (quant_dir / "config.json").is_file()
    if peer or not have_ck:  # (write_random_model keeps a folder written before)
        tok = float_dir.with_name(float_dir.name + ".tokenizer")
        byte_tokenizer().save_pretrained(tok)
        write_random_model(shape, float_dir, tok, shape=SHAPES[shape])
    if not have_ck:
        tmp = quant_dir.with_name(quant_dir.name + ".tmp")
        run_cli(["quantize", str(float_dir), "-o", str(tmp), "--method", "rtn", "--group-size", str(group), *cli_args],
                quant_dir.with_name(quant_dir.name + ".log"))
        write_head_stats(tmp, SHAPES[shape]["hidden_size"], torch.Generator().manual_seed(0))
        tmp.rename(quant_dir)


def make_rows(args, work: Path, res: dict) -> tuple:
    """{row name: (runtime, runner)} and the tokenizer (None for a random shape)."""
    from awq_edge.checkpoint.hf_folder import load_tokenizer

    float_dir = None
    if args.shape and args.shape_peer == "float":
        float_dir, quant_dir = work / f"float_{args.shape}", work / f"ck_{args.shape}_rtn"
        quantize_float_shape(args.shape, float_dir, quant_dir, peer="peer" in args.rows_of)
        tokenizer = None
    elif args.shape:
        from bench.export_scale import write_checkpoint

        quant_dir = work / f"ck_{args.shape}"
        write_checkpoint(args.shape, quant_dir, symmetric=False)
        tokenizer = None
    else:
        quant_dir, tokenizer = Path(args.quant_dir), load_tokenizer(Path(args.quant_dir))
    res["quant_dir"] = str(quant_dir)
    # row -> (checkpoint, export options): EXPORTS' rows from quant_dir, FORMATS' defaults from their own checkpoints
    sources = {name: (quant_dir, extra) for name, extra in EXPORTS.items() if name in args.rows_of}
    for name, group in FORMATS.items():
        if name in args.rows_of:
            sources[name] = (work / f"ck_{args.shape}_rtn_{name.removeprefix('ours_')}", {})
            quantize_float_shape(args.shape, float_dir, sources[name][0], peer=False, cli_args=("--no-zero-point",),
                                 group=group)
    folders, res["export_seconds"] = {}, {}
    for name, (ck, extra) in sources.items():
        t0 = time.perf_counter()
        folders[name] = export(ck, work / name, export_options("ort", dtype="fp16", **extra))
        res["export_seconds"][name] = round(time.perf_counter() - t0, 1)
    peer_source = args.hf_dir or float_dir or (quant_dir if args.shape else None)  # see the module's docstring
    if "peer" in args.rows_of and peer_source:
        folders["peer_int4"] = work / f"peer_int4_{Path(peer_source).name}_{args.provider}"
        res["peer_source"] = "float model" if args.hf_dir or float_dir else "the same AutoAWQ checkpoint"
        res["export_seconds"]["peer_int4"] = run_peer_builder(Path(peer_source), folders["peer_int4"], "int4",
                                                                provider=args.provider)
    rows, profile_m = {}, f"1,{args.prompt_tokens}"
    for name, folder in folders.items():
        model = genai_model(folder, args.provider)
        rows[f"{name}/onnxruntime-genai"] = (folder, lambda p, m=model: time_genai(m, p, args.new_tokens))
        if args.provider == "cuda" and name in ("ours_default", "ours_sym32", "peer_int4") and "ab" in args.rows_of:
            # onnxruntime's weight-only (fpA_intB) path; the pip wheel's compact build takes only g32 layers without
            # zero points (the peer's, ours_sym32's), so ours_default stays on the legacy kernel: a control row
            model = genai_model(folder, args.provider, fpa_intb=profile_m)
            rows[f"{name}/onnxruntime-genai-fpaintb"] = (folder, lambda p, m=model: time_genai(m, p, args.new_tokens))
        if args.provider == "cuda" and name in ("ours_default", "peer_int4") and "genai_graph" in args.rows_of:
            model = genai_model(folder, args.provider, graph=True)  # genai replaying its decode steps as CUDA graphs
            rows[f"{name}/onnxruntime-genai-graph"] = (folder, lambda p, m=model: time_genai(m, p, args.new_tokens))
            model = genai_model(folder, args.provider, as_written=True)  # ours: graphs on, the builder's: off
            rows[f"{name}/onnxruntime-genai-as-written"] = (folder,
                                                             lambda p, m=model: time_genai(m, p, args.new_tokens))
        # as `awq-edge generate` runs it: on the CUDA provider, its steps' CUDA graphs
        if name.startswith("ours") and name not in FORMATS:
            dec = timed_decoder(folder, provider=args.provider)
            rows[f"{name}/awq-edge-ort"] = (folder, lambda p, d=dec: time_ort(d, p, args.new_tokens))
            if name != "ours_default":
                continue
            eager = {"provider": args.provider, "cuda_graph": False}
            if args.provider == "cuda":  # the loop before the graph became the default
                dece = timed_decoder(folder, **eager)
                rows[f"{name}/awq-edge-ort-eager"] = (folder, lambda p, d=dece: time_ort(d, p, args.new_tokens))
            if "ab" in args.rows_of:  # A/B rows, stepping without the graph
                # one intra-op thread: a step's nodes are many and small (a CPU A/B)
                dec1 = timed_decoder(folder, threads=1, **eager)
                rows[f"{name}/awq-edge-ort-1thread"] = (folder, lambda p, d=dec1: time_ort(d, p, args.new_tokens))
                # a step's attention mask as a new host array (what OrtDecoder did before it bound it once)
                dech = timed_decoder(folder, bound_inputs=False, **eager)
                rows[f"{name}/awq-edge-ort-hostin"] = (folder, lambda p, d=dech: time_ort(d, p, args.new_tokens))
                # a step through buffers of fixed address and shape without the graph
                decx = timed_decoder(folder, fixed_buffers=True, **eager)
                rows[f"{name}/awq-edge-ort-fixed"] = (folder, lambda p, d=decx: time_ort(d, p, args.new_tokens))
            if "ab" in args.rows_of and args.provider == "cuda":  # a stream of ours, as onnxruntime-genai hands the
                stream = torch.cuda.Stream()                     # provider its own
                decs = timed_decoder(folder, provider_options={"user_compute_stream": str(stream.cuda_stream)},
                                     **eager)
                decs.stream = stream  # kept alive with the session
                rows[f"{name}/awq-edge-ort-stream"] = (folder, lambda p, d=decs: time_ort(d, p, args.new_tokens))
                decf = timed_decoder(folder, config_entries={FPA_INTB_ENTRY: "1", FPA_INTB_M_ENTRY: profile_m},
                                     **eager)
                rows[f"{name}/awq-edge-ort-fpaintb"] = (folder, lambda p, d=decf: time_ort(d, p, args.new_tokens))
    if "cuda_backend" in args.rows_of and args.provider == "cuda":
        from awq_edge.runtime.cuda import CudaDecoder, CudaOps, load_weights

        weights = load_weights(quant_dir, "cuda", torch.float16, packed=True,
                               max_len=args.prompt_tokens + args.new_tokens)
        dec = CudaDecoder(weights, CudaOps(weights))
        rows["checkpoint/awq-edge-cuda"] = (None, lambda p: time_cuda_backend(dec, p, args.new_tokens))
    return rows, tokenizer, quant_dir


def markdown(res: dict) -> str:
    lines = [f"# ONNX on {res['device']} ({res['model']}, onnxruntime {res['versions']['onnxruntime']}, "
             f"onnxruntime-genai {res['versions']['onnxruntime_genai']})", "",
             f"Batch 1, greedy, {res['prompt_tokens']}-token prompt then {res['new_tokens']} tokens; medians of "
             f"{res['repeats']} rounds, every row in turn each round.", "",
             "| model | runtime | tok/s | TTFT ms | WikiText-2 ppl | CPU nodes (MatMulNBits + attention) | MB | "
             "ms a step inside onnxruntime's run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") else ""
        cpu = f"{r['cpu_nodes']} ({r['cpu_nodes_matmul_attention']})" if "cpu_nodes" in r else ""
        size = f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else ""
        inside = f"{r['ort_run_ms_per_step']:.3f} of {r['ms_per_step']:.3f}" if "ort_run_ms_per_step" in r else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {r['tok_s']:.1f} | {1e3 * r['ttft_s']:.1f} | {ppl} | "
                     f"{cpu} | {size} | {inside} |")
    if res.get("ratios"):
        lines += ["", "Ratios (same run): " + "; ".join(f"{k} {v:.3f}x" for k, v in res["ratios"].items())]
    if res.get("profile"):
        lines += ["", "onnxruntime's profile of ours_default's decode steps (medians per step, us; node times are the "
                  "host's time in each node, launches on the CUDA provider):", "",
                  "| loop | wall per step | runs with nodes of steps | model_run | in nodes | nodes a run | top op "
                  "types |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for loop, p in res["profile"].items():
            if not p["runs"]:  # no model_run event after the prompt's: an empty profile
                lines.append(f"| {loop} | {1e3 * p['ms_per_step']:.0f} | 0 of {p['steps']} | | | | |")
                continue
            top = ", ".join(f"{op} {us:.0f}" for op, us in list(p["by_op_us"].items())[:6])
            lines.append(f"| {loop} | {1e3 * p['ms_per_step']:.0f} | {p['runs_with_nodes']} of {p['steps']} | "
                         f"{p['model_run_us']:.0f} | {p['nodes_us']:.0f} | {p['nodes_per_run']:.0f} | {top} |")
    return "\n".join(lines) + "\n"


def ratios(rows: list) -> dict:
    by = {f"{r['model']}/{r['runtime']}": r for r in rows}
    out = {}
    for a, b in (("ours_default/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_sym/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_sym/onnxruntime-genai", "ours_default/onnxruntime-genai"),
                 ("ours_sym32/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_sym32/onnxruntime-genai", "ours_sym/onnxruntime-genai"),
                 ("ours_sym32/onnxruntime-genai-fpaintb", "ours_sym32/onnxruntime-genai"),
                 ("ours_sym32/onnxruntime-genai-fpaintb", "peer_int4/onnxruntime-genai"),
                 ("ours_sym32/onnxruntime-genai-fpaintb", "ours_default/onnxruntime-genai"),
                 ("ours_exact/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_split_head/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_default/onnxruntime-genai", "ours_split_head/onnxruntime-genai"),
                 ("ours_float_act/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_head4/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_float_logits/onnxruntime-genai", "peer_int4/onnxruntime-genai"),
                 ("ours_float_logits/awq-edge-ort", "ours_default/awq-edge-ort"),
                 ("ours_default/awq-edge-ort", "ours_default/onnxruntime-genai"),
                 ("ours_exact/awq-edge-ort", "ours_exact/onnxruntime-genai"),
                 ("ours_default/awq-edge-ort-eager", "ours_default/onnxruntime-genai"),
                 ("ours_default/awq-edge-ort", "ours_default/awq-edge-ort-eager"),
                 ("ours_default/awq-edge-ort-1thread", "ours_default/onnxruntime-genai"),
                 ("ours_default/awq-edge-ort-fixed", "ours_default/onnxruntime-genai"),
                 ("ours_default/awq-edge-ort-stream", "ours_default/onnxruntime-genai"),
                 ("ours_default/awq-edge-ort-eager", "ours_default/awq-edge-ort-hostin"),
                 ("ours_default/awq-edge-ort", "ours_default/awq-edge-ort-fixed"),
                 ("ours_default/onnxruntime-genai-fpaintb", "ours_default/onnxruntime-genai"),
                 ("peer_int4/onnxruntime-genai-fpaintb", "peer_int4/onnxruntime-genai"),
                 ("ours_default/onnxruntime-genai-fpaintb", "peer_int4/onnxruntime-genai-fpaintb"),
                 ("ours_default/awq-edge-ort-fpaintb", "ours_default/awq-edge-ort-eager"),
                 ("ours_default/onnxruntime-genai-as-written", "peer_int4/onnxruntime-genai-as-written"),
                 ("ours_default/onnxruntime-genai-graph", "peer_int4/onnxruntime-genai-graph"),
                 ("ours_default/onnxruntime-genai-graph", "ours_default/onnxruntime-genai"),
                 ("peer_int4/onnxruntime-genai-graph", "peer_int4/onnxruntime-genai"),
                 ("ours_default/awq-edge-ort", "ours_default/onnxruntime-genai-graph"),
                 ("checkpoint/awq-edge-cuda", "ours_default/onnxruntime-genai")):
        if a.endswith("-eager") and a not in by:  # the CPU: the default loop is the eager one
            a = a.removesuffix("-eager")
        if a in by and b in by:
            out[f"{a} vs {b} tok/s"] = by[a]["tok_s"] / by[b]["tok_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quant-dir", help="an `awq-edge quantize` checkpoint of a real model")
    ap.add_argument("--hf-dir", help="its float model, for the peer's int4 build (no peer row without it)")
    ap.add_argument("--shape", help="instead: random weights at this shape (bench/export_scale.py's names)")
    ap.add_argument("--shape-peer", choices=("float", "checkpoint"), default="float",
                    help="--shape's peer: the builder's own int4 of a random float model that our row quantises with "
                         "RTN (float, as for a real model), or its build of our random AutoAWQ checkpoint (the same "
                         "MatMulNBits layout as ours: the runtimes alone compared)")
    ap.add_argument("--work", required=True, help="where the checkpoint, exports and profiles are written")
    ap.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--rows", default="ours_default,ours_exact,peer,cuda_backend,ab",
                    help=f"comma list of {', '.join(ROWS)} (genai_graph: ours_default and the peer on genai with "
                         "its CUDA graphs too, and each folder as its writer left it, CUDA only)")
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=64,
                    help="then onnxruntime's profile of this many steps of ours_default, our loop's and genai's "
                         "(0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx_gpu"))
    args = ap.parse_args(argv)
    if bool(args.shape) == bool(args.quant_dir):
        ap.error("pass --quant-dir (a real checkpoint) or --shape (random weights), one of them")
    args.rows_of = set(args.rows.split(","))
    if args.rows_of - set(ROWS):
        ap.error(f"--rows: unknown {', '.join(sorted(args.rows_of - set(ROWS)))}; pick from {', '.join(ROWS)}")
    if args.rows_of & set(FORMATS) and not (args.shape and args.shape_peer == "float"):
        ap.error(f"--rows {', '.join(sorted(args.rows_of & set(FORMATS)))} quantise the float model of a --shape: use "
                 "them with --shape (and the float peer)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import onnxruntime_genai as og

    res = {"command": "python -P " + " ".join(sys.argv), "device": gpu_name(args.provider),
           "provider": args.provider, "model": args.shape or Path(args.quant_dir).name, "host": platform.platform(),
           "versions": {"onnxruntime": ort.__version__, "onnxruntime_genai": og.__version__,
                        "torch": torch.__version__},
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats}
    out = Path(args.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")

    rows, tokenizer, quant_dir = make_rows(args, work, res)
    vocab = json.loads((quant_dir / "config.json").read_text())["vocab_size"]
    prompt = prompt_of(args, tokenizer, vocab)
    times = {name: [] for name in rows}
    tokens = {}
    for r in range(args.repeats + 1):  # round 0 warms every row up
        for name, (_, run) in (rows.items() if r % 2 else reversed(rows.items())):
            ttft, tok_s, toks, *inside = run(prompt)
            tokens[name] = toks
            if r:
                times[name].append((ttft, tok_s, *inside))
    # Every runtime goes before the placement sessions and the perplexity runs: at 8B the rows' sessions, caches and
    # graphs together fill an 80 GB GPU, and one more session did not fit (H100, 2026-12-07).
    rows = {name: folder for name, (folder, _) in rows.items()}
    del run  # the timing loop's last runner, still bound after it
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    res["rows"] = []
    for name, folder in rows.items():
        model, runtime = name.split("/")
        row = {"model": model, "runtime": runtime, "tok_s": statistics.median(t[1] for t in times[name]),
               "ttft_s": statistics.median(t[0] for t in times[name]), "tok_s_all": [t[1] for t in times[name]]}
        if len(times[name][0]) > 2:  # our onnxruntime loop: how much of a step is onnxruntime's run
            row["ort_run_ms_per_step"] = 1e3 * statistics.median(t[2] for t in times[name])
            row["ms_per_step"] = 1e3 / row["tok_s"]
            row["cuda_graph"] = all(t[3] for t in times[name])  # each step replayed a graph to the end of each round
        if runtime != "onnxruntime-genai" and f"{model}/onnxruntime-genai" in tokens:  # same folder, same tokens
            row["greedy_equal_to_genai"] = tokens[name] == tokens[f"{model}/onnxruntime-genai"]
        if folder is not None:
            row.update(placement(folder, args.provider, work), size_bytes=onnx_size(folder))
            if tokenizer is not None and runtime == "onnxruntime-genai":
                from awq_edge.quantizer.eval import text_tokens

                ids = text_tokens(tokenizer, Path(args.wikitext) / "test.txt", args.eval_tokens)
                row["ppl"] = onnx_perplexity(folder, args.provider, tokenizer, ids, args.seqlen)
        res["rows"].append(row)
        save()
    res["ratios"] = ratios(res["rows"])
    save()
    folder = rows.get("ours_default/awq-edge-ort")
    if args.profile_steps and folder is not None:
        res["profile"] = profile_loops(folder, args.provider, prompt, args.profile_steps, work,
                                       genai_graph=args.provider == "cuda" and "genai_graph" in args.rows_of)
        save()
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
