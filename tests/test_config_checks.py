"""The config pre-check on ``model.options`` values (esn_core.config_checks + option_values):
hand-written configs with bad values get exact messages, the shipped configs and every
adapter's own defaults pass, and the constructors refuse the same values with the same words."""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from esn_core.config_checks import ConfigError, check_config, keyword_annotations, source_literal
from esn_core.option_values import value_problem

REPO = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((REPO / "config.yaml").read_text())
HUB = {"qwen2_5_omni": "Qwen/Qwen2.5-Omni-7B", "kimi_audio": "moonshotai/Kimi-Audio-7B-Instruct",
       "minicpm_o_4_5": "openbmb/MiniCPM-o-4_5", "planted": None}  # hub ids: no path that must exist
REGISTRY = source_literal("esn_core.models.base", "_REGISTRY")


def _problems(adapter: str, options: dict) -> list[str]:
    config = copy.deepcopy(SHIPPED)
    config["model"].update(adapter=adapter, path=HUB[adapter], options=options)
    try:
        check_config(config)
    except ConfigError as error:
        return [line.strip() for line in str(error).splitlines()[1:]]
    return []


@pytest.mark.parametrize("adapter,options,expected", [
    ("minicpm_o_4_5", {"vocoder_batch_size": 0},
     ["model.options.vocoder_batch_size: 0 is not allowed; a whole number >= 1"]),
    ("minicpm_o_4_5", {"vocoder_batch_size": "16", "dtype": "bf16"},
     ["model.options.vocoder_batch_size: '16' is not allowed; a whole number >= 1",
      "model.options.dtype: 'bf16' is not allowed; one of 'float32', 'bfloat16', 'float64'"]),
    ("minicpm_o_4_5", {"max_new_tokens": True},  # a bool is not a whole number here
     ["model.options.max_new_tokens: true is not allowed; a whole number >= 1"]),
    ("qwen2_5_omni", {"token2wav_steps": 1, "token2wav_ragged": "yes", "speaker": 7},
     ["model.options.token2wav_steps: 1 is not allowed; a whole number >= 2",
      "model.options.token2wav_ragged: 'yes' is not allowed; true or false",
      "model.options.speaker: 7 is not allowed; a string"]),
    ("qwen2_5_omni", {"late_stop_check": "no"},
     ["model.options.late_stop_check: 'no' is not allowed; true or false"]),
    ("qwen2_5_omni", {"stop_token_ids": [151645, "eos"], "system_prompt": 1.5},
     ["model.options.stop_token_ids: [151645, 'eos'] is not allowed; a list, each a whole number",
      "model.options.system_prompt: 1.5 is not allowed; a string or null"]),
    ("kimi_audio", {"audio_temperature": -0.1, "audio_top_k": 2.5, "detokenizer_batch": 0},
     ["model.options.audio_temperature: -0.1 is not allowed; a number >= 0",
      "model.options.audio_top_k: 2.5 is not allowed; a whole number >= 0",
      "model.options.detokenizer_batch: 0 is not allowed; a whole number >= 1"]),
    ("kimi_audio", {"dtype": "half", "overlap_speech": "yes"},
     ["model.options.dtype: 'half' is not allowed; one of 'bfloat16', 'float16', 'float32', 'float64' or null",
      "model.options.overlap_speech: 'yes' is not allowed; true or false"]),
    ("planted", {"speech_workers": 0},
     ["model.options.speech_workers: 0 is not allowed; a whole number >= 1 or null"]),
    ("minicpm_o_4_5", {"sampling": {"temperature": 0, "top_p": 1.5, "top_k": 25, "topk": 3,
                                    "max_codes": "9"}},
     ["model.options.sampling.temperature: 0 is not allowed; a number > 0",
      "model.options.sampling.top_p: 1.5 is not allowed; a number in (0, 1]",
      "model.options.sampling.topk: not a field of CodeSampling; it has ['max_codes', 'min_codes', "
      "'min_keep', 'penalty_window', 'repetition_penalty', 'temperature', 'top_k', 'top_p']",
      "model.options.sampling.max_codes: '9' is not allowed; a whole number >= 1"]),
])
def test_bad_option_values_are_named_with_what_is_accepted(adapter, options, expected):
    assert _problems(adapter, options) == expected


@pytest.mark.parametrize("adapter,options", [
    ("minicpm_o_4_5", {"vocoder_batch_size": 1, "dtype": "bfloat16", "device": "cuda:1",
                       "sampling": {"top_p": 0.9}}),
    ("qwen2_5_omni", {"token2wav_steps": 2, "stop_token_ids": [151645], "system_prompt": None,
                      "dtype": "float16", "cuda_graphs": True, "overlap_speech": True,
                      "late_stop_check": False}),
    ("kimi_audio", {"audio_temperature": 0, "audio_top_k": 0, "dtype": None,  # float takes a whole number
                    "overlap_speech": False}),
    ("minicpm_o_4_5", {"overlap_speech": True}),
    ("planted", {"speech_workers": None}),
    ("planted", {"speech_workers": 3}),
])
def test_good_option_values_pass(adapter, options):
    assert _problems(adapter, options) == []


def test_bad_values_in_every_model_of_models_are_named_with_its_key():
    config = copy.deepcopy(SHIPPED)
    config["model"] = None
    config["models"] = {"small": {**SHIPPED["model"], "options": {"speech_workers": -2}},
                        "big": {**SHIPPED["model"], "options": {"speech_workers": 2}}}
    with pytest.raises(ConfigError) as error:
        check_config(config)
    assert str(error.value).splitlines()[1:] == [
        "  models.small.options.speech_workers: -2 is not allowed; a whole number >= 1 or null"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_shipped_configs_have_accepted_option_values(name):
    config = yaml.safe_load((REPO / "config" / name).read_text())
    models = config.get("models") or {"model": config.get("model") or SHIPPED["model"]}
    for entry in models.values():
        options = entry.get("options") or {}
        adapter = entry.get("adapter", "planted")
        assert _problems(adapter, options) == [], (name, adapter)


@pytest.mark.parametrize("adapter", sorted(REGISTRY))
def test_every_adapter_takes_its_own_defaults_and_ranges_only_its_numeric_options(adapter):
    module_name, class_name = REGISTRY[adapter].split(":")
    annotations = keyword_annotations(REGISTRY[adapter])
    ranges = source_literal(module_name, "OPTION_RANGES")
    module = importlib.import_module(module_name)
    for name, (low, high) in ranges.items():
        assert annotations[name] is not None and value_problem(low if low is not None else high,
                                                               annotations[name]) is None, name
    for name, parameter in inspect.signature(getattr(module, class_name).__init__).parameters.items():
        if name in annotations and parameter.default is not inspect.Parameter.empty:
            assert value_problem(parameter.default, annotations[name], ranges.get(name)) is None, (name, parameter)
    # dtype choices in the annotation are the adapter's own dtype table
    if "dtype" in annotations:
        literal = next(n for n in ast.walk(ast.parse(annotations["dtype"])) if isinstance(n, ast.Subscript))
        assert set(ast.literal_eval(literal.slice)) == set(module.DTYPES)


def test_constructors_refuse_the_same_values_before_any_loading(tmp_path):
    from esn_core.models.kimi_audio import KimiAudioAdapter
    from esn_core.models.minicpm_o import MiniCPMOAdapter
    from esn_core.models.planted import PlantedAdapter
    from esn_core.models.qwen_omni import QwenOmniAdapter

    absent = tmp_path / "absent"  # never read: the values are refused first
    cases = [
        (lambda: MiniCPMOAdapter(absent, vocoder_batch_size=0),
         "vocoder_batch_size: 0 is not allowed; a whole number >= 1"),
        (lambda: MiniCPMOAdapter(absent, vocoder_steps="10"), "vocoder_steps: '10' is not allowed; a whole number >= 1"),
        (lambda: KimiAudioAdapter(absent, device="cpu", audio_temperature=-1),
         "audio_temperature: -1 is not allowed; a number >= 0"),
        (lambda: QwenOmniAdapter(absent, token2wav_steps=1), "token2wav_steps: 1 is not allowed; a whole number >= 2"),
        (lambda: QwenOmniAdapter.from_model(None, batch_size=0), "batch_size: 0 is not allowed; a whole number >= 1"),
        (lambda: PlantedAdapter(absent, speech_workers=0),
         "speech_workers: 0 is not allowed; a whole number >= 1 or null"),
        (lambda: MiniCPMOAdapter(absent, sampling={"temperature": 0.0, "top_p": 1.0}),
         "temperature: 0.0 is not allowed; a number > 0"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError) as error:
            build()
        assert str(error.value) == message


@pytest.mark.parametrize("value,annotation,bounds,accepted", [
    (0, "int", (1, None), "a whole number >= 1"),
    (1, "int", (1, None), None),
    (False, "int", None, "a whole number"),
    (2, "float", (0, 1), "a number in [0, 1]"),
    (1, "float", (0, 1), None),  # float takes a whole number
    (True, "float", None, "a number"),
    (1, "bool", None, "true or false"),
    ("a", "Literal['a', 'b']", None, None),
    ("c", "typing.Literal['a', 'b'] | None", None, "one of 'a', 'b' or null"),
    (None, "Optional[int]", (1, None), None),
    (0, "Optional[int]", (1, None), "a whole number >= 1 or null"),
    ("/models/x", "str | os.PathLike", None, None),
    (3, "str | os.PathLike", None, None),  # a name it cannot read: anything goes
    (3, None, None, None),  # no annotation, no range: no check
    (-1, None, (0, None), "a number >= 0"),  # a range alone: a number
    ((1, 2), "tuple[int, ...]", None, None),
    ("12", "Sequence[int]", None, "a list, each a whole number"),
    # brackets where a bound is excluded
    (0, "float", (0, None, "()"), "a number > 0"),
    (1e-9, "float", (0, None, "()"), None),
    (1, "float", (0, 1, "(]"), None),
    (0.0, "float", (0, 1, "(]"), "a number in (0, 1]"),
    (1, "float", (0, 1, "[)"), "a number in [0, 1)"),
    (5, "int", (None, 5, "[)"), "a whole number < 5"),
    (4, "int", (None, 5, "[)"), None),
])
def test_value_problem_by_hand(value, annotation, bounds, accepted):
    assert value_problem(value, annotation, bounds) == accepted


def test_code_sampling_ranges_are_its_fields_and_its_defaults_pass():
    from esn_core.config_checks import dataclass_fields
    from esn_core.models.minicpm_speech_codes import CodeSampling

    fields = dataclass_fields("esn_core.models.minicpm_speech_codes", "CodeSampling")
    assert set(fields) == set(CodeSampling.__dataclass_fields__)
    ranges = source_literal("esn_core.models.minicpm_speech_codes", "SAMPLING_RANGES")
    assert set(ranges) <= set(fields)
    defaults = CodeSampling()
    assert all(value_problem(getattr(defaults, k), fields[k], ranges.get(k)) is None for k in fields)
    with pytest.raises(ValueError) as error:
        CodeSampling(top_p=0.0, min_keep=0)
    assert str(error.value) == ("top_p: 0.0 is not allowed; a number in (0, 1]; "
                                "min_keep: 0 is not allowed; a whole number >= 1")
    with pytest.raises(ValueError, match="brackets must be one of"):
        value_problem(1, "int", (0, 2, "[["))
