"""bench/weight_scan.py runs on a tiny shape, so an interface change breaks a test, not a long run."""

import json

from conftest import bench_script, save_tiny_tokenizer

weight_scan = bench_script("weight_scan")


def test_the_weight_scan_benchmark_times_the_scan_on_a_tiny_random_folder(tmp_path):
    save_tiny_tokenizer(tmp_path / "tok")
    out = tmp_path / "scan.json"
    assert weight_scan.main(["--models", "tiny", "--work", str(tmp_path / "w"), "--tokenizer", str(tmp_path / "tok"),
                             "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"] == "tiny" and row["weights_gib"] > 0 and len(row["scan_s"]) == 2
    assert 0 < row["peak_rss_gib_before"] <= row["peak_rss_gib_after"] < 4
