"""`awq-edge generate` (one prompt, for scripts) and `awq-edge chat` (interactive), on `awq_edge.load`.

Backends: `ort` (default) runs an ONNX export with onnxruntime (`--provider cpu|cuda`); `cuda` runs a quantised
checkpoint on the GPU with awq-edge's kernels; `trt` runs an engine from `awq-edge build`."""

import sys

from awq_edge.errors import AwqEdgeError
from awq_edge.runtime.api import BACKENDS, check_sampling, load, utf8_text

CHAT_HELP = "awq-edge chat: type a message; /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer."


def sampling_of(args) -> dict:
    """The sampling arguments of Model.tokens, checked before the model is loaded."""
    return check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)


def write_stream(pieces, out) -> str:
    """Write text pieces to out as they come; returns the whole text."""
    text = []
    for piece in pieces:
        text.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(text)


def run_generate(args) -> int:
    sampling = sampling_of(args)
    prompt = utf8_text(args.prompt, "prompt")
    model = load(args.model_dir, args.backend, provider=args.provider)
    write_stream(model.stream(prompt, raw=args.raw, **sampling), sys.stdout)
    return 0


def read_message() -> str | None:
    """The next line typed, or None at end of input; a line that is not UTF-8 is an AwqEdgeError."""
    try:
        return input("> ").strip()
    except EOFError:
        print(file=sys.stderr)
        return None
    except UnicodeDecodeError as e:
        raise AwqEdgeError(f"that message holds bytes that are not UTF-8 (at byte {e.start})", "type UTF-8 text")


def chat_turn(model, messages: list, sampling: dict) -> None:
    """Answer the last user message; on an error or Ctrl-C the turn is dropped and the session goes on."""
    try:
        ids = model.prompt_ids(messages)
        answer = write_stream(model.stream(ids, **sampling), sys.stdout)
    except AwqEdgeError as e:
        messages.pop()
        print(f"awq-edge chat: error: {e}", file=sys.stderr)
        return
    except KeyboardInterrupt:
        messages.pop()
        print("\n[answer stopped; Ctrl-C again at the prompt leaves]", file=sys.stderr)
        return
    messages.append({"role": "assistant", "content": answer})


def run_chat(args) -> int:
    sampling = sampling_of(args)
    model = load(args.model_dir, args.backend, provider=args.provider)
    if not model.tokenizer.chat_template:
        raise AwqEdgeError(f"{args.model_dir} has no chat template", "use `awq-edge generate --raw` for a base model")
    system = [{"role": "system", "content": utf8_text(args.system, "system message")}] if args.system else []
    messages = list(system)
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            text = read_message()
        except AwqEdgeError as e:
            print(f"awq-edge chat: error: {e}", file=sys.stderr)
            continue
        if text is None or text == "/exit":
            return 0
        if text == "/reset":
            messages = list(system)
            continue
        if text:
            messages.append({"role": "user", "content": text})
            chat_turn(model, messages, sampling)


def add_sampling_args(p):
    p.add_argument("model_dir", help="ONNX folder from `awq-edge export` (--backend ort), quantised checkpoint from "
                                     "`awq-edge quantize` (--backend cuda), or engine folder (--backend trt)")
    p.add_argument("--backend", choices=BACKENDS, default="ort",
                   help="ort: onnxruntime (default); cuda: awq-edge's int4 kernels on an NVIDIA GPU; "
                        "trt: a TensorRT engine")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="with --backend ort: onnxruntime's execution provider; cuda needs `pip install awq-edge[gpu]` "
                        "and an export with --dtype fp16")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of sampling (the same answers again on one backend; cuda samples on the GPU)")


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
