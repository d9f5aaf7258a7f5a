"""bench/export_scale.py runs every target on a tiny shape, so a broken variant fails here, not on a long run."""

import json

from conftest import bench_script

export_scale = bench_script("export_scale")


def test_every_export_target_runs_measures_and_decodes_consistently_on_a_tiny_shape(tmp_path):
    out = tmp_path / "export_scale.json"
    assert export_scale.main(["--models", "tiny", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["target"] for r in rows] == list(export_scale.TARGETS)
    for r in rows:
        assert r["wall_s"] > 0 and 0 < r["peak_rss_gib"] < 4 and r["bytes"] > 1e6, r
        if "trt" not in r["target"]:
            assert r["decode"]["finite"] and r["decode"]["max_rel_diff"] < (2e-3 if "fp16" in r["target"] else 1e-5)
