"""Device profiles: load and validate devices/*.toml (installed as awq_edge.device_profiles)."""

import dataclasses
import importlib.resources
import math
import tomllib
from pathlib import Path

from awq_edge.errors import AwqEdgeError

# Compute capabilities TensorRT-RTX 1.7 can target ahead of time (its ComputeCapability enum).
RTX_COMPUTE_CAPABILITIES = ("8.0", "8.6", "8.9", "12.0", "12.1")
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")
FAMILIES = ("jetson", "rtx", "datacenter")
INT4_MATMULS = ("plugin", "native")
PRECISIONS = ("fp16",)


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One deployment target: what the engine build needs to know about it."""

    name: str
    description: str
    aliases: tuple
    family: str
    tensorrt: str  # Python module that builds engines for it
    compute_capability: str  # "major.minor"
    memory_gib: float
    memory_bandwidth_gbs: float
    precision: str
    max_seq_len: int  # default context length (prompt + generated)
    kv_cache_mib: int  # KV cache budget; may shorten max_seq_len for large models
    workspace_mib: int  # TensorRT builder workspace limit
    max_batch: int
    prefill_tokens: int  # longest prompt chunk the prefill profile takes at once
    int4_matmul: str  # preferred int4 path: "plugin" (MatMulNBits, zero points) or "native" (symmetric int4 DQ)

    @property
    def sm(self) -> int:
        """Compute capability as CMake's CUDA_ARCHITECTURES number, e.g. 87."""
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


_FIELDS = {f.name: f.type for f in dataclasses.fields(DeviceProfile)}


def _check(cond: bool, where: str, problem: str, fix: str) -> None:
    if not cond:
        raise AwqEdgeError(f"{where}: {problem}", fix)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def parse_profile(name: str, data: dict, where: str) -> DeviceProfile:
    """Validate one profile's TOML table; every problem names the key and the allowed values."""
    unknown = sorted(set(data) - set(_FIELDS) - {"name"})
    _check(not unknown, where, f"unknown key(s) {unknown}", f"keys are {sorted(set(_FIELDS) - {'name'})}")
    missing = sorted(set(_FIELDS) - set(data) - {"name"})
    _check(not missing, where, f"missing key(s) {missing}", "add them; see devices/jetson-agx-orin-64gb.toml")
    _check(isinstance(data["description"], str), where, f"description = {data['description']!r} is not a string",
           'write it in quotes, e.g. description = "my board"')
    for key, allowed in (("family", FAMILIES), ("tensorrt", TENSORRT_MODULES), ("precision", PRECISIONS),
                         ("int4_matmul", INT4_MATMULS)):
        _check(data[key] in allowed, where, f"{key} = {data[key]!r} is not one of {list(allowed)}", f"set {key} to one of them")
    cc = data["compute_capability"]
    parts = cc.split(".") if isinstance(cc, str) else []
    _check(len(parts) == 2 and all(p.isdigit() for p in parts), where,
           f"compute_capability = {cc!r} is not 'major.minor'", 'write it as a string, e.g. "8.7"')
    for key in ("memory_gib", "memory_bandwidth_gbs", "max_seq_len", "kv_cache_mib", "workspace_mib", "max_batch",
                "prefill_tokens"):
        _check(_positive(data[key]), where, f"{key} = {data[key]!r} is not a positive number",
               f"set {key} to a finite number > 0")
    for key in ("max_seq_len", "kv_cache_mib", "workspace_mib", "max_batch", "prefill_tokens"):
        _check(isinstance(data[key], int), where, f"{key} = {data[key]!r} is not an integer", f"write {key} without a fraction")
    _check(data["prefill_tokens"] <= data["max_seq_len"], where,
           f"prefill_tokens {data['prefill_tokens']} exceeds max_seq_len {data['max_seq_len']}", "lower prefill_tokens")
    _check(isinstance(data["aliases"], list) and all(isinstance(a, str) for a in data["aliases"]), where,
           "aliases is not a list of strings", 'write aliases = ["name", ...] or aliases = []')
    if data["tensorrt"] == "tensorrt_rtx":
        _check(cc in RTX_COMPUTE_CAPABILITIES, where,
               f"TensorRT-RTX cannot build for compute capability {cc}",
               f"use tensorrt = \"tensorrt\" (built on the device) or one of {list(RTX_COMPUTE_CAPABILITIES)}")
    return DeviceProfile(name=name, **{k: tuple(v) if k == "aliases" else v for k, v in data.items() if k != "name"})


def load_profile_file(path) -> DeviceProfile:
    """Read one profile; its name is the file name without .toml."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise AwqEdgeError(f"device profile {path} does not exist", "run `awq-edge devices` for the known devices")
    except OSError as e:  # a folder, or not readable
        raise AwqEdgeError(f"device profile {path} cannot be read ({e.strerror})", "pass a readable .toml file")
    except UnicodeDecodeError as e:  # TOML is UTF-8; the locale's encoding would read other bytes as something else
        raise AwqEdgeError(f"device profile {path} is not UTF-8 text ({e.reason} at byte {e.start})",
                           "save it as UTF-8")
    except tomllib.TOMLDecodeError as e:
        raise AwqEdgeError(f"device profile {path} is not valid TOML ({e})", "fix the file's syntax")
    return parse_profile(path.stem, data, str(path))


def load_profiles() -> dict:
    """Every shipped profile by name, checked for clashing names and aliases."""
    files = sorted((f for f in importlib.resources.files("awq_edge.device_profiles").iterdir()
                    if f.name.endswith(".toml")), key=lambda f: f.name)
    profiles = {}
    for f in files:
        name = f.name.removesuffix(".toml")
        profiles[name] = parse_profile(name, tomllib.loads(f.read_text()), f"devices/{f.name}")
    seen = set(profiles)
    for p in profiles.values():
        for alias in p.aliases:
            _check(alias not in seen, f"devices/{p.name}.toml", f"alias {alias!r} is already a device or alias",
                   "give every device and alias a distinct name")
            seen.add(alias)
    return profiles


def get_profile(name: str) -> DeviceProfile:
    """A shipped profile by name or alias, or a .toml path for a custom device."""
    if name.endswith(".toml"):
        return load_profile_file(name)
    profiles = load_profiles()
    for p in profiles.values():
        if name == p.name or name in p.aliases:
            return p
    raise AwqEdgeError(f"unknown device {name!r}",
                       f"use one of {sorted(profiles)}, or a path to a .toml profile (`awq-edge devices` lists them)")


def format_table(profiles) -> str:
    """The `awq-edge devices` listing: one line per device."""
    header = ("device", "sm", "memory", "GB/s", "builder", "int4", "max seq", "aliases")
    rows = [header] + [(p.name, p.compute_capability, f"{p.memory_gib:g} GiB", f"{p.memory_bandwidth_gbs:g}",
                        p.tensorrt, p.int4_matmul, str(p.max_seq_len), ",".join(p.aliases)) for p in profiles]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
