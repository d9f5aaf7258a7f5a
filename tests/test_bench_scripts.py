"""The benchmark scripts no other test runs, each end to end on a tiny shape: bench/quantize_cpu.py and
bench/quantize_scale.py on the CPU, bench/layer_costs.py on a GPU (its refusal without one on the CPU),
bench/engine.py's one-line refusals here and its real build where TensorRT-RTX is installed,
bench/device_gemma.sh's CPU dry run; every device script parses, and bench/device_chain.sh refuses what it cannot run
(its steps run the bench scripts tested here and beside)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bench_script, layout_links_removed, save_tiny_tokenizer, tiny_model
from test_engine import tiny_decoder, write_onnx_dir

from awq_edge.engine import manifest, plan

ROOT = Path(__file__).resolve().parents[1]


quantize_scale = bench_script("quantize_scale")
layer_costs = bench_script("layer_costs")
bench_engine = bench_script("engine")


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny random Llama float folder with a word-level tokenizer (hidden 64: group size 64)."""
    path = tmp_path_factory.mktemp("float") / "tiny"
    tiny_model("llama").save_pretrained(path)
    save_tiny_tokenizer(path)
    return path


def test_quantize_cpu_times_rtn_and_each_awq_sample_count_in_its_own_process(tmp_path, float_dir):
    out = tmp_path / "quantize_cpu.json"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "quantize_cpu.py"), "--model", str(float_dir),
                           "--n-samples", "1", "--threads", "2", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["env"]["cpus"] == os.cpu_count() and "--n-samples 1" in report["env"]["command"]
    rows = report["rows"]
    assert [(r["method"], r["n_samples"], r["group_size"], r["threads"]) for r in rows] == [("rtn", 0, 64, 2),
                                                                                            ("awq", 1, 64, 2)]
    for r in rows:
        assert 0 <= r["quantize_seconds"] <= r["wall_seconds"] < 300, r  # RTN of the tiny model rounds to 0.0 s
        assert 100 < r["peak_rss_mb"] < 4096, r  # a Python process with torch, and nowhere near a real model's
        assert f"quantize {float_dir} " in r["command"] and f"--method {r['method']}" in r["command"]
    assert "--n-samples" not in rows[0]["command"] and rows[1]["command"].endswith("--n-samples 1")
    # One JSON line per setting on stdout, as written to the file.
    assert [json.loads(line) for line in proc.stdout.splitlines()] == rows


def test_quantize_scale_runs_a_random_tiny_shape_and_the_real_model_row_with_its_eval(tmp_path, float_dir, capsys):
    tok, wikitext = tmp_path / "tok", tmp_path / "wt"
    save_tiny_tokenizer(tok)
    wikitext.mkdir()
    (wikitext / "test.txt").write_text(" ".join(f"w{3 + i * 37 % 250}" for i in range(1200)))
    out = tmp_path / "quantize_scale.json"
    # RTN: the script's rows and parsing are the same for every method, and AWQ's search costs seconds here.
    assert quantize_scale.main(["--models", "tiny", "--layers", "1", "--tokenizer", str(tok), "--work",
                                str(tmp_path / "w"), "--smollm2", str(float_dir), "--wikitext", str(wikitext),
                                "--quantize-args", "--method rtn", "--out", str(out)]) == 0
    config = json.loads((tmp_path / "w" / "tiny-1layers" / "config.json").read_text())
    shape = quantize_scale.SHAPES["tiny"]
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == shape["hidden_size"]
    assert config["intermediate_size"] == shape["intermediate_size"]
    assert not (tmp_path / "w" / "tiny-1layers-q").exists()  # each random model's checkpoint is removed after
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["weights"]) for r in rows] == [("tiny-1layers", "random fp16"), ("smollm2-135m", "real")]
    for r in rows:
        assert r["command"].startswith("awq-edge quantize ") and r["command"].endswith("--method rtn"), r["command"]
        assert [p["phase"] for p in r["phases"]] == ["load", "calibration", "layers", "save"], r["phases"]
        assert 0.1 < r["peak_rss_gib"] < 4 and r["wall_seconds"] > 0 and r["layer_steps"].startswith("load ")
        assert r["peak_rss_gib"] == max(p["peak_rss_gib_so_far"] for p in r["phases"])
        assert any(line.startswith("wrote ") for line in r["log_tail"]), r["log_tail"]
    ev = rows[1]["eval"]
    assert isinstance(ev, dict), ev  # the eval's stderr where it failed
    assert ev["seqlen"] == 512 and ev["windows"] == 2 and math.isfinite(ev["ppl"]) and ev["ppl"] > 1
    assert "tiny: random fp16 folder ready" in capsys.readouterr().out


def test_quantize_scale_refuses_an_unknown_shape_before_writing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        quantize_scale.main(["--models", "tiny,llama9-70b", "--tokenizer", str(tmp_path), "--work",
                             str(tmp_path / "w"), "--out", str(tmp_path / "o.json")])
    assert e.value.code == 2 and "unknown llama9-70b" in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (tmp_path / "o.json").exists()


def test_layer_costs_shape_defaults_to_llama3_8b_and_refuses_widths_off_the_group():
    assert layer_costs.GROUPS == {"q/k/v": (6144, 4096), "o": (4096, 4096), "gate/up": (28672, 4096),
                                  "down": (4096, 14336)}
    assert layer_costs.groups("256,512,128") == {"q/k/v": (512, 256), "o": (256, 256), "gate/up": (1024, 256),
                                                 "down": (256, 512)}
    for bad in ("256,512", "256,500,128", "250,512,128", "a,b,c", "0,512,128"):
        with pytest.raises(Exception, match="HIDDEN|multiples"):
            layer_costs.groups(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_layer_costs_without_a_gpu_refuses_in_one_line(tmp_path):
    out = tmp_path / "lc.json"
    with pytest.raises(SystemExit) as e:  # a message, not a code: Python prints it as one line and exits 1
        layer_costs.main(["--shape", "256,512,128", "--out", str(out)])
    assert e.value.code == ("bench/layer_costs.py: needs an NVIDIA GPU with CUDA (it times with CUDA events and runs "
                            "the Triton GPTQ loop)")
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs an NVIDIA GPU and Triton (bench/layer_costs.py times CUDA events and Triton's loop)")
def test_layer_costs_times_every_group_of_a_tiny_layer_and_the_triton_loop_matches_pytorchs(tmp_path):
    out = tmp_path / "lc.json"
    assert layer_costs.main(["--shape", "256,512,128", "--loop", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["env"]["gpu"] == torch.cuda.get_device_name()
    assert [(row["group"], tuple(row["shape"])) for row in r["rows"]] == list(layer_costs.groups("256,512,128").items())
    for row in r["rows"]:
        assert all(row[k] > 0 for k in ("gptq_fused_s", "gptq_loop_s", "candidate_fake_quant_s")), row
        # Not bit for bit (tests/test_gptq.py's bounds): a last-bit difference now and then propagates.
        assert row["q_equal_fraction"] > 0.999 and row["scales_max_rel_diff"] < 2e-3, row
    assert set(r["per_layer"]) == {"gptq_fused_s", "gptq_loop_s", "candidate_fake_quant_s"}
    assert r["per_layer"]["gptq_loop_s"] == round(sum(row["gptq_loop_s"] for row in r["rows"]), 4)


def _hide_tensorrt(monkeypatch):
    real_import = importlib.import_module

    def no_tensorrt(name, *a):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(name)
        return real_import(name, *a)

    monkeypatch.setattr("awq_edge.engine.build.importlib.import_module", no_tensorrt)


def test_engine_bench_without_tensorrt_refuses_in_one_line_and_writes_no_report(tmp_path, monkeypatch, capsys):
    _hide_tensorrt(monkeypatch)
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native"), context_length=4096)
    out = tmp_path / "engine.json"
    assert bench_engine.main([str(d), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench/engine.py: error: device rtx-3090 needs the Python module "
                                               "`tensorrt_rtx`") and "pip install tensorrt-rtx" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".engine.json*"))
    assert bench_engine.main([str(tmp_path / "none"), "-o", str(out)]) == 2  # no ONNX folder: names the export
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "awq-edge export" in err[0] and not out.exists(), err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                    reason="tensorrt_rtx not installed (pip install tensorrt-rtx==1.7.1.116); builds without a GPU")
def test_engine_bench_builds_every_rtx_profile_and_reports_its_size_and_time(tmp_path, capsys):
    d = write_onnx_dir(tmp_path / "onnx", tiny_decoder("native"), context_length=4096)
    out = tmp_path / "engine.json"
    assert bench_engine.main([str(d), "-o", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [x["device"] for x in r["results"]] == ["rtx-3090", "rtx-4090", "rtx-5090"]
    for x in r["results"]:
        assert x["engine_bytes"] > 0 and 0 < x["build_seconds"] <= x["wall_seconds"], x
        assert x["tensorrt"]["module"] == "tensorrt_rtx" and 0 < x["max_seq_len"] <= 4096 and x["kv_cache_bytes"] > 0
    assert r["onnx"]["sha256"] == manifest.model_hash(d) and r["onnx"]["bytes"] == bench_engine.onnx_bytes(d) > 0
    assert r["onnx"]["int4_nodes"] == plan.int4_nodes(tiny_decoder("native"))
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run: with a GPU its decode step would run")
def test_the_gemma_device_script_dry_runs_its_chain_on_the_cpu(tmp_path):
    """bench/device_gemma.sh as its usage's CPU dry run: a float folder already there (here a tiny Gemma 3), RTN on
    the CPU, both evaluations; the GPU's steps (the environment listing with nvidia-smi and gguf, the decode
    benchmark) fail, are named in the summary and do not stop the others."""
    float_dir, wt, out = tmp_path / "float", tmp_path / "wt", tmp_path / "out"
    tiny_model("gemma3_text").save_pretrained(float_dir)
    save_tiny_tokenizer(float_dir)
    wt.mkdir()
    (wt / "test.txt").write_text(" ".join(f"w{3 + (7 * i) % 250}" for i in range(600)) + "\n")
    env = {**os.environ, "OUT": str(out), "WT": str(wt), "FLOAT": str(float_dir), "CKPT": str(tmp_path / "ck"),
           "WORK": str(tmp_path / "work"), "DEVICE": "cpu", "QUANT_ARGS": "--method rtn --group-size 32",
           "EVAL_ARGS": "--seqlen 64 --max-tokens 256", "DECODE_ARGS": "--new 4 --repeats 1",
           "AWQ_EDGE_KERNELS_LIB": str(tmp_path / "none.so"), "PATH": f"{Path(sys.executable).parent}:"
           f"{os.environ['PATH']}", "STEP_TIMEOUT": "240"}
    with layout_links_removed():
        proc = subprocess.run(["bash", "bench/device_gemma.sh"], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=900)
    assert proc.returncode != 0, proc.stdout[-2000:]  # its GPU steps cannot pass here
    summary = (out / "summary.txt").read_text().split(":", 1)[1].split()
    assert "decode" in summary and not {"quantize", "eval_awq", "eval_float"} & set(summary), proc.stdout[-3000:]
    assert "bench/decode.py needs an NVIDIA GPU" in (out / "decode.txt").read_text()  # its one line, no traceback
    assert (out / "convert.txt").read_text().startswith(f"== convert: {float_dir} exists, kept")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]["group_size"] == 32
    ppl = {}
    for step in ("eval_awq", "eval_float"):
        text = (out / f"{step}.txt").read_text()
        assert f"== {step}: exit 0 after" in text, text[-2000:]
        ppl[step] = json.loads(next(line for line in text.splitlines() if line.startswith("{")))["ppl"]
    assert all(math.isfinite(p) and p > 1 for p in ppl.values()) and ppl["eval_awq"] != ppl["eval_float"], ppl


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.sh")))
def test_each_device_script_parses(script):
    """The device scripts run only on a lent GPU machine: a syntax error there costs a machine start."""
    proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_device_chain_needs_a_results_folder_and_refuses_an_unknown_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "bench/device_chain.sh", "status"], capture_output=True, text=True, cwd=ROOT,
                          env=env)
    assert proc.returncode != 0 and "set OUT to a results folder" in proc.stderr, proc.stderr
    with layout_links_removed():
        proc = subprocess.run(["bash", "bench/device_chain.sh", "no-such-step"], capture_output=True, text=True,
                              cwd=ROOT, env={**env, "OUT": str(tmp_path / "out")})
    assert proc.returncode == 2 and "unknown step no-such-step" in proc.stdout, (proc.stdout, proc.stderr)
    assert not (tmp_path / "out" / "results.tgz").exists()
