"""bench/placement.py: its chains and its analysis of probe records on the CPU; on a GPU with nvcc, a probe build of
the kernel library through the whole script, and the default library's refusal."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_script

from awq_edge.runtime import kernels

ROOT = Path(__file__).resolve().parents[1]
placement = bench_script("placement")


@pytest.mark.parametrize("mode", ["alone", "layer"])
def test_every_chain_ends_with_the_probed_shape(mode):
    for layer in placement.LAYERS:
        for shape in layer:
            for length in (1, 5, 8, 64):
                chain = placement.chain_for(shape, mode, length)
                assert len(chain) == length and chain[-1] == shape
                first = next(la for la in placement.LAYERS if shape in la)  # 4096 x 4096: Llama-2-7B's
                if mode == "layer" and length >= len(first):
                    assert sorted(chain[-len(first):]) == sorted(first)  # the layer's order, each product once
    with pytest.raises(ValueError, match="in no layer"):
        placement.chain_for((1536, 640), "layer", 8)


def test_a_shape_outside_the_layers_is_refused_for_the_layer_mode_before_any_gpu_work(tmp_path):
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "placement.py"), "--shapes", "1536x640",
                           "--out", str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "1536x640 in no Llama layer" in proc.stderr and "--modes alone" in proc.stderr
    assert not (tmp_path / "p.json").exists()


def _record(sm, entry, released, done, threads=32):
    return (entry, released, done, sm, 100, 2 * (done - entry), threads)


def test_the_analysis_reads_placement_span_and_tail_from_the_records():
    # 2 SMs of 4 used: SM 0 ran three blocks to 1000 + 9000 ns, SM 1 one block to 1000 + 3000; the kernel before
    # released them at 1000 ns; one block entered early (PDL), the last entered 2000 ns after the release.
    records = [_record(0, 500, 1000, 10000), _record(0, 900, 1000, 9000), _record(0, 3000, 3000, 9500),
               _record(1, 800, 1000, 4000)]
    r = placement.analyse(records, 5e-6, n_sm=4)
    assert r["blocks"] == 4 and r["sms_used"] == 2 and r["warps_a_block"] == 1
    assert r["blocks_per_sm"] == {"min": 1, "median": 2.0, "max": 3}
    assert r["blocks_per_sm_histogram"] == {"1": 1, "3": 1}
    assert r["span_us"] == pytest.approx(9.0) and r["early_us"] == pytest.approx(0.5)
    assert r["last_entry_us"] == pytest.approx(2.0) and r["graph_us_per_product"] == pytest.approx(5.0)
    assert r["tail_us"] == pytest.approx((10000 - 7000) / 1000)  # the median of the SMs' ends, 10000 and 4000
    assert r["sm_busy_share"] == pytest.approx((9000 + 3000) / (4 * 9000))
    assert r["sm_end_us_by_blocks"] == {"1": pytest.approx(3.0), "3": pytest.approx(9.0)}
    assert r["sm_clock_ghz"] == pytest.approx(2.0)


def test_a_block_without_a_record_is_refused():
    with pytest.raises(ValueError, match="left no record"):
        placement.analyse([_record(0, 500, 1000, 10000), (0, 0, 0, 0, 0, 0, 0)], 1e-6, n_sm=2)


gpu_and_nvcc = pytest.mark.skipif(
    not torch.cuda.is_available() or not (shutil.which("nvcc") and shutil.which("cmake")),
    reason="needs an NVIDIA GPU, nvcc and cmake")


def _run(lib: Path, out: Path, *args):
    return subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "placement.py"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), kernels.LIB_ENV: str(lib)})


@gpu_and_nvcc
def test_the_probe_build_runs_the_whole_script_on_a_small_shape(tmp_path):
    major, minor = torch.cuda.get_device_capability()
    build = tmp_path / "probe"
    subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(build),
                    f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}", "-DCMAKE_CUDA_FLAGS=-DAWQE_PROBE_PLACEMENT"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "8"], check=True, capture_output=True)
    out = tmp_path / "p.json"
    proc = _run(build / "libawq_edge_kernels.so", out, "--shapes", "4096x4096", "--modes", "alone,layer",
                "--length", "8", "--reps", "3", "--label", "test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [(p["shape"], p["mode"]) for p in r["probes"]] == [("4096x4096", "alone"), ("4096x4096", "layer")]
    for p in r["probes"]:
        assert p["blocks"] == 256 and sum(p["blocks_per_sm_histogram"].values()) == p["sms_used"] <= r["sm_count"]
        assert 0 < p["span_us"] < 1000 and 0 < p["sm_busy_share"] <= 1 and len(p["span_us_all"]) == 3
    assert r["probes"][1]["chain"] == ["22016x4096", "4096x11008", "12288x4096", "4096x4096"]


@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.library_path().is_file(),
                    reason="needs an NVIDIA GPU and the built kernel library")
def test_a_library_without_the_probe_is_refused_with_the_fix(tmp_path):
    proc = _run(kernels.library_path(), tmp_path / "p.json", "--shapes", "4096x4096")
    assert proc.returncode != 0 and "-DAWQE_PROBE_PLACEMENT" in proc.stderr
    assert not (tmp_path / "p.json").exists()
