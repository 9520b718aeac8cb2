"""Why Qwen2.5-Omni's decode steps slow beside token2wav: one batch's decode alone and beside three loads.

    python3 benchmarks/decode_beside.py --device cuda --batch 64 --repeats 3
    python3 benchmarks/decode_beside.py --tiny            # CPU smoke test

With ``overlap_speech`` a batch's token2wav runs on the speech worker (its own thread and
CUDA stream) while the next batch decodes; on an H100 the thinker's and talker's decode
steps then took 2.1-2.6x as long (BENCHMARKS.md, "2026-12-07"), so the overlap hid little.
Two causes fit. The GPU: a decode step is a chain of small kernels, each waiting for room
on the SMs behind the DiT's large ones. The host: PyTorch releases the GIL inside every op,
so the worker's Python runs between the decode's ops, and each of the decode's ops waits
for a slice of it. The fixes differ (fewer, larger kernels, or a smaller share of the SMs
for the speech decoder; or the speech decoder in a process of its own), so this script
tells them apart. It decodes one batch (thinker and talker, graphs on, hooks off: the
``off+graphs`` mode of ``qwen_omni_throughput.py``, whose model, workload and forced
lengths it uses) alone and beside each of:

* ``host``: a thread doing what the worker does on the host and nothing on the GPU: small
  CPU matrix products in a Python loop (the GIL released inside each, held between);
* ``device``: a thread keeping the GPU busy on a stream of its own with large bfloat16
  matrix products, a few launches at a time, waiting on its stream between them (with the
  GIL released): the SMs full, the GIL nearly free;
* ``token2wav``: the real load: an earlier batch's token2wav on the speech worker, as
  ``overlap_speech`` runs it (its own stream, paced).

Every condition decodes the same way (on the speech worker's high-priority decode stream,
token2wav's float32 precision held, as an overlapped run decodes); conditions are
interleaved, the order rotating every repeat. Reported per condition: the median thinker
and talker decode step (ms, the prefill left out) and each over the same repeat's ``alone``
(median over repeats), and how many rounds its load ran. If ``host`` slows the decode as
``token2wav`` does, the GIL is the cause; if ``device`` does, the GPU. On CPU (``--tiny``)
the figures mean nothing (every load competes for the same cores): a smoke test.

``--profile N`` also runs the decode alone once under ``torch.profiler`` and prints its N
costliest ops by device time (CPU time without a GPU), with their host time: at batch 64 a
talker step took ~17 ms with graphs against 4.7 ms at batch 1 on the H100, which the
weights and KV reads (~2 ms) do not explain, and this says where the rest goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from qwen_omni_throughput import (  # noqa: E402
    IM_END, PAD, OmniPartTimer, build_model, evc_inputs, forced_lengths, graph_runners,
)
from workloads import esd_like, spread  # noqa: E402

from esn_core.models.qwen_omni import QwenOmniAdapter  # noqa: E402
from esn_core.models.speech_overlap import SpeechWorker  # noqa: E402

LOADS = ("alone", "host", "device", "token2wav")


class Load:
    """A background thread running ``round()`` until the block ends; ``rounds`` counts them.

    ``round`` returning means one unit of load done; the thread stops after the round in
    which the block ended, and the block's exit waits for it (an error there is raised)."""

    def __init__(self, round_):
        self.round, self.rounds = round_, 0
        self._stop, self._error = threading.Event(), None
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.round()
                self.rounds += 1
        except BaseException as error:  # noqa: BLE001 (handed to the caller)
            self._error = error

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error


def host_round(size: int = 64, ops: int = 200):
    """Small CPU products in a Python loop: the GIL held between ops, released inside them."""
    a = torch.randn(size, size)

    def round_() -> None:
        for _ in range(ops):
            torch.mm(a, a)

    return round_


def device_round(device: str, size: int = 8192, launches: int = 4):
    """Large products on a stream of this thread's own: a few launches, then a wait on the
    stream (GIL released), so the GPU stays full while the thread barely runs Python."""
    cuda = device.startswith("cuda")
    if not cuda:
        size = 256  # CPU smoke test: the same loop, small
    stream = torch.cuda.Stream(device) if cuda else None
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(size, size, device=device, dtype=dtype)

    def round_() -> None:
        if stream is None:
            for _ in range(launches):
                x @ x
            return
        with torch.cuda.stream(stream):
            for _ in range(launches):
                x @ x
        stream.synchronize()

    return round_


def token2wav_round(adapter, calls, seeds, rounds: int):
    """``rounds`` second halves (an earlier batch's token2wav), made here in the decoding
    thread as the workflow makes them (``begin_speech``), run one after another."""
    finishes = [adapter.begin_speech(calls, seeds) for _ in range(rounds)]

    def round_() -> None:
        if finishes:
            finishes.pop(0)()
        else:
            time.sleep(0.01)  # all ran: idle (the table says how many rounds did)

    return round_


def decode(adapter, batch, timer) -> dict[str, float]:
    """One batch's thinker and talker decode (token2wav calls recorded, not run):
    the median step of each, ms."""
    inputs, attempts, seeds = batch
    timer.reset()
    adapter.generate_codes(inputs, seeds, **forced_lengths(adapter, attempts))
    timer.sync()
    return {name: 1e3 * statistics.median(timer.step_seconds(name)) for name in ("thinker", "talker")}


def profile_decode(adapter, batch, timer, device: str, top: int) -> None:
    """The decode alone under the profiler: its ``top`` ops by device time (CPU time on a
    machine without CUDA), totals over the whole decode (thinker and talker)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        steps = decode(adapter, batch, timer)
    key = "device_time_total" if cuda else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    print(f"# the decode alone under the profiler (steps: thinker {steps['thinker']:.2f} ms, "
          f"talker {steps['talker']:.2f} ms); its {top} costliest ops")
    print(f"| op | calls | {'device' if cuda else 'CPU'} ms (total) | host ms (self) |")
    print("|---|---|---|---|")
    for e in events:
        print(f"| {e.key[:60]} | {e.count} | {getattr(e, key) / 1e3:.2f} | "
              f"{e.self_cpu_time_total / 1e3:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes: a CPU smoke test")
    parser.add_argument("--batch", type=int, default=None, help="rows a batch (default 64; --tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3; --tiny 1")
    parser.add_argument("--token2wav-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0,
                        help="also profile the decode alone once: its N costliest ops (0: skip)")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    batch = args.batch or (2 if args.tiny else 64)
    repeats = args.repeats or (1 if args.tiny else 3)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    scale = 0.05 if args.tiny else 1.0
    draw = [type(a)(a.source_seconds, max(3, round(a.text_tokens * scale)),
                    max(2, round(a.codec_tokens * scale))) for a in esd_like(2 * batch, args.seed)]
    model = build_model(args.tiny, device, dtype)
    adapter = QwenOmniAdapter.from_model(
        model, speaker="Chelsie", max_new_tokens=max(a.text_tokens for a in draw) + 1,
        talker_max_new_tokens=max(a.codec_tokens for a in draw) + 1, stop_token_ids=[IM_END, PAD],
        token2wav_batch_size=args.token2wav_batch_size, overlap_speech=True)
    adapter._graph_runners = graph_runners(model, "cuda" if device.startswith("cuda") else "eager")
    timer = OmniPartTimer(model, device)
    rng = np.random.default_rng(args.seed)
    attempts = spread(draw, 2 * batch)
    speech_batch, decode_batch = ((evc_inputs(part, device, dtype, rng), part, list(range(len(part))))
                                  for part in (attempts[:batch], attempts[batch:]))
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    print(f"# Qwen2.5-Omni {'tiny' if args.tiny else '7B'} decode beside loads on {name}; torch "
          f"{torch.__version__}; batch {batch}, graphs on, hooks off; median of {repeats}")
    print(f"# {' '.join(sys.argv)}")
    results = {load: [] for load in LOADS}
    with SpeechWorker(True, adapter.device):  # every condition decodes on the worker's decode stream
        # The load's token2wav calls (an earlier batch), and the decode's graphs recorded.
        _, calls, call_seeds = adapter.generate_codes(
            speech_batch[0], speech_batch[2], **forced_lengths(adapter, speech_batch[1]))
        decode(adapter, decode_batch, timer)
        for repeat in range(repeats):
            for load in LOADS[repeat % len(LOADS):] + LOADS[:repeat % len(LOADS)]:
                round_ = {"alone": None, "host": host_round(), "device": device_round(device),
                          "token2wav": token2wav_round(adapter, calls, call_seeds, 2)}[load]
                if round_ is None:
                    steps, rounds = decode(adapter, decode_batch, timer), 0
                else:
                    with Load(round_) as running:
                        steps = decode(adapter, decode_batch, timer)
                    rounds = running.rounds
                results[load].append((steps, rounds))
        if args.profile:
            profile_decode(adapter, decode_batch, timer, device, args.profile)
    print("| load | thinker step ms | over alone | talker step ms | over alone | load rounds |")
    print("|---|---|---|---|---|---|")
    for load, runs in results.items():
        cells = []
        for part in ("thinker", "talker"):
            ms = statistics.median(r[0][part] for r in runs)
            ratio = statistics.median(r[0][part] / a[0][part] for r, a in zip(runs, results["alone"]))
            cells += [f"{ms:.2f}", f"{ratio:.2f}x"]
        print(f"| {load} | {' | '.join(cells)} | {statistics.median(r[1] for r in runs):g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
