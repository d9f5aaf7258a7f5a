"""`awq-edge build`: ONNX folder -> serialized TensorRT engine and manifest for one device profile."""

import ctypes
import importlib
import json
import os
import shutil
import time
from pathlib import Path

import onnx

from awq_edge import engine
from awq_edge.devices import DeviceProfile, get_profile
from awq_edge.errors import AwqEdgeError
from awq_edge.outputs import check_output_dir, replace_dir, temp_dir, write_failed

_INSTALL_HINT = {
    "tensorrt": "run `awq-edge build` on the device itself: JetPack 6 ships TensorRT 10.3 "
                "(`sudo apt install python3-libnvinfer`), see docs/deploying-to-jetson.md",
    "tensorrt_rtx": "`pip install tensorrt-rtx==1.7.1.116` (builds RTX engines on any x86-64 Linux, GPU or not)",
}
KERNELS_LIBRARY = "libawq_edge_kernels.so"
PLUGIN_NAME = "MatMulNBits"
PLUGIN_BUILD_HINT = ("cmake -S plugins/tensorrt -B plugins/build/tensorrt && cmake --build plugins/build/tensorrt "
                     "(needs TensorRT's headers; docs/deploying-to-jetson.md)")
# CUdevice_attribute values of CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR (cuda.h).
_CC_MAJOR, _CC_MINOR = 75, 76


def import_tensorrt(profile: DeviceProfile):
    """The TensorRT Python module the profile builds with, or one clear error saying where to run."""
    try:
        return importlib.import_module(profile.tensorrt)
    except ImportError:
        raise AwqEdgeError(f"device {profile.name} needs the Python module `{profile.tensorrt}`, "
                           "which is not importable here", _INSTALL_HINT[profile.tensorrt])


def current_compute_capability():
    """"major.minor" of GPU 0 through the CUDA driver, or None where there is no driver or GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0):
        return None
    cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
    return f"{major.value}.{minor.value}"


def _check_rtx_plugin_loader() -> None:
    # TensorRT-RTX's MatMulNBits importer dlopens "libtensorrt_rtx.so", which the wheel ships only as
    # ".so.1"; without it the parser aborts the whole process (std::terminate), so check first.
    try:
        ctypes.CDLL("libtensorrt_rtx.so")
    except OSError:
        libs = Path(importlib.import_module("tensorrt_rtx_libs").__file__).parent
        raise AwqEdgeError("TensorRT-RTX's MatMulNBits import needs libtensorrt_rtx.so on the library path",
                           f"mkdir -p ~/.cache/awq-edge/lib && ln -sf {libs}/libtensorrt_rtx.so.1 "
                           "~/.cache/awq-edge/lib/libtensorrt_rtx.so && "
                           "export LD_LIBRARY_PATH=~/.cache/awq-edge/lib:$LD_LIBRARY_PATH")


def _load_plugin(registry, path: Path) -> None:
    # A registry refuses a library whose creator it already holds (a second build in one process with a
    # shared registry); that refusal is fine.
    if registry.load_library(str(path.absolute())) is None and registry.get_creator(PLUGIN_NAME, "1", "") is None:
        raise AwqEdgeError(f"TensorRT could not load the plugin library {path} (its messages are above)",
                           f"keep {KERNELS_LIBRARY} beside it, and rebuild it for this TensorRT: {PLUGIN_BUILD_HINT}")


def _target(trt, config, profile: DeviceProfile) -> None:
    """Aim the build at the profile's GPU: named ahead of time on TensorRT-RTX, the local GPU otherwise."""
    if profile.tensorrt == "tensorrt_rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{profile.sm}"), 0)
        return
    here = current_compute_capability()
    if here != profile.compute_capability:
        raise AwqEdgeError(f"TensorRT builds for the GPU it runs on, which is sm {here}, but device {profile.name} "
                           f"is sm {profile.compute_capability}", f"run `awq-edge build` on the {profile.name} itself")


def _default_timing_cache(profile: DeviceProfile, trt) -> Path:
    return Path.home() / ".cache" / "awq-edge" / f"timing-{profile.name}-{profile.tensorrt}-{trt.__version__}.cache"


def _write_fields_model(onnx_dir: Path, scratch: Path) -> Path:
    """The ONNX with MatMulNBits weights as attributes (engine.weights_as_fields), in a scratch folder."""
    model = engine.weights_as_fields(onnx.load(str(onnx_dir / engine.MODEL_FILE)))
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / engine.MODEL_FILE
    try:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{engine.MODEL_FILE}.data", size_threshold=1024)
    except ValueError as e:  # protobuf's 2 GB limit, which attributes (never external here) count against
        raise AwqEdgeError(f"the MatMulNBits weights do not fit one ONNX protobuf as attributes ({e})",
                           "models this large need the plugin to take external weights; not supported yet")
    return path


def _parse(trt, builder, logger, onnx_path: Path, onnx_dir):
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise AwqEdgeError(f"TensorRT's ONNX parser refused {onnx_dir}: {errors}",
                           "export with `awq-edge export --target trt --dtype fp16` and the same TensorRT version")
    return network, parser


def build(onnx_dir, device: str, out_dir, plugin_library=None, timing_cache=None, verbose=False) -> dict:
    """Parse, build and serialize; write ENGINE_DIR/{model.engine, manifest.json} atomically. Returns the manifest."""
    profile = get_profile(device)
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    model = engine.load_graph(onnx_dir)
    inputs = engine.graph_inputs(model)
    kv = engine.kv_layout(inputs)
    engine.check_precision(inputs, profile)
    int4 = engine.int4_nodes(model)
    engine.check_int4_path(int4, profile, plugin_library)
    if plugin_library is not None and not Path(plugin_library).is_file():
        raise AwqEdgeError(f"plugin library {plugin_library} does not exist", f"build it: {PLUGIN_BUILD_HINT}")
    max_seq = engine.max_context(profile, kv, engine.model_max_positions(onnx_dir))
    shapes = engine.optimization_profiles(inputs, max_seq, profile)
    ours = {engine.ENGINE_FILE, engine.MANIFEST_FILE, KERNELS_LIBRARY} | ({Path(plugin_library).name} if plugin_library else set())
    out_dir = check_output_dir(out_dir, inputs=[onnx_dir], is_ours=lambda d: (d / engine.MANIFEST_FILE).is_file(),
                               our_files=ours, what="engine folder", need_bytes=engine.onnx_bytes(onnx_dir))

    trt = import_tensorrt(profile)
    scratch = out_dir.absolute().parent / f".{out_dir.name}.onnx-{os.getpid()}"
    try:
        return _build(trt, profile, onnx_dir, out_dir, scratch, plugin_library, timing_cache, verbose,
                      kv=kv, int4=int4, max_seq=max_seq, shapes=shapes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build(trt, profile, onnx_dir, out_dir, scratch, plugin_library, timing_cache, verbose, *, kv, int4, max_seq,
           shapes) -> dict:
    """The TensorRT half of `build`, once the ONNX is checked and the shapes are known."""
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugin_library is not None:
        if profile.tensorrt == "tensorrt_rtx" and int4["matmul_nbits"]:
            _check_rtx_plugin_loader()
        _load_plugin(builder.get_plugin_registry(), Path(plugin_library))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib * 2**20)
    _target(trt, config, profile)
    onnx_path = onnx_dir / engine.MODEL_FILE
    if profile.tensorrt == "tensorrt" and int4["matmul_nbits"]:
        onnx_path = _write_fields_model(onnx_dir, scratch)
    # The parser owns the weights the network points at: keep it alive until the engine is serialized.
    network, _parser = _parse(trt, builder, logger, onnx_path, onnx_dir)
    for phase_shapes in shapes.values():
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in phase_shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    # TensorRT-RTX tunes at run time; its timing cache calls are no-ops, so only full TensorRT keeps one.
    cache_path = None
    if profile.tensorrt == "tensorrt":
        cache_path = Path(timing_cache) if timing_cache else _default_timing_cache(profile, trt)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise AwqEdgeError(f"TensorRT could not build the engine for {profile.name} (its messages are above)",
                           "rerun with --verbose; a workspace_mib or max_seq_len too large for the device is common")
    record = engine.manifest(profile, trt_module=profile.tensorrt, trt_version=trt.__version__, onnx_dir=onnx_dir,
                             model_sha256=engine.model_hash(onnx_dir), kv=kv, max_seq=max_seq, profiles=shapes,
                             int4=int4, plugin_library=plugin_library, engine_bytes=serialized.nbytes,
                             build_seconds=seconds)
    _write_engine_dir(out_dir, bytes(serialized), record, _plugin_files(plugin_library))
    if cache_path is not None:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return record


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _plugin_files(plugin_library) -> list:
    """The plugin and the kernels library it loads through its $ORIGIN rpath, to ship beside the engine."""
    if plugin_library is None:
        return []
    plugin = Path(plugin_library)
    kernels = plugin.parent / KERNELS_LIBRARY
    return [plugin] + ([kernels] if kernels.is_file() else [])


def _write_engine_dir(out_dir: Path, plan: bytes, record: dict, libraries=()) -> None:
    """Fill a temporary folder beside out_dir, then swap it in; a failed build leaves the old engine."""
    tmp = temp_dir(out_dir)
    try:
        (tmp / engine.ENGINE_FILE).write_bytes(plan)
        (tmp / engine.MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for library in libraries:
            shutil.copy2(library, tmp / library.name)
        replace_dir(tmp, out_dir)
    except OSError as e:
        raise write_failed(out_dir, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_identity(model: str, *flags: str) -> str:
    """What `make engine` stamps the checkpoint with: the model (a builtin name, or a folder's resolved path,
    config.json and weight files' sizes and times) and the quantise flags. A new identity remakes the chain
    even where no file in it is newer (MODEL=a/smol, then MODEL=b/smol: same output folder, other weights)."""
    from awq_edge.model import BUILTIN_MODELS

    lines = [f"flags {' '.join(flags)}"]
    folder = Path(model)
    if model in BUILTIN_MODELS or not folder.is_dir():
        return "\n".join([f"model {model}"] + lines) + "\n"
    lines.append(f"model {folder.resolve()}")
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix == ".safetensors":
            st = f.stat()
            lines.append(f"file {f.name} {st.st_size} {st.st_mtime_ns}")
    return "\n".join(lines) + "\n"


def write_stamp(path, model: str, *flags: str) -> None:
    """Write the model's identity to path only when it differs, so make sees a new time only for a new model."""
    path = Path(path)
    text = model_identity(model, *flags)
    if not path.is_file() or path.read_text() != text:
        _write_atomic(path, text.encode())


def _build_command(args) -> int:
    record = build(args.onnx_dir, args.device, args.output, args.plugin, args.timing_cache, args.verbose)
    print(f"wrote {Path(args.output) / engine.ENGINE_FILE} ({record['engine_bytes'] / 2**20:.1f} MiB, "
          f"{record['device']}, {record['tensorrt']['module']} {record['tensorrt']['version']}, "
          f"max {record['kv_cache']['max_seq_len']} tokens, built in {record['build_seconds']:.1f} s)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build a TensorRT engine from an exported ONNX folder for a device",
                              description=__doc__)
    p.add_argument("onnx_dir", help="folder written by `awq-edge export --target trt --dtype fp16`")
    p.add_argument("--device", required=True, help="device profile name or alias (`awq-edge devices`), or a .toml path")
    p.add_argument("-o", "--output", required=True, help="engine folder to write (replaced atomically)")
    p.add_argument("--plugin", help="libawq_edge_trt_plugin.so, needed when the ONNX has MatMulNBits nodes")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (default ~/.cache/awq-edge/timing-*.cache)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.set_defaults(func=_build_command)
