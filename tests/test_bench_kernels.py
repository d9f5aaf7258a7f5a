"""bench/kernels.py: its shape option on the CPU, and the whole script on one shape on a GPU; bench/device_decode.sh
(the build-per-variant A/B that drives it and bench/decode.py) on a GPU with nvcc."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_script, layout_links_removed

from awq_edge.runtime import kernels

ROOT = Path(__file__).resolve().parents[1]
bench_kernels = bench_script("kernels")


def test_shapes_are_n_by_k_with_k_a_multiple_of_the_group():
    assert bench_kernels.parse_shapes("37888x3584,640X1024") == [(37888, 3584), (640, 1024)]
    for bad in ("4096", "4096x4000", "4x4096", "ax128", "4096x4096,"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_kernels.parse_shapes(bad)


@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.library_path().is_file(),
                    reason="needs an NVIDIA GPU and the built kernel library")
def test_the_benchmark_checks_and_times_a_shape_end_to_end(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "kernels.py"), "--shapes", "1536x640",
                           "--label", "test", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["command"].endswith(f"--out {out}") and [(s["N"], s["K"]) for s in r["shapes"]] == [(1536, 640)]
    shape = r["shapes"][0]
    assert max(max(e.values()) for e in shape["rel_error"].values()) < 1e-3
    assert [row["M"] for row in shape["rows"]] == bench_kernels.MS and all(row["ours_s"] > 0 for row in shape["rows"])


def test_the_device_decode_script_needs_a_results_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_decode.sh")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode != 0 and "set OUT to a results folder" in proc.stderr


@pytest.mark.parametrize("env, message", [
    (dict(BUILDS="spread"), "BUILDS/PROBES entry 'spread' is not NAME=FLAGS"),
    (dict(BUILDS="default=", PROBES="-DAWQE_SPREAD"), "entry '-DAWQE_SPREAD' is not NAME=FLAGS"),
    (dict(BUILDS="default=", TEST_BUILDS="bulk"), "TEST_BUILDS names 'bulk', which BUILDS does not build"),
])
def test_the_device_decode_script_refuses_a_malformed_variant_before_any_build(tmp_path, env, message):
    env = {**os.environ, "OUT": str(tmp_path), "BUILD_ROOT": str(tmp_path), "MODELS": "", **env}
    link = ROOT / "awq_edge" / "export"
    had_link = os.path.lexists(link)
    with layout_links_removed():
        proc = subprocess.run(["bash", "bench/device_decode.sh"], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=60)
        assert os.path.lexists(link) == had_link  # refused before it touches the checkout
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (shutil.which("nvcc") and shutil.which("cmake")), reason="needs nvcc and cmake")
def test_the_device_decode_script_builds_a_variant_of_several_comma_separated_flags(tmp_path):
    """The build step alone (no GPU needed: no kernel shapes, no models): a variant's flags, comma-separated, reach
    CMAKE_CUDA_FLAGS as one space-separated string, and the library is built with them."""
    env = {**os.environ, "OUT": str(tmp_path), "ARCH": "90-real", "TESTS": "0", "MODELS": "",
           "BUILD_ROOT": str(tmp_path), "BUILDS": "mb3b24=-DAWQE_MIN_BLOCKS=3,-DAWQE_WARP_BUDGET=24"}
    env.pop("KERNEL_SHAPES", None)
    with layout_links_removed():
        proc = subprocess.run(["bash", "bench/device_decode.sh"], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    cache = (tmp_path / "awqe-mb3b24" / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_FLAGS:STRING=-DAWQE_MIN_BLOCKS=3 -DAWQE_WARP_BUDGET=24\n" in cache
    assert (tmp_path / "awqe-mb3b24" / "libawq_edge_kernels.so").is_file()


@pytest.mark.skipif(not torch.cuda.is_available() or not (shutil.which("nvcc") and shutil.which("cmake")),
                    reason="needs an NVIDIA GPU, nvcc and cmake (the script builds the kernel library per variant)")
def test_the_device_decode_script_runs_each_build_through_kernels_and_decode(tmp_path):
    """bench/device_decode.sh as a GPU session runs it (NOTES r12's A/B, r15, r16 and r19), on small shapes and the
    tiny model: three builds (the default, the bulk stream, the spread placement), the kernel tests with the last two,
    bench/kernels.py and bench/decode.py with each library, and the placement probe's builds (plain and spread)
    through bench/placement.py."""
    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "OUT": str(tmp_path), "ARCH": f"{major}{minor}-real", "TESTS": "0",
           "BUILD_ROOT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "BUILDS": "default= bulk=-DAWQE_BULK_STREAM spread=-DAWQE_SPREAD", "KERNEL_SHAPES": "1536x640,22016x4096",
           "MODELS": "tiny", "VARIANTS": "ours", "BENCH_ARGS": "--prompt 8 --new 4 --repeats 1",
           "TEST_BUILDS": "bulk spread", "PLACEMENT": "1", "PROBES": "spread=-DAWQE_SPREAD",
           "PLACEMENT_ARGS": "--shapes 4096x4096,22016x4096 --modes alone --length 8 --reps 3"}
    with layout_links_removed():
        proc = subprocess.run(["bash", "bench/device_decode.sh"], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for name in ("bulk", "spread"):
        assert " passed" in (tmp_path / f"tests_{name}.txt").read_text().splitlines()[-1]
    placed = json.loads((tmp_path / "placement.json").read_text())
    assert [(p["shape"], p["mode"], p["blocks"]) for p in placed["probes"]] == [("4096x4096", "alone", 256),
                                                                              ("22016x4096", "alone", 1376)]
    # -DAWQE_SPREAD: no SM holds more than its share of gate/up's blocks (r19)
    spread = json.loads((tmp_path / "placement-spread.json").read_text())
    assert spread["label"].startswith("probe-spread build")
    gate_up = spread["probes"][1]
    assert gate_up["blocks_per_sm"]["max"] <= -(-1376 // spread["sm_count"])
    assert gate_up["last_entry_us"] < 0.5 * gate_up["block_us"]["median"]  # in one wave: none waited for a slot
    for name in ("default", "bulk", "spread"):
        k = json.loads((tmp_path / f"kernels_{name}.json").read_text())
        assert k["label"].startswith(f"{name} build")
        assert [(s["N"], s["K"]) for s in k["shapes"]] == [(1536, 640), (22016, 4096)]  # the second spread (r19)
        for shape in k["shapes"]:
            assert max(max(e.values()) for e in shape["rel_error"].values()) < 1e-3
        d = json.loads((tmp_path / f"decode_{name}.json").read_text())
        assert d["models"]["tiny"]["ours"]["tok_s"] > 0, d["models"]["tiny"]


# The A/B builds bench/NOTES.md's open rounds use (r16-r21, bench/device_decode.sh's BUILDS and PROBES) and the
# earlier flags still in the source, compiled for sm_90 through ptxas: a flag no default build uses otherwise rots
# unseen until a device call (its #error guards, static_asserts, templates and register limits; launch-time faults
# such as r16's 48 KB one need the GPU tests).
AB_BUILDS = {
    "gemm.cu": ["-DAWQE_BULK_STREAM", "-DAWQE_SPREAD", "-DAWQE_BULK_STREAM -DAWQE_SPREAD", "-DAWQE_DEPTH=3",
                "-DAWQE_DEPTH=3 -DAWQE_PRE_WAIT=2", "-DAWQE_PRE_WAIT=1", "-DAWQE_PRE_WAIT=0", "-DAWQE_DEPTH=1",
                "-DAWQE_PDL_LATE", "-DAWQE_REGISTER_STREAM", "-DAWQE_MIN_BLOCKS=3 -DAWQE_WARP_BUDGET=24",
                "-DAWQE_DEPTH=3 -DAWQE_DEEP_WARPS=4", "-DAWQE_STAGE=8", "-DAWQE_PROBE_PLACEMENT -DAWQE_SPREAD",
                "-DAWQE_PROBE_STREAM_ONLY", "-DAWQE_PROBE_NO_X"],
    "decode.cu": ["-DAWQE_ATTN_WAIT_FIRST"],
}


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc (CUDA toolkit) to compile the kernels")
@pytest.mark.parametrize("source,flags", [(s, f) for s, fs in AB_BUILDS.items() for f in fs])
def test_every_ab_build_flag_compiles_for_sm90(source, flags, tmp_path):
    plugins = ROOT / "plugins"
    proc = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", *flags.split(), "-I", str(plugins / "include"),
                           "-I", str(plugins / "kernels"), "-c", str(plugins / "kernels" / source), "-o",
                           str(tmp_path / "k.o"), "-Xptxas", "-v"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ptxas info" in proc.stderr and (tmp_path / "k.o").stat().st_size > 0
