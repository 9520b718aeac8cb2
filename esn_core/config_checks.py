"""Config checks the JSON schema cannot express, run while Snakemake builds the DAG.

The schema (``workflow/schemas/config.schema.yaml``) checks keys and types; this module
checks what needs the code or the filesystem: judge and naturalness entries against the
keys their loaders take, ``model.options`` against the adapter's constructor (names, and
values against its annotations and the ``OPTION_RANGES`` table next to it), paths that
must exist, the interventions list, and the ``ESN_FUSED_COUNTING`` the jobs inherit. Every problem is reported with its key path
(``judges.available[e2v].model_dir``), all at once, so ``snakemake -n`` catches them
before any job runs.

Heavy model code is never imported: the adapter's keyword arguments are read from its
source with ``ast`` (the module is located, not executed), and so are the judge loaders'
key tables in ``esn_core.judges.registry``.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
from pathlib import Path
from typing import Any, Mapping

import esn_core
from esn_core.option_values import option_message, value_problem


class ConfigError(ValueError):
    """One or more config values that would fail inside a job."""


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` listing every problem (key path: what is wrong)."""
    problems = [
        *_check_corpus(config["corpus"]),
        *_check_models(config),
        *_check_judges(config["judges"]),
        *_check_interventions(config["evaluation"]["interventions"]),
        *_check_environment(os.environ),
    ]
    if problems:
        raise ConfigError("config values that would fail inside a job:\n" + "\n".join(f"  {p}" for p in problems))


# ---------------------------------------------------------------------------- sections


def _check_corpus(corpus: Mapping[str, Any]) -> list[str]:
    if corpus["source"] != "esd":
        return []
    root = corpus.get("esd_root")
    if not root or not Path(os.path.expanduser(str(root))).is_dir():
        return [f"corpus.esd_root: {root!r} is not a directory (the ESD folder, 'Emotion Speech Dataset' "
                "or its parent)"]
    return []


def _check_models(config: Mapping[str, Any]) -> list[str]:
    """``model`` or every ``models.<name>`` entry."""
    if config.get("models") is not None:
        if config.get("model") is not None:
            return ["models: give either model: (one LALM) or models: (several), not both; an override that "
                    "adds models: to the shipped config sets model: null"]
        if not config["models"]:
            return ["models: name at least one model"]
        return [p for name, entry in config["models"].items() for p in _check_model(entry, f"models.{name}")]
    if config.get("model") is None:
        return ["model: required (one LALM), or models: (several)"]
    return _check_model(config["model"])


def _check_model(model: Mapping[str, Any], where: str = "model") -> list[str]:
    problems = []
    adapter, path = model["adapter"], model.get("path")
    if path and _looks_local(str(path)) and not Path(os.path.expanduser(str(path))).exists():
        problems.append(f"{where}.path: {path!r} does not exist")
    if adapter != "planted" and not path:
        problems.append(f"{where}.path: required for adapter {adapter!r}")
    if model.get("plant_layers") is not None and (adapter != "planted" or path):
        problems.append(f"{where}.plant_layers: only for adapter 'planted' without a path (the model planted "
                        "under results/)")
    options = model.get("options") or {}
    factory = source_literal("esn_core.models.base", "_REGISTRY").get(adapter)
    if factory is None:
        return problems
    accepted = keyword_annotations(factory)
    if accepted is None:  # **kwargs, or an inherited constructor: cannot tell
        return problems
    ranges = _option_ranges(factory)
    mappings = _module_literal(factory.split(":", 1)[0], "OPTION_MAPPINGS")
    for key, value in options.items():
        if key == "path":
            problems.append(f"{where}.options.path: give the checkpoint as {where}.path")
        elif key not in accepted:
            problems.append(f"{where}.options.{key}: not a keyword argument of {factory.split(':')[1]} "
                            f"(adapter {adapter!r}); it takes {sorted(set(accepted) - {'path'})}")
        elif key in mappings and isinstance(value, Mapping):
            problems += _check_fields(value, *mappings[key], f"{where}.options.{key}")
        elif (allowed := value_problem(value, accepted[key], ranges.get(key))) is not None:
            problems.append(option_message(f"{where}.options.{key}", value, allowed))
    return problems


def _option_ranges(factory: str) -> dict[str, tuple]:
    """The adapter module's ``OPTION_RANGES`` (option -> (min, max)), or none."""
    return _module_literal(factory.split(":", 1)[0], "OPTION_RANGES")


def _module_literal(module: str, name: str) -> dict:
    try:
        return source_literal(module, name)
    except LookupError:
        return {}


def _check_fields(given: Mapping[str, Any], module: str, cls: str, ranges_name: str, where: str) -> list[str]:
    """An option given as a mapping of a dataclass's fields (MiniCPM-o's ``sampling``): keys
    against the fields, values against their annotations and the module's ranges literal."""
    fields = dataclass_fields(module, cls)
    ranges = _module_literal(module, ranges_name)
    problems = []
    for key, value in given.items():
        if key not in fields:
            problems.append(f"{where}.{key}: not a field of {cls}; it has {sorted(fields)}")
        elif (allowed := value_problem(value, fields[key], ranges.get(key))) is not None:
            problems.append(option_message(f"{where}.{key}", value, allowed))
    return problems


def dataclass_fields(module: str, cls: str) -> dict[str, str | None]:
    """A class's annotated fields, each with its annotation as source text, read from the source."""
    tree = ast.parse(_module_file(module).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {f.target.id: ast.unparse(f.annotation) for f in node.body
                    if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)}
    raise LookupError(f"{module} defines no class {cls}")


def _check_judges(judges: Mapping[str, Any]) -> list[str]:
    problems = []
    resources = set(source_literal("esn_core.workflow", "JUDGE_RESOURCES"))  # the workflow's, not the loader's
    judge_keys = {kind: keys | resources for kind, keys in
                  source_literal("esn_core.judges.registry", "_JUDGE_KEYS").items()}
    names = [entry.get("name") for entry in judges["available"]]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"judges.available: judge name {name!r} is listed twice")
    for entry in judges["available"]:
        where = f"judges.available[{entry['name']}]"
        problems += _check_entry(entry, judge_keys, where, needs_path=entry["kind"] != "embedded")
    naturalness = judges.get("naturalness")
    if naturalness:
        mos_keys = source_literal("esn_core.judges.registry", "_MOS_KEYS")
        problems += _check_entry(naturalness, mos_keys, "judges.naturalness", needs_path=naturalness["kind"] == "utmos")
    return problems


def _check_entry(entry: Mapping[str, Any], allowed: Mapping[str, set], where: str, needs_path: bool) -> list[str]:
    kind = entry["kind"]
    keys = allowed[kind]
    problems = [f"{where}.{key}: unknown key for kind {kind!r}; allowed {sorted(keys)}"
                for key in entry if key not in keys]
    path_keys = [k for k in ("path", "model_dir", "checkpoint") if k in keys]
    given = [k for k in path_keys if entry.get(k)]
    if needs_path and not given:
        problems.append(f"{where}: kind {kind!r} needs {' or '.join(repr(k) for k in path_keys)} "
                        "(a local file or directory)")
    for key in given:
        if not Path(os.path.expanduser(str(entry[key]))).exists():
            problems.append(f"{where}.{key}: {entry[key]!r} does not exist")
    return problems


def _check_interventions(interventions: list[Mapping[str, Any]]) -> list[str]:
    problems = []
    for k, entry in enumerate(interventions):
        if entry["method"] != "deactivate" and not entry.get("alphas"):
            problems.append(f"evaluation.interventions[{k}] ({entry['method']}): alphas is empty; list at least "
                            "one α or drop the entry")
    return problems


def _check_environment(environ: Mapping[str, str]) -> list[str]:
    """Variables the jobs inherit and read: a bad one would fail every model job at its
    first counted position, after the model has loaded."""
    value = environ.get("ESN_FUSED_COUNTING")
    allowed = source_literal("esn_core.fused_counting", "SETTINGS")
    if value is not None and value.strip().lower() not in allowed:
        return [f"environment ESN_FUSED_COUNTING: {value!r} is not one of {', '.join(allowed)}"]
    return []


def _looks_local(path: str) -> bool:
    """An absolute or explicitly relative path (a hub id such as ``Qwen/Qwen2.5-Omni-7B`` is neither)."""
    return os.path.isabs(path) or path.startswith((".", "~"))


# ---------------------------------------------------------------------------- source reading


def _module_file(module: str) -> Path:
    """The source file of ``module``, located without executing any package on the way."""
    parts = module.split(".")
    if parts[0] != "esn_core":
        spec = importlib.machinery.PathFinder.find_spec(parts[0])
        search = spec.submodule_search_locations if spec else None
    else:
        search = list(esn_core.__path__)
    for depth in range(1, len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: depth + 1]), search)
        if spec is None:
            raise ModuleNotFoundError(module)
        search = spec.submodule_search_locations
    return Path(spec.origin)


def source_literal(module: str, name: str) -> Any:
    """The literal value assigned to ``name`` at the top of ``module``'s source."""
    tree = ast.parse(_module_file(module).read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise LookupError(f"{module} assigns no literal {name}")


def keyword_annotations(factory: str) -> dict[str, str | None] | None:
    """Keyword arguments of a ``"module:Class"`` factory's ``__init__``, read from its source, each
    with its annotation as source text (``None``: none given).

    ``None`` when they cannot be told from the source (``**kwargs``, no ``__init__`` of its own).
    """
    module, attribute = factory.split(":", 1)
    tree = ast.parse(_module_file(module).read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attribute:
            init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is None or init.args.kwarg is not None:
                return None
            args = [*init.args.posonlyargs, *init.args.args, *init.args.kwonlyargs]
            return {a.arg: ast.unparse(a.annotation) if a.annotation else None for a in args[1:]}
    return None
