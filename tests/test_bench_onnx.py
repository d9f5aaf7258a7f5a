"""bench/onnx.py end to end on a tiny random model: every ONNX variant and onnxruntime-genai's builder (the peer),
parity, perplexity, decode timing and the markdown; then --decode-only and --markdown-only on what it left."""

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CHAT = "{% for m in messages %}w9 {{ m['content'] }} w10 {% endfor %}{% if add_generation_prompt %}w11{% endif %}"


def bench(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "onnx.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                    reason="onnxruntime-genai (its model builder is the peer) is not installed: pip install -e .[test]")
def test_every_onnx_variant_and_the_peer_run_on_a_tiny_model(tmp_path):
    from awq_edge.quantizer.api import quantize

    float_dir, ck, wt = tmp_path / "float", tmp_path / "ck", tmp_path / "wt"
    tiny_model("llama", hidden_size=128, intermediate_size=256, tie_word_embeddings=True).save_pretrained(float_dir)
    save_tiny_tokenizer(float_dir)
    quantize(str(float_dir), method="rtn", group_size=32, device="cpu", progress=False, log=lambda *a: None).save(ck)
    for d in (float_dir, ck):  # the greedy check asks the chat template for its prompts
        (d / "chat_template.jinja").write_text(CHAT)
    wt.mkdir()
    rng = random.Random(0)
    for split, n in (("test", 2000), ("valid", 400)):
        (wt / f"{split}.txt").write_text(" ".join(f"w{rng.randrange(3, 256)}" for _ in range(n)) + "\n")
    out = tmp_path / "onnx"
    bench("--quant-dir", ck, "--model", float_dir, "--work", tmp_path / "work", "--wikitext", wt, "--eval-tokens",
          512, "--seqlen", 64, "--prompt-tokens", 8, "--new-tokens", 4, "--repeats", 1, "--out", out)
    r = json.loads(out.with_suffix(".json").read_text())
    variants = {"ours_int4", "ours_default", "ours_default_no_outliers", "ours_default_sym_head", "ours_int4_int8act",
                "ours_int4_int8act_head8", "ours_int4_int8act_head4", "ours_int4_int8act_head4sym_calib",
                "ours_int4_int8act_head4sym_g64_calib", "ours_fp32", "peer_int4", "peer_int4_g64", "peer_fp32"}
    assert set(r["size_bytes"]) == variants | {"float_fp16_safetensors"}
    assert set(r["wikitext2_test_ppl"]) == variants | {"pytorch_float", "pytorch_awq"}
    assert all(v["ppl"] > 1 for v in r["wikitext2_test_ppl"].values())
    assert r["parity"]["max_abs_diff"] < 1e-3 and len(r["greedy_64"]) == 5
    assert {"lower_ppl", "no_larger", "speed_vs_peer_interleaved"} <= set(r["defaults_vs_peer"])
    assert "| ours_default |" in out.with_suffix(".md").read_text()
    dec = tmp_path / "decode"
    bench("--decode-only", "--models", "ours_default,peer_int4", "--work", tmp_path / "work", "--quant-dir", ck,
          "--model", float_dir, "--wikitext", wt, "--prompt-tokens", 8, "--new-tokens", 4, "--repeats", 1, "--out", dec)
    assert dec.with_suffix(".json").is_file()
    out.with_suffix(".md").unlink()
    bench("--markdown-only", "--out", out)
    assert "| ours_default |" in out.with_suffix(".md").read_text()
