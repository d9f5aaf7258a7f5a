"""`awq-edge build` (ONNX folder -> TensorRT engine folder for one device profile) and `awq-edge devices` (the
profiles it accepts)."""

import dataclasses
from pathlib import Path

from awq_edge.engine.build import build
from awq_edge.engine.devices import format_table, get_profile, load_profiles
from awq_edge.engine.manifest import ENGINE_FILE
from awq_edge.errors import AwqEdgeError


def _build_command(args) -> int:
    record = build(args.onnx_dir, args.device, args.output, args.plugin, args.timing_cache, args.verbose)
    print(f"wrote {Path(args.output) / ENGINE_FILE} ({record['engine_bytes'] / 2**20:.1f} MiB, "
          f"{record['device']}, {record['tensorrt']['module']} {record['tensorrt']['version']}, "
          f"max {record['kv_cache']['max_seq_len']} tokens, built in {record['build_seconds']:.1f} s)")
    return 0


def _devices_command(args) -> int:
    if args.name is None:
        print(format_table(load_profiles().values()))
        return 0
    profile = get_profile(args.name)
    fields = {**dataclasses.asdict(profile), "sm": profile.sm}
    if args.field is not None:
        values = []
        for key in args.field.split(","):
            if key not in fields:
                raise AwqEdgeError(f"device profiles have no field {key!r}", f"use one of {sorted(fields)}")
            values.append(",".join(fields[key]) if isinstance(fields[key], tuple) else str(fields[key]))
        print(" ".join(values))
        return 0
    for key, value in fields.items():
        print(f"{key} = {value!r}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("build", help="build a TensorRT engine from an exported ONNX folder for a device",
                              description="ONNX folder -> serialized TensorRT engine and manifest for one device profile.")
    p.add_argument("onnx_dir", help="folder written by `awq-edge export --target trt --dtype fp16`")
    p.add_argument("--device", required=True, help="device profile name or alias (`awq-edge devices`), or a .toml path")
    p.add_argument("-o", "--output", required=True, help="engine folder to write (replaced atomically)")
    p.add_argument("--plugin", help="libawq_edge_trt_plugin.so, needed when the ONNX has MatMulNBits nodes")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (default ~/.cache/awq-edge/timing-*.cache)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.set_defaults(func=_build_command)
    p = subparsers.add_parser("devices", help="list the device profiles `awq-edge build --device` accepts")
    p.add_argument("name", nargs="?", help="show one device (name, alias or .toml path)")
    p.add_argument("--field", help="print only these comma-separated fields, space-separated (for scripts)")
    p.set_defaults(func=_devices_command)
