"""LALM adapters: one per model, all behind ``esn_core.models.base.LALMAdapter``."""

from esn_core.models.base import (
    GROUPS,
    EVCOutput,
    EVCRequest,
    LALMAdapter,
    adapter_names,
    load_adapter,
    register_adapter,
)

__all__ = [
    "GROUPS", "EVCOutput", "EVCRequest", "LALMAdapter", "adapter_names", "load_adapter",
    "register_adapter",
]
