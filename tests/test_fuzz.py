"""Issue 20's fuzz suite: seeded mutations of a valid tiny example of every input format, each run through the
command that reads it (in this process). The property: exit 2 with one `awq-edge CMD: error: ... (fix: ...)` line
and nothing written, or exit 0 with a correct output; never a traceback, never the inputs changed.

FUZZ_CASES cases (default 300, `make test`'s slice: under a minute), dealt round the formats in an order fixed
by FUZZ_SEED (default 20); each format's cases are its systematic mutations (fuzz_mutate), then random ones.
The long run, `FUZZ_CASES=6000 pytest tests/test_fuzz.py`, writes its report to bench/results/fuzz.json (any
run that sets FUZZ_CASES does).
"""

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_tokenizer, tiny_model
from fuzz_mutate import (
    Mutation,
    flip_bytes,
    json_mutations,
    json_tail,
    jsonl_mutations,
    safetensors_mutations,
    safetensors_tail,
    show,
    systematic,
    tensor_mutations,
    tensor_tail,
    text_mutations,
    toml_mutations,
    toml_tail,
)
from test_engine import tiny_decoder, write_onnx_dir
from test_export import write_checkpoint
from test_runtime import save_byte_tokenizer

import awq_edge
from awq_edge.checkpoint.hf_folder import HEAD_STATS_FILE
from awq_edge.cli import main
from awq_edge.errors import AwqEdgeError

ROOT = Path(__file__).resolve().parents[1]
N_CASES = int(os.environ.get("FUZZ_CASES", 300))
SEED = int(os.environ.get("FUZZ_SEED", 20))
LONG_RUN = "FUZZ_CASES" in os.environ
CASE_SECONDS = 120  # a case running longer is a hang, reported as a traceback
ONE_LINE = re.compile(r"^awq-edge \w+: error: .+ \(fix: .+\)$")
IDS = [[3, 4, 5, 6, 7, 8, 9, 10]]  # the token ids every model's logits are compared on
TEXT = "w3 w4 w5 zz"  # the text every float-folder tokenizer is compared on
CALIB = " ".join(f"w{3 + i % 200}" for i in range(400))


# ---- the inputs: a valid tiny example of every format, built once

def build_inputs(root: Path) -> dict:
    from awq_edge.engine import manifest, plan
    from awq_edge.engine.devices import get_profile
    from awq_edge.export.api import export

    for name, shard in (("float", None), ("sharded", "60KB")):
        tiny_model("llama").save_pretrained(root / name, **({"max_shard_size": shard} if shard else {}))
        save_tiny_tokenizer(root / name)
    write_checkpoint(root / "ck")
    save_byte_tokenizer(root / "ck")
    # the head statistics a calibrated `awq-edge quantize` stores, which the default export reads
    moments = [round(0.5 + (i % 7) / 4, 2) for i in range(128)]
    (root / "ck" / HEAD_STATS_FILE).write_text(json.dumps({"final_norm_sq_mean": moments}))
    export(root / "ck", root / "onnx")
    trt = write_onnx_dir(root / "trt", tiny_decoder("native"), context_length=256)  # what rtx-4090 builds
    # The engine folder `awq-edge build` writes for it, as tests/test_runtime_trt.py makes one (never run: no GPU).
    profile = get_profile("rtx-4090")
    inputs = plan.graph_inputs(plan.load_graph(trt))
    kv = plan.kv_layout(inputs)
    record = manifest.manifest(profile, trt_module=profile.tensorrt, trt_version="1.7", onnx_dir=trt,
                               model_sha256="0", kv=kv, max_seq=256, profiles=plan.optimization_profiles(
                                   inputs, 256, profile), int4={}, plugin_library=None, engine_bytes=4,
                               build_seconds=1.0)
    # The same bytes in every run, so that the same seed makes the same mutations.
    record.update(built_at="2026-01-01T00:00:00+00:00", built_on="fuzz")
    record["model"]["onnx_dir"] = "/srv/awq-edge/trt"
    (root / "engine").mkdir()
    (root / "engine" / manifest.MANIFEST_FILE).write_text(json.dumps(record, indent=2))
    (root / "engine" / manifest.ENGINE_FILE).write_bytes(b"plan")
    (root / "dev").mkdir()
    shutil.copy(ROOT / "devices" / "rtx-4090.toml", root / "dev" / "my.toml")
    (root / "calib").mkdir()
    (root / "calib" / "c.txt").write_text(CALIB + "\n")
    lines = [json.dumps({"text": " ".join(CALIB.split()[i::4])}) for i in range(4)]
    (root / "calib" / "c.jsonl").write_text("\n".join(lines) + "\n")
    (root / "text").mkdir()
    (root / "text" / "t.txt").write_text("hello world, " * 3)
    return {p.name: p for p in root.iterdir()}


def tree(root: Path) -> dict:
    """Every file and folder under root: sha256 of a file, None for a folder."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


# ---- the commands, and what a correct output of each is

def logits_of_checkpoint(folder: Path) -> torch.Tensor:
    from awq_edge.checkpoint.reader import load_quantized_model

    model, _ = load_quantized_model(folder)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def logits_of_export(folder: Path) -> np.ndarray:
    from awq_edge.runtime.ort import OrtDecoder

    return OrtDecoder(folder).forward(IDS[0])


def tokenizer_view(folder: Path) -> tuple:
    from awq_edge.checkpoint.hf_folder import load_tokenizer

    tok = load_tokenizer(folder)
    ids = tok(TEXT)["input_ids"]
    return ids, tok.decode(ids)


def quiet_main(argv) -> tuple:
    """(exit code, stdout) of a command an oracle runs; its stderr is dropped."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main([str(a) for a in argv]), out.getvalue()
        except SystemExit as e:
            return e.code, out.getvalue()


class Baselines:
    """What each command makes of the unmutated inputs, computed on first use."""

    def __init__(self, fx: dict, root: Path):
        self.fx, self.root, self.cache = fx, root, {}

    def get(self, key):
        if key not in self.cache:
            self.cache[key] = getattr(self, f"_{key}")()
        return self.cache[key]

    def _checkpoint(self):
        out = self.root / "q"
        assert quiet_main(["quantize", self.fx["float"], "-o", out, "--method", "rtn", "--device", "cpu"])[0] == 0
        return logits_of_checkpoint(out), tokenizer_view(out)

    def _export(self):
        return logits_of_export(self.fx["onnx"])

    def _eval(self):
        return quiet_main(eval_argv(self.fx["ck"], self.fx["text"]))[1]

    def _generate(self):
        return quiet_main(generate_argv(self.fx["onnx"]))[1]


def eval_argv(ck, text):
    return ["eval", ck, "--text", text / "t.txt", "--device", "cpu", "--seqlen", "16"]


def generate_argv(onnx):
    return ["generate", onnx, "--prompt", "hi", "--max-new-tokens", "2"]


def valid_variant(case) -> bool:
    """Whether the mutation made another valid input, whose output may differ (then it must be finite): a float
    tensor recast to another float dtype, or tied embeddings (transformers then ignores lm_head.weight too)."""
    parts = case.name.removeprefix("random: ").split(" and ")
    return all(re.search(r" as (float16|bfloat16|float32)$", p) or p == "tie_word_embeddings = True" for p in parts)


def same_checkpoint(p, base, case):
    """Exit 0 of quantize is correct when the checkpoint computes and tokenises as the unmutated input's does (from
    another valid input, computes finite logits), and export takes it."""
    logits, view = base.get("checkpoint")
    got = logits_of_checkpoint(p["out"])
    if not torch.allclose(got, logits, atol=1e-4) and not (valid_variant(case) and torch.isfinite(got).all()):
        return "its checkpoint's logits differ from the unmutated input's"
    if tokenizer_view(p["out"]) != view:
        return "its checkpoint's tokenizer differs from the unmutated input's"
    code, _ = quiet_main(["export", p["out"], "-o", p["case"] / "onnx", "--exact"])
    return None if code == 0 else f"export refuses its checkpoint (exit {code})"


def finite_checkpoint(p, base, case):
    """Exit 0 of a calibrated quantize is correct when the calibration text was valid and the checkpoint's logits
    are finite (other text gives other scales)."""
    problem = calib_problem(p["case"] / case.target)
    if problem:
        return f"it calibrated on {problem}"
    return None if torch.isfinite(logits_of_checkpoint(p["out"])).all() else "its checkpoint computes NaN or inf"


def same_export(p, base, case):
    from awq_edge.export.folder import read_genai_config

    got = logits_of_export(p["out"])
    if not np.allclose(got, base.get("export"), atol=1e-4) and not (valid_variant(case) and np.isfinite(got).all()):
        return "its export's logits differ from the unmutated checkpoint's"
    read_genai_config(p["out"])  # what generate reads: raises if it refuses it
    return None


def finite_export(p, base, case):
    """Exit 0 of the default export is correct when its logits are finite and generate takes its folder (other
    statistics search another head, so other logits)."""
    from awq_edge.export.folder import read_genai_config

    if not np.isfinite(logits_of_export(p["out"])).all():
        return "its export's logits are not finite"
    read_genai_config(p["out"])
    return None


def same_perplexity(p, base, case):
    ppl = re.compile(r"perplexity (\S+) over (\d+) tokens")
    got, want = ppl.search(p["stdout"]), ppl.search(base.get("eval"))
    if got and (got.groups() == want.groups() or valid_variant(case) and math.isfinite(float(got[1]))):
        return None
    return f"it printed {p['stdout'].strip()!r}, the unmutated checkpoint {base.get('eval').strip()!r}"


def same_generation(p, base, case):
    """Exit 0 of generate is correct when the text is the unmutated export's, or a prefix of it where the
    mutation changed the stop tokens (which may end an answer sooner)."""
    want, got = base.get("generate"), p["stdout"]
    if got == want or ("eos_token_id" in case.name and want.startswith(got.rstrip("\n"))):
        return None
    return f"it printed {got!r}, the unmutated export {want!r}"


def valid_profile(p, base, case):
    import tomllib

    try:
        data = tomllib.loads((p["dev"] / "my.toml").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"it took a file that is not TOML ({e})"
    for key, value in data.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in NUMBER_KEYS and not (number and math.isfinite(value) and value > 0):
            return f"it took {key} = {value!r}"
        if key in STRING_KEYS and not isinstance(value, str):
            return f"it took {key} = {value!r}"
    return None


NUMBER_KEYS = {"memory_gib", "memory_bandwidth_gbs", "max_seq_len", "kv_cache_mib", "workspace_mib", "max_batch",
               "prefill_tokens"}
STRING_KEYS = {"description", "family", "tensorrt", "compute_capability", "precision", "int4_matmul"}


def built_engine(p, base, case):
    """Exit 0 of build (TensorRT-RTX builds without a GPU) is correct for a valid profile whose engine folder the
    runtime reads."""
    from awq_edge.engine.manifest import read_manifest

    read_manifest(p["out"])
    return valid_profile(p, base, case)


def never(p, base, case):
    """generate --backend trt needs a GPU, which the tests never have."""
    return "it succeeded without a GPU"


def calib_problem(path: Path):
    """Why a calibration file is not text to calibrate on (None when it is)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "bytes that are not UTF-8"
    if "\0" in text:
        return "a NUL byte (binary, or UTF-16)"
    if path.suffix == ".jsonl":
        for line in filter(str.strip, text.splitlines()):
            try:
                doc = json.loads(line)
            except ValueError:
                return f"a line that is not JSON: {line[:40]!r}"
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                return f"a line without a text string: {line[:40]!r}"
    return None


@dataclass(frozen=True)
class Command:
    argv: object  # paths -> argv
    ok: object  # (paths, baselines, case) -> None where exit 0 was correct, else what was wrong


QUANTIZE = ["--method", "rtn", "--device", "cpu"]
AWQ = ["--method", "awq", "--device", "cpu", "--n-samples", "1", "--seqlen", "16"]
COMMANDS = {
    "quantize": Command(lambda p: ["quantize", p["float"], "-o", p["out"], *QUANTIZE], same_checkpoint),
    "quantize sharded": Command(lambda p: ["quantize", p["sharded"], "-o", p["out"], *QUANTIZE], same_checkpoint),
    "quantize --calib .txt": Command(lambda p: ["quantize", p["float"], "-o", p["out"], *AWQ, "--calib",
                                                p["calib"] / "c.txt"], finite_checkpoint),
    "quantize --calib .jsonl": Command(lambda p: ["quantize", p["float"], "-o", p["out"], *AWQ, "--calib",
                                                  p["calib"] / "c.jsonl"], finite_checkpoint),
    "export": Command(lambda p: ["export", p["ck"], "-o", p["out"], "--exact"], same_export),
    "export (default)": Command(lambda p: ["export", p["ck"], "-o", p["out"]], finite_export),
    "eval": Command(lambda p: eval_argv(p["ck"], p["text"]), same_perplexity),
    "generate": Command(lambda p: generate_argv(p["onnx"]), same_generation),
    "devices": Command(lambda p: ["devices", p["dev"] / "my.toml"], valid_profile),
    "build": Command(lambda p: ["build", p["trt"], "--device", p["dev"] / "my.toml", "-o", p["out"]], built_engine),
    "generate --backend trt": Command(lambda p: ["generate", p["engine"], "--backend", "trt", "--prompt", "hi"],
                                      never),
}


# ---- the formats: a file of an input folder, its mutations, and the commands that read it

@dataclass(frozen=True)
class Format:
    name: str
    folders: tuple  # input folders copied into each case's folder; the first holds the target
    target: str | None  # the file mutated, relative to the case's folder
    mutations: object  # bytes -> [Mutation]
    tail: object  # (rng, bytes) -> Mutation: random ones once the systematic ones are used up
    commands: tuple


def weight_map_file(path) -> bool:
    return len(path) == 2 and path[0] == "weight_map"


def decoder_file(path) -> bool:
    return path == ("model", "decoder", "filename")


def engine_file(path) -> bool:
    return path in (("plugin_library",), ("engine_file",), ("model", "onnx_dir"))


FORMATS = [
    Format("config.json", ("float",), "float/config.json", json_mutations, json_tail, ("quantize",)),
    Format("tokenizer.json", ("float",), "float/tokenizer.json", json_mutations, json_tail, ("quantize",)),
    Format("tokenizer_config.json", ("float",), "float/tokenizer_config.json", json_mutations, json_tail,
           ("quantize",)),
    Format("model.safetensors header", ("float",), "float/model.safetensors", safetensors_mutations,
           safetensors_tail, ("quantize",)),
    Format("model.safetensors.index.json", ("sharded",), "sharded/model.safetensors.index.json",
           lambda d: json_mutations(d, weight_map_file), json_tail, ("quantize sharded",)),
    Format("model.safetensors tensors", ("float",), "float/model.safetensors", tensor_mutations, tensor_tail,
           ("quantize",)),
    Format("checkpoint model.safetensors header", ("ck", "text"), "ck/model.safetensors", safetensors_mutations,
           safetensors_tail, ("export", "eval")),
    Format("checkpoint config.json", ("ck", "text"), "ck/config.json", json_mutations, json_tail, ("export", "eval")),
    Format("checkpoint tensors", ("ck", "text"), "ck/model.safetensors", tensor_mutations, tensor_tail,
           ("export", "eval")),
    Format("head statistics", ("ck",), f"ck/{HEAD_STATS_FILE}", json_mutations, json_tail, ("export (default)",)),
    Format("calib .txt", ("float", "calib"), "calib/c.txt", text_mutations, lambda r, d: flip_bytes(r, d),
           ("quantize --calib .txt",)),
    Format("calib .jsonl", ("float", "calib"), "calib/c.jsonl", jsonl_mutations, lambda r, d: flip_bytes(r, d),
           ("quantize --calib .jsonl",)),
    Format("genai_config.json", ("onnx",), "onnx/genai_config.json", lambda d: json_mutations(d, decoder_file),
           json_tail, ("generate",)),
    Format("awq_edge_export.json", ("onnx",), "onnx/awq_edge_export.json", json_mutations, json_tail, ("generate",)),
    Format("device .toml", ("dev", "trt"), "dev/my.toml", toml_mutations, toml_tail, ("devices", "build")),
    Format("manifest.json", ("engine",), "engine/manifest.json", lambda d: json_mutations(d, engine_file), json_tail,
           ("generate --backend trt",)),
]


# ---- CLI numbers and the Python API's keywords: the value table says which must be taken

NUMBERS = ("-1", "0", "1", "2", "16", "0.5", "1e30", "nan", "inf", "-inf", "99999999999999999999", "abc", "", "-0",
           "1_000", "0x10")
# (command, option) -> (type, the values it must take)
OPTIONS = {
    ("generate", "--seed"): (int, lambda v: v >= 0),
    ("generate", "--temperature"): (float, lambda v: math.isfinite(v) and v >= 0),
    ("generate", "--top-p"): (float, lambda v: math.isfinite(v) and 0 < v <= 1),
    ("generate", "--top-k"): (int, lambda v: v >= 0),
    ("generate", "--max-new-tokens"): (int, lambda v: v >= 0),
    ("quantize", "--group-size"): (int, lambda v: v >= 16 and v & (v - 1) == 0),
    ("quantize", "--n-samples"): (int, lambda v: v >= 1),
    ("quantize", "--seqlen"): (int, lambda v: v >= 2),
    ("quantize", "--keep-8bit"): (int, lambda v: v >= 0),
    ("quantize", "--max-gpu-memory"): (float, lambda v: math.isfinite(v) and v > 0),
    ("eval", "--seqlen"): (int, lambda v: v >= 2),
    ("eval", "--max-tokens"): (int, lambda v: v >= 0),
}


def valid_option(command: str, *args) -> bool:
    """Whether every option given is one the command must take: it parses as argparse parses it, in range."""
    for opt, value in zip(args[::2], args[1::2]):
        if (command, opt) in OPTIONS:
            kind, ok = OPTIONS[command, opt]
            try:
                if not ok(kind(value)):
                    return False
            except ValueError:
                return False
    return True


def option_cases() -> list:
    """(name, command, extra argv) for every option and value, sampling options alone and with sampling on."""
    out = []
    for command, opt in OPTIONS:
        for v in NUMBERS:
            out.append((f"{command} {opt} {v!r}", command, (opt, v)))
            if opt in ("--seed", "--top-p", "--top-k"):
                out.append((f"{command} --temperature 0.7 {opt} {v!r}", command, (opt, v, "--temperature", "0.7")))
    return out


def option_tail(rng: random.Random) -> tuple:
    command = rng.choice(["generate", "quantize", "eval"])
    opts = rng.sample([o for c, o in OPTIONS if c == command], 2)
    args = tuple(x for o in opts for x in (o, rng.choice(NUMBERS)))
    return (f"{command} " + " ".join(f"{a!r}" if i % 2 else a for i, a in enumerate(args)), command, args)


OPTION_COMMANDS = {
    "generate": lambda p: generate_argv(p["onnx"]),
    "quantize": lambda p: ["quantize", p["float"], "-o", p["out"], *AWQ, "--calib", p["calib"] / "c.txt"],
    "eval": lambda p: eval_argv(p["ck"], p["text"]),
}


def taken_option(p, base, case):
    """Exit 0 with a number is correct when the command must take it (OPTIONS), and a checkpoint it wrote computes
    finite logits."""
    if not valid_option(case.command, *case.args):
        return f"it took {' '.join(case.args)}"
    if case.command == "quantize" and not torch.isfinite(logits_of_checkpoint(p["out"])).all():
        return "its checkpoint computes NaN or inf"
    return None


# The sampling keywords of Model.generate/stream/chat and the values they must take.
SAMPLING = {"max_new_tokens": "count", "temperature": "finite >= 0", "top_p": "(0, 1]", "top_k": "count",
            "seed": "count"}
API_VALUES = ("hot", 2.5, -1, 0, 1, 0.5, math.nan, math.inf, -math.inf, None, True, [], 1e30, 10**30,
              np.int64(3), np.float32(0.5))


def valid_keyword(key, value) -> bool:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    integral = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    rule = SAMPLING.get(key)
    if rule == "count":
        return integral and value >= 0
    if rule == "finite >= 0":
        return real and math.isfinite(value) and value >= 0
    if rule == "(0, 1]":
        return real and math.isfinite(value) and 0 < value <= 1
    return False


# awq_edge.quantize's keywords: (value, whether it must be taken), with method awq on one block of 16 tokens of
# the calibration file, so that every keyword matters. (Pairs, not a dict: 4.0 == 4 and True == 1 as keys.)
QUANTIZE_KEYWORDS = {
    "group_size": ((24, False), (0, False), (-1, False), ("64", False), (64.0, False), (True, False), (32, True),
                   (None, True)),
    "n_samples": ((0, False), (-1, False), ("1", False), (1.5, False), (2, True)),
    "seqlen": ((1, False), (0, False), ("16", False), (math.nan, False), (16, True)),
    "keep_8bit": ((-1, False), ("1", False), (1.5, False), (10**6, False), (0, True)),
    "w_bit": (("4", False), (4.0, False), (True, False), (8, False), (4, True)),
    "method": (("x", False), (5, False), ("rtn", True)),
    "device": ((5, False), ("tpu", False), (None, False), ("cpu", True)),
    "max_gpu_memory": ((math.nan, False), (-1, False), (0, False), ("x", False), (math.inf, False), (None, True),
                       (1.5, True)),
    "calib_source": ((5, False), ("", False), ("missing.txt", False), ("builtin", True)),
    "zero_point": (("no", False), (None, False), (1, False), (False, True)),
}
LOAD_KEYWORDS = {"folder": (None, 5, "", "/nonexistent"), "backend": ("x", None, 5, "ORT", "trt"),
                 "provider": ("x", None, 5, "CPU", "cuda")}


def api_cases() -> list:
    out = [(f"Model.{call}(**{{{key!r}: {show(v)}}})", "api", (call, key, v))
           for call in ("generate", "stream", "chat") for key in SAMPLING for v in API_VALUES]
    out.append(("Model.generate(temprature=0.5)", "api", ("generate", "temprature", 0.5)))
    out += [(f"load({key}={show(v)})", "api", ("load", key, v)) for key, vs in LOAD_KEYWORDS.items() for v in vs]
    out += [(f"quantize({key}={show(v)})", "api", ("quantize", key, v, valid))
            for key, pairs in QUANTIZE_KEYWORDS.items() for v, valid in pairs]
    return out


def run_api(p, call, key, value, *_):
    """Call the Python API with one keyword mutated; the other sampling keywords keep the answer short."""
    if call == "load":
        kwargs = {"folder": p["onnx"], key: value}
        return awq_edge.load(kwargs.pop("folder"), **kwargs)
    if call == "quantize":
        kwargs = dict(method="awq", device="cpu", output=p["out"], calib_source=str(p["calib"] / "c.txt"),
                      n_samples=1, seqlen=16, progress=False, log=lambda *a: None)
        kwargs[key] = value
        return awq_edge.quantize(p["float"], **kwargs)
    model = awq_edge.load(p["onnx"])
    sampling = {"max_new_tokens": 2, key: value}
    if call == "generate":
        return model.generate("hi", **sampling)
    if call == "stream":
        return "".join(model.stream("hi", **sampling))
    return model.chat([{"role": "user", "content": "hi"}], **sampling)


def api_ok(p, base, case):
    call, key, value = case.args[:3]
    if call == "quantize":
        return None if case.args[3] else f"quantize took {key}={value!r}"
    if call == "load":
        return None if (key, value) == ("provider", "cpu") else f"load took {key}={value!r}"
    return None if valid_keyword(key, value) else f"{call} took {key}={value!r}"


# ---- cases: dealt round the formats, the same for a seed

@dataclass(frozen=True)
class Case:
    format: str
    name: str
    command: str
    folders: tuple
    target: str | None = None
    mutation: Mutation | None = None
    args: tuple = ()

    def __str__(self):
        return f"{self.format}: {self.name} -> {self.command}"


def format_cases(fmt: Format, inputs: dict, seed: int):
    """A format's cases: each systematic mutation with each command, then random mutations without end."""
    data = (inputs[fmt.folders[0]].parent / fmt.target).read_bytes()
    for m in systematic(fmt.mutations(data), seed, fmt.name):
        for command in fmt.commands:
            yield Case(fmt.name, m.name, command, fmt.folders, fmt.target, m)
    rng = random.Random(f"{seed}/{fmt.name}/tail")
    while True:
        m = fmt.tail(rng, data)
        for command in fmt.commands:
            yield Case(fmt.name, f"random: {m.name}", command, fmt.folders, fmt.target, m)


def listed_cases(name, listed, tail, folders, seed):
    for case_name, command, args in systematic(listed, seed, name):
        yield Case(name, case_name, command, folders, args=args)
    rng = random.Random(f"{seed}/{name}/tail")
    while tail:
        case_name, command, args = tail(rng)
        yield Case(name, f"random: {case_name}", command, folders, args=args)


def all_cases(inputs: dict, seed: int, n: int) -> list:
    """n cases dealt one from each format in turn (a format with no cases left drops out)."""
    streams = [format_cases(f, inputs, seed) for f in FORMATS]
    streams.append(listed_cases("CLI numbers", option_cases(), option_tail, ("onnx", "float", "calib", "ck", "text"),
                                seed))
    streams.append(listed_cases("API keywords", api_cases(), None, ("onnx", "float", "calib"), seed))
    out = []
    while len(out) < n and streams:
        for s in list(streams):
            case = next(s, None)
            if case is None:
                streams.remove(s)
            elif len(out) < n:
                out.append(case)
    return out


# ---- running one case

@dataclass
class Outcome:
    kind: str  # refused | accepted | traceback | silent | unclear (exit 2 without one proper line) | dirty
    detail: str = ""


class Hang(Exception):
    pass


def hang(signum, frame):
    raise Hang(f"over {CASE_SECONDS} s")


def prepare(case: Case, inputs: dict, case_dir: Path) -> dict:
    """Copy the case's input folders into case_dir and mutate its target; the paths the command is given."""
    p = {"case": case_dir, "out": case_dir / "out"}
    for name in case.folders:
        p[name] = Path(shutil.copytree(inputs[name], case_dir / name))
    if case.mutation is not None:
        f = case_dir / case.target
        f.write_bytes(case.mutation.apply(f.read_bytes()))
    return p


def execute(case: Case, p: dict, capfd) -> tuple:
    """(exit code, stderr lines, stdout) of the case's command run in this process; an exception other than a
    clean exit is raised."""
    capfd.readouterr()
    if case.command == "api":
        try:
            run_api(p, *case.args)
            code, err = 0, ""
        except AwqEdgeError as e:
            code, err = 2, f"awq-edge api: error: {e}"
        out = capfd.readouterr().out
    else:
        argv = (OPTION_COMMANDS[case.command](p) + list(case.args) if case.format == "CLI numbers"
                else COMMANDS[case.command].argv(p))
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's one line
            code = e.code
        out, err = capfd.readouterr()
    return code, [line for line in err.splitlines() if line.strip()], out


def judge(case: Case, inputs: dict, base: Baselines, case_dir: Path, capfd) -> Outcome:
    p = prepare(case, inputs, case_dir)
    before = tree(case_dir)
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    try:
        code, lines, out = execute(case, p, capfd)
    except Exception as e:
        capfd.readouterr()
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome("traceback", f"{traceback.format_exception_only(e)[-1].strip()} "
                                    f"(at {Path(where.filename).name}:{where.lineno})")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    after = tree(case_dir)
    if code == 0:
        wrote = {k: v for k, v in after.items() if k != "out" and not k.startswith("out/")}
        if wrote != before:
            return Outcome("dirty", f"exit 0 changed the inputs or wrote beside -o: {diff(before, wrote)}")
        p["stdout"] = out
        check = taken_option if case.format == "CLI numbers" else api_ok if case.command == "api" else \
            COMMANDS[case.command].ok
        try:
            problem = check(p, base, case)
        except Exception as e:
            problem = f"its output is unreadable ({traceback.format_exception_only(e)[-1].strip()})"
        return Outcome("silent", f"exit 0, but {problem}") if problem else Outcome("accepted")
    if code != 2 or len(lines) != 1 or not ONE_LINE.match(lines[0]):
        return Outcome("unclear", f"exit {code}, stderr {lines[-3:]!r}")
    if after != before:
        return Outcome("dirty", f"exit 2 changed files: {diff(before, after)}")
    return Outcome("refused", lines[0])


def diff(a: dict, b: dict) -> list:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:5]


# ---- the test and its report

RESULTS = []


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("fuzz-inputs")
    fx = build_inputs(root)
    before = tree(root)
    yield fx
    assert tree(root) == before, "a case changed the shared inputs"
    if LONG_RUN:
        write_report(request)


@pytest.fixture(scope="module")
def base(inputs, tmp_path_factory):
    return Baselines(inputs, tmp_path_factory.mktemp("fuzz-baselines"))


def pytest_generate_tests(metafunc):
    if "case_index" in metafunc.fixturenames:
        metafunc.parametrize("case_index", range(N_CASES), ids=lambda i: f"{i:04d}")


@pytest.fixture(scope="module")
def cases(inputs) -> list:
    return all_cases(inputs, SEED, N_CASES)


def test_a_mutated_input_is_refused_in_one_line_or_gives_a_correct_output(case_index, cases, inputs, base,
                                                                           tmp_path, capfd):
    case = cases[case_index]
    t0 = time.perf_counter()
    outcome = judge(case, inputs, base, tmp_path, capfd)
    RESULTS.append({"format": case.format, "case": case.name, "command": case.command, "outcome": outcome.kind,
                    "detail": outcome.detail, "seconds": round(time.perf_counter() - t0, 2)})
    assert outcome.kind in ("refused", "accepted"), f"{case}: {outcome.kind}: {outcome.detail}"


def write_report(request):
    """bench/results/fuzz.json: the run's command, counts by format and outcome, and every case that did not pass."""
    by_format = {}
    for r in RESULTS:
        counts = by_format.setdefault(r["format"], {"cases": 0})
        counts["cases"] += 1
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    kinds = ("traceback", "silent", "unclear", "dirty")
    report = {
        "what": "issue 20's fuzz suite: mutated inputs of every format run through the command that reads it",
        "command": f"FUZZ_CASES={N_CASES} FUZZ_SEED={SEED} python -m pytest -q tests/test_fuzz.py",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": len(RESULTS),
        "seconds": round(sum(r["seconds"] for r in RESULTS), 1),
        "all": {k: sum(r["outcome"] == k for r in RESULTS) for k in ("refused", "accepted", *kinds)},
        "formats": by_format,
        "failures": [r for r in RESULTS if r["outcome"] not in ("refused", "accepted")],
    }
    path = ROOT / "bench" / "results" / "fuzz.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    summary = {k: report[k] for k in ("command", "cases", "seconds", "all")}
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nfuzz report, written to {path}: {json.dumps(summary)}")
