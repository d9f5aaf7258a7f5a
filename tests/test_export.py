"""export/: graph parity with PyTorch, lossless MatMulNBits import, target op sets, and bad input."""

import errno
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from awq_edge.export import folder
from awq_edge.export.api import export, export_options
from awq_edge.export.decoder import IR_VERSION, OPSET, ExportOptions
from safetensors.torch import save_file

from awq_edge.errors import AwqEdgeError
from awq_edge.packing import from_matmul_nbits, to_awq_gemm
from awq_edge.quant import QConfig, dequantize, quantize
from awq_edge.runtime.ort import OrtDecoder

# Per family: config fields beside the common tiny shape that switch on what the family adds to the Llama block.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=32),
    "phi3": {},
    "gemma": dict(head_dim=32, hidden_act="gelu_pytorch_tanh"),
    # Gemma 2/3: a sliding layer and a global one, query scaling unlike head_dim; Gemma 2 soft-caps scores and logits
    "gemma2": dict(head_dim=32, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                   query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3_text": dict(head_dim=32, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                        query_pre_attn_scalar=24, rope_parameters={
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}}),
}
NEW_FAMILIES = ["qwen3", "phi3", "gemma", "gemma2", "gemma3_text"]
# Ops TensorRT 10.3's ONNX parser (JetPack 6) handles, plus our plugin's MatMulNBits.
TRT_OPS = {
    "Gather", "MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "Sqrt", "Reciprocal", "ReduceMean", "Cast", "Sigmoid",
    "Reshape", "Transpose", "Concat", "Slice", "Neg", "Unsqueeze", "Shape", "Range", "LessOrEqual", "Greater",
    "And", "Where", "Softmax", "DequantizeLinear", "MatMulNBits", "Split", "Tanh", "Erf",
}


def write_checkpoint(folder, family="llama", symmetric=False, group_size=32, tied=True, seed=0, **config_overrides):
    """A tiny random model quantised to 4 bits and saved as an AutoAWQ GEMM checkpoint.

    Norm weights are random (so Gemma's 1 + w and the q/k norms matter). Returns (the float model with the same
    dequantised weights, {linear name: (q, scales, zeros)}).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    fields = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tied, max_position_embeddings=256,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    fields.update(FAMILIES[family])
    fields.update(config_overrides)
    config = AutoConfig.for_model(family, **fields)
    config._attn_implementation = "eager"  # the reference soft-caps scores where a fused kernel would not
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if family.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif family == "qwen2" and name.endswith("bias"):  # random q/k/v biases; a fresh model zeroes them
                p.normal_(0, 0.5)
    cfg = QConfig(4, group_size, zero_point=not symmetric)
    tensors, ints = {}, {}
    for key, value in model.state_dict().items():
        name = key.rsplit(".", 1)[0]
        if key.endswith("proj.weight"):
            q, scales, zeros = quantize(value, cfg)
            ints[name] = (q, scales, zeros)
            tensors.update({f"{name}.{k}": v for k, v in to_awq_gemm(q, scales, zeros, group_size).items()})
            model.get_submodule(name).weight.data = dequantize(q, scales, zeros, group_size)
        elif not (tied and key == "lm_head.weight"):
            tensors[key] = value.half()
            value.copy_(value.half().float())
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    meta = config.to_dict()
    meta["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                   "version": "gemm", "modules_to_not_convert": None}
    (folder / "config.json").write_text(json.dumps(meta))
    return model, ints


def blow_up_residual(folder, model):
    """Set layer 0's last norm (Gemma 2/3's post_feedforward_layernorm) to 1 + 6e4, so that the residual stream
    passes fp16's range as Gemma-3-270M's does (1.0e5), in the checkpoint and in `model` alike; returns the
    stream's max |h|."""
    from safetensors.torch import load_file

    name = "model.layers.0.post_feedforward_layernorm.weight"
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = torch.full_like(tensors[name], 6e4)
    save_file(tensors, folder / "model.safetensors")
    model.get_submodule(name.rsplit(".", 1)[0]).weight.data = tensors[name].float()
    with torch.no_grad():
        states = model(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
    return max(float(h.abs().max()) for h in states)


def run_full(folder, ids):
    """Logits [S, V] of the exported model for a prompt, through the runtime's cache-free first call."""
    return OrtDecoder(folder).forward(ids)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck") / "llama"
    model, ints = write_checkpoint(folder)
    return folder, model, ints


PROMPT = [5, 17, 42, 99, 3, 200, 7, 64, 128, 11, 250, 31]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_fp32_export_logits_match_pytorch_with_same_dequantised_weights(tmp_path, family, target):
    model, _ = write_checkpoint(tmp_path / "ck", family=family)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(target=target))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    got = run_full(out, PROMPT)
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def prefill_and_steps(out, split=3):
    """Logits of PROMPT through the exported folder: the whole prompt at once, and a prefill of `split` tokens
    followed by one cached step per token."""
    decoder = OrtDecoder(out)
    steps = np.concatenate([decoder.forward(PROMPT[:split])] + [decoder.forward([t]) for t in PROMPT[split:]])
    return run_full(out, PROMPT), steps


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("target", ["ort", "trt"])
@pytest.mark.parametrize("tied", [True, False])
def test_every_family_matches_pytorch_in_prefill_and_cached_steps_with_identical_greedy_tokens(
        tmp_path, family, target, tied):
    model, _ = write_checkpoint(tmp_path / "ck", family=family, tied=tied)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(target=target))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    for got in prefill_and_steps(out):
        assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
        assert np.array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_mistral_sliding_window_matches_pytorch_in_prefill_and_cached_steps(tmp_path, target):
    model, _ = write_checkpoint(tmp_path / "ck", family="mistral", sliding_window=4)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(target=target))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    decoder = OrtDecoder(out)
    steps = np.concatenate([decoder.forward(PROMPT[:3])] + [decoder.forward([t]) for t in PROMPT[3:]])
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-4 * np.abs(ref).max()
    assert np.abs(steps - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("family", ["llama"] + NEW_FAMILIES)
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_fp16_export_logits_stay_close_to_pytorch(tmp_path, family, target):
    folder = tmp_path / "ck"
    model, _ = write_checkpoint(folder, family=family)
    out = export(folder, tmp_path / "onnx", ExportOptions(target=target, dtype="fp16"))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_fp16_export_keeps_a_residual_stream_beyond_fp16_range_in_fp32(tmp_path, family, target):
    model, _ = write_checkpoint(tmp_path / "ck", family=family)
    assert blow_up_residual(tmp_path / "ck", model) > 65504
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(target=target, dtype="fp16"))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    for got in prefill_and_steps(out):
        assert np.isfinite(got).all() and np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()


def test_untied_lm_head_is_exported_from_its_own_weight(tmp_path):
    model, _ = write_checkpoint(tmp_path / "ck", tied=False)
    out = export(tmp_path / "ck", tmp_path / "onnx")
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-4 * np.abs(ref).max()


def initializers(folder) -> dict:
    model = onnx.load(str(folder / "model.onnx"))  # loads the external data beside it
    return {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer}


@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_nbits_holds_the_checkpoint_integers_scales_and_zero_points_bit_for_bit(tmp_path, symmetric):
    """A symmetric checkpoint's linears store no zero points (each is 8, MatMulNBits' default) and read the same."""
    model, ints = write_checkpoint(tmp_path / "ck", symmetric=symmetric)
    out = export(tmp_path / "ck", tmp_path / "onnx")
    w = initializers(out)

    def weights(name, k):
        b, s = torch.from_numpy(w[f"{name}.qweight"]), torch.from_numpy(w[f"{name}.scales"])
        assert (f"{name}.qzeros" in w) != symmetric, name
        z = torch.from_numpy(w[f"{name}.qzeros"]) if not symmetric else torch.full(
            (b.shape[0], (b.shape[1] + 1) // 2), 0x88, dtype=torch.uint8)
        return from_matmul_nbits(b, s, z, k=k, block_size=32, bits=4)

    for layer in range(2):
        p = f"model.layers.{layer}"
        q, scales, zeros = weights(f"{p}.self_attn.qkv_proj", 128)
        parts = [ints[f"{p}.self_attn.{n}_proj"] for n in "qkv"]
        assert torch.equal(q, torch.cat([x[0] for x in parts]))
        assert torch.equal(scales, torch.cat([x[1] for x in parts]))
        assert torch.equal(zeros, torch.cat([x[2] for x in parts]))
        for name in (f"{p}.self_attn.o_proj", f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj", f"{p}.mlp.down_proj"):
            q0, s0, z0 = ints[name]
            q, scales, zeros = weights(name, q0.shape[1])
            assert torch.equal(q, q0) and torch.equal(scales, s0) and torch.equal(zeros, z0)
    nodes = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    assert {len(n.input) for n in nodes if n.op_type == "MatMulNBits"} == {3 if symmetric else 4}
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-4 * np.abs(ref).max()


def test_trt_native_int4_weights_are_the_checkpoint_integers_minus_eight(tmp_path):
    model, ints = write_checkpoint(tmp_path / "ck", symmetric=True)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(target="trt", trt_native=True))
    w = initializers(out)
    for name, (q, scales, _) in ints.items():
        assert np.array_equal(w[f"{name}.qweight"].astype(np.int16), (q.short() - 8).t().numpy())
        assert np.array_equal(w[f"{name}.scales"], scales.t().numpy())
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-4 * np.abs(ref).max()


def test_trt_native_refuses_asymmetric_weights_naming_no_zero_point(tmp_path, ckpt):
    with pytest.raises(AwqEdgeError, match="--no-zero-point"):
        export(ckpt[0], tmp_path / "onnx", ExportOptions(target="trt", trt_native=True))
    assert not (tmp_path / "onnx").exists()


def test_a_symmetric_trt_export_reaches_the_engine_check_without_zero_points(tmp_path):
    """A --no-zero-point checkpoint's --target trt export now stores no zero points on its MatMulNBits (above), so the
    engine's int4 check lets it past TensorRT-RTX's refusal of zero points (the plugin library is still asked for);
    an asymmetric one is refused as before."""
    from awq_edge.engine import plan
    from awq_edge.engine.devices import get_profile

    rtx = get_profile("rtx-4090")
    for symmetric in (True, False):
        write_checkpoint(tmp_path / f"ck{symmetric}", symmetric=symmetric)
        out = export(tmp_path / f"ck{symmetric}", tmp_path / f"onnx{symmetric}", ExportOptions(target="trt"))
        counts = plan.int4_nodes(onnx.load(str(out / "model.onnx"), load_external_data=False))
        assert counts["matmul_nbits"] > 0 and counts["matmul_nbits_zero_points"] == (0 if symmetric else
                                                                                      counts["matmul_nbits"])
        if symmetric:
            plan.check_int4_path(counts, rtx, "libawq_edge_trt_plugin.so")
        else:
            with pytest.raises(AwqEdgeError, match="refuses zero points"):
                plan.check_int4_path(counts, rtx, "libawq_edge_trt_plugin.so")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("native", [False, True])
def test_trt_target_uses_only_ops_tensorrt_parses(tmp_path, native, family):
    model, _ = write_checkpoint(tmp_path / "ck", family=family, symmetric=True)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(target="trt", trt_native=native))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-4 * np.abs(ref).max()
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    used = {n.op_type for n in model.graph.node}
    assert used <= TRT_OPS, used - TRT_OPS
    assert ("MatMulNBits" in used) != native and ("DequantizeLinear" in used) == native


def test_ort_target_uses_fused_onnxruntime_ops(tmp_path, ckpt):
    model = onnx.load(str(export(ckpt[0], tmp_path / "onnx") / "model.onnx"), load_external_data=False)
    used = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "MatMulNBits", "SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization"} <= used


def test_model_declares_ir_10_and_opset_21_with_weights_as_external_data(tmp_path, ckpt):
    out = export(ckpt[0], tmp_path / "onnx")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert (model.ir_version, IR_VERSION) == (10, 10)
    assert {o.domain: o.version for o in model.opset_import} == {"": OPSET, "com.microsoft": 1}
    assert (out / folder.DATA_FILE).stat().st_size > (out / folder.MODEL_FILE).stat().st_size
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_key_value_heads"] == 2 and genai["model"]["eos_token_id"] == 0


@pytest.mark.parametrize("options, providers", [
    ({}, []), ({"dtype": "fp16"}, [{"cuda": {"enable_cuda_graph": "1"}}]), ({"target": "trt", "dtype": "fp16"}, [])])
def test_genai_config_names_cuda_with_graphs_for_the_fp16_onnxruntime_export(tmp_path, ckpt, options, providers):
    """The fp16 export is the GPU's: onnxruntime-genai runs it on CUDA, replaying its decode steps as CUDA graphs,
    with no provider set by the caller; the CPU (fp32) and TensorRT folders name none."""
    out = export(ckpt[0], tmp_path / "onnx", export_options(options.pop("target", "ort"), exact=True, **options))
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"] == providers


def test_sharded_hub_checkpoint_exports_like_a_single_file(tmp_path, ckpt):
    folder = tmp_path / "hub"
    shutil.copytree(ckpt[0], folder)
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    a = run_full(export(ckpt[0], tmp_path / "a"), PROMPT)
    b = run_full(export(folder, tmp_path / "b"), PROMPT)
    assert np.array_equal(a, b)


def test_folder_without_config_is_refused_as_not_a_checkpoint(tmp_path):
    with pytest.raises(AwqEdgeError, match="not a quantised checkpoint"):
        export(tmp_path, tmp_path / "onnx")


def test_float_model_folder_is_refused_with_quantise_first_fix(tmp_path, ckpt):
    folder = tmp_path / "float"
    shutil.copytree(ckpt[0], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AwqEdgeError, match="awq-edge quantize"):
        export(folder, tmp_path / "onnx")


def test_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path, ckpt):
    folder = tmp_path / "gpt2"
    shutil.copytree(ckpt[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AwqEdgeError, match="llama, mistral, qwen2"):
        export(folder, tmp_path / "onnx")


def test_pickled_weights_are_never_loaded(tmp_path, ckpt):
    folder = tmp_path / "bin"
    shutil.copytree(ckpt[0], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(AwqEdgeError, match="never loaded"):
        export(folder, tmp_path / "onnx")


def test_unwritable_output_path_fails_cleanly(tmp_path, ckpt):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AwqEdgeError, match="could not write"):
        export(ckpt[0], blocker / "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_full_disk_leaves_no_partial_folder_and_keeps_the_earlier_export(tmp_path, ckpt, monkeypatch):
    out = export(ckpt[0], tmp_path / "onnx")
    before = (out / folder.DATA_FILE).read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", no_space)
    with pytest.raises(AwqEdgeError, match="No space left on device"):
        export(ckpt[0], tmp_path / "onnx", ExportOptions(dtype="fp16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert (out / folder.DATA_FILE).read_bytes() == before


def test_non_empty_folder_that_is_not_an_export_is_not_overwritten(tmp_path, ckpt):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(AwqEdgeError, match="not an awq-edge export"):
        export(ckpt[0], tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_session_outputs_use_the_names_genai_expects(tmp_path, ckpt):
    out = export(ckpt[0], tmp_path / "onnx")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]


def assert_equals_pytorch_with_head(out, model, weight):
    """The export's logits equal PyTorch's with the head's weight replaced; with a tied head the embeddings are
    replaced too."""
    model.lm_head.weight.data = weight
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_head_bits_export_equals_pytorch_with_that_head_rounded(tmp_path, tied, bits):
    model, _ = write_checkpoint(tmp_path / "ck", tied=tied)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(head_bits=bits))
    head = quantize(model.lm_head.weight.data, QConfig(bits, 32, zero_point=True))
    assert_equals_pytorch_with_head(out, model, dequantize(*head, 32))
    used = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert ("GatherBlockQuantized" in used) == tied and "Gemm" not in used


def test_head_bits_is_refused_for_tensorrt(tmp_path, ckpt):
    with pytest.raises(AwqEdgeError, match="--head-bits 8 with --target trt"):
        export(ckpt[0], tmp_path / "onnx", ExportOptions(target="trt", head_bits=8))


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_scaled_rope_llama3_matches_pytorch(tmp_path, target):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model, _ = write_checkpoint(tmp_path / "ck", rope_parameters=rope)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(target=target))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(run_full(out, PROMPT) - ref).max() < 1e-4 * np.abs(ref).max()


def test_rope_that_depends_on_sequence_length_is_refused(tmp_path):
    write_checkpoint(tmp_path / "ck", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(AwqEdgeError, match="changes with sequence length"):
        export(tmp_path / "ck", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_head_stores_no_zero_points_and_equals_pytorch_with_that_head(tmp_path, tied, bits):
    model, _ = write_checkpoint(tmp_path / "ck", tied=tied)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(head_bits=bits, head_symmetric=True))
    head = quantize(model.lm_head.weight.data, QConfig(bits, 32, zero_point=False))
    assert_equals_pytorch_with_head(out, model, dequantize(*head, 32))
    names = {t.name for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert "lm_head.qweight" in names and "lm_head.qzeros" not in names


def write_calibration_text(path, n_words=6000, seed=0):
    """Words of the tiny tokenizer (w3..w255), enough for 16 blocks of 512 tokens."""
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(f"w{i}" for i in rng.integers(3, 256, n_words * 2)))
    return path


@pytest.mark.parametrize("symmetric", [True, False])
def test_head_calib_export_equals_pytorch_with_the_head_searched_on_real_activations(tmp_path, symmetric):
    """--head-calib: the export's head is the activation-weighted search's, computed from this model's final norm."""
    from awq_edge.export.head import final_norm_moments, quantize_weighted
    from conftest import save_tiny_tokenizer

    from awq_edge.checkpoint.hf_folder import load_tokenizer
    from awq_edge.quantizer.calib import calibration_blocks

    model, _ = write_checkpoint(tmp_path / "ck")
    save_tiny_tokenizer(tmp_path / "ck")
    text = write_calibration_text(tmp_path / "calib.txt")
    out = export(tmp_path / "ck", tmp_path / "onnx",
                 ExportOptions(head_bits=4, head_calib=str(text), head_symmetric=symmetric))
    # The moments independently: the float model's last hidden state is the final norm's output.
    blocks = calibration_blocks(load_tokenizer(tmp_path / "ck"), str(text), 16, 512)
    with torch.no_grad():
        x = model.model(input_ids=blocks).last_hidden_state.reshape(-1, 128).double()
    moments = x.pow(2).mean(0).float()
    assert torch.allclose(final_norm_moments(tmp_path / "ck", str(text)), moments, rtol=1e-4)
    head = quantize_weighted(model.lm_head.weight.data.clone(), moments, 4, 32, symmetric)
    assert_equals_pytorch_with_head(out, model, dequantize(*head, 32))
    info = json.loads((out / "awq_edge_export.json").read_text())
    assert info["head_calib"] == str(text) and info["head_symmetric"] == symmetric


@pytest.mark.parametrize("symmetric", [True, False])
def test_weighted_head_search_has_less_weighted_error_than_round_to_nearest(symmetric):
    from awq_edge.export.head import quantize_weighted

    torch.manual_seed(0)
    w = torch.randn(512, 128)
    w[:, 5] *= 8  # a large-weight channel that the activations barely read
    moments = torch.rand(128) * 0.1
    moments[[7, 40]] = 50.0  # two outlier channels, as after a real final norm

    def weighted_error(q, scales, zeros):
        return ((dequantize(q, scales, zeros, 32) - w).pow(2) * moments).sum(-1)

    q, scales, zeros = quantize_weighted(w, moments, 4, 32, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == (512, 4)
    if symmetric:
        assert bool((zeros == 8).all())
    searched = weighted_error(q, scales, zeros)
    rtn = weighted_error(*quantize(w, QConfig(4, 32, zero_point=not symmetric)))
    assert searched.sum() < 0.8 * rtn.sum()
    if symmetric:  # round-to-nearest is a point of the symmetric grid, so no row can be worse
        assert bool((searched <= rtn * (1 + 1e-5)).all())


def test_head_calib_without_a_tokenizer_is_refused_clearly(tmp_path, ckpt):
    with pytest.raises(AwqEdgeError, match="--head-calib needs the checkpoint's tokenizer"):
        export(ckpt[0], tmp_path / "onnx", ExportOptions(head_bits=4, head_calib="builtin"))
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_rope_tables_computed_in_the_graph_equal_the_stored_ones(tmp_path, ckpt, dtype):
    computed = export(ckpt[0], tmp_path / "computed", ExportOptions(dtype=dtype))
    stored = export(ckpt[0], tmp_path / "stored", ExportOptions(dtype=dtype, rope_in_graph=False))
    names = {t.name for t in onnx.load(str(computed / "model.onnx"), load_external_data=False).graph.initializer}
    assert "cos_cache" not in names and "sin_cache" not in names
    assert np.array_equal(run_full(computed, PROMPT), run_full(stored, PROMPT))
    size = {f: sum(p.stat().st_size for p in f.iterdir() if p.name.startswith("model.onnx")) for f in (computed, stored)}
    table_bytes = 2 * 256 * 16 * (4 if dtype == "fp32" else 2)  # cos + sin, max_positions x head_dim / 2
    assert size[stored] - size[computed] > table_bytes - 1024


def test_head_options_without_head_bits_are_refused(tmp_path, ckpt):
    with pytest.raises(AwqEdgeError, match="add --head-bits 4"):
        export(ckpt[0], tmp_path / "onnx", ExportOptions(head_symmetric=True))
    assert not (tmp_path / "onnx").exists()
