"""A float model as the quantiser sees it: its decoder layers one at a time, and the parts around them.

`FileModel` reads a Hugging Face folder's safetensors layer by layer, so the
whole model is never in host or GPU memory at once: only the embeddings, the
final norm and the rotary tables are resident (the head is never loaded).
`LoadedModel` wraps an nn.Module already in memory (the Python API, tests,
the quality benchmark). Both record the decoder layers' call arguments from the
model's own forward, so masks and rotary tables are the model's, not ours.
"""

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from awq_edge.checkpoint.hf_folder import check_values, load_config, tensor_files
from awq_edge.errors import AwqEdgeError


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: keeps its input and arguments, passes the input on."""

    def __init__(self, calls: list, n_layers: int, attention_type=None):
        super().__init__()
        self.calls, self.n_layers, self.attention_type = calls, n_layers, attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if len(self.calls) == self.n_layers:
            raise _StopForward
        return hidden_states


@torch.no_grad()
def _record(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor):
    """(first layer input, [(args, kwargs)] of every layer) for one batch of token ids."""
    calls = []
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(calls, len(originals), getattr(layer, "attention_type", None))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(calls) != len(originals):
        raise RuntimeError(f"recorded {len(calls)} decoder layer calls, expected {len(originals)}")
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


class LoadedModel:
    """A transformers model in memory; quantised layers are written back into it."""

    def __init__(self, model: nn.Module, adapter):
        self.model, self.adapter, self.config = model, adapter, model.config
        self.layers = adapter.layers(model)
        self.n_layers = len(self.layers)

    def record(self, input_ids: torch.Tensor):
        device = next(self.model.parameters()).device
        return _record(self.model, self.layers, input_ids.to(device))

    def layer(self, i: int, device, dtype) -> nn.Module:
        for name, p in self.layers[i].named_parameters():
            check_values(f"{self.adapter.layers_path}.{i}.{name}", p.data, "the model")
        return self.layers[i].to(device)

    def release(self, i: int, layer: nn.Module) -> None:
        self.layers[i] = layer.to("cpu")

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


class FileModel:
    """A Hugging Face folder read tensor by tensor from its safetensors files."""

    def __init__(self, path: Path, adapter, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        self.path, self.adapter, self.dtype = Path(path), adapter, dtype
        self.config = load_config(self.path)
        self.files = tensor_files(self.path)
        self.n_layers = self.config.num_hidden_layers
        # The model is built on the meta device (no memory), then only what the recording runs is made real:
        # the embeddings and final norm from the files, and buffers (rotary tables) from a copy of the model
        # with no layers and a one-row vocabulary, computed by transformers itself.
        with torch.device("meta"):
            self.shell = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.layers = adapter.layers(self.shell)
        self.decoder_layers = list(self.layers)  # on the meta device until `layer(i)` loads one
        for i, layer in enumerate(self.decoder_layers):
            self.layers[i] = nn.Identity()
            self.layers[i].attention_type = getattr(layer, "attention_type", None)
        self.shell.eval()
        head = next(name for name, m in self.shell.named_modules() if m is self.shell.get_output_embeddings())
        keys = [k for k in self.shell.state_dict() if not k.startswith(head + ".")]  # the head never runs here
        buffers = _computed_buffers(self.config, dtype)
        params = self._read([k for k in keys if k not in buffers])
        self.shell.load_state_dict({**params, **{k: buffers[k] for k in keys if k in buffers}}, strict=False,
                                   assign=True)
        for name, b in self.shell.named_buffers():
            if b.is_meta and name in buffers:
                self.shell.get_submodule(name.rpartition(".")[0]).register_buffer(
                    name.rpartition(".")[2], buffers[name], persistent=False)

    def _read(self, keys, device="cpu", cast: bool = True) -> dict:
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise AwqEdgeError(
                f"{self.path} lacks tensors its config needs: {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''}",
                "re-download or re-save the model folder (save_pretrained writes every tensor)",
            )
        out = {}
        by_file = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as f:
                for k in names:
                    out[k] = f.get_tensor(k).to(self.dtype) if cast else f.get_tensor(k)
        return out

    def check_weights(self) -> None:
        """Every stored weight finite and of a sane size (hf_folder.check_values), one tensor at a time, before any
        work: a corrupt file must not stop the layer loop half way, or quantise silently to garbage."""
        by_file = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in names:
                    check_values(name, f.get_tensor(name), self.path)

    def record(self, input_ids: torch.Tensor):
        return _record(self.shell, self.layers, input_ids)

    def layer(self, i: int, device, dtype=None) -> nn.Module:
        layer = self.decoder_layers[i]
        prefix = f"{self.adapter.layers_path}.{i}."
        names = list(layer.state_dict())
        state = self._read([prefix + n for n in names], device)
        layer = layer.to_empty(device=device)
        layer.load_state_dict({n: state[prefix + n] for n in names}, assign=True)
        return layer.eval()

    def release(self, i: int, layer: nn.Module) -> None:
        self.decoder_layers[i] = layer.to("meta")

    def module(self, path: str) -> nn.Module:
        """A resident part outside the decoder layers (the final norm)."""
        return self.shell.get_submodule(path)

    def outside_names(self) -> list:
        """Every tensor that is not part of a decoder layer (a tied head is not stored)."""
        prefix = f"{self.adapter.layers_path}."
        keys = [k for k in self.files if not k.startswith(prefix)]
        return [k for k in keys if not (self.config.tie_word_embeddings and k == "lm_head.weight")]

    def read(self, name: str) -> torch.Tensor:
        """One tensor in the dtype its file holds."""
        return self._read([name], cast=False)[name]

    def close(self) -> None:
        """Drop the resident float parts (embeddings, norms); recording no longer works."""
        self.shell = self.layers = None


def _computed_buffers(config, dtype) -> dict:
    """The buffers transformers computes at construction (rotary inverse frequencies), from a layerless copy."""
    from transformers import AutoModelForCausalLM

    small = copy.deepcopy(config)
    small.num_hidden_layers = 0
    small.vocab_size = (getattr(config, "pad_token_id", None) or 0) + 1
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(small, dtype=dtype)
    return dict(model.named_buffers())
