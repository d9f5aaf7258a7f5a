"""bench/ort_host_costs.py runs every part on a tiny export on the CPU."""

import json

from conftest import bench_script
from test_export import write_checkpoint

from awq_edge.export.api import export
from awq_edge.export.decoder import ExportOptions

ort_host_costs = bench_script("ort_host_costs")


def test_both_parts_run_on_a_tiny_export(tmp_path):
    write_checkpoint(tmp_path / "ck")
    folder = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(dtype="fp16"))
    out = tmp_path / "res"
    assert ort_host_costs.main(["--folder", str(folder), "--vocab", "1000,3000", "--calls", "5", "--prompt", "8",
                                "--new", "6", "--rounds", "1", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res["argmax"]) == {"1000", "3000"}
    assert all(v > 0 for a in res["argmax"].values() for v in a.values())
    for part in ("bound", "fixed"):
        s = res["step"][part]
        assert 0 < s["inside_run_us"] < s["step_us"] and s["outside_run_us"] > 0 and s["cuda_graph"] is False, s
    assert set(res["step"]) == {"bound", "fixed"} and res["device"].startswith("CPU")  # (the graph: CUDA only)
