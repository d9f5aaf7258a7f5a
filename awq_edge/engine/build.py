"""Build a TensorRT engine from an ONNX folder for one device profile: the TensorRT calls."""

import ctypes
import importlib
import os
import shutil
import time
from pathlib import Path

import onnx

from awq_edge.engine import manifest, plan
from awq_edge.engine.devices import DeviceProfile, get_profile
from awq_edge.engine.manifest import KERNELS_LIBRARY
from awq_edge.errors import AwqEdgeError
from awq_edge.export.folder import MODEL_FILE, context_length
from awq_edge.outputs import check_output_dir, write_atomic

_INSTALL_HINT = {
    "tensorrt": "run `awq-edge build` on the device itself: JetPack 6 ships TensorRT 10.3 "
                "(`sudo apt install python3-libnvinfer`), see docs/deploying-to-jetson.md",
    "tensorrt_rtx": "`pip install tensorrt-rtx==1.7.1.116` (builds RTX engines on any x86-64 Linux, GPU or not)",
}
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
    """The ONNX with MatMulNBits weights as attributes (plan.weights_as_fields), in a scratch folder."""
    model = plan.weights_as_fields(onnx.load(str(onnx_dir / MODEL_FILE)))
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / MODEL_FILE
    try:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{MODEL_FILE}.data", size_threshold=1024)
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
    model = plan.load_graph(onnx_dir)
    positions = context_length(onnx_dir)  # the folder's files are read (and checked) before the graph's checks
    inputs = plan.graph_inputs(model)
    kv = plan.kv_layout(inputs)
    plan.check_precision(inputs, profile)
    int4 = plan.int4_nodes(model)
    plan.check_int4_path(int4, profile, plugin_library)
    if plugin_library is not None and not Path(plugin_library).is_file():
        raise AwqEdgeError(f"plugin library {plugin_library} does not exist", f"build it: {PLUGIN_BUILD_HINT}")
    max_seq = plan.max_context(profile, kv, positions)
    shapes = plan.optimization_profiles(inputs, max_seq, profile)
    out_dir = check_output_dir(out_dir, inputs=[onnx_dir], is_ours=manifest.is_engine_dir,
                               our_files=manifest.engine_files(plugin_library), what="engine folder",
                               need_bytes=plan.onnx_bytes(onnx_dir))

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
    onnx_path = onnx_dir / MODEL_FILE
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
    record = manifest.manifest(profile, trt_module=profile.tensorrt, trt_version=trt.__version__, onnx_dir=onnx_dir,
                               model_sha256=manifest.model_hash(onnx_dir), kv=kv, max_seq=max_seq, profiles=shapes,
                               int4=int4, plugin_library=plugin_library, engine_bytes=serialized.nbytes,
                               build_seconds=seconds)
    manifest.write_engine_dir(out_dir, bytes(serialized), record, manifest.plugin_files(plugin_library))
    if cache_path is not None:
        write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return record
