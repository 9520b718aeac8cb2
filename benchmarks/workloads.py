"""The workloads the throughput benchmarks generate: what one EVC attempt asks of the model.

Random weights never stop on their own, so a benchmark decides each row's lengths and
forces them: ``ForcedLengths`` is a logits processor that makes row ``b`` emit an end token
exactly at step ``lengths[b]`` (and never before), so rows of one batch finish at different
steps, as real conversions do, and everything downstream (padding, early-finishing rows,
token2wav on codes of different lengths) is real.

``esd_like`` draws lengths from a stated distribution modelled on ESD (SPEC §8), English:
- source (the neutral utterance): ``U(2, 5)`` seconds (ESD's English utterances run ~2-4 s,
  the longest sentences ~5 s);
- answer text: ~3 tokens per second of source (ESD sentences are 5-12 words), x ``U(0.8, 1.2)``,
  plus one for the final punctuation;
- answer speech: the source's duration x ``U(0.85, 1.25)`` (emotional renditions run longer)
  at Qwen2.5-Omni's 50 codec tokens per second (token2wav: 2 mel frames per code, 100 frames
  per second, 240 samples per frame at 24 kHz).
``fixed`` gives every attempt the same lengths (the earlier benchmarks' workload).

The vocoder benchmarks (Kimi-Audio's detokenizer, MiniCPM-o's token2wav) share the rest:
``codes_at`` (an answer at another model's code rate), ``spread_indices`` (the rows a per-row
loop decodes), ``snr_db`` and ``worst_difference`` (batched waveforms against the per-row ones) and ``PartTimer``
(seconds and calls of the parts a decode runs through); ``with_stop_check`` and
``stop_flags_for`` (``--stop-check``: step loops reading their stop flag late or every step).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

CODEC_PER_SECOND = 50


@dataclass(frozen=True)
class Attempt:
    source_seconds: float
    text_tokens: int
    codec_tokens: int


def esd_like(n: int, seed: int = 0) -> list[Attempt]:
    """``n`` attempts with ESD-like lengths (module docstring), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    seconds = rng.uniform(2.0, 5.0, n)
    text = np.maximum(4, np.round(3.0 * seconds * rng.uniform(0.8, 1.2, n)) + 1)
    codec = np.round(CODEC_PER_SECOND * seconds * rng.uniform(0.85, 1.25, n))
    return [Attempt(float(s), int(t), int(c)) for s, t, c in zip(seconds, text, codec)]


def fixed(n: int, source_seconds: float, text_tokens: int, codec_tokens: int) -> list[Attempt]:
    return [Attempt(float(source_seconds), int(text_tokens), int(codec_tokens))] * n


def spread(attempts: list[Attempt], n: int) -> list[Attempt]:
    """``n`` of ``attempts`` evenly spaced in codec length, so that a subset (e.g. the rows a
    batch-1 loop has time for) covers the whole distribution rather than its first draws."""
    ordered = sorted(attempts, key=lambda a: (a.codec_tokens, a.text_tokens, a.source_seconds))
    if n >= len(ordered):
        return ordered
    picks = np.round(np.linspace(0, len(ordered) - 1, n)).astype(int)
    return [ordered[i] for i in picks]


def codes_at(attempt: Attempt, rate: float, minimum: int = 1) -> int:
    """The attempt's answer in codes at ``rate`` a second (``esd_like`` draws it at 50), at
    least ``minimum`` codes."""
    return max(minimum, round(attempt.codec_tokens * rate / CODEC_PER_SECOND))


def random_codes(lengths, vocab: int, seed: int) -> list[list[int]]:
    """One row of random codes below ``vocab`` per length (random weights: any code will do)."""
    draw = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=draw).tolist() for n in lengths]


def spread_indices(lengths, n: int) -> list[int]:
    """Indices of ``n`` rows evenly spaced in length (the rows a per-row path decodes), in
    index order; all of them, shortest first, when ``n`` covers every row."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if n >= len(order):
        return order
    return sorted({order[int(round(i))] for i in torch.linspace(0, len(order) - 1, n).tolist()})


def snr_db(reference, other) -> float:
    """``other``'s SNR against ``reference`` (tensors or arrays) in dB; inf when equal."""
    reference, other = torch.as_tensor(reference).double(), torch.as_tensor(other).double()
    error = (reference - other).pow(2).sum()
    if error == 0:
        return float("inf")
    return float(10 * torch.log10(reference.pow(2).sum() / error))


def worst_difference(pairs) -> tuple[float, float]:
    """(max |difference|, lowest SNR in dB) over (reference, other) waveform pairs."""
    pairs = [(torch.as_tensor(a).double(), torch.as_tensor(b).double()) for a, b in pairs]
    return (max(float((a - b).abs().max()) for a, b in pairs),
            min(snr_db(a, b) for a, b in pairs))


class PartTimer:
    """Seconds and calls of named parts: ``wrap(name, owner, attribute)`` replaces the method
    ``owner.attribute`` by a timed one (the device synchronised around it, so the seconds are
    the part's own); ``reset()`` zeroes the counts, ``snapshot()`` copies them."""

    def __init__(self, sync=lambda: None):
        self.sync, self.seconds, self.calls = sync, {}, {}

    @classmethod
    def on(cls, device: str) -> "PartTimer":
        """Synchronising ``device`` around each part (nothing to wait for on the CPU)."""
        return cls(torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None))

    def wrap(self, name: str, owner, attribute: str) -> None:
        method = getattr(owner, attribute)
        self.seconds.setdefault(name, 0.0)
        self.calls.setdefault(name, 0)

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        setattr(owner, attribute, timed)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def snapshot(self) -> dict:
        return {"seconds": dict(self.seconds), "calls": dict(self.calls)}

    def median_run(self, run, repeats: int, device: str):
        """``run()`` timed ``repeats`` times, the parts reset before each: the median run's
        (seconds, result, part snapshot) and the peak GiB over all of them (None off CUDA)."""
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runs = []
        for _ in range(repeats):
            self.reset()
            self.sync()
            start = time.perf_counter()
            result = run()
            self.sync()
            runs.append((time.perf_counter() - start, result, self.snapshot()))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        return (*sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2], peak)


def describe(attempts: list[Attempt]) -> str:
    def span(values) -> str:
        values = np.asarray(values, dtype=float)
        return f"{values.min():g}-{values.max():g} (mean {values.mean():.1f})"

    return (f"{len(attempts)} attempts: source {span([a.source_seconds for a in attempts])} s, "
            f"text {span([a.text_tokens for a in attempts])} tokens, "
            f"codec {span([a.codec_tokens for a in attempts])} tokens")


class ForcedLengths:
    """A logits processor: row ``b`` emits ``end_id`` at generated step ``lengths[b]`` exactly.

    Step 0 is the first generated token; before a row's step its end ids are masked out, at
    it every other id is. The step comes from the sequence length (no host sync per step).
    One instance serves one ``generate`` call: it records the prompt length at its first call.
    """

    def __init__(self, lengths, end_ids, device=None):
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long, device=device)
        self.end_ids = torch.as_tensor(list(end_ids), dtype=torch.long, device=device)
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        if input_ids.shape[0] != len(self.lengths):
            raise ValueError(f"ForcedLengths has {len(self.lengths)} lengths for a batch of "
                             f"{input_ids.shape[0]} rows")
        step = input_ids.shape[1] - self.prompt_len
        if self.lengths.device != scores.device:
            # Moved once: a copy from pageable host memory each step would wait for the
            # device each step, as the decode loop itself no longer does (late_stop).
            self.lengths, self.end_ids = self.lengths.to(scores.device), self.end_ids.to(scores.device)
        lengths, end_ids = self.lengths, self.end_ids
        scores = scores.clone()
        scores[:, end_ids] = scores[:, end_ids].masked_fill((lengths > step)[:, None], -torch.inf)
        ending = (lengths == step)[:, None]
        forced = torch.full_like(scores, -torch.inf)
        forced[:, end_ids[0]] = 0.0
        return torch.where(ending, forced, scores)


def add_vocoder_arguments(ap) -> None:
    """The options the vocoder benchmarks share (per row against batched calls on one mix)."""
    ap.add_argument("--shape", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--rows", type=int, default=None, help="rows in the mix")
    ap.add_argument("--micro", type=int, nargs="+", default=None, help="rows per batched call")
    ap.add_argument("--per-row-rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")


def vocoder_device(ap, args) -> str:
    """CUDA for the full shape where there is one; the tiny shape on at most 2 CPU threads."""
    device = args.device or ("cuda" if torch.cuda.is_available() and args.shape != "tiny" else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    return device


EVERY_STEP = "+every-step-stop"  # a mode's suffix: decode loops read their stop flag every step


def with_stop_check(modes: list[str], choice: str) -> list[str]:
    """``--stop-check``'s modes: ``late`` the given ones (the adapters' way), ``every-step``
    each suffixed ``EVERY_STEP``, ``both`` the given ones and their suffixed twins."""
    suffixed = [m + EVERY_STEP for m in modes]
    return {"late": list(modes), "every-step": suffixed, "both": list(modes) + suffixed}[choice]


@contextlib.contextmanager
def stop_flags_for(mode: str, *loops):
    """Within: the step-loop modules ``loops`` read "has every row ended?" every step (a
    host wait per step on a GPU) if ``mode`` carries ``EVERY_STEP``; else one step late,
    as they run (``late_stop.LateFlag``)."""
    from esn_core.models.late_stop import EveryStepFlag

    if EVERY_STEP not in mode:
        yield
        return
    saved = [(loop, loop.LateFlag) for loop in loops]
    for loop in loops:
        loop.LateFlag = EveryStepFlag
    try:
        yield
    finally:
        for loop, flag in saved:
            loop.LateFlag = flag


def mode_ratio_lines(batch: int, modes: list[str], rates: dict) -> list[str]:
    """Summary lines of a main table (``rates[batch, mode]``: utterances/hour): capture's
    cost over ``off`` run the same way, and the stop flag read late over every step."""
    lines = []
    for suffix in dict.fromkeys(m[len(m.split("+")[0]):] for m in modes):
        if "off" + suffix in modes and "capture" + suffix in modes:
            lines.append(f"# batch {batch}: capture{suffix} overhead "
                         f"{rates[batch, 'off' + suffix] / rates[batch, 'capture' + suffix]:.3f}x")
    for mode in (m for m in modes if EVERY_STEP in m and m.replace(EVERY_STEP, "") in modes):
        late = mode.replace(EVERY_STEP, "")
        lines.append(f"# batch {batch} {late}: stop flag read a step late "
                     f"{rates[batch, late] / rates[batch, mode]:.3f}x the utterances/hour of "
                     "reading it every step")
    return lines


def add_throughput_arguments(ap, shapes) -> None:
    """The options the adapter throughput benchmarks share (shape, device, batches, rows,
    the whole-call capture cost's ways, whole conversions)."""
    ap.add_argument("--shape", choices=sorted(shapes), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--attempts", type=int, default=None,
                    help="rows per batched measurement (default: the largest batch)")
    ap.add_argument("--single-rows", type=int, default=4,
                    help="rows the batch-1 loop is timed on (spread over the length range)")
    # Whole-call capture cost, two ways around the lent hosts' drift (hook_overhead.py).
    ap.add_argument("--paired-repeats", type=int, default=0,
                    help="passes over the rows with off and capture paired call by call "
                         "(whole-run capture cost without the host's drift; 0: skip it)")
    ap.add_argument("--composed-repeats", type=int, default=0,
                    help="whole-call capture cost composed from parts measured where drift "
                         "cancels (composed_overhead): alternating runs, whole off calls, and "
                         "4x as many paired prefills (0: skip it)")
    ap.add_argument("--speech", action="store_true",
                    help="time whole conversions: the speech decoder runs on each call's codes")
    ap.add_argument("--attention", choices=["packed", "stock"], default="packed",
                    help="decode-step attention: packed (the adapters' own, the default) or "
                         "transformers' sdpa (before 5.23: the KV cache expanded per query head)")
    ap.add_argument("--stop-check", choices=["late", "every-step", "both"], default="late",
                    help="late: the step loops read 'has every row ended?' a step late (as the "
                         "adapters run); every-step: the host waits for each step to read it; "
                         "both: every mode twice, side by side")


def set_attention(model, choice: str) -> str:
    """``--attention``: leave ``model``'s decoders on the packed decode step, or put them back
    on transformers' own SDPA; returns what the header prints."""
    from esn_core.models.decode_attention import use_packed_decode_attention

    if choice == "stock":
        use_packed_decode_attention(model, on=False)
        return "decode attention: transformers' sdpa"
    return "decode attention: packed"
