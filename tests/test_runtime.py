"""awq_edge.runtime: KV-cache decoding, sampling, stop tokens, streaming, onnxruntime-genai, CLI."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from awq_edge.export.api import export
from awq_edge.export.decoder import ExportOptions
from conftest import chat_session
from test_export import FAMILIES, PROMPT, write_checkpoint

from awq_edge.cli import main
from awq_edge.errors import AwqEdgeError
from awq_edge.runtime.generate import generate, stream_text
from awq_edge.runtime.ort import OrtDecoder, argmax
from awq_edge.runtime.sampling import Sampling, next_token, top_p_filter


def save_byte_tokenizer(folder):
    """A 256-token byte-level tokenizer with a chat template, matching the tiny model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt")
    model, _ = write_checkpoint(root / "ck")
    save_byte_tokenizer(root / "ck")
    return {t: export(root / "ck", root / t, ExportOptions(target=t)) for t in ("ort", "trt")}, model, root


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_prefill_then_cached_single_token_steps_match_one_full_forward(exported, target):
    folders, model, _ = exported
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].numpy()
    d = OrtDecoder(folders[target])
    steps = [d.forward(PROMPT[:5])] + [d.forward([t]) for t in PROMPT[5:]]
    assert np.abs(np.concatenate(steps) - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_a_prompt_with_last_only_converts_only_its_last_row(exported, target):
    """extend() (every prompt of generate and chat) asks for the last row only: the same float32 row as the whole
    prompt's last, through the shared buffer's first growth (ort) and the separate past -> present tensors (trt)."""
    folders, _, _ = exported
    d = OrtDecoder(folders[target])
    whole = d.forward(PROMPT)
    d.reset()
    last = d.forward(PROMPT, last_only=True)
    assert whole.shape == (len(PROMPT), whole.shape[1]) and last.shape == (1, whole.shape[1])
    assert last.dtype == np.float32 and np.array_equal(last, whole[-1:])
    d.reset()
    assert np.array_equal(d.extend(PROMPT), whole[-1])


def test_float_logits_cast_in_an_fp16_graph_give_the_fp16_graphs_logits(tmp_path):
    """ExportOptions.float_logits: an fp16 graph whose logits output is float32 (cast on the provider) gives the
    same logits as the fp16 graph's output converted on the host, step by step."""
    write_checkpoint(tmp_path / "ck")
    half = export(tmp_path / "ck", tmp_path / "half", ExportOptions(dtype="fp16"))
    full = export(tmp_path / "ck", tmp_path / "full", ExportOptions(dtype="fp16", float_logits=True))
    types = {f: onnx.load(str(f / "model.onnx"), load_external_data=False).graph.output[0].type.tensor_type.elem_type
             for f in (half, full)}
    assert (types[half], types[full]) == (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT)
    fp32 = export(tmp_path / "ck", tmp_path / "fp32", ExportOptions(float_logits=True))  # nothing to cast
    assert [json.loads((f / "awq_edge_export.json").read_text())["float_logits"] for f in (half, full, fp32)] == [
        False, True, False]
    a, b = OrtDecoder(half), OrtDecoder(full)
    assert a.step_logits.dtype == np.float16 and b.step_logits.dtype == np.float32
    for d in (a, b):
        d.steps = [d.extend(PROMPT[:5])] + [d.forward([t])[-1] for t in PROMPT[5:]]
    assert np.array_equal(np.stack(a.steps), np.stack(b.steps))
    # generate's greedy loop reads the fp16 graph's logits without converting them: the forward loop's tokens
    for d in (a, b):
        d.extend(PROMPT)
    first = int(np.argmax(a.forward([PROMPT[-1]])[-1]))
    assert [first] + list(a.greedy_tokens(first, 11)) == forward_greedy(b, PROMPT[-1], 12)


def forward_greedy(d, token: int, n: int) -> list:
    """The n ids that follow `token` through forward() and numpy's argmax of its float32 logits: the loop
    greedy_tokens must equal."""
    out = []
    for _ in range(n):
        token = int(np.argmax(d.forward([token])[-1]))
        out.append(token)
    return out


def test_each_greedy_step_binds_its_id_again(exported):
    """Binding copies a host input to the device where a node there reads it (the CUDA provider's embedding), so a
    step must bind its id again, not only rewrite the host array bound before: an H200 run of the bound-once form
    fed every step the id the array held when it was bound (bench/results/gpu_tests_ort_cuda_h200_bindonce.txt). The
    CPU provider reads the array itself, so this checks the binding calls, on both step paths."""
    for bound_inputs in (True, False):
        d = OrtDecoder(exported[0]["ort"], bound_inputs=bound_inputs)
        assert d.step_logits is not None and d.bound_inputs == bound_inputs  # the steps take _step, not forward
        first = int(np.argmax(d.extend(PROMPT)))
        bound, bind = [], d.binding.bind_ortvalue_input
        d.binding.bind_ortvalue_input = lambda name, value, bound=bound, bind=bind: bound.append(
            (name, int(value.numpy().ravel()[0]))) or bind(name, value)
        tokens = list(d.greedy_tokens(first, 5))
        assert [v for n, v in bound if n == "input_ids"] == [first] + tokens[:-1], bound_inputs  # once a step


def test_fixed_buffers_and_cuda_graphs_refuse_what_they_cannot_run(exported, tmp_path):
    """A CUDA graph needs the CUDA provider; fixed buffers need GroupQueryAttention's shared cache (the trt target's
    graph keeps separate past and present tensors)."""
    folders = exported[0]
    with pytest.raises(AwqEdgeError, match="CUDA graph needs the CUDA provider"):
        OrtDecoder(folders["ort"], cuda_graph=True)
    with pytest.raises(AwqEdgeError, match="cannot step through fixed buffers"):
        OrtDecoder(folders["trt"], fixed_buffers=True)


def test_a_graph_step_onnxruntime_refuses_falls_back_to_the_same_buffers_without_it(exported, capsys):
    """Where onnxruntime cannot capture or replay a step's CUDA graph, the decoder says so once on stderr and steps
    through the same fixed buffers without the graph (-1), with the default steps' logits. On the CPU the graph's
    replay options are stood in for and refused by the session's run."""
    folder = exported[0]["ort"]
    ref, d = OrtDecoder(folder), OrtDecoder(folder, fixed_buffers=True)
    for dec in (ref, d):
        dec.extend(PROMPT[:5])
    d.cuda_graph, d.replay = True, ort.RunOptions()  # as a graph's first replay would be
    run, seen = d.session.run_with_iobinding, []

    def refuse_graphs(binding, options):
        seen.append(options is d.eager)
        if options is not d.eager:
            raise RuntimeError("CUDA graph capture failed")
        return run(binding, options)

    d.session.run_with_iobinding = refuse_graphs
    steps = [(d.forward([t])[-1], ref.forward([t])[-1]) for t in PROMPT[5:9]]
    assert all(np.array_equal(a, b) for a, b in steps) and seen == [False, True, True, True, True]
    assert not d.cuda_graph and capsys.readouterr().err.count("stepping without a CUDA graph") == 1


def test_argmax_of_float16_logits_is_numpys_of_their_float32_values():
    """runtime.ort.argmax compares float16 logits as ordered integers: the index np.argmax gives their float32
    values, the first of equal values, with negatives, infinities, and +0 / -0 (equal) as the largest."""
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):  # the widest row saturates to +-inf
        rows = [(rng.standard_normal(4099) * s).astype(np.float16) for s in (0.01, 3, 60000)]
    rows.append(-np.abs(rows[1]) - 1)  # all negative
    rows.append(np.round(rows[1]))  # many ties
    rows.append(np.array([-np.inf, -3, -np.inf], np.float16))
    rows.append(np.array([1, np.inf, 2, np.inf], np.float16))
    rows.append(np.array([-1, -0.0, -2, 0.0, -0.0], np.float16))  # -0 first: float says index 1
    rows.append(np.array([-1, 0.0, -0.0], np.float16))
    rows.append(np.array([-1, -0.0, -2], np.float16))
    for row in rows:
        assert argmax(row) == int(np.argmax(row.astype(np.float32)))
        assert argmax(row.astype(np.float32)) == int(np.argmax(row.astype(np.float32)))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # Gemma 3: a 5-token sliding layer beside a global one
def test_the_shared_cache_grows_past_its_first_1024_positions_with_the_same_logits(tmp_path, family):
    """GroupQueryAttention graphs keep one buffer per layer, grown by running the held tokens again: the logits
    equal those of the separate past -> present tensors across the growth, after a reset and a reused prefix, and
    transformers' own on the same weights (the sliding window honoured in the shared buffer)."""
    model, _ = write_checkpoint(tmp_path / "ck", family=family, max_position_embeddings=4096)
    out = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions())
    apart = tmp_path / "apart"
    shutil.copytree(out, apart)
    config = json.loads((apart / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = False
    (apart / "genai_config.json").write_text(json.dumps(config))
    shared, separate = OrtDecoder(out), OrtDecoder(apart)
    hostin = OrtDecoder(out, bound_inputs=False)  # a step's mask and positions as new host arrays, not views
    assert shared.shared and not separate.shared and shared.bound_inputs and not hostin.bound_inputs
    prompt = [(7 * i) % 256 for i in range(1020)]
    for d in (shared, separate, hostin):  # a prompt, steps across 1024, a longer prompt across 2048 that extends the cache
        d.steps = [d.extend(prompt)] + [d.forward([t])[-1] for t in range(3, 11)]
        d.steps.append(d.extend(d.tokens + [(5 * i) % 256 for i in range(1100)]))
        d.steps.append(d.extend([1, 2, 3]))  # not a prefix: a reset, the grown buffers kept
    assert shared.capacity == 4096
    for a, b, c in zip(shared.steps, separate.steps, hostin.steps):
        assert np.abs(a - b).max() < 1e-4 * np.abs(b).max()
        assert np.array_equal(a, c)
    # generate's greedy loop across the growth: the bound step, then the general path where the cache grows (and
    # the fixed buffers are made again for the new size)
    greedy = [OrtDecoder(out), OrtDecoder(out, bound_inputs=False), OrtDecoder(out, fixed_buffers=True)]
    for d in (*greedy, separate):
        d.first = int(np.argmax(d.extend(prompt)))
    expected = [separate.first] + forward_greedy(separate, separate.first, 8)
    for d in greedy:
        assert [d.first] + list(d.greedy_tokens(d.first, 8)) == expected and d.capacity == 2048
    fixed = OrtDecoder(out, fixed_buffers=True)  # its single steps' logits, through a reset and the growth
    fixed.steps = [fixed.extend(prompt)] + [fixed.forward([t])[-1] for t in range(3, 11)]
    fixed.steps.append(fixed.extend(fixed.tokens + [(5 * i) % 256 for i in range(1100)]))
    fixed.steps.append(fixed.extend([1, 2, 3]))
    fixed.steps.append(fixed.forward([4])[-1])  # a step after the reset: the mask holds 4 ones, not 2048
    shared.steps.append(shared.forward([4])[-1])
    for a, b in zip(fixed.steps, shared.steps):
        assert np.array_equal(a, b)
    # transformers over the whole sequence the steps fed: the prompt, the 8 single steps, the 1100-token extension
    fed = prompt + list(range(3, 11)) + [(5 * i) % 256 for i in range(1100)]
    with torch.no_grad():
        ref = model(torch.tensor([fed])).logits[0].numpy()
    at = [len(prompt) - 1 + i for i in range(9)] + [len(fed) - 1]
    for a, i in zip(shared.steps[:10], at):
        assert np.abs(a - ref[i]).max() < 1e-3 * np.abs(ref[i]).max(), i


def test_greedy_generation_matches_pytorch_generate(exported):
    folders, model, _ = exported
    d = OrtDecoder(folders["ort"])
    d.eos_ids = set()
    ours = list(generate(d, PROMPT, 24))
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == ref


def test_generation_stops_before_a_stop_token(exported):
    folders, _, _ = exported
    d = OrtDecoder(folders["ort"])
    d.eos_ids = set()
    free = list(generate(d, PROMPT, 12))
    stopped = list(generate(d, PROMPT, 12, stop_ids=[free[4]]))
    assert stopped == free[: free.index(free[4])]


def test_extend_reuses_the_cache_when_the_prompt_grows(exported):
    folders, _, _ = exported
    d = OrtDecoder(folders["ort"])
    d.extend(PROMPT[:6])
    calls = []
    d.forward, forward = (lambda ids, **kw: calls.append(list(ids)) or forward(ids, **kw)), d.forward
    logits = d.extend(PROMPT)
    assert calls == [PROMPT[6:]]
    assert np.allclose(logits, OrtDecoder(folders["ort"]).extend(PROMPT), atol=1e-5)


def test_context_overflow_is_a_clear_error(exported):
    d = OrtDecoder(exported[0]["ort"])
    with pytest.raises(AwqEdgeError, match="exceed the model's context"):
        d.forward(list(range(200)) + list(range(100)))


def test_greedy_sampling_takes_the_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert next_token(logits, Sampling(), np.random.default_rng(0)) == 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    assert np.array_equal(top_p_filter(probs, 0.8) > 0, [False, True, True, False])
    assert np.array_equal(top_p_filter(probs, 0.81) > 0, [False, True, True, True])


def test_top_k_one_sampling_is_greedy_and_temperature_sampling_follows_the_distribution():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    assert {next_token(logits, Sampling(1.0, 1.0, 1), rng) for _ in range(50)} == {0}
    counts = np.bincount([next_token(logits, Sampling(1.0), rng) for _ in range(4000)], minlength=3) / 4000
    assert np.abs(counts - [0.7, 0.2, 0.1]).max() < 0.03
    assert {next_token(logits, Sampling(1.0, top_p=0.6), rng) for _ in range(50)} == {0}


@pytest.mark.parametrize("s", [Sampling(0.7), Sampling(1.0, 0.8), Sampling(1.3, 1.0, 3), Sampling(0.9, 0.7, 4)],
                         ids=["temperature", "top_p", "top_k", "top_k_and_top_p"])
def test_device_sampling_draws_from_the_host_samplers_distribution(s):
    """The CUDA backend's sampler (torch, on the logits' device; here the CPU) keeps next_token's support and
    probabilities, and repeats with its generator's seed."""
    from awq_edge.runtime.cuda import sample_on_device

    logits = np.array([2.0, 1.5, 1.4, 0.2, -0.5, -3.0])
    z = logits / s.temperature
    if s.top_k:
        z = np.where(z < np.sort(z)[-s.top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p = top_p_filter(p / p.sum(), s.top_p) if s.top_p < 1 else p / p.sum()
    p /= p.sum()
    t = torch.tensor(logits)
    gen = torch.Generator().manual_seed(1)
    draws = [int(sample_on_device(t, s, gen)) for _ in range(4000)]
    counts = np.bincount(draws, minlength=len(logits)) / len(draws)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(p))
    assert np.abs(counts - p).max() < 0.03
    assert int(sample_on_device(t, Sampling(), torch.Generator())) == 0  # temperature 0: the argmax
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        runs.append([int(sample_on_device(t, s, gen)) for _ in range(20)])
    assert runs[0] == runs[1]


def test_stream_text_never_emits_half_a_utf8_character():
    class Bytes:  # a byte-level tokenizer: each id is one byte
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    pieces = list(stream_text(Bytes(), iter("añ€".encode())))
    assert "".join(pieces) == "añ€" and all("\ufffd" not in p for p in pieces)


def genai_greedy(model, prompt: list, n_new: int) -> list:
    """onnxruntime-genai's greedy tokens after prompt, up to n_new (fewer at an end-of-sequence token)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n_new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


def genai_and_ours(model, folder, provider: str = "cpu", n_new: int = 12) -> tuple[list, list]:
    """onnxruntime-genai's greedy tokens after PROMPT (up to n_new) and our loop's as many on the same folder and
    provider, not stopping at an end-of-sequence id."""
    theirs = genai_greedy(model, PROMPT, n_new)
    d = OrtDecoder(folder, provider=provider)
    d.eos_ids = set()
    return theirs, list(generate(d, PROMPT, len(theirs)))


def test_onnxruntime_genai_generates_the_same_greedy_tokens_from_the_export(exported):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    folder = exported[0]["ort"]
    theirs = genai_greedy(og.Model(str(folder)), PROMPT, 16)
    ours = list(generate(OrtDecoder(folder), PROMPT, 16))
    assert len(theirs) >= 8 and theirs[: len(ours)] == ours


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_onnxruntime_genai_reads_every_familys_fp16_export_as_our_loop_does(tmp_path, family):
    """The GPU's folder (exact, fp16) of each other family on onnxruntime-genai's CPU provider: our loop's greedy
    tokens (tests/test_runtime_ort_cuda.py runs the same on CUDA, graphs on)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    write_checkpoint(tmp_path / "ck", family=family)
    save_byte_tokenizer(tmp_path / "ck")
    folder = export(tmp_path / "ck", tmp_path / "onnx", ExportOptions(dtype="fp16"))
    config = og.Config(str(folder))
    config.clear_providers()  # the folder names CUDA; this machine has none
    theirs, ours = genai_and_ours(og.Model(config), folder)
    assert len(theirs) >= 8 and theirs == ours


def test_generate_on_a_quantised_checkpoint_says_to_export_first(exported, capsys):
    _, _, root = exported
    assert main(["generate", str(root / "ck"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "awq-edge export" in err and len(err.strip().splitlines()) == 1


def test_export_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a quantised checkpoint" in err[0]
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"


def expected_reply(folder, text, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    return tok.decode(list(generate(OrtDecoder(folder), list(ids), n)), skip_special_tokens=True)


def test_generate_command_streams_the_greedy_reply(exported, capsys):
    folder = exported[0]["ort"]
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected_reply(folder, "hi", 8) + "\n"


def test_chat_command_answers_each_turn_and_reset_forgets_the_conversation(exported, capsys, monkeypatch):
    folder = exported[0]["ort"]
    chat_session(monkeypatch, ["hi", "/reset", "", "yo"])
    assert main(["chat", str(folder), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out == expected_reply(folder, "hi", 6) + "\n" + expected_reply(folder, "yo", 6) + "\n"
