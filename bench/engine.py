"""Engine build benchmark: TensorRT engine size and build time per device -> bench/results/engine.json.

Run as `python -P bench/engine.py ONNX_DIR` (-P: bench/onnx.py must not shadow the onnx package).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from awq_edge.export.folder import MODEL_FILE

from awq_edge.engine import build, manifest, plan
from awq_edge.errors import AwqEdgeError

RESULTS = Path(__file__).resolve().parent / "results" / "engine.json"


def onnx_bytes(onnx_dir: Path) -> int:
    return sum(p.stat().st_size for p in onnx_dir.iterdir() if p.name.startswith(MODEL_FILE))


def bench_device(onnx_dir: Path, device: str, plugin) -> dict:
    """Build into a scratch folder; TensorRT's own build time and the whole command's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        record = build.build(onnx_dir, device, Path(tmp) / "engine", plugin_library=plugin)
        wall = time.perf_counter() - start
    return {
        "device": record["device"],
        "tensorrt": record["tensorrt"],
        "compute_capability": record["compute_capability"],
        "engine_bytes": record["engine_bytes"],
        "build_seconds": record["build_seconds"],
        "wall_seconds": round(wall, 3),
        "max_seq_len": record["kv_cache"]["max_seq_len"],
        "kv_cache_bytes": record["kv_cache"]["bytes"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("onnx_dir", type=Path, help="`awq-edge export --target trt --dtype fp16` folder")
    p.add_argument("--devices", default="rtx-3090,rtx-4090,rtx-5090", help="comma-separated device profiles")
    p.add_argument("--plugin", help="libawq_edge_trt_plugin.so, for ONNX with MatMulNBits")
    p.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        model = plan.load_graph(args.onnx_dir)
        results = [bench_device(args.onnx_dir, d, args.plugin) for d in args.devices.split(",")]
    except AwqEdgeError as e:  # one line, as `awq-edge build` prints it (no TensorRT here, a bad folder, ...)
        print(f"bench/engine.py: error: {e}", file=sys.stderr)
        return 2
    export_info = args.onnx_dir / "awq_edge_export.json"
    report = {
        "what": "awq-edge build: TensorRT engine size and build time per device (one process, back to back)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "onnx": {"dir": str(args.onnx_dir), "bytes": onnx_bytes(args.onnx_dir), "sha256": manifest.model_hash(args.onnx_dir),
                 "int4_nodes": plan.int4_nodes(model),
                 "export": json.loads(export_info.read_text()) if export_info.is_file() else None},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.output)
    for r in results:
        print(f"{r['device']:10s} {r['engine_bytes'] / 2**20:8.1f} MiB  build {r['build_seconds']:6.1f} s  "
              f"wall {r['wall_seconds']:6.1f} s  max {r['max_seq_len']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
