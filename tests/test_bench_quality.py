"""bench/quality.py runs every method and row flag on a tiny random model and a fake WikiText-2 folder, so a broken
row fails here, not after an hour of a real run. One main() call holds all the rows; the flags are checked where
they reach the quantiser, since on random weights no flag has a perplexity it must reach."""

import json
import math
import re
import sys

import pytest
import torch
from conftest import bench_script, save_tiny_tokenizer, tiny_model
from test_export import write_calibration_text

quality = bench_script("quality")

SEQLEN = 32
EVAL = ["--seqlen", str(SEQLEN), "--eval-tokens", "256"]  # 8 windows of 32 tokens, 31 predicted in each
EVAL_TOKENS = 8 * (SEQLEN - 1)
VALID = "wikitext2-valid"
# (row, guard, options quantize_model gets, whether GPTQ's matmuls run TF32-rounded); the n4 rows of
# wikitext2-valid calibrate on the n8 row's first blocks, sampled on the model's own text
ROWS = [
    ("rtn:4:32", True, {}, False),
    (f"rtn:4:64:{VALID}:8:seq", True, {"sequential": True}, False),
    (f"awq:4:32:{VALID}:4", True, {}, False),
    (f"awq:4:32:{VALID}:4:noguard+duo+seq", False, {"duo": True, "sequential": True}, False),
    ("awq:4:64:sampled:4:noduo+noseq", True, {"duo": False, "sequential": False}, False),
    (f"gptq:4:32:{VALID}:4", True, {"gptq_damp": quality.gptq.DAMP}, False),
    (f"gptq:4:64:{VALID}:4:damp0.05+sink0.1+tf32emu", True, {"gptq_damp": 0.05, "gptq_sink": 0.1}, True),
    (f"awq-gptq:4:32:{VALID}:4:tf32emu+damp0.01+noseq", True, {"gptq_damp": 0.01, "sequential": False}, True),
    ("awq:4:64:mixed:4", True, {}, False),  # the shipped text DEFAULT_ROWS calibrate on
    (f"awq:4:32:{VALID}:4:sym", True, {}, False),  # no zero points
]


def run(mp, folders, out, *args) -> int:
    """quality.main() with these arguments (it reads sys.argv), on the CPU unless they name a device (its default is
    the GPU where there is one: the CPU tests' ids and TF32 emulation are the CPU's)."""
    mp.setattr(sys, "argv", ["bench/quality.py", "--model", str(folders / "model"), "--wikitext",
                             str(folders / "wt"), "--out", str(out), "--device", "cpu", *args])
    return quality.main()


def label(r: dict) -> str:
    """A row's name in the per-layer tables, as main() writes it."""
    return (f"{r['method']} w{r['w_bit']} g{r['group_size']} {r['calibration'] or ''} n{r['n_samples']} "
            f"{r['flags']}").replace("  ", " ").strip()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    tiny_model("llama").save_pretrained(root / "model")
    save_tiny_tokenizer(root / "model")
    (root / "wt").mkdir()
    for name in ("test.txt", "valid.txt"):
        write_calibration_text(root / "wt" / name, seed=len(name))  # two texts: valid is not test
    return root


@pytest.fixture(scope="module")
def every_row(folders):
    """One run of every row; each quantize_model call recorded as (method, group, ids, guard, options, TF32)."""
    calls, inner = [], quality.quantize_model
    add, gptq_quantize = quality.gptq.HessianAccumulator.add, quality.layerwise.gptq_quantize

    def recording(m, adapter, cfg, method, ids, **kw):
        emulated = quality.layerwise.gptq_quantize is not gptq_quantize
        assert emulated == (quality.gptq.HessianAccumulator.add is not add)
        options = {k: v for k, v in kw.items() if k not in ("device", "progress", "guard")}
        calls.append((method, cfg.group_size, ids.clone(), kw["guard"], options, emulated, cfg.zero_point))
        return inner(m, adapter, cfg, method, ids, **kw)

    out = folders / "res" / "quality"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quality, "quantize_model", recording)
        assert run(mp, folders, out, "--rows", ",".join(r[0] for r in ROWS), *EVAL, "--valid-tokens", "64") == 0
    # the emulation is undone after its rows
    assert (quality.gptq.HessianAccumulator.add, quality.layerwise.gptq_quantize) == (add, gptq_quantize)
    return out, calls


def test_every_method_and_flag_gets_a_finite_perplexity_and_its_row(every_row):
    out, _ = every_row
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["rows"]
    expected = [("float", 16, None, None, 0, None)]
    for spec, *_ in ROWS:
        method, bits, group, *rest = spec.split(":")
        expected.append((method, int(bits), int(group), rest[0] if rest else None, int(rest[1]) if rest else 0,
                         rest[2] if len(rest) > 2 else ""))
    assert [(r["method"], r["w_bit"], r["group_size"], r["calibration"], r["n_samples"], r.get("flags"))
            for r in rows] == expected
    float_ppl = rows[0]["ppl"]
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["eval_tokens"] == EVAL_TOKENS, r
    for r in rows[1:]:
        assert r["ppl"] != float_ppl, r  # the row's model is quantised, not the float one evaluated again
    assert res["env"]["seqlen"] == SEQLEN and res["env"]["eval_tokens"] == EVAL_TOKENS
    assert res["env"]["valid_tokens"] == 64 and res["env"]["grid_noise"] == 0.0
    by_spec = dict(zip((r[0] for r in ROWS), rows[1:]))
    assert by_spec[f"awq:4:32:{VALID}:4:noguard+duo+seq"]["guard"] is False
    assert {k: by_spec[f"awq:4:32:{VALID}:4:noguard+duo+seq"][k] for k in ("duo", "seq")} == {"duo": True, "seq": True}
    assert {k: by_spec["awq:4:64:sampled:4:noduo+noseq"][k] for k in ("duo", "seq")} == {"duo": False, "seq": False}
    assert "duo" not in by_spec[f"awq:4:32:{VALID}:4"]  # unset: the quantiser's default
    gptq_rows = {s: (r["gptq_damp"], r.get("gptq_sink")) for s, r in by_spec.items() if "gptq" in r["method"]}
    assert list(gptq_rows.values()) == [(quality.gptq.DAMP, None), (0.05, 0.1), (0.01, None)]
    # RTN's gap closed, against the first RTN row of the same bits, group and zero points (none here without them)
    rtn = {32: rows[1]["ppl"], 64: rows[2]["ppl"]}
    for r in rows[3:]:
        if not r["zero_point"]:
            assert "gap_closed_vs_rtn" not in r, r
            continue
        assert r["gap_closed_vs_rtn"] == round((rtn[r["group_size"]] - r["ppl"]) / (rtn[r["group_size"]] - float_ppl),
                                               4), r
    assert "gap_closed_vs_rtn" not in rows[1] and "gap_closed_vs_rtn" not in rows[2]
    # AWQ's reports: 3 scale groups a layer in this Llama (o_proj has none: 2 KV heads), clipping only in awq's rows
    for r in rows[1:]:
        scaled = r["method"] in ("awq", "awq-gptq")
        assert (r["scales_kept"] or "").endswith("/6") == scaled and (r["duo_chosen"] is not None) == scaled, r
        assert (r["clip_kept"] is not None) == (r["method"] == "awq"), r
    assert by_spec["awq:4:64:sampled:4:noduo+noseq"]["duo_chosen"] == 0  # no weight-aware candidate was tried


def test_every_flag_reaches_the_quantiser(every_row):
    _, calls = every_row
    assert [(c[0], c[1], c[3], c[4], c[5]) for c in calls] == [
        (spec.split(":")[0], int(spec.split(":")[2]), guard, options, tf32) for spec, guard, options, tf32 in ROWS]
    ids = [c[2] for c in calls]
    assert torch.equal(ids[0], torch.zeros(1, 2, dtype=torch.long))  # RTN without calibration
    assert [tuple(i.shape) for i in ids[1:]] == [(8, SEQLEN)] + [(4, SEQLEN)] * 8
    assert [c[6] for c in calls] == [not spec.endswith(":sym") for spec, *_ in ROWS]  # the zero points asked for
    assert torch.equal(ids[2], ids[1][:4]) and torch.equal(ids[3], ids[1][:4])  # n4: the n8 blocks' first ones
    assert not torch.equal(ids[4], ids[2])  # sampled text, not WikiText-2 valid
    assert not torch.equal(ids[8], ids[2]) and not torch.equal(ids[8], ids[4])  # the shipped text, another again
    assert (ids[1] > 2).all()  # valid.txt's words, no unknown token


def test_the_per_layer_tables_hold_every_calibrated_row(every_row):
    out, _ = every_row
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["rows"][1:]
    labels = [label(r) for r in rows]
    assert len(set(labels)) == len(labels)
    assert list(res["layer_errors"]) == labels[1:]  # rtn:4:32 has no calibration, so no held-out error
    assert list(res["valid_layer_errors"]) == labels
    for errors in (*res["layer_errors"].values(), *res["valid_layer_errors"].values()):
        assert len(errors) == 2 and all(math.isfinite(e) and e > 0 for e in errors), errors
    for r, name in zip(rows, labels):
        assert r["valid_layer_error_sum"] == round(sum(res["valid_layer_errors"][name]), 4), r
    md = out.with_suffix(".md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line.split(" | ")[0][2:] in (
        "float", "rtn", "awq", "gptq", "awq-gptq")]
    assert len(table) == len(ROWS) + 1
    for line, r in zip(table, res["rows"]):
        assert line.split(" | ")[6] == f"{r['ppl']:.3f}", line
    assert "| layer | " + " | ".join(labels[1:]) + " |" in md
    assert "| layer | " + " | ".join(labels) + " |" in md
    first = labels[1]
    assert f"| 0 | {res['layer_errors'][first][0]:.4f} |" in md


def test_grid_noise_moves_the_float_row_and_runs_merge_only_on_equal_float_rows(every_row, folders, capsys):
    """--grid-noise only reshapes each linear into 32-weight blocks, so it runs on any model whose widths divide 32
    (it means something only for GGUF-derived weights). Runs split over processes merge when their float rows
    agree, and are refused when they do not."""
    out, _ = every_row
    first = json.loads(out.with_suffix(".json").read_text())
    with pytest.MonkeyPatch.context() as mp:
        assert run(mp, folders, folders / "res" / "plain", "--rows", "rtn:4:64", *EVAL, "--valid-tokens", "0") == 0
        assert run(mp, folders, folders / "res" / "noisy", "--rows", "rtn:4:32", *EVAL, "--valid-tokens", "0",
                   "--grid-noise", "0.5") == 0
        plain = json.loads((folders / "res" / "plain.json").read_text())
        noisy = json.loads((folders / "res" / "noisy.json").read_text())
        assert plain["rows"][0]["ppl"] == first["rows"][0]["ppl"] != noisy["rows"][0]["ppl"]
        assert plain["valid_layer_errors"] == {} and "valid_layer_error_sum" not in plain["rows"][1]
        assert noisy["env"]["grid_noise"] == 0.5 and all(math.isfinite(r["ppl"]) and r["ppl"] > 1
                                                          for r in noisy["rows"])
        assert "weights moved off their grid by noise of 0.5 4-bit steps" in (folders / "res" / "noisy.md").read_text()
        assert "off their grid" not in (folders / "res" / "plain.md").read_text()
        # the noise itself: every decoder linear's weights move, by a fraction of their blocks' 4-bit step
        m = tiny_model("llama")
        before = {n: p.clone() for n, p in m.named_parameters()}
        quality.break_grid(m, quality.get_adapter("llama"), 0.5)
        moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
        assert moved == {n for n in before if ".layers." in n and n.endswith("proj.weight")}
        steps = []
        for n in sorted(moved):
            blocks = before[n].reshape(before[n].shape[0], -1, 32)
            after = m.get_parameter(n).detach().reshape_as(blocks)
            steps.append(((after - blocks) / ((blocks.amax(-1, True) - blocks.amin(-1, True)) / 15)).flatten())
        assert 0.45 < torch.cat(steps).std() < 0.55  # Gaussian noise of 0.5 steps

        merged = folders / "res" / "merged"
        capsys.readouterr()
        mp.setattr(sys, "argv", ["bench/quality.py", "--merge", str(out.with_suffix(".json")),
                                 str(folders / "res" / "plain.json"), "--out", str(merged)])
        assert quality.main() == 0
        res = json.loads(merged.with_suffix(".json").read_text())
        # the merged table's RTN gap is recomputed: plain's RTN g64 row against the first run's, the same rounding
        assert res["rows"] == first["rows"] + [{**plain["rows"][1], "gap_closed_vs_rtn": 0.0}]
        assert res["layer_errors"] == first["layer_errors"]
        assert res["valid_layer_errors"] == first["valid_layer_errors"]
        assert len(res["env"]["commands"]) == 2 and "| rtn | 4 | 64 | - |" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="runs disagree on the float model's perplexity"):
            quality.merge([out.with_suffix(".json"), folders / "res" / "noisy.json"], folders / "res" / "refused")
        assert not (folders / "res" / "refused.json").exists()


@pytest.mark.parametrize("row,message", [
    (f"awq:4:32:{VALID}:4:fast", "flags are noguard+duo+noduo+seq+noseq+tf32emu+sym, dampX"),
    (f"awq:4:32:{VALID}:4:duo+noduo", "duo and noduo together"),
    (f"awq:4:32:{VALID}:4:seq+noseq", "seq and noseq together"),
    (f"gptq:4:32:{VALID}:4:dampx", "write GPTQ's dampening as dampX"),
    (f"gptq:4:32:{VALID}:4:sink", "write the sink's share as sinkX"),
])
def test_a_bad_row_is_refused_before_any_row_runs(folders, row, message):
    out = folders / "refused" / row.replace(":", "_")
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit, match=re.escape(message)):
        run(mp, folders, out, "--rows", f"rtn:4:32,{row}", *EVAL)
    assert not out.with_suffix(".json").exists()


def test_no_wikitext_folder_is_a_skip(folders, capsys, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["bench/quality.py", "--model", str(folders / "model"), "--wikitext", str(tmp_path),
                                 "--out", str(tmp_path / "res")])
        assert quality.main() == 0
    assert "skip: WikiText-2 not found" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_tf32_rounding_keeps_ten_mantissa_bits_to_nearest_ties_away():
    x = torch.tensor([1 + 2**-11, 1 + 2**-12, 1 + 3 * 2**-11, -(1 + 2**-11), 3.0])
    assert quality._tf32(x).tolist() == [1 + 2**-10, 1.0, 1 + 2**-9, -(1 + 2**-10), 3.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (--device cuda)")
def test_the_rows_run_on_the_gpu(folders):
    """--device cuda, as the committed results were made: the float model, calibration, each row's layer loop and the
    evaluation on the GPU, the GPU named in the files."""
    out = folders / "res" / "cuda"
    rows = f"rtn:4:64,awq:4:64:{VALID}:4,awq-gptq:4:32:{VALID}:4"
    with pytest.MonkeyPatch.context() as mp:
        assert run(mp, folders, out, "--rows", rows, *EVAL, "--valid-tokens", "64", "--device", "cuda") == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["env"]["device"] == "cuda" and res["env"]["gpu"] == torch.cuda.get_device_name()
    assert [r["method"] for r in res["rows"]] == ["float", "rtn", "awq", "awq-gptq"]
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in res["rows"]), res["rows"]
    assert torch.cuda.get_device_name() in out.with_suffix(".md").read_text()
