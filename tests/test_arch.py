"""Folding AWQ scales into the previous op leaves every supported architecture's float outputs unchanged."""

import pytest
import torch

from awq_edge.arch import SUPPORTED, fold_scale, get_adapter
from awq_edge.errors import AwqEdgeError
from conftest import ARCHS, tiny_model


@pytest.mark.parametrize("model_type,overrides", [(a, {}) for a in ARCHS] + [
    ("llama", {"num_key_value_heads": 4}),  # no GQA: v_proj -> o_proj is folded too
    ("phi3", {"num_key_value_heads": 4}),
])
def test_folding_scales_keeps_logits(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    adapter = get_adapter(model.config.model_type)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    folded = 0
    gen = torch.Generator().manual_seed(1)
    for layer in adapter.layers(model):
        groups = adapter.groups(layer, model.config)
        if overrides.get("num_key_value_heads") == 4:
            assert any(g.linears[-1].endswith("o_proj") for g in groups)
        for g in groups:
            n = layer.get_submodule(g.linears[0]).in_features
            w_before = layer.get_submodule(g.linears[0]).weight.clone()
            fold_scale(layer, g, 0.25 + 3 * torch.rand(n, generator=gen), adapter.norm_offset)
            assert not torch.allclose(layer.get_submodule(g.linears[0]).weight, w_before)
            folded += 1
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert folded >= 3 * len(adapter.layers(model))
    assert (after - before).abs().max().item() < 1e-4


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(AwqEdgeError) as e:
        get_adapter("gpt2")
    assert "gpt2" in str(e.value) and all(t in str(e.value) for t in SUPPORTED)


@pytest.mark.parametrize("model_type", ARCHS)
def test_every_tensor_the_family_description_names_exists_in_a_model_of_that_family(model_type):
    model = tiny_model(model_type, tie_word_embeddings=True)
    f = get_adapter(model_type)
    names = set(model.state_dict())
    layer = f"{f.layers_path}.0"
    parts = [*f.qkv, f.o, *f.gate_up, f.down, *f.qk_norms]
    norms = [n for n in (f.attn_norm, f.mlp_norm, f.attn_out_norm, f.mlp_out_norm) if n]
    assert {f"{layer}.{n}.weight" for n in parts + norms} | {f"{f.embed}.weight", f"{f.final_norm}.weight"} <= names


def test_a_description_reads_each_layers_window_and_rope_from_the_config():
    from awq_edge.arch import describe

    config = tiny_model("gemma3_text", layer_types=["sliding_attention", "full_attention"]).config.to_dict()
    spec = describe(config)
    assert spec.windows == (8, 0) and spec.rope_kinds == ("sliding_attention", "full_attention")
    assert spec.ropes["sliding_attention"][0][1] != spec.ropes["full_attention"][0][1]  # theta 1e4 and 1e6
    assert spec.query_scale == 16 ** -0.5 and spec.embed_scale == 64 ** 0.5 and spec.activation == "gelu_tanh"


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}},
     "rope type 'longrope' changes with sequence length"),
    ({"hidden_act": "relu"}, "activation 'relu' of phi3 is not supported"),
    ({"model_type": "gpt2"}, "unsupported architecture 'gpt2'"),
])
def test_what_a_description_cannot_express_is_refused_in_one_line(change, message):
    from awq_edge.arch import describe

    config = {**tiny_model("phi3").config.to_dict(), **change}
    with pytest.raises(AwqEdgeError) as e:
        describe(config)
    assert message in str(e.value) and "\n" not in str(e.value)
