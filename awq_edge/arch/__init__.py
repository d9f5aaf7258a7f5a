"""Model families as data: adding one is adding one short module to ADAPTERS, read by the quantiser, the exporter
and the runtimes."""

from awq_edge.arch import gemma, llama, phi3
from awq_edge.arch.base import Adapter, ScaleGroup, fold_scale
from awq_edge.arch.spec import Dims, Spec, describe, rope_tables
from awq_edge.errors import AwqEdgeError

ADAPTERS = (llama.ADAPTER, llama.QWEN3, phi3.ADAPTER, gemma.ADAPTER, gemma.GEMMA2, gemma.GEMMA3)
SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model_type: str) -> Adapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise AwqEdgeError(
        f"unsupported architecture {model_type!r}",
        f"use a model of one of: {', '.join(SUPPORTED)}",
    )

__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "Dims", "ScaleGroup", "Spec", "describe", "fold_scale",
           "get_adapter", "rope_tables"]
