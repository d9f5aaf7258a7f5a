"""bench/onnx_gpu.py runs every row on the CPU on tiny models (the GPU run differs only in the provider), so a
broken row fails here, not on the GPU machine."""

import gc
import json
import types
from pathlib import Path

import onnx
import pytest
from conftest import bench_script, save_tiny_tokenizer, tiny_model
from test_export import write_calibration_text, write_checkpoint

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
onnx_gpu = bench_script("onnx_gpu")
SMALL = ["--provider", "cpu", "--prompt-tokens", "8", "--new-tokens", "12", "--repeats", "1", "--profile-steps", "4"]


def check_rows(out: Path, expected: list) -> list:
    res = json.loads(out.with_suffix(".json").read_text())
    assert [f"{r['model']}/{r['runtime']}" for r in res["rows"]] == expected
    for r in res["rows"]:
        assert r["tok_s"] > 0 and r["ttft_s"] > 0 and r["nodes"] > 0 and r["cpu_nodes"] == r["nodes"], r
        assert r.get("greedy_equal_to_genai", True), r  # our backend and onnxruntime-genai agree on one folder
    assert "| ours_default | onnxruntime-genai |" in out.with_suffix(".md").read_text()
    return res["rows"]


def test_every_row_runs_on_a_random_tiny_shape(tmp_path):
    """Every export, our loop timed inside and outside onnxruntime's run, and the peer built from the same random
    AutoAWQ checkpoint (--shape-peer checkpoint)."""
    out = tmp_path / "res"
    assert onnx_gpu.main(["--shape", "tiny", "--shape-peer", "checkpoint", "--work", str(tmp_path / "w"), "--out",
                          str(out), "--rows",
                          "ours_default,ours_exact,ours_split_head,ours_float_act,ours_float_logits,ours_head4,peer,ab",
                          *SMALL]) == 0
    rows = check_rows(out, ["ours_default/onnxruntime-genai", "ours_default/awq-edge-ort",
                            "ours_default/awq-edge-ort-1thread", "ours_default/awq-edge-ort-hostin",
                            "ours_default/awq-edge-ort-fixed", "ours_exact/onnxruntime-genai",
                            "ours_exact/awq-edge-ort", "ours_split_head/onnxruntime-genai",
                            "ours_split_head/awq-edge-ort", "ours_float_act/onnxruntime-genai",
                            "ours_float_act/awq-edge-ort", "ours_float_logits/onnxruntime-genai",
                            "ours_float_logits/awq-edge-ort", "ours_head4/onnxruntime-genai",
                            "ours_head4/awq-edge-ort", "peer_int4/onnxruntime-genai"])
    for r in rows:
        if r["runtime"].startswith("awq-edge-ort"):
            assert 0 < r["ort_run_ms_per_step"] < r["ms_per_step"] and r["cuda_graph"] is False, r
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["peer_source"] == "the same AutoAWQ checkpoint"
    for loop in ("awq-edge-ort-eager", "onnxruntime-genai"):  # onnxruntime's profile of both loops on one folder
        p = res["profile"][loop]
        assert p["runs"] >= 3 and 0 < p["nodes_us"] < p["model_run_us"] and p["by_op_us"]["MatMulNBits"] > 0, p
        assert p["steps"] == p["runs"] == p["runs_with_nodes"] == 4, p
    nodes = {loop: p["nodes_per_run"] for loop, p in res["profile"].items()}  # one graph: the same nodes a step
    assert nodes["awq-edge-ort-eager"] == nodes["onnxruntime-genai"] > 10, nodes
    assert "| onnxruntime-genai |" in out.with_suffix(".md").read_text()
    assert "ours_split_head/onnxruntime-genai vs peer_int4/onnxruntime-genai tok/s" in res["ratios"]
    assert "ours_default/awq-edge-ort vs ours_default/awq-edge-ort-hostin tok/s" in res["ratios"]  # the eager loop


def test_a_shapes_default_peer_is_the_builders_int4_of_a_random_float_model(tmp_path, capsys, monkeypatch):
    """--shape's default: a random fp16 model at the shape, ours quantised from it by the CLI (RTN, group 128, the
    random head statistics the export's head reads), the peer the builder's own int4 of the same float model. The
    rows' runtimes are gone before the placement sessions open (at 8B they filled an 80 GB GPU)."""
    out, work = tmp_path / "res", tmp_path / "w"
    alive, placement = [], onnx_gpu.placement

    def counting_placement(*args, **kwargs):
        gc.collect()
        alive.append([o for o in gc.get_objects() if issubclass(type(o), onnx_gpu.OrtDecoder) or (
            type(o) is types.FunctionType and o.__name__ == "<lambda>" and o.__code__.co_filename == onnx_gpu.__file__
            and o.__code__.co_varnames[:1] == ("p",))])  # the rows' runners (type(): no attribute hooks run)
        return placement(*args, **kwargs)

    monkeypatch.setattr(onnx_gpu, "placement", counting_placement)
    assert onnx_gpu.main(["--shape", "tiny", "--work", str(work), "--out", str(out), "--rows", "ours_default,peer",
                          *SMALL]) == 0
    assert alive == [[], [], []], alive  # one placement a row, nothing of the runtimes left
    # without `ab` in --rows, no A/B rows (the shapes' runs: each row holds a session of the model)
    check_rows(out, ["ours_default/onnxruntime-genai", "ours_default/awq-edge-ort", "peer_int4/onnxruntime-genai"])
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["peer_source"] == "float model" and res["quant_dir"] == str(work / "ck_tiny_rtn")
    ck = json.loads((work / "ck_tiny_rtn" / "config.json").read_text())
    assert ck["quantization_config"]["group_size"] == 128 and ck["awq_edge"]["method"] == "rtn"
    assert ck["awq_edge"]["source_model"] == str(work / "float_tiny")
    assert "holds no head statistics" not in capsys.readouterr().out  # the export's head read the written ones
    peer = json.loads((work / "peer_int4_float_tiny_cpu" / "genai_config.json").read_text())
    assert peer["model"]["decoder"]["filename"] == "model.onnx"
    # the peer's own rounding of the float weights (its groups of 32), where ours keep the checkpoint's 128
    blocks = {}
    for name in ("peer_int4_float_tiny_cpu", "ours_default"):
        graph = onnx.load(work / name / "model.onnx", load_external_data=False).graph
        blocks[name] = {next(a.i for a in n.attribute if a.name == "block_size") for n in graph.node
                        if n.op_type == "MatMulNBits" and "layers." in n.name}
    assert blocks == {"peer_int4_float_tiny_cpu": {32}, "ours_default": {128}}, blocks


def test_the_format_rows_quantise_the_same_float_model_without_zero_points(tmp_path):
    """ours_sym and ours_sym32: the shape's float model quantised again with --no-zero-point, exported at the
    defaults: their layers' MatMulNBits store no zero points where ours_default's do, in groups of 128 (ours_default's)
    and of 32 (the peer's); genai runs them, our loop does not (the layer-format A/B)."""
    out, work = tmp_path / "res", tmp_path / "w"
    assert onnx_gpu.main(["--shape", "tiny", "--work", str(work), "--out", str(out), "--rows",
                          "ours_default,ours_sym,ours_sym32", *SMALL]) == 0
    check_rows(out, ["ours_default/onnxruntime-genai", "ours_default/awq-edge-ort", "ours_sym/onnxruntime-genai",
                     "ours_sym32/onnxruntime-genai"])
    for name, group in (("sym", 128), ("sym32", 32)):
        ck = json.loads((work / f"ck_tiny_rtn_{name}" / "config.json").read_text())
        assert ck["quantization_config"]["group_size"] == group, ck["quantization_config"]
        assert ck["awq_edge"]["symmetric"] is True and ck["awq_edge"]["source_model"] == str(work / "float_tiny")
    layers = {}
    for name in ("ours_default", "ours_sym", "ours_sym32"):
        graph = onnx.load(work / name / "model.onnx", load_external_data=False).graph
        layers[name] = {(len(n.input), next(a.i for a in n.attribute if a.name == "block_size")) for n in graph.node
                        if n.op_type == "MatMulNBits" and "layers." in n.name}
    assert layers == {"ours_default": {(4, 128)}, "ours_sym": {(3, 128)}, "ours_sym32": {(3, 32)}}, layers
    ratios = json.loads(out.with_suffix(".json").read_text())["ratios"]
    assert {"ours_sym/onnxruntime-genai vs ours_default/onnxruntime-genai tok/s",
            "ours_sym32/onnxruntime-genai vs ours_sym/onnxruntime-genai tok/s"} <= set(ratios), ratios
    for row in ("ours_sym", "ours_sym32"):  # a checkpoint of its own needs the shape's float model
        with pytest.raises(SystemExit):
            onnx_gpu.main(["--shape", "tiny", "--shape-peer", "checkpoint", "--work", str(work), "--rows", row,
                           *SMALL])


def test_a_real_checkpoint_gets_perplexity_and_the_peers_build(tmp_path):
    write_checkpoint(tmp_path / "ck")
    save_tiny_tokenizer(tmp_path / "ck")
    tiny_model("llama").save_pretrained(tmp_path / "float")
    save_tiny_tokenizer(tmp_path / "float")
    wt = tmp_path / "wt"
    wt.mkdir()
    for name in ("test.txt", "valid.txt"):
        write_calibration_text(wt / name)
    out = tmp_path / "res"
    assert onnx_gpu.main(["--quant-dir", str(tmp_path / "ck"), "--hf-dir", str(tmp_path / "float"), "--work",
                          str(tmp_path / "w"), "--out", str(out), "--wikitext", str(wt), "--eval-tokens", "256",
                          "--seqlen", "64", *SMALL]) == 0
    rows = check_rows(out, ["ours_default/onnxruntime-genai", "ours_default/awq-edge-ort",
                            "ours_default/awq-edge-ort-1thread", "ours_default/awq-edge-ort-hostin",
                            "ours_default/awq-edge-ort-fixed", "ours_exact/onnxruntime-genai",
                            "ours_exact/awq-edge-ort", "peer_int4/onnxruntime-genai"])
    assert all(r["ppl"] > 1 for r in rows if r["runtime"] == "onnxruntime-genai")


@pytest.mark.gpu
def test_every_cuda_row_runs_on_a_random_tiny_shape(tmp_path):
    """On the CUDA provider our loop (replaying its steps' CUDA graphs, the default) runs beside the same loop
    without them, on a CUDA stream of its own and through onnxruntime's weight-only GEMM path (fpA_intB), as genai
    does; every row runs, every MatMulNBits and attention node on the GPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with the CUDA execution provider")
    out = tmp_path / "res"
    assert SMALL[:2] == ["--provider", "cpu"]
    assert onnx_gpu.main(["--shape", "tiny", "--work", str(tmp_path / "w"), "--out", str(out), "--rows",
                          "ours_default,ours_sym,ours_sym32,peer,genai_graph,ab", "--provider", "cuda", *SMALL[2:],
                          "--profile-steps", "16"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [f"{r['model']}/{r['runtime']}" for r in res["rows"]] == [
        "ours_default/onnxruntime-genai", "ours_default/onnxruntime-genai-fpaintb",
        "ours_default/onnxruntime-genai-graph", "ours_default/onnxruntime-genai-as-written",
        "ours_default/awq-edge-ort", "ours_default/awq-edge-ort-eager", "ours_default/awq-edge-ort-1thread",
        "ours_default/awq-edge-ort-hostin", "ours_default/awq-edge-ort-fixed", "ours_default/awq-edge-ort-stream",
        "ours_default/awq-edge-ort-fpaintb", "ours_sym/onnxruntime-genai",
        "ours_sym32/onnxruntime-genai", "ours_sym32/onnxruntime-genai-fpaintb", "peer_int4/onnxruntime-genai",
        "peer_int4/onnxruntime-genai-fpaintb", "peer_int4/onnxruntime-genai-graph",
        "peer_int4/onnxruntime-genai-as-written"]
    for r in res["rows"]:  # random weights: near-tied logits, so no claim on equal greedy tokens
        assert r["tok_s"] > 0 and r["cpu_nodes_matmul_attention"] == 0, r
        if r["runtime"].startswith("awq-edge-ort"):  # only the default loop replays graphs, to the end
            assert r["cuda_graph"] == (r["runtime"] == "awq-edge-ort"), r
    assert "ours_default/awq-edge-ort-eager vs ours_default/awq-edge-ort-hostin tok/s" in res["ratios"]
    assert "ours_default/onnxruntime-genai-graph vs peer_int4/onnxruntime-genai-graph tok/s" in res["ratios"]
    assert "ours_default/onnxruntime-genai-as-written vs peer_int4/onnxruntime-genai-as-written tok/s" in res["ratios"]
    prof = res["profile"]
    assert set(prof) == {"awq-edge-ort-eager", "onnxruntime-genai", "onnxruntime-genai-graph"}
    graph, eager = prof["onnxruntime-genai-graph"], prof["onnxruntime-genai"]
    # genai's graph mode replays: a replayed step runs no node of onnxruntime's, where the eager genai ran them all
    # at every step (16 steps: onnxruntime runs a few before it captures)
    assert eager["runs_with_nodes"] == eager["steps"] == 16 and eager["nodes_per_run"] > 10, eager
    assert graph["steps"] == 16 and graph["runs"] > 0 and graph["runs_with_nodes"] < graph["steps"] // 2, graph


def test_an_unknown_row_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        onnx_gpu.main(["--shape", "tiny", "--work", str(tmp_path / "w"), "--rows", "ours_default,peers", *SMALL])
    assert stop.value.code == 2
    assert "--rows: unknown peers; pick from ours_default" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
