"""Our code makes the host wait for the device a fixed number of times per call, never per
decode step: capture and steering sessions, on transformers' decode and on the adapter's
graph path (``cuda_graphs``), for the Qwen2.5-Omni adapter's thinker and talker.

A wait per step would serialise host and device in every step; at batch 1, where a step is
launch-bound, its whole host time would add to the device's. Checked on CPU with
``sync_audit.SyncAudit``: the calls from ``esn_core`` that would wait are counted for two
runs of different lengths, and must not differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sync_audit import SyncAudit
from tiny_omni import build_tiny_omni, write_source

from esn_core.hooks import Capture, HookEngine, Intervention, MLPGroup, find_gated_mlps
from esn_core.models.base import EVCRequest
from esn_core.models.qwen_omni import QwenOmniAdapter

TF_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def test_the_audit_names_the_line_that_would_wait():
    t = torch.ones(3)
    with SyncAudit(under="tests") as audit:
        t.sum().item()  # the line below this one's number minus one
        line = __import__("inspect").currentframe().f_lineno - 1
        if t.any():
            pass
        t[t > 0] = 2.0  # boolean-mask assignment: the mask's count is read on the host
        t.add_(1)  # an ordinary op: no wait
    assert audit.sites == {f"tests/test_host_syncs.py:{line}": 1,
                           f"tests/test_host_syncs.py:{line + 2}": 1,
                           f"tests/test_host_syncs.py:{line + 4}": 1}


def test_the_audit_names_the_lines_that_would_send_host_data_to_the_device():
    t = torch.ones(3)  # made outside the audit: a device tensor, as a model's are
    with SyncAudit(under="tests") as audit:
        line = __import__("inspect").currentframe().f_lineno + 1
        torch.tensor([1, 2, 3], device=t.device)  # made from Python data on a named device
        rows = torch.tensor([4, 5, 6])  # on the host: not sent anywhere yet
        rows.to(t.device)  # sent
        t.copy_(rows)  # sent
        freqs = torch.arange(3, dtype=torch.float32).exp()[None]  # made and kept on the host
        t * freqs.to(t.device)  # sent
        t[:2] = freqs[0, :2]  # sent
        t.new_tensor([7.0, 8.0, 9.0])  # made on t's device from Python data
        t.to(t.device), t.copy_(t + 1), rows.to(torch.float64)  # device to device; a dtype only
        torch.as_tensor(t, device=t.device), torch.zeros(3, device=t.device)  # no host data
    assert audit.uploads == {f"tests/test_host_syncs.py:{line + i}": 1 for i in (0, 2, 3, 5, 6, 7)}
    assert not audit.sites


def test_reading_a_host_tensor_is_no_wait_and_copying_to_the_host_is():
    t = torch.ones(3)
    with SyncAudit(under="tests") as audit:
        grid = torch.linspace(0, 1, 5)  # on the host
        float(grid[1] - grid[0]), grid.tolist(), grid[grid > 0]  # host reads: no wait
        line = __import__("inspect").currentframe().f_lineno + 1
        host = t.cpu()  # the device's value copied to the host: a wait
        host.sum().item()  # then on the host: no wait
    assert audit.sites == {f"tests/test_host_syncs.py:{line}": 1}
    assert not audit.uploads


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic cache", "static cache"])
def test_sessions_wait_the_same_number_of_times_for_any_number_of_steps(static):
    model = _tiny_qwen2()
    engine = HookEngine({"lm": MLPGroup(find_gated_mlps(model.model), root=model.model,
                                        eos_token_ids=(3,))})
    n = engine.layout("lm").n_neurons
    ids = torch.tensor([[0, 0, 5, 7, 9], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    steer = Intervention.uniform("steer", np.arange(0, n, 5), 1.5, batch_size=2)
    extra = {"cache_implementation": "static", "disable_compile": True} if static else {}
    for session in ({"capture": {"lm": Capture()}}, {"interventions": {"lm": steer}}):
        sites = []
        for steps in (3, 9):
            with SyncAudit() as audit, engine.session(**session):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                               min_new_tokens=steps, do_sample=False, pad_token_id=0, **extra)
            sites.append((audit.sites, audit.uploads))
        assert sites[0][0], "the session's own waits (prefill, exit) are seen"
        assert sites[0] == sites[1], (list(session), sites)


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    checkpoint = build_tiny_omni(tmp_path_factory.mktemp("omni") / "Qwen2.5-Omni-tiny")
    folder = tmp_path_factory.mktemp("sources")
    sources = [write_source(folder / f"src{i}.wav", s, i) for i, s in enumerate((0.45, 0.7))]
    requests = [EVCRequest(f"att{i}", str(p), "unused", "0011", "happy", 11 + i)
                for i, p in enumerate(sources)]
    return checkpoint, requests


@pytest.mark.skipif(TF_MAJOR < 5, reason="transformers 4.x generates one row at a time")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager decode", "cuda_graphs path"])
def test_the_qwen_adapter_waits_the_same_number_of_times_for_any_answer_length(omni, graphs):
    checkpoint, requests = omni
    adapter = QwenOmniAdapter(checkpoint, dtype="float32", device="cpu", max_new_tokens=12,
                              talker_max_new_tokens=16, token2wav_steps=2, cuda_graphs=graphs)
    engine = HookEngine(adapter.groups())
    inputs = adapter.prepare(requests)
    sites = []
    for text, speech in ((3, 5), (8, 14)):
        lengths = dict(thinker_min_new_tokens=text, thinker_max_new_tokens=text,
                       talker_min_new_tokens=speech, talker_max_new_tokens=speech)
        with SyncAudit() as audit, engine.session(capture={"lm": Capture(), "synth": Capture()}):
            result, calls, _ = adapter.generate_codes(inputs, [1, 2], **lengths)
        assert result[0].shape[1] == inputs["input_ids"].shape[1] + text  # the lengths took
        sites.append((audit.sites, audit.uploads))
    assert sites[0][0], "the sessions' own waits (prefills, exit) are seen"
    assert sites[0] == sites[1]


@pytest.mark.skipif(TF_MAJOR < 5, reason="transformers 4.x generates one row at a time")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager decode", "cuda_graphs path"])
@pytest.mark.parametrize("late", [True, False], ids=["late stop check", "every-step stop check"])
def test_decode_steps_never_wait_once_the_stop_check_is_read_late(omni, graphs, late):
    """With ``late_stop_check`` (the default), no code, ours or transformers', makes the
    host wait for the device inside a thinker or talker decode step, on the eager decode
    (its masks made on the device: ``decode_attention.decode_step_mask``) and on the
    ``cuda_graphs`` path: a generate of 8 + 14 decode steps waits as often as one of 3 + 5.
    Read every step, the stop check waits once a decode step (the known answer: 14 more
    steps, 14 more waits, all on its line)."""
    import transformers as tf

    checkpoint, requests = omni
    adapter = QwenOmniAdapter(checkpoint, dtype="float32", device="cpu", max_new_tokens=12,
                              talker_max_new_tokens=24, token2wav_steps=2, cuda_graphs=graphs,
                              late_stop_check=late)
    engine = HookEngine(adapter.groups())
    inputs = adapter.prepare(requests)
    under = ("esn_core", str(Path(tf.__file__).parent))
    sites, uploads = [], []
    for text, speech in ((3, 3), (3, 5), (8, 14)):  # the first makes the caches: not audited
        lengths = dict(thinker_min_new_tokens=text, thinker_max_new_tokens=text,
                       talker_min_new_tokens=speech, talker_max_new_tokens=speech)
        with SyncAudit(under=under) as audit, engine.session(capture={"lm": Capture(), "synth": Capture()}):
            adapter.generate_codes(inputs, [1, 2], **lengths)
        sites.append(audit.sites)
        uploads.append(audit.uploads)
    assert uploads[1] == uploads[2], "host data sent to the device per decode step"
    short, long = sites[1:]
    more = {site: long[site] - short[site] for site in long | short if long[site] != short[site]}
    if late:
        assert short and not more, more
    else:
        (site, waits), = more.items()
        assert site.startswith("transformers/generation/utils.py:") and waits == (8 - 3) + (14 - 5)
