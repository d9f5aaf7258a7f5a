"""bench/ort_host_costs.py runs every part on a tiny export on the CPU."""

import importlib.util
import json
from pathlib import Path

from test_export import write_checkpoint

from awq_edge.export.api import export
from awq_edge.export.decoder import ExportOptions

_spec = importlib.util.spec_from_file_location(
    "ort_host_costs", Path(__file__).resolve().parents[1] / "bench" / "ort_host_costs.py")
ort_host_costs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ort_host_costs)


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
