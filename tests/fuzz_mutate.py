"""The fuzz suite's seeded mutator (issue 20): named mutations of a valid file's bytes, for JSON, TOML, safetensors
(its header and its tensor set) and plain text; each `*_mutations` lists a format's all, each `*_tail` draws
random ones from a seeded generator."""

import copy
import json
import math
import random
import struct
import tomllib
from dataclasses import dataclass
from typing import Callable

# What a value is replaced with: wrong types, extremes, negatives, NaN and infinities (json writes NaN literals).
VALUES = (None, "", "x", -1, 0, 1e30, math.nan, math.inf, -math.inf, [], {}, True)
# TOML has no null; it adds a fraction, a float where an integer goes, and the 64-bit extremes.
TOML_VALUES = ("", "x", -1, 0, 1.5, 1e30, math.nan, math.inf, -math.inf, [], {}, True, 2**63 - 1, -2**63)
# What a value naming a file is replaced with: outside the folder, absolute, empty, missing, the folder itself.
PATHS = ("../x", "/etc/passwd", "", "missing.bin", ".", "sub/x")


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[bytes], bytes]


def show(value) -> str:
    return json.dumps(value) if isinstance(value, (str, list, dict)) or value is None else repr(value)


# ---- any file

def file_mutations(data: bytes) -> list:
    """Empty, truncated at five offsets, random bytes of the same length, and a NUL and a non-UTF-8 byte in the
    middle."""
    n, mid = len(data), len(data) // 2
    cuts = sorted({1, n // 4, mid, 3 * n // 4, n - 1} - {0, n})
    return [Mutation("empty file", lambda d: b""),
            *[Mutation(f"truncated to {c} of {n} bytes", lambda d, c=c: d[:c]) for c in cuts],
            Mutation("random bytes", lambda d: random.Random(n).randbytes(len(d))),
            Mutation("a NUL byte in the middle", lambda d: d[:mid] + b"\0" + d[mid:]),
            Mutation("a non-UTF-8 byte in the middle", lambda d: d[:mid] + b"\xe9" + d[mid:])]


def flip_bytes(rng: random.Random, data: bytes, start: int = 0, end: int = None) -> Mutation:
    """1-4 bytes at random positions in [start, end) set to random values."""
    end = len(data) if end is None else end
    spots = sorted(rng.sample(range(start, end), min(rng.randint(1, 4), end - start)))
    values = [rng.randrange(256) for _ in spots]

    def apply(d):
        b = bytearray(d)
        for i, v in zip(spots, values):
            b[i] = v
        return bytes(b)
    return Mutation("bytes " + ", ".join(f"{i}=0x{v:02x}" for i, v in zip(spots, values)), apply)


# ---- JSON (and the same edits on a TOML table or a safetensors header)

def paths(doc, prefix=()) -> list:
    """Every path (a tuple of keys and list indices) to a value inside doc, parents before children."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def path_name(path) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


_DELETE = object()


def edited(doc, path, value):
    """A deep copy of doc with the value at path replaced (or deleted: value _DELETE)."""
    doc = copy.deepcopy(doc)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return doc


def edits(doc, values=VALUES, is_path=lambda path: False) -> list:
    """(name, edited doc) for every path: deleted, then replaced by each value (and, where it names a file, by
    each of PATHS)."""
    out = []
    for p in paths(doc):
        out.append((f"delete {path_name(p)}", edited(doc, p, _DELETE)))
        for v in values + (PATHS if is_path(p) else ()):
            out.append((f"{path_name(p)} = {show(v)}", edited(doc, p, v)))
    return out


def dump_json(doc) -> bytes:
    return json.dumps(doc, indent=1).encode()


def json_mutations(data: bytes, is_path=lambda path: False, dump=dump_json) -> list:
    """Every edit of the document, the document in an array, a duplicated key, and file_mutations."""
    doc = json.loads(data)
    out = [Mutation(name, lambda d, e=e: dump(e)) for name, e in edits(doc, VALUES, is_path)]
    if isinstance(doc, dict) and doc:
        first = next(iter(doc))
        body = dump(doc).decode().strip()
        # json keeps the last of two equal keys: the bad value first is harmless, last it must be refused.
        dup = json.dumps({first: "x"})[1:-1]
        out += [Mutation(f"duplicate key {first} = \"x\" first", lambda d: ("{" + dup + ", " + body[1:]).encode()),
                Mutation(f"duplicate key {first} = \"x\" last", lambda d: (body[:-1] + ", " + dup + "}").encode())]
    return out + [Mutation("a JSON array holding the object", lambda d: dump([doc]))] + file_mutations(data)


def json_tail(rng: random.Random, data: bytes, dump=dump_json, values=VALUES) -> Mutation:
    """Two random edits together, or random bytes flipped."""
    doc = json.loads(data)
    if rng.random() < 0.5:
        return flip_bytes(rng, data)
    names = []
    for _ in range(2):
        p = rng.choice(paths(doc))
        v = rng.choice(values + (_DELETE,))
        doc = edited(doc, p, v)
        names.append(f"delete {path_name(p)}" if v is _DELETE else f"{path_name(p)} = {show(v)}")
        if not paths(doc):
            break
    return Mutation(" and ".join(names), lambda d: dump(doc))


# ---- TOML

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def dump_toml(doc: dict) -> bytes:
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in doc.items()).encode()


def toml_mutations(data: bytes) -> list:
    """Every key deleted or replaced by each of TOML_VALUES, an unknown key, a duplicated key, and
    file_mutations."""
    doc = tomllib.loads(data.decode())
    out = [Mutation(name, lambda d, e=e: dump_toml(e)) for name, e in edits(doc, TOML_VALUES)]
    first = next(iter(doc))
    return out + [Mutation("an unknown key", lambda d: d + b"speed = 1\n"),
                  Mutation(f"duplicate key {first}", lambda d: d + f"{first} = 1\n".encode()),
                  Mutation("a table header", lambda d: d + b"[extra]\nx = 1\n")] + file_mutations(data)


def toml_tail(rng: random.Random, data: bytes) -> Mutation:
    return json_tail(rng, json.dumps(tomllib.loads(data.decode())).encode(), dump_toml, TOML_VALUES) \
        if rng.random() < 0.7 else flip_bytes(rng, data)


# ---- safetensors: the header

def split_safetensors(data: bytes) -> tuple:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def with_header(raw: bytes, body: bytes) -> bytes:
    """A safetensors file of a raw JSON header and body: the header's length first, padded as safetensors pads."""
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def header_dump(body: bytes) -> Callable:
    """A function writing a header dict before body."""
    return lambda header: with_header(json.dumps(header, separators=(",", ":")).encode(), body)


def safetensors_mutations(data: bytes) -> list:
    """Header edits (every entry's dtype, shape and offsets, and the metadata), a dtype not known, shapes that do
    not match the offsets, wrong header lengths, a duplicated name, bytes flipped in the header, truncations."""
    n, header, body = split_safetensors(data)
    dump = header_dump(body)
    out = [Mutation(f"header {name}", lambda d, e=e: dump(e)) for name, e in edits(header)]
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, (start, end) = entry["shape"], entry["data_offsets"]
        for what, field, value in [("dtype not known", "dtype", "X9"),
                                   ("another dtype", "dtype", "F32" if entry["dtype"] != "F32" else "F16"),
                                   ("shape reversed", "shape", shape[::-1]),
                                   ("shape twice as long", "shape", [2 * shape[0]] + shape[1:]),
                                   ("offsets past the data", "data_offsets", [start, len(body) + 8]),
                                   ("offsets overlapping the start", "data_offsets", [0, end - start])]:
            if entry[field] != value:
                e = edited(header, (name, field), value)
                out.append(Mutation(f"header {name}: {what}", lambda d, e=e: dump(e)))
    raw = data[8:8 + n]
    first = next(k for k in header if k != "__metadata__")
    dup = json.dumps({first: header[first]})[1:-1].encode()
    out += [Mutation(f"header length {m}", lambda d, m=m: struct.pack("<Q", m) + d[8:])
            for m in sorted({0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1})]
    out.append(Mutation(f"duplicate name {first}", lambda d: with_header(raw[:1] + dup + b"," + raw[1:], body)))
    rng = random.Random(n)
    out += [flip_bytes(rng, data, 8, 8 + n) for _ in range(6)]
    out += [Mutation(f"truncated to {c} bytes", lambda d, c=c: d[:c])
            for c in sorted({4, 8, 8 + n // 2, 8 + n, len(data) - 1, 8 + n + len(body) // 2})]
    return out + [Mutation("empty file", lambda d: b""),
                  Mutation("random bytes", lambda d: random.Random(1).randbytes(len(d)))]


def safetensors_tail(rng: random.Random, data: bytes) -> Mutation:
    """Header edits or flipped header bytes (bytes flipped in the data would change the weights, not the format)."""
    n, header, body = split_safetensors(data)
    if rng.random() < 0.5:
        return flip_bytes(rng, data, 8, 8 + n)
    m = json_tail(rng, json.dumps(header).encode(), header_dump(body))
    return Mutation(f"header {m.name}", m.apply)


# ---- safetensors: the tensor set

def _tensors(data: bytes) -> dict:
    from safetensors.torch import load
    return load(data)


def _save(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save(tensors, metadata={"format": "pt"})


def tensor_edits(name: str, t) -> list:
    """(what, function of the tensor dict) for one tensor: deleted, renamed, another dtype, other shapes, NaN/inf."""
    import torch

    def edit(fn):
        def apply(d):
            ts = _tensors(d)
            fn(ts)
            return _save(ts)
        return apply

    out = [("deleted", edit(lambda ts: ts.pop(name))),
           ("renamed", edit(lambda ts: ts.update({name + "s": ts.pop(name)})))]
    for dtype in (torch.float16, torch.float32, torch.bfloat16, torch.int8, torch.int32, torch.int64):
        if dtype != t.dtype:
            out.append((f"as {str(dtype)[6:]}", edit(lambda ts, dt=dtype: ts.update({name: ts[name].to(dt)}))))
    out += [("flattened", edit(lambda ts: ts.update({name: ts[name].flatten()}))),
            ("half its rows", edit(lambda ts: ts.update({name: ts[name][: max(1, len(ts[name]) // 2)].clone()}))),
            ("a dimension added", edit(lambda ts: ts.update({name: ts[name][None].clone()}))),
            ("empty", edit(lambda ts: ts.update({name: ts[name][:0].clone()})))]
    if t.dim() == 2 and t.shape[0] != t.shape[1]:  # a square one transposed is another valid weight
        out.append(("transposed", edit(lambda ts: ts.update({name: ts[name].t().contiguous()}))))
    if t.is_floating_point():
        for bad in (math.nan, math.inf):
            def poison(ts, bad=bad):
                ts[name] = ts[name].clone()
                ts[name].view(-1)[0] = bad
            out.append((f"holding {bad}", edit(poison)))
    return out


def tensor_mutations(data: bytes) -> list:
    """Each tensor deleted, renamed, cast, reshaped or poisoned, an unknown tensor added, and all of them gone."""
    import torch

    # Sorted: safetensors hands the tensors back in an order that changes from run to run.
    out = [Mutation(f"tensor {name} {what}", fn)
           for name, t in sorted(_tensors(data).items()) for what, fn in tensor_edits(name, t)]
    extra = {"model.layers.0.mystery.weight": torch.ones(2, 2)}
    return out + [Mutation("an unknown tensor added", lambda d: _save({**_tensors(d), **extra})),
                  Mutation("no tensors", lambda d: _save({}))]


def tensor_tail(rng: random.Random, data: bytes) -> Mutation:
    """Two tensor edits together."""
    ts = _tensors(data)
    first, second = rng.sample(sorted(ts), 2)
    (w1, f1), (w2, f2) = rng.choice(tensor_edits(first, ts[first])), rng.choice(tensor_edits(second, ts[second]))
    return Mutation(f"tensor {first} {w1} and {second} {w2}", lambda d: f2(f1(d)))


# ---- plain text and JSON lines (calibration text)

def text_mutations(data: bytes) -> list:
    """Whitespace only, too short, UTF-16, Latin-1, a lone surrogate, an overlong encoding, a UTF-8 BOM, CRLF
    lines, and file_mutations."""
    text = data.decode()
    return [Mutation("whitespace only", lambda d: b" \n\t\n"),
            Mutation("three words", lambda d: b"w3 w4 w5"),
            Mutation("UTF-16 with a BOM", lambda d: text.encode("utf-16")),
            Mutation("UTF-16-LE without a BOM", lambda d: text.encode("utf-16-le")),
            Mutation("Latin-1 accents", lambda d: (text + " caf\u00e9").encode("latin-1")),
            Mutation("a lone surrogate", lambda d: d + b" \xed\xa0\x80"),
            Mutation("an overlong encoding", lambda d: d + b" \xc0\xaf"),
            Mutation("a UTF-8 BOM", lambda d: b"\xef\xbb\xbf" + d),
            Mutation("CRLF line ends", lambda d: d.replace(b"\n", b"\r\n"))] + file_mutations(data)


def jsonl_mutations(data: bytes) -> list:
    """Edits of the first line's object, a line that is not JSON, an array, NaN, a blank file, and
    file_mutations."""
    lines = data.decode().splitlines()
    rest = "\n".join(lines[1:]) + "\n"
    out = [Mutation(f"line 1: {name}", lambda d, e=e: (json.dumps(e) + "\n" + rest).encode())
           for name, e in edits(json.loads(lines[0]))]
    for name, line in [("not JSON", "{text: w3}"), ("an array", '["w3 w4"]'), ("a number", "42"),
                       ("NaN", '{"text": NaN}'), ("an extra key", '{"text": "w3 w4", "id": 1}'),
                       ("text twice", '{"text": 1, "text": "w3 w4"}'), ("a truncated object", '{"text": "w3')]:
        out.append(Mutation(f"line 1 {name}", lambda d, line=line: (line + "\n" + rest).encode()))
    return out + [Mutation("blank lines only", lambda d: b"\n\n \n")] + text_mutations(data)[2:]


def text_tail(rng: random.Random, data: bytes) -> Mutation:
    return flip_bytes(rng, data)


def systematic(mutations: list, seed: int, key: str) -> list:
    """The mutations in an order fixed by the seed and the format's name."""
    out = list(mutations)
    random.Random(f"{seed}/{key}").shuffle(out)
    return out
