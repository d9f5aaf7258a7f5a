"""The engine folder's format, both sides: model.engine, manifest.json (where it runs, what built it, from what,
which shapes it takes) and the plugin libraries beside them; written atomically by the build, read by the runtime."""

import dataclasses
import hashlib
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

from awq_edge.engine.devices import TENSORRT_MODULES, DeviceProfile
from awq_edge.errors import AwqEdgeError
from awq_edge.export.folder import MODEL_FILE
from awq_edge.outputs import replace_dir, temp_dir, write_failed

ENGINE_FILE = "model.engine"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
KERNELS_LIBRARY = "libawq_edge_kernels.so"


def model_hash(onnx_dir) -> str:
    """sha256 over model.onnx and its external data files, in name order."""
    h = hashlib.sha256()
    folder = Path(onnx_dir)
    for path in sorted(p for p in folder.iterdir() if p.name.startswith(MODEL_FILE) and p.is_file()):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def manifest(profile: DeviceProfile, *, trt_module: str, trt_version: str, onnx_dir, model_sha256: str,
             kv, max_seq: int, profiles: dict, int4: dict, plugin_library, engine_bytes: int,
             build_seconds: float) -> dict:
    """The engine's record: where it runs, what built it, from what, and which shapes it takes."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "engine_file": ENGINE_FILE,
        "device": profile.name,
        "device_profile": {**dataclasses.asdict(profile), "aliases": list(profile.aliases)},
        "compute_capability": profile.compute_capability,
        "tensorrt": {"module": trt_module, "version": trt_version},
        "model": {"onnx_dir": str(Path(onnx_dir).absolute()), "sha256": model_sha256, "int4_nodes": int4},
        "kv_cache": {**dataclasses.asdict(kv), "max_seq_len": max_seq,
                     "bytes": kv.bytes_per_token * max_seq * profile.max_batch},
        # A list: the runtime selects TensorRT optimisation profiles by index.
        "optimization_profiles": [{"name": phase, "shapes": {name: [list(s) for s in shapes] for name, shapes in p.items()}}
                                  for phase, p in profiles.items()],
        "plugin_library": None if plugin_library is None else Path(plugin_library).name,
        "engine_bytes": engine_bytes,
        "build_seconds": round(build_seconds, 3),
        "built_on": platform.node(),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def engine_files(plugin_library=None) -> set:
    """The files an engine folder holds; one holding anything else is not replaced (it is someone's)."""
    return {ENGINE_FILE, MANIFEST_FILE, KERNELS_LIBRARY} | ({Path(plugin_library).name} if plugin_library else set())


def is_engine_dir(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def plugin_files(plugin_library) -> list:
    """The plugin and the kernels library it loads through its $ORIGIN rpath, to ship beside the engine."""
    if plugin_library is None:
        return []
    plugin = Path(plugin_library)
    kernels = plugin.parent / KERNELS_LIBRARY
    return [plugin] + ([kernels] if kernels.is_file() else [])


def write_engine_dir(out_dir: Path, plan: bytes, record: dict, libraries=()) -> None:
    """Fill a temporary folder beside out_dir, then swap it in; a failed build leaves the old engine."""
    tmp = temp_dir(out_dir)
    try:
        (tmp / ENGINE_FILE).write_bytes(plan)
        (tmp / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for library in libraries:
            shutil.copy2(library, tmp / library.name)
        replace_dir(tmp, out_dir)
    except OSError as e:
        raise write_failed(out_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _shape_ok(shape) -> bool:
    return isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)


def _profile_ok(profile) -> bool:
    """An optimisation profile as the runtime indexes it: a name, and per input its (min, opt, max) shapes."""
    if not isinstance(profile, dict) or not isinstance(profile.get("name"), str) \
            or not isinstance(profile.get("shapes"), dict):
        return False
    return all(isinstance(s, list) and len(s) == 3 and all(map(_shape_ok, s)) for s in profile["shapes"].values())


def _manifest_problem(record) -> str | None:
    """What in a manifest the runtime could not use, or None."""
    if not isinstance(record, dict) or type(record.get("manifest_version")) is not int \
            or record["manifest_version"] != MANIFEST_VERSION:
        return f"is not a version-{MANIFEST_VERSION} engine manifest"
    trt, model, kv = record.get("tensorrt"), record.get("model"), record.get("kv_cache")
    # The runtime imports this module: one of the builders, never whatever module a file names.
    if not isinstance(trt, dict) or trt.get("module") not in TENSORRT_MODULES:
        return f"names no TensorRT module of {list(TENSORRT_MODULES)} (tensorrt.module)"
    if not isinstance(model, dict) or not isinstance(model.get("onnx_dir"), str):
        return "has no model.onnx_dir"
    if not isinstance(kv, dict) or not all(_count(kv.get(k)) for k in ("layers", "kv_heads", "head_dim",
                                                                      "max_seq_len")):
        return "has no kv_cache of positive layers, kv_heads, head_dim and max_seq_len"
    profiles = record.get("optimization_profiles")
    if not isinstance(profiles, list) or not all(map(_profile_ok, profiles)) \
            or not {"prefill", "decode"} <= {p["name"] for p in profiles}:
        return "has no prefill and decode optimization_profiles of (min, opt, max) shapes"
    prefill = next(p["shapes"] for p in profiles if p["name"] == "prefill")
    if len(prefill.get("input_ids", [[]] * 3)[2]) < 2 or len(prefill.get("past_key_values.0.key", [[]] * 3)[2]) < 3:
        return "has a prefill profile without the shapes of input_ids and past_key_values.0.key"
    plugin = record.get("plugin_library")
    if plugin is not None and not (isinstance(plugin, str) and plugin not in ("", ".", "..")
                                   and Path(plugin).name == plugin):
        return f"has plugin_library {plugin!r}, which is not a file name beside the engine"
    return None


def read_manifest(engine_dir: Path) -> dict:
    """manifest.json, with every field the runtime reads checked."""
    path = Path(engine_dir) / MANIFEST_FILE
    rebuild = "rebuild it with `awq-edge build ONNX_DIR --device NAME -o ENGINE_DIR`"
    if not path.is_file() or not (Path(engine_dir) / ENGINE_FILE).is_file():
        raise AwqEdgeError(f"{engine_dir} is not an engine folder (no {MANIFEST_FILE} and {ENGINE_FILE})",
                           "build one with `awq-edge build ONNX_DIR --device NAME -o ENGINE_DIR`")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AwqEdgeError(f"{path} is not valid JSON ({e})", rebuild) from None
    problem = _manifest_problem(record)
    if problem:
        raise AwqEdgeError(f"{path} {problem}", rebuild)
    return record
