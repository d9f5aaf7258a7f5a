"""`awq-edge generate` (one prompt, for scripts) and `awq-edge chat` (interactive).

Backends: `ort` (default) runs an ONNX export with onnxruntime; `cuda` runs a quantised checkpoint on the GPU
with awq-edge's kernels; `trt` runs an engine from `awq-edge build`."""

import sys
from pathlib import Path

from awq_edge.errors import AwqEdgeError
from awq_edge.runtime.generate import generate, stream_text
from awq_edge.runtime.ort import OrtDecoder
from awq_edge.runtime.sampling import Sampling


BACKENDS = ("ort", "cuda", "trt")


def open_decoder(folder, backend: str = "ort"):
    if backend == "cuda":
        from awq_edge.runtime.cuda import CudaDecoder

        return CudaDecoder.from_checkpoint(Path(folder))
    if backend == "trt":
        from awq_edge.runtime.trt import TrtDecoder

        return TrtDecoder(Path(folder))
    return OrtDecoder(Path(folder))


def load(folder, backend: str = "ort"):
    """The decoder and the tokenizer saved beside it (local files only, no remote code)."""
    from transformers import AutoTokenizer

    decoder = open_decoder(folder, backend)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AwqEdgeError(f"{folder} has no usable tokenizer ({e})", "re-export from a checkpoint with tokenizer files")
    return decoder, tokenizer


def prompt_ids(tokenizer, messages, raw: bool) -> list:
    if raw or not tokenizer.chat_template:
        return tokenizer(messages[-1]["content"])["input_ids"]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def sampling_of(args) -> Sampling:
    try:
        return Sampling(args.temperature, args.top_p, args.top_k)
    except ValueError as e:
        raise AwqEdgeError(f"bad sampling options: {e}", "use --temperature >= 0, --top-p in (0, 1], --top-k >= 0")


def reply(decoder, tokenizer, ids, args, out) -> str:
    """Stream one answer to `out` and return its text."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokens = generate(decoder, ids, args.max_new_tokens, sampling_of(args), stops, args.seed)
    pieces = []
    for piece in stream_text(tokenizer, tokens):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(pieces)


def run_generate(args) -> int:
    decoder, tokenizer = load(args.model_dir, args.backend)
    ids = prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}], args.raw)
    reply(decoder, tokenizer, ids, args, sys.stdout)
    return 0


def run_chat(args) -> int:
    decoder, tokenizer = load(args.model_dir, args.backend)
    if not tokenizer.chat_template:
        raise AwqEdgeError(f"{args.model_dir} has no chat template", "use `awq-edge generate --raw` for a base model")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("awq-edge chat: type a message; /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = list(system)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(decoder, tokenizer, prompt_ids(tokenizer, messages, False), args, sys.stdout)
        messages.append({"role": "assistant", "content": answer})


def add_sampling_args(p):
    p.add_argument("model_dir", help="ONNX folder from `awq-edge export` (--backend ort), quantised checkpoint from "
                                     "`awq-edge quantize` (--backend cuda), or engine folder (--backend trt)")
    p.add_argument("--backend", choices=BACKENDS, default="ort",
                   help="ort: onnxruntime on the CPU (default); cuda: awq-edge's int4 kernels on an NVIDIA GPU; "
                        "trt: a TensorRT engine")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--seed", type=int, default=0)


def register(subparsers):
    g = subparsers.add_parser("generate", help="generate a reply to one prompt (streams to stdout)")
    add_sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    g.set_defaults(func=run_generate)
    c = subparsers.add_parser("chat", help="interactive chat in the terminal with the model's chat template")
    add_sampling_args(c)
    c.add_argument("--system", default="", help="system message")
    c.set_defaults(func=run_chat)
