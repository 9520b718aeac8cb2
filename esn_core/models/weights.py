"""Checkpoint weights: which safetensors files a folder holds, reading them, and loading a
state dict into one of our modules with 0 missing / 0 unexpected names.

Every adapter rebuilds upstream's modules under upstream's parameter names, so a name that
does not match is a bug in our rebuild or a different checkpoint: it is an error naming the
file and the names, never a silently random weight.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn


class WeightNameError(KeyError, ValueError):
    """Checkpoint weights that do not match the module's names; the message lists them."""


class WeightIndexError(FileNotFoundError):
    """A ``model.safetensors.index.json`` that cannot be read; the message names it."""


INDEX = "model.safetensors.index.json"


def weight_files(directory: Path, missing: list[str], shown_as: str = "") -> list[Path]:
    """The safetensors files of ``directory``: one ``model.safetensors`` or an index's shards.

    Missing files are appended to ``missing`` (each prefixed by ``shown_as``, e.g. the
    sub-folder's name), so that a checkpoint check can name every missing file at once.
    """
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise WeightIndexError(f"{index} is not a safetensors index: {err}") from err
        missing += [f"{shown_as}{s}" for s in shards if not (directory / s).is_file()]
        return [directory / s for s in shards]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    missing.append(f"{shown_as}model.safetensors (or {INDEX} and its shards)")
    return []


def read_safetensors(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
               may_lack: Iterable[str] = ()) -> None:
    """Load ``state`` into ``module``; unless the names match exactly (``may_lack`` aside, e.g.
    a head tied to the embeddings), a ``WeightNameError`` names ``what`` and the missing and
    unexpected names (the first 8 of each, with their counts)."""
    may_lack = set(may_lack)
    expected = set(module.state_dict()) - may_lack
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightNameError(f"{what}: weights do not match the module: "
                              f"missing {missing[:8]} ({len(missing)}), "
                              f"unexpected {unexpected[:8]} ({len(unexpected)})")
    module.load_state_dict(state, strict=not may_lack)  # names checked above
