"""AWQ and RTN on tiny models: the search improves on RTN, and the checkpoint reloads to the same model."""

import json

import pytest
import torch
from conftest import ARCHS, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from awq_edge.arch import get_adapter
from awq_edge.checkpoint.reader import load_quantized_model
from awq_edge.checkpoint.writer import save_quantized
from awq_edge.errors import AwqEdgeError
from awq_edge.quant import QConfig, fake_quantize
from awq_edge.quantizer.awq import search_scale
from awq_edge.quantizer.calib import sampled_blocks
from awq_edge.quantizer.layerwise import quantize_model


def _calib(n=4, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_scale_search_beats_plain_rounding_on_outlier_channels():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(512, 128)
    x[:, :4] *= 30  # a few salient input channels, as in real activations
    cfg = QConfig(3, 64, True)
    chunks = [(lin, x[:384], False), (lin, x[384:], True)]
    s, best, losses = search_scale(iter(chunks), x[:384].abs().mean(0), [lin], cfg)
    rtn = ((x @ fake_quantize(lin.weight, cfg).t() - lin(x)) ** 2)
    assert losses[0, 0].item() == pytest.approx(rtn[:384].mean().item(), rel=1e-5)
    assert losses[0, 1].item() == pytest.approx(rtn[384:].mean().item(), rel=1e-5)
    assert best > 0 and losses[:, 0].min() < 0.8 * losses[0, 0]
    assert losses[best, 1] < losses[0, 1]


def test_a_scale_that_loses_to_rounding_on_held_out_tokens_is_dropped():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(512, 128)
    search = x[:256].clone()
    search[:, :4] *= 30  # outliers only in the search text: their scales do not generalise
    cfg = QConfig(3, 64, True)
    s, best, losses = search_scale(iter([(lin, search, False), (lin, x[256:], True)]), search.abs().mean(0), [lin], cfg)
    assert losses[:, 0].argmin() > 0  # the search part alone would pick a scale
    assert best == 0 and torch.equal(s, torch.ones(128))  # the held-out part says plain rounding is better


@pytest.mark.parametrize("model_type", ARCHS)
def test_awq_runs_on_every_architecture_and_beats_rtn(model_type):
    cfg = QConfig(3, 32, True)
    ids = _calib()
    losses = {}
    for method in ("rtn", "awq"):
        model = tiny_model(model_type)
        with torch.no_grad():
            ref = tiny_model(model_type)(input_ids=ids).logits
        res = quantize_model(model, get_adapter(model.config.model_type), cfg, method, ids, progress=False)
        n_linears = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
        assert len(res.linears) == n_linears
        with torch.no_grad():
            losses[method] = (model(input_ids=ids).logits - ref).pow(2).mean().item()
    assert losses["awq"] < losses["rtn"]


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model("llama")
    cfg = QConfig(4, 32, True)
    res = quantize_model(model, get_adapter("llama"), cfg, "awq", _calib(), progress=False)
    out = save_quantized(model, tiny_tokenizer(), res, tmp_path / "ckpt", {"method": "awq", "group_size": 32, "symmetric": False})
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                             "version": "gemm", "modules_to_not_convert": None}
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128, 64 // 8)
    assert "model.layers.0.mlp.down_proj.weight" not in tensors
    reloaded, tokenizer = load_quantized_model(out)
    assert tokenizer.convert_tokens_to_ids("w7") == 7
    ids = _calib(2, 16, seed=3)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    # Norms and embeddings are stored in fp16; the linears are bit-exact.
    for name, ql in res.linears.items():
        assert torch.equal(reloaded.get_submodule(name).weight, ql.dequantize())
    assert (a - b).abs().max().item() < 5e-3


def test_keep_8bit_moves_the_most_sensitive_linears_to_8_bits(tmp_path):
    model = tiny_model("llama")
    res = quantize_model(model, get_adapter("llama"), QConfig(4, 32, True), "awq", _calib(), keep_8bit=2, progress=False)
    worst = sorted(res.report["sensitivity"], key=res.report["sensitivity"].get, reverse=True)[:2]
    assert res.report["int8_modules"] == worst
    assert all(res.linears[n].bits == 8 for n in worst)
    assert sum(ql.bits == 8 for ql in res.linears.values()) == 2
    out = save_quantized(model, tiny_tokenizer(), res, tmp_path / "ck", {"method": "awq", "group_size": 32, "symmetric": False})
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["quantization_config"]["modules_to_not_convert"]) == sorted(worst)
    tensors = load_file(out / "model.safetensors")
    assert all(f"{n}.weight" in tensors and f"{n}.qweight" not in tensors for n in worst)


def test_ragged_group_is_refused_by_the_checkpoint_before_writing(tmp_path):
    model = tiny_model("llama", hidden_size=48, intermediate_size=96, num_attention_heads=3, num_key_value_heads=3)
    res = quantize_model(model, get_adapter("llama"), QConfig(4, 32, True), "rtn", _calib(), progress=False)
    with pytest.raises(AwqEdgeError, match="group-size"):
        save_quantized(model, tiny_tokenizer(), res, tmp_path / "ck", {"method": "rtn", "group_size": 32, "symmetric": False})
    assert list(tmp_path.iterdir()) == []


def test_sampled_calibration_is_model_text_of_the_asked_shape():
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    a = sampled_blocks(model, tok, 3, 20)
    b = sampled_blocks(model, tok, 3, 20)
    assert a.shape == (3, 20) and torch.equal(a, b)  # seeded: a run can be repeated
    assert not set(a[:, 0].tolist()) & set(tok.all_special_ids)
    assert len(set(a[:, 1:].flatten().tolist())) > 20  # sampled, not a repeated argmax


def test_duo_candidates_are_rtn_then_the_x_grid_then_autoawqs_weight_aware_grid():
    from awq_edge.quant import to_groups
    from awq_edge.quantizer.awq import scale_candidates

    torch.manual_seed(0)
    lins = [torch.nn.Linear(128, 32, bias=False), torch.nn.Linear(128, 16, bias=False)]
    x_mean = torch.rand(128) + 0.1
    cfg = QConfig(4, 64, True)
    plain, duo = scale_candidates(x_mean, lins, cfg), scale_candidates(x_mean, lins, cfg, duo=True)
    assert len(plain) == 20 and len(duo) == 40
    assert torch.equal(plain[0], torch.ones(128)) and all(torch.equal(a, b) for a, b in zip(plain, duo))
    w = torch.cat([lin.weight for lin in lins]).detach()
    g = to_groups(w, 64).abs()
    w_mean = (g / g.amax(-1, keepdim=True)).reshape(48, 128).mean(0)
    s = x_mean.pow(0.5) / (w_mean.pow(0.5) + 1e-4)  # AutoAWQ's duo_scaling at ratio 0.5
    assert torch.allclose(duo[30], s / (s.max() * s.min()).sqrt(), rtol=1e-5)
    ragged = scale_candidates(x_mean[:100], [torch.nn.Linear(100, 8, bias=False)], cfg, duo=True)  # padded group
    assert all(c.shape == (100,) and bool(torch.isfinite(c).all()) and bool((c > 0).all()) for c in ragged)


def test_sequential_feeds_later_layers_the_quantised_output():
    ids = _calib()
    cfg = QConfig(3, 32, True)
    results = {}
    for sequential in (False, True):
        model = tiny_model("llama", num_hidden_layers=3)
        results[sequential] = quantize_model(model, get_adapter("llama"), cfg, "awq", ids, progress=False,
                                             sequential=sequential).linears
    first = [n for n in results[False] if ".layers.0." in n]
    later = [n for n in results[False] if ".layers.0." not in n]
    assert all(torch.equal(results[False][n].q, results[True][n].q) for n in first)  # layer 0 sees the same input
    assert any(not torch.equal(results[False][n].q, results[True][n].q) for n in later)


def test_calibration_blocks_start_with_bos_where_the_tokenizer_adds_it(tmp_path):
    from tokenizers import processors

    from awq_edge.quantizer.calib import calibration_blocks

    tok = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{3 + i % 200}" for i in range(3000)))
    assert (calibration_blocks(tok, str(text), 4, 32)[:, 0] != tok.bos_token_id).all()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    blocks = calibration_blocks(tok, str(text), 4, 32)
    assert blocks.shape == (4, 32) and (blocks[:, 0] == tok.bos_token_id).all()
    assert (blocks[:, 1:] != tok.bos_token_id).all()


def test_gptq_sink_weighting_changes_gptq_and_leaves_awq_alone():
    ids = _calib()
    cfg = QConfig(3, 32, True)
    out = {}
    for method in ("gptq", "awq"):
        for sink in (0.0, 0.5):
            res = quantize_model(tiny_model("llama"), get_adapter("llama"), cfg, method, ids, progress=False,
                                 gptq_sink=sink)
            out[method, sink] = res.linears
    changed = [n for n in out["gptq", 0.0] if not torch.equal(out["gptq", 0.0][n].q, out["gptq", 0.5][n].q)]
    assert changed
    assert all(torch.equal(out["awq", 0.0][n].q, out["awq", 0.5][n].q) for n in out["awq", 0.0])
