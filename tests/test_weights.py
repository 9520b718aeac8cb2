"""Shared checkpoint-weight helpers: which safetensors files a folder holds, exact loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from esn_core.models.weights import (
    WeightIndexError, WeightNameError, load_exact, read_safetensors, weight_files,
)


def test_weight_files_reads_an_index_and_names_each_missing_shard(tmp_path):
    a, b = torch.arange(3.0), torch.ones(2, 2)
    save_file({"a": a}, str(tmp_path / "model-1.safetensors"))
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    missing: list[str] = []
    files = weight_files(tmp_path, missing, "lm/")
    assert [f.name for f in files] == ["model-1.safetensors", "model-2.safetensors"]
    assert missing == ["lm/model-2.safetensors"]
    save_file({"b": b}, str(tmp_path / "model-2.safetensors"))
    missing.clear()
    state = read_safetensors(weight_files(tmp_path, missing))
    assert not missing and torch.equal(state["a"], a) and torch.equal(state["b"], b)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(WeightIndexError, match="model.safetensors.index.json"):
        weight_files(tmp_path, missing)


def test_weight_files_of_an_empty_folder_says_what_it_expected(tmp_path):
    missing: list[str] = []
    assert weight_files(tmp_path, missing, "vq/") == []
    assert missing == ["vq/model.safetensors (or model.safetensors.index.json and its shards)"]


def test_load_exact_names_every_mismatch_and_allows_only_what_may_be_lacking():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}
    renamed = dict(state)
    renamed["1.w"] = renamed.pop("1.weight")
    with pytest.raises(WeightNameError, match=r"ckpt: .*missing \['1\.weight'\] \(1\), unexpected \['1\.w'\] \(1\)"):
        load_exact(module, renamed, "ckpt")
    assert issubclass(WeightNameError, KeyError) and issubclass(WeightNameError, ValueError)
    lacking = {k: v for k, v in state.items() if k != "1.bias"}
    with pytest.raises(WeightNameError, match=r"1\.bias"):
        load_exact(module, lacking, "ckpt")
    before = module[1].bias.detach().clone()
    load_exact(module, lacking, "ckpt", may_lack=["1.bias"])
    assert torch.equal(module[0].weight, torch.full((3, 2), 0.5)) and torch.equal(module[1].bias, before)
