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
