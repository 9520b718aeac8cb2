"""Reads Step-Audio2's ``flow.yaml`` (HyperPyYAML: ``!new:<module.Class>`` mappings, ``!ref <key>``
scalars, ``!name:`` callables) without HyperPyYAML: each ``!new:`` tag is matched by its class
name to our own implementation, so the file's constructor arguments build our modules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from esn_core.models.s3_flow import CausalConditionalCFM, CausalMaskedDiffWithXvec
from esn_core.models.s3_flow_dit import DiT
from esn_core.models.s3_flow_encoder import UpsampleConformerEncoderV2

CLASSES = {cls.__name__: cls for cls in
           (CausalMaskedDiffWithXvec, CausalConditionalCFM, DiT, UpsampleConformerEncoderV2)}


class FlowConfigError(ValueError):
    """flow.yaml names something we cannot build; the message names the file and the tag."""


@dataclass
class _New:
    target: str
    kwargs: dict


@dataclass
class _Ref:
    expr: str


@dataclass
class _Name:
    target: str


class _Loader(yaml.SafeLoader):
    pass


def _new(loader, suffix, node):
    if not isinstance(node, yaml.MappingNode):
        return _New(suffix, {})
    return _New(suffix, loader.construct_mapping(node, deep=True))


_Loader.add_multi_constructor("!new:", _new)
_Loader.add_multi_constructor("!name:", lambda loader, suffix, node: _Name(suffix))
_Loader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))

_REF = re.compile(r"^<([\w.]+)((?:\[[\w]+\])*)>$")


def _resolve_ref(expr: str, root: dict, path: Path) -> Any:
    match = _REF.match(expr.strip())
    if not match:
        raise FlowConfigError(f"{path}: unsupported !ref expression {expr!r} (only <key> or <key[sub]>)")
    value: Any = root
    for part in [match.group(1), *re.findall(r"\[(\w+)\]", match.group(2))]:
        if not isinstance(value, dict) or part not in value:
            raise FlowConfigError(f"{path}: !ref {expr!r} names a missing key {part!r}")
        value = value[part]
    return value


def _build(value: Any, root: dict, path: Path) -> Any:
    if isinstance(value, _Ref):
        return _build(_resolve_ref(value.expr, root, path), root, path)
    if isinstance(value, _New):
        name = value.target.rsplit(".", 1)[-1]
        if name not in CLASSES:
            raise FlowConfigError(f"{path}: !new:{value.target} has no implementation here "
                                  f"(known: {sorted(CLASSES)})")
        kwargs = {k: _build(v, root, path) for k, v in value.kwargs.items()}
        try:
            return CLASSES[name](**kwargs)
        except TypeError as err:
            raise FlowConfigError(f"{path}: !new:{value.target}: {err}") from err
    if isinstance(value, dict):
        return {k: _build(v, root, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v, root, path) for v in value]
    return value


def build_flow(path: Path) -> CausalMaskedDiffWithXvec:
    """The ``flow`` entry of ``path``, built as our ``CausalMaskedDiffWithXvec``."""
    with Path(path).open() as handle:
        root = yaml.load(handle, Loader=_Loader)  # noqa: S506  (our SafeLoader subclass)
    if not isinstance(root, dict) or "flow" not in root:
        raise FlowConfigError(f"{path}: no top-level 'flow' entry")
    flow = _build(root["flow"], root, Path(path))
    if not isinstance(flow, CausalMaskedDiffWithXvec):
        raise FlowConfigError(f"{path}: 'flow' is {type(flow).__name__}, not a CausalMaskedDiffWithXvec")
    return flow
