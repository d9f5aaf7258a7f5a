"""bench/decode.py's real-model options and its greedy parity check, on the CPU (its CUDA calls run on a GPU only)."""

from pathlib import Path

import pytest
import torch
from conftest import bench_script, save_tiny_tokenizer
from test_export import write_checkpoint

from awq_edge.runtime.cuda import CudaDecoder, TorchOps, load_weights

decode = bench_script("decode")


def test_the_cache_is_what_the_cli_allocates_unless_max_len_says_otherwise():
    args = decode.parse_args([])
    assert decode.cache_len(8192, args, 384) == 4096 and decode.cache_len(512, args, 384) == 512
    assert decode.cache_len(256, args, 384) == 384  # at least the run's own tokens
    assert decode.cache_len(8192, decode.parse_args(["--max-len", "384"]), 384) == 384


def test_real_models_come_from_repeated_or_comma_separated_options_and_the_smollm2_alias(tmp_path):
    a, b, f = (tmp_path / n for n in "abf")
    for d in (a, b, f):
        d.mkdir()
        (d / "config.json").write_text("{}")
    args = decode.parse_args(["--models", "x", "--real", f"x={a},{f},y={b}", "--real", f"z={b}"])
    assert args.real == {"x": (a, f), "y": (b, None), "z": (b, None)} and args.models == ["x", "y", "z"]
    args = decode.parse_args(["--models", "smollm2", "--smollm2-ckpt", str(a), "--smollm2-float", str(f)])
    assert args.real == {"smollm2": (a, f)} and args.models == ["smollm2"]
    assert decode.parse_args(["--models", "llama2-7b,smollm2"]).real == {}  # smollm2 without a checkpoint: skipped
    for bad in (["--real", "x"], ["--real", f"x={tmp_path / 'none'}"], ["--models", "nope"],
                ["--real", f"x={a},{f},{f}"], ["--real", f"x={a}", "--real", f"x={b}"], ["--smollm2-float", str(f)],
                ["--max-len", "383"]):  # fewer positions than the default prompt and new tokens (384)
        with pytest.raises(SystemExit):
            decode.parse_args(bad)


@pytest.mark.parametrize("family, chat", [("gemma3_text", False), ("llama", True)])
def test_greedy_parity_uses_bf16_for_gemma_and_the_chat_template_where_there_is_one(tmp_path, monkeypatch, family,
                                                                                      chat):
    write_checkpoint(tmp_path / "ck", family=family)
    save_tiny_tokenizer(tmp_path / "ck")
    if chat:
        (tmp_path / "ck" / "chat_template.jinja").write_text(
            "{% for m in messages %}w9 {{ m['content'] }} w10 {% endfor %}{% if add_generation_prompt %}w11{% endif %}")
    monkeypatch.setattr(decode, "PARITY_PROMPTS", ["w5 w17 w42", "w99 w3 w200 w7"])
    from awq_edge.checkpoint.hf_folder import load_tokenizer

    tok = load_tokenizer(tmp_path / "ck")
    ids = decode.prompt_ids(tok, "w5 w17")
    assert ids == ([9, 5, 17, 10, 11] if chat else [1, 5, 17])  # the template's turn, or BOS + the text
    dec = CudaDecoder(load_weights(tmp_path / "ck", "cpu", torch.float32, packed=False), TorchOps(), use_graphs=False)
    out = decode.greedy_parity(tmp_path / "ck", dec, 6, decode.reference_dtypes(family))
    half = "bf16" if family.startswith("gemma") else "fp16"
    assert out["references"] == [half, "fp32"] and out["prompt_format"] == ("chat_template" if chat else
                                                                            "text_after_bos")
    assert out["identical_fp32"] == 2 and f"identical_{half}" in out and len(out["rows"]) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (bench/decode.py times CUDA)")
def test_every_decode_variant_runs_on_a_tiny_random_shape_and_a_tiny_real_checkpoint(tmp_path):
    import json
    import subprocess
    import sys

    write_checkpoint(tmp_path / "ck", group_size=64)
    save_tiny_tokenizer(tmp_path / "ck")
    out = tmp_path / "decode.json"
    proc = subprocess.run(
        [sys.executable, "-P", str(Path(decode.__file__)), "--models", "tiny,tiny-gemma3", "--real",
         f"real={tmp_path / 'ck'}",
         "--variants", "ours,ours_unfolded,ours_fullspan,ours_fold_boundaries,ours_sampled,torch_int4,hf",
         "--hf-compile", "--breakdown",
         "--prompt", "8", "--new", "4", "--repeats", "1", "--parity", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = json.loads(out.read_text())["models"]
    errors = {f"{m}.{k}": v for m, r in models.items() for k, v in r.items() if k.endswith("_error")}
    assert not errors, errors
    timed = {m: {k for k, v in r.items() if isinstance(v, dict) and v.get("tok_s", 0) > 0} for m, r in models.items()}
    for shape in ("tiny", "tiny-gemma3"):  # the Llama block and Gemma 3's (q/k norms, sandwich norms, GELU, windows)
        gemma = {"ours_fold_boundaries"} if shape == "tiny-gemma3" else set()  # a Gemma 2/3 block's variant
        assert timed[shape] == {"ours", "ours_unfolded", "ours_fullspan", "ours_sampled", "ours_sampled_host",
                                "torch_int4", "hf_fp16_static_eager", "hf_fp16_static_compiled"} | gemma, shape
    assert {"ours", "hf_fp16_static_eager"} <= timed["real"]
    assert {"full_step_norm_rows_us", "full_step_norm_sums_us", "norm_rows", "norm_sums"} <= set(
        models["tiny"]["breakdown_us"])  # r18's A/B
    assert "full_step_us" in models["tiny"]["breakdown_us"] and "residual_norm_x2" in models["tiny-gemma3"]["breakdown_us"]
    for shape in ("tiny", "tiny-gemma3"):  # the spans' A/B: the attention and the step over the whole cache too
        assert {"attention_fullspan", "full_step_fullspan_us", "span"} <= set(models[shape]["breakdown_us"]), shape
    assert "full_step_fold_boundaries_us" in models["tiny-gemma3"]["breakdown_us"]
