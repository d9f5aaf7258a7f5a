"""`awq_edge.load`: a quantised model in a Python app: generate, stream and chat on onnxruntime, CUDA or TensorRT.

    import awq_edge
    model = awq_edge.load("smol-onnx")                    # an `awq-edge export` folder, on onnxruntime
    print(model.generate("What is the capital of France?", max_new_tokens=32))
    for piece in model.stream("Tell me a story."):        # text as it is decoded
        print(piece, end="", flush=True)
    model.chat([{"role": "user", "content": "Hi!"}])       # the model's chat template

`awq-edge generate` and `awq-edge chat` are built on it.
"""

import math
import numbers
import operator
import os
from collections.abc import Iterator
from pathlib import Path

from awq_edge.errors import AwqEdgeError

BACKENDS = ("ort", "cuda", "trt")
FOLDER_OF = {"ort": "an `awq-edge export` folder", "cuda": "an `awq-edge quantize` checkpoint",
             "trt": "an `awq-edge build` engine folder"}


def _open_decoder(folder: Path, backend: str, provider: str):
    if backend == "cuda":
        from awq_edge.runtime.cuda import CudaDecoder

        return CudaDecoder.from_checkpoint(folder)
    if backend == "trt":
        from awq_edge.runtime.trt import TrtDecoder

        return TrtDecoder(folder)
    from awq_edge.runtime.ort import OrtDecoder

    return OrtDecoder(folder, provider=provider)


def utf8_text(text: str, what: str) -> str:
    """text, once it is known to be a str that encodes as UTF-8 (argv and stdin decode stray bytes to lone surrogates)."""
    if not isinstance(text, str):
        raise AwqEdgeError(f"the {what} is a {type(text).__name__}, not text", f"pass the {what} as a str")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise AwqEdgeError(f"the {what} holds bytes that are not UTF-8 (at character {e.start})",
                           f"pass the {what} as UTF-8 text") from None
    return text


class Model:
    """A decoder with its KV cache and the tokenizer saved beside it. Batch 1; greedy unless temperature > 0.

    Sampling arguments of generate/stream/chat: max_new_tokens (256), temperature (0: greedy), top_p (1.0),
    top_k (0: no limit), seed (0). An answer ends at an end-of-sequence token, after max_new_tokens, or where
    the model's context is full. The cuda backend samples on the GPU: a seed repeats its answers there, but
    the same seed draws other tokens on the onnxruntime backend, which samples on the host.
    """

    def __init__(self, decoder, tokenizer, folder: Path, backend: str):
        self.decoder, self.tokenizer, self.folder, self.backend = decoder, tokenizer, folder, backend

    def prompt_ids(self, messages: list, template: bool = True) -> list:
        """Token ids of a conversation: the chat template when the tokenizer has one (and template), else the
        last message's text alone."""
        for m in messages:
            utf8_text(m.get("content") if isinstance(m, dict) else m, "message")
        if not template or not self.tokenizer.chat_template:
            return list(self.tokenizer(messages[-1]["content"])["input_ids"])
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def _ids(self, prompt, template: bool) -> list:
        if isinstance(prompt, str):
            return self.prompt_ids([{"role": "user", "content": utf8_text(prompt, "prompt")}], template)
        try:
            ids = [operator.index(i) for i in prompt]  # ints of any kind (numpy's too), never floats
        except TypeError:
            ids = [-1]
        vocab = len(self.tokenizer)
        if not all(0 <= i < vocab for i in ids):
            raise AwqEdgeError("the prompt is neither text nor a list of token ids in the vocabulary",
                               f"pass a str or a list of ints in [0, {vocab})")
        return ids

    def tokens(self, prompt_ids: list, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0) -> Iterator[int]:
        """The new token ids, one at a time, after prompt_ids."""
        from awq_edge.runtime.generate import generate
        from awq_edge.runtime.sampling import Sampling

        s = check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
        context = self.decoder.context_length
        if len(prompt_ids) >= context:
            raise AwqEdgeError(f"the prompt has {len(prompt_ids)} tokens, and the model's context holds {context}",
                               "shorten the prompt (in a chat: /reset starts over)")
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        n = min(s["max_new_tokens"], context - len(prompt_ids))
        # A limit wider than the vocabulary is no limit (and the partition of the logits could not take it).
        vocab = getattr(self.decoder, "vocab_size", None) or len(self.tokenizer)
        top_k = s["top_k"] if s["top_k"] < vocab else 0
        return generate(self.decoder, prompt_ids, n, Sampling(s["temperature"], s["top_p"], top_k), stops, s["seed"])

    def stream(self, prompt, *, raw: bool = False, **sampling) -> Iterator[str]:
        """The answer's text in pieces as they are decoded. prompt: text (sent through the chat template unless
        raw or the tokenizer has none) or a list of token ids (fed as they are)."""
        from awq_edge.runtime.generate import stream_text

        sampling = check_sampling(**sampling)
        return stream_text(self.tokenizer, self.tokens(self._ids(prompt, not raw), **sampling))

    def generate(self, prompt, *, raw: bool = False, **sampling):
        """The whole answer: text for a text prompt, the new token ids for a list of ids."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, raw=raw, **sampling))
        return list(self.tokens(self._ids(prompt, False), **check_sampling(**sampling)))

    def chat(self, messages: list, **sampling) -> str:
        """The assistant's next answer to messages ([{"role": "user", "content": ...}, ...])."""
        if not self.tokenizer.chat_template:
            raise AwqEdgeError(f"{self.folder} has no chat template", "use generate(..., raw=True) for a base model")
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise AwqEdgeError("messages is not a list of {role, content} dicts",
                               'pass [{"role": "user", "content": "..."}]')
        from awq_edge.runtime.generate import stream_text

        sampling = check_sampling(**sampling)
        return "".join(stream_text(self.tokenizer, self.tokens(self.prompt_ids(messages), **sampling)))


SAMPLING_OPTIONS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


def _count(value, name: str):
    """value as an int when it is a whole number >= 0 (numpy's too), else one error; never a bool or a float."""
    n = operator.index(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else -1
    if n < 0:
        flag = "--" + name.replace("_", "-")
        raise AwqEdgeError(f"{name} {value!r} is not a count", f"use {flag} 0 or more")
    return int(n)


def _finite(value):
    """value as a float when it is a finite real number (numpy's too; never a bool), else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def check_sampling(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=0, **unknown) -> dict:
    """The sampling options of generate/stream/chat as plain numbers, each checked for its type, its range and
    NaN before any work: a NaN temperature or a negative seed is one error, never garbage or a traceback."""
    if unknown:
        raise AwqEdgeError(f"unknown sampling option(s) {', '.join(sorted(unknown))}",
                           f"use {', '.join(SAMPLING_OPTIONS)}")
    t, p = _finite(temperature), _finite(top_p)
    if t is None or t < 0:
        raise AwqEdgeError(f"temperature {temperature!r} is not a finite number >= 0", "use --temperature >= 0 "
                           "(0: greedy)")
    if p is None or not 0 < p <= 1:
        raise AwqEdgeError(f"top_p {top_p!r} is not a number in (0, 1]", "use --top-p in (0, 1] (1: no limit)")
    return {"max_new_tokens": _count(max_new_tokens, "max_new_tokens"), "temperature": t, "top_p": p,
            "top_k": _count(top_k, "top_k"), "seed": _count(seed, "seed")}


def load(folder, backend: str = "ort", *, provider: str = "cpu") -> Model:
    """Open a model to run: backend "ort" (onnxruntime; provider "cpu" or "cuda") takes an `awq-edge export`
    folder, "cuda" (awq-edge's int4 kernels) an `awq-edge quantize` checkpoint, "trt" an `awq-edge build`
    engine folder. The tokenizer is read from the same folder, local files only, never remote code."""
    if backend not in BACKENDS:
        raise AwqEdgeError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}", "use backend=\"ort\", \"cuda\" or \"trt\"")
    if not isinstance(folder, (str, os.PathLike)):
        raise AwqEdgeError(f"model folder {folder!r} is not a path", f"pass {FOLDER_OF[backend]}")
    folder = Path(folder)
    if not folder.is_dir():
        raise AwqEdgeError(f"model folder {folder} not found", f"pass {FOLDER_OF[backend]}")
    if provider != "cpu" and backend != "ort":
        raise AwqEdgeError(f"provider {provider!r} applies to the ort backend only", "drop --provider")
    from awq_edge.checkpoint.hf_folder import check_tokenizer_json, load_tokenizer

    check_tokenizer_json(folder)
    decoder = _open_decoder(folder, backend, provider)

    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise AwqEdgeError(f"{folder} has no usable tokenizer ({str(e)[:200]})",
                           "export again from a checkpoint that has its tokenizer files") from None
    return Model(decoder, tokenizer, folder, backend)
