"""The speech worker: second halves run on one thread, in order, one batch ahead at most."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from esn_core.models.speech_overlap import SpeechWorker, StreamHandoff, paced, repeated_blocks


def test_results_reach_done_in_submission_order_on_the_callers_thread():
    caller = threading.get_ident()
    seen, threads = [], []

    def finish(i, delay):
        def run():
            time.sleep(delay)  # the first is the slowest: order must not follow completion
            threads.append(threading.get_ident())
            return i
        return run

    with SpeechWorker(True) as worker:
        for i, delay in enumerate((0.05, 0.0, 0.01)):
            worker.submit(finish(i, delay), lambda r: seen.append((r, threading.get_ident())))
    assert seen == [(0, caller), (1, caller), (2, caller)]
    assert threads and all(t != caller for t in threads)


def test_submit_returns_once_every_older_batch_is_handed_over():
    """The caller is never more than one batch ahead of the speech it has handed over."""
    handed = []
    release = threading.Event()

    def slow():
        release.wait(5)
        return "first"

    with SpeechWorker(True) as worker:
        worker.submit(slow, handed.append)
        assert handed == []  # the first runs while the caller goes on
        timer = threading.Timer(0.05, release.set)
        timer.start()
        worker.submit(lambda: "second", handed.append)
        assert handed == ["first"]  # submitting the second waited for the first
    assert handed == ["first", "second"]


def test_disabled_worker_runs_each_at_once_on_the_callers_thread():
    caller = threading.get_ident()
    log = []
    with SpeechWorker(False) as worker:
        worker.submit(lambda: threading.get_ident(), log.append)
        assert log == [caller]


def test_a_workers_error_reaches_the_caller_and_later_batches_are_not_handed_over():
    handed = []

    def broken():
        raise ValueError("vocoder exploded on row 3")

    with pytest.raises(ValueError, match="row 3"):
        with SpeechWorker(True) as worker:
            worker.submit(broken, handed.append)
            worker.submit(lambda: "after", handed.append)
            worker.submit(lambda: "later", handed.append)
    assert handed == []


def test_the_worker_thread_is_gone_after_an_error_in_the_caller():
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="decode failed"):
        with SpeechWorker(True) as worker:
            worker.submit(lambda: time.sleep(0.02), lambda _: None)
            raise RuntimeError("decode failed")
    assert {t.ident for t in threading.enumerate()} <= before


def test_repeated_blocks_are_the_members_of_outermost_module_lists():
    class Vocoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(2, 2)
            self.ups = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2)]), nn.ModuleList([nn.Linear(2, 2)])])
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.ReLU()]))
                                         for _ in range(3)])
            self.inner = nn.Sequential(nn.ModuleList([nn.Tanh()]))

    model = Vocoder()
    found = repeated_blocks(model)
    expected = [model.ups[0][0], model.ups[1][0], *model.blocks, model.inner[0][0]]
    assert [id(m) for m in found] == [id(m) for m in expected]

    class Decoder:  # a speech decoder class that holds its modules
        def __init__(self):
            self.dit, self.vocoder, self.rate = nn.Sequential(nn.ModuleList([nn.Tanh()])), model, 24_000

    decoder = Decoder()
    assert [id(m) for m in repeated_blocks(decoder, None)] == [id(decoder.dit[0][0])] + [id(m) for m in expected]


def test_handoff_and_pacing_change_nothing_off_cuda():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x = torch.randn(2, 3)
    with StreamHandoff("cpu", model) as handoff, paced([model], "cpu"):
        out = model(x)
    assert handoff.ready is None
    assert not model._forward_hooks and not model._forward_pre_hooks
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams")
def test_handoff_runs_after_the_first_half_on_its_own_stream():
    first = torch.full((1 << 22,), 2.0, device="cuda")
    first.mul_(3.0)  # queued on the caller's stream
    handoff = StreamHandoff("cuda", enabled=True)
    result = []

    def second():
        with handoff:
            assert torch.cuda.current_stream() != torch.cuda.default_stream()
            result.append(float(first.sum()))

    thread = threading.Thread(target=second)
    thread.start()
    thread.join()
    assert result == [6.0 * (1 << 22)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams")
def test_the_callers_work_runs_on_a_high_priority_stream_in_order():
    caller = torch.cuda.current_stream()
    x = torch.ones(1 << 20, device="cuda")
    x.mul_(2)
    with SpeechWorker(True, "cuda"):
        inside = torch.cuda.current_stream()
        assert inside != caller and inside.priority < caller.priority
        x.add_(1)  # after the caller's earlier work
    assert torch.cuda.current_stream() == caller
    assert float(x.sum()) == 3.0 * (1 << 20)  # the caller's later work after it
