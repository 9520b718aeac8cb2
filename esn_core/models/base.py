"""The interface every speech-generative LALM implements, and the registry that loads one.

The workflow never branches on a model's name: it builds ``EVCRequest`` rows, calls
``adapter.convert`` on one batch at a time, and wraps that call in
``HookEngine(adapter.groups()).session(...)`` when it captures activations or intervenes
(per-row masks, so one batch may mix conditions). An adapter therefore owns only what is
model specific: loading, the EVC prompt, batched generation, decoding text and audio, and
naming its hooked MLP groups (``lm``: the language decoder; ``synth``: the speech decoder).

Adapters register a *factory path* (``"module:attribute"``) rather than a class, so that
looking up one model never imports another's heavy dependencies.
"""

from __future__ import annotations

import importlib
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

from esn_core.hooks import MLPGroup

GROUPS: tuple[str, ...] = ("lm", "synth")


@dataclass(frozen=True)
class EVCRequest:
    """One emotional voice conversion attempt: re-speak ``source_path`` as ``target_emotion``.

    ``transcript`` is the source's text (the WER reference); ``seed`` drives any sampling,
    so two attempts with one seed differ only by what the caller changed (e.g. a mask).
    """

    attempt_id: str
    source_path: str
    transcript: str
    speaker: str
    target_emotion: str
    seed: int


@dataclass
class EVCOutput:
    """What the LALM produced for one request: its decoded text and its speech."""

    attempt_id: str
    decoded_text: str
    waveform: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    n_positions: int  # positions the hooked decoder processed (SPEC §1, ``T``)

    def __post_init__(self) -> None:
        self.waveform = np.asarray(self.waveform, dtype=np.float32).reshape(-1)


class LALMAdapter(ABC):
    """A speech-generative LALM behind the pipeline's one interface."""

    name: str
    # The pipeline runs a batch's speech decoder (``begin_convert``'s second half) on a worker
    # thread while the next batch decodes (``speech_overlap``); adapters take it as an option.
    overlap_speech: bool = False

    @abstractmethod
    def groups(self) -> dict[str, MLPGroup]:
        """The hookable MLP groups, keyed ``'lm'`` and ``'synth'`` (see ``GROUPS``)."""

    @abstractmethod
    def convert(self, requests: list[EVCRequest]) -> list[EVCOutput]:
        """Run one batch; output ``i`` answers request ``i``.

        A batch is one forward/generate call, so a ``HookEngine`` session around this call
        sees exactly these rows in this order (row ``b`` of an ``Intervention`` is
        ``requests[b]``).
        """

    def begin_convert(self, requests: list[EVCRequest]) -> Callable[[], list[EVCOutput]]:
        """Run the part of ``convert`` the hook engine sees; the returned function runs the rest.

        Everything a hooked MLP takes part in (prompt, text, speech codes) happens in this
        call, so a ``HookEngine`` session around it sees the whole batch; the returned
        function finishes it (the speech decoder, which no group holds) and returns what
        ``convert`` would, and may run on another thread while the next batch begins
        (``esn_core.models.speech_overlap``). This default converts at once.
        """
        outputs = self.convert(requests)
        return lambda: outputs


def check_template(template: str) -> str:
    """An instruction template must name ``{emotion}`` and no other field."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if fields != {"emotion"}:
        raise ValueError(
            f"instruction_template must contain the field {{emotion}} and no other, got {sorted(fields)}"
        )
    return template


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, str] = {
    "planted": "esn_core.models.planted:PlantedAdapter",
    "qwen2_5_omni": "esn_core.models.qwen_omni:QwenOmniAdapter",
    "kimi_audio": "esn_core.models.kimi_audio:KimiAudioAdapter",
    "minicpm_o_4_5": "esn_core.models.minicpm_o:MiniCPMOAdapter",
}


def register_adapter(name: str, factory: str) -> None:
    """Make ``load_adapter(name, ...)`` call ``factory`` (``"module:attribute"``)."""
    if ":" not in factory:
        raise ValueError(f"adapter factory must read 'module:attribute', got {factory!r}")
    _REGISTRY[name] = factory


def adapter_names() -> list[str]:
    return sorted(_REGISTRY)


def _resolve(factory: str) -> Callable[..., LALMAdapter]:
    module_name, attribute = factory.split(":", 1)
    return getattr(importlib.import_module(module_name), attribute)


def load_adapter(name: str, **kwargs) -> LALMAdapter:
    """The adapter registered as ``name``, built with ``kwargs`` (e.g. ``path=...``)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown LALM adapter {name!r}; registered: {adapter_names()}")
    adapter = _resolve(_REGISTRY[name])(**kwargs)
    if not isinstance(adapter, LALMAdapter):
        raise TypeError(f"adapter factory for {name!r} returned {type(adapter).__name__}")
    missing = [g for g in GROUPS if g not in adapter.groups()]
    if missing:
        raise ValueError(f"adapter {name!r} does not name MLP group(s) {missing}")
    return adapter
