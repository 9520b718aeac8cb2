"""Capture and steering overhead of the hook engine, hooks-on vs hooks-off, side by side.

    python benchmarks/hook_overhead.py --shape tiny                   # CPU sanity check

``qwen25omni7b`` is a Qwen2ForCausalLM with Qwen2.5-Omni-7B's thinker shapes (28 layers,
hidden 3584, 18944 gate neurons per layer, 28/4 heads, vocab 152064) and random bf16
weights built directly on the device. Every batch generates exactly ``--new`` tokens
after a ``--prompt``-token prompt. Modes are interleaved round-robin, the order rotating
every repeat, with Python's garbage collector paused inside each timed run, so drift in
clocks hits every mode alike. A mode's ratio is the median over repeats of its time over
the plain run of the same repeat, with the quartiles of those ratios; ``plain again`` (a
second plain run) shows what the machine's noise alone gives. Because single runs on a
shared host drift by several percent, the script also times every decode step (a logits
processor stamps the clock once per step) and reports, per token, the median over repeats
of a run's median step over the same repeat's plain run's (slow drift cancels in a pair),
and the ratio of the median step of all runs of a mode to that of plain runs: figures
that a few slow runs do not move. Also reports the stored bytes per attempt of the counts at that shape.

On the lent GPU hosts whole runs switch at random between a fast and a slow state (median
step ~17 ms or ~30 ms, between and within runs: ``--raw`` keeps every stamp), which no
run-against-run ratio survives. The figure that does: each hooked mode also runs with its
hooks taken off and put back after every step (``Alternator``), and a hooked step is
compared with its two plain neighbours, which share the machine's state of the moment.
``--alternate-periods 2 3`` also runs hooks on for one step in three, which compares a
hooked step with plain steps that do not follow a hooked one and shows whether its cost
spills into the next step. The whole ``generate`` is then composed from its parts:
entering the session (a steering session compiles its operands there), the prefill
(paired), the decode steps (by the alternating ratio) and leaving the session. A last whole-run figure keeps only runs in the
fast state (median step within ``FAST_STATE`` of the batch's fastest run).

    python benchmarks/hook_overhead.py --shape qwen25omni7b --device cuda --batches 64 16 1 \
        --repeats 4 --alternate-repeats 6 --alternate-periods 2 3

``--cuda-graphs`` runs every decode step through ``GraphedDecode`` on a static cache (one per
batch size), as the Qwen2.5-Omni adapter's ``cuda_graphs`` does: the alternation then
compares a step replaying the counting or steering graph with its neighbours replaying the
plain one, the hook cost inside graphs without the drift between runs.
``--shape qwen25omni7b-talker`` is the talker's decoder stack.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from esn_core.hooks import Capture, HookEngine, Intervention, MLPGroup

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "qwen25omni7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                         num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         rope_theta=1_000_000.0),
    # The talker's decoder stack (its codec vocabulary; its thinker-state input projection
    # is not part of a decode step's stack).
    "qwen25omni7b-talker": dict(vocab_size=8448, hidden_size=896, intermediate_size=18944,
                                num_hidden_layers=24, num_attention_heads=12, num_key_value_heads=4,
                                head_dim=128, rope_theta=1_000_000.0),
}


def build_model(shape: str, device: str, dtype: torch.dtype) -> Qwen2ForCausalLM:
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def add_model_arguments(ap: argparse.ArgumentParser, shape: str = "tiny") -> None:
    """The model and prompt options the benchmark scripts share."""
    ap.add_argument("--shape", choices=sorted(SHAPES), default=shape)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=160)
    ap.add_argument("--attention", choices=["packed", "stock"], default="packed",
                    help="decode-step attention: packed (as the adapters run it) or transformers' "
                         "sdpa (before 5.23: the KV cache expanded per query head)")


def hooked_model(shape: str, device: str,
                 attention: str = "packed") -> tuple[Qwen2ForCausalLM, MLPGroup, HookEngine]:
    """The benchmark model (bf16 on a GPU, float32 on CPU) and a hook engine over its
    decoder's MLPs, with no end token (every run generates its full length); its decode
    attention packed as the adapters run it (``attention="stock"``: transformers' sdpa)."""
    from esn_core.models.decode_attention import use_packed_decode_attention

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_model(shape, device, dtype)
    use_packed_decode_attention(model, on=attention == "packed")
    group = MLPGroup.under(model.model, position_root=model, eos_token_ids=())
    return model, group, HookEngine({"lm": group})


class StepClock(LogitsProcessor):
    """Stamps the clock once per generated token (generate calls it after each forward),
    then calls ``after`` if set (``Alternator``: its cost lands in the next step).

    On a GPU it first waits for the device: ``generate`` waits for it a few small kernels
    later anyway (to learn whether every row has finished), so this moves no work, but it
    charges a step's GPU tail to that step, not the next (the prefill's, above all).
    """

    def __init__(self, device: str = "cpu"):
        self.start = 0.0  # when generate was called: stamps[0] - start is the prefill
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # this thread's CPU time: blind to being preempted
        self.after: Callable[[], None] | None = None
        self.device = device

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.thread_time())
        if self.after is not None:
            self.after()
        return scores


class Alternator:
    """Takes a session's hooks off after one forward and puts them back ``period - 1``
    forwards later: with ``period=2``, forwards 0 (the prefill), 2, 4, ... run hooked and
    1, 3, 5, ... plain, in one ``generate``. Adjacent steps share the machine's state of the
    moment, so their ratio is blind to the drift between runs that dominates
    run-against-run comparisons here. A longer period leaves plain steps that do not follow
    a hooked one: whether the first plain step after a hooked one runs slower than they do
    shows a hooked step's cost outliving it (which ``period=2`` would hide).
    Without a session (the control) it toggles nothing, at the same Python cost."""

    def __init__(self, session=None, period: int = 2):
        self.session = session
        self.period = period
        self.pause = None
        self.forwards = 1  # generate calls this after each forward, the prefill's first

    def __call__(self) -> None:
        hooked_next = hooked_forward(self.forwards, self.period)
        self.forwards += 1
        if self.pause is None and not hooked_next:
            self.pause = self.session.paused() if self.session is not None else contextlib.nullcontext()
            self.pause.__enter__()
        elif self.pause is not None and hooked_next:
            self.close()

    def close(self) -> None:
        if self.pause is not None:
            pause, self.pause = self.pause, None
            pause.__exit__(None, None, None)


def hooked_forward(forward: int, period: int = 2) -> bool:
    """Does ``Alternator(period=period)`` leave the hooks on for this forward (0: prefill)?"""
    return forward % period == 0


def alternating_ratios(stamps: list[float], period: int = 2) -> tuple[list[float], float, list[float]]:
    """Per hooked decode step, its time over the mean of two plain steps: the one before it
    and the last of its period. Also all hooked steps' mean over those plain steps' mean
    (which keeps periodic costs, e.g. a flush of the capture's step buffer every few steps,
    that a median skips); and, for ``period >= 3``, per hooked step the plain step after
    it over the same mean (~1 unless the hooked step's cost spills into the next)."""
    d = np.diff(stamps)  # d[f - 1]: the time of forward f

    def t(forward: int) -> float:
        return float(d[forward - 1])

    ratios, spill = [], []
    for f in range(period, len(d) - period + 2, period):
        plain = (t(f - 1) + t(f + period - 1)) / 2
        ratios.append(t(f) / plain)
        if period > 2:
            spill.append(t(f + 1) / plain)
    forwards = np.arange(1, len(d) + 1)
    phase = forwards % period
    # The plain steps compared are those after a plain step (with period 2: every one).
    clean = (phase != 0) & ((phase != 1) | (period == 2))
    return ratios, float(d[phase == 0].mean() / d[clean].mean()), spill


def graphed_decoder(model, device: str):
    """The decoder stack's decode steps replayed as CUDA graphs (on CPU: the same fixed-slot
    path without recording), installed for the rest of the process."""
    from esn_core.models.graphed_decode import GraphedDecode

    return GraphedDecode(model.model, "cuda" if device.startswith("cuda") else "eager").__enter__()


def static_cache_keywords(model, caches: dict, batch: int, length: int) -> dict:
    """``generate`` keywords for a static KV cache of ``length`` positions, one per batch
    size, emptied per call (a graph reads the cache where it was recorded)."""
    from transformers import StaticCache

    from esn_core.models.cache_keyword import cache_keyword

    cache = caches.get(batch)
    if cache is None:
        cache = caches[batch] = StaticCache(config=model.config, max_cache_len=length)
    cache.reset()
    return {cache_keyword(model): cache, "disable_compile": True}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def steering_plan(layout, batch: int, r: float, seed: int) -> Intervention:
    """Per-row masks like an evaluation batch: distinct masks, one untouched baseline row."""
    rng = np.random.default_rng(seed)
    n_sel = int(r * layout.n_neurons)
    masks = [rng.choice(layout.n_neurons, n_sel, replace=False) for _ in range(batch)]
    if batch > 1:  # at batch 1 the only row must steer, or nothing is measured
        masks[0] = np.array([], dtype=np.int64)
    return Intervention("steer", tuple(masks), tuple([1.0] * batch))


# The sessions an adapter benchmark alternates per step (``kimi_audio_throughput``,
# ``minicpm_o_throughput``): ``control`` toggles nothing at the same Python cost.
ADAPTER_MODES = ("control", "capture", "steer", "capture+steer")


def adapter_sessions(engine: HookEngine, captured: tuple[str, ...], plans: dict[str, Intervention]):
    """mode -> a fresh session of that mode: capture on the ``captured`` groups, steering
    with ``plans`` (group -> plan), both, or none."""
    capture = lambda: {group: Capture() for group in captured}  # noqa: E731
    return {
        "control": lambda: contextlib.nullcontext(None),
        "capture": lambda: engine.session(capture=capture()),
        "steer": lambda: engine.session(interventions=plans),
        "capture+steer": lambda: engine.session(capture=capture(), interventions=plans),
    }


def rotated(modes: tuple[str, ...], repeat: int) -> tuple[str, ...]:
    """``modes`` started at a different one each repeat, so no mode always runs first."""
    shift = repeat % len(modes)
    return modes[shift:] + modes[:shift]


def paired_calls(chunks: list, time_call) -> dict[str, tuple[dict[str, float], list[tuple[float, float]]]]:
    """Hooks off against capture, call by call: ``time_call(chunk, mode)`` runs for both
    modes back to back on every chunk, in ABBA order (off first on even calls), so each
    pair shares the host's state of the moment; whole runs one after the other are a minute
    apart and drift by more than capture costs.

    ``time_call`` returns the call's seconds, or its parts' seconds by name (the whole
    call first: e.g. ``{"whole": 26.1, "lm": 4.3}``), so one run gives each part's ratio
    from the same pairs. Returns, by part (``"call"`` for plain seconds), each mode's summed
    seconds and every pair's (off, capture) seconds.

    The first chunk runs once in each mode untimed before the pairs (its times printed):
    first calls pay one-off costs a job pays once, such as compiling the fused counting
    kernels (``esn_core.fused_counting``, on by default on CUDA). Each pair is printed as it
    ends (``#`` lines), so a run cut off by a time limit still shows what it measured."""
    def parts_of(chunk, mode) -> dict[str, float]:
        seconds = time_call(chunk, mode)
        return dict(seconds) if isinstance(seconds, dict) else {"call": float(seconds)}

    first = {mode: parts_of(chunks[0], mode) for mode in ("off", "capture")}
    names = list(first["off"])
    print("# first calls, untimed in the pairs: " + "; ".join(
        f"{name}: off {first['off'][name]:.2f} s, capture {first['capture'][name]:.2f} s"
        for name in names), flush=True)
    out = {name: ({"off": 0.0, "capture": 0.0}, []) for name in names}
    for n, chunk in enumerate(chunks):
        seconds = {}
        for mode in (("off", "capture") if n % 2 == 0 else ("capture", "off")):
            seconds[mode] = parts_of(chunk, mode)
        for name in names:
            totals, pairs = out[name]
            off, capture = seconds["off"][name], seconds["capture"][name]
            totals["off"] += off
            totals["capture"] += capture
            pairs.append((off, capture))
        print(f"# pair {n + 1}/{len(chunks)}: " + "; ".join(
            f"{name}: off {seconds['off'][name]:.3f} s, capture {seconds['capture'][name]:.3f} s "
            f"({seconds['capture'][name] / seconds['off'][name]:.3f}x)" for name in names),
            flush=True)
    return out


def ratio_interval(pairs: list[tuple[float, float]], level: float = 0.95, resamples: int = 10_000,
                   seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of capture's summed seconds over off's, the pairs resampled whole.

    Single pairs on the lent hosts spread by +-5-10 %, so a run's ratio of sums carries an
    uncertainty of its own; this says how large, so that two runs' figures are compared
    with their spread in view (percentile interval, ``resamples`` draws, seeded)."""
    seconds = np.asarray(pairs, dtype=np.float64)  # [n, 2]: off, capture
    draws = np.random.default_rng(seed).integers(0, len(seconds), size=(resamples, len(seconds)))
    sums = seconds[draws].sum(axis=1)  # [resamples, 2]
    ratios = sums[:, 1] / sums[:, 0]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


PAIRED_HEADER = ("| batch | part | calls | off s (sum) | capture s (sum) | capture / off (sums) "
                 "| 95 % interval (pairs resampled) | per call: median [quartiles] |\n"
                 "|---|---|---|---|---|---|---|---|")


def paired_row(batch: int, part: str, totals: dict[str, float], pairs: list[tuple[float, float]]) -> str:
    ratios = [capture / off for off, capture in pairs]
    a, b = quartiles(ratios)
    low, high = ratio_interval(pairs)
    return (f"| {batch} | {part} | {len(ratios)} | {totals['off']:.3f} | {totals['capture']:.3f} | "
            f"{totals['capture'] / totals['off']:.3f}x | [{low:.3f}, {high:.3f}] | "
            f"{statistics.median(ratios):.3f}x [{a:.3f}, {b:.3f}] |")


def paired_rows(batch: int, parts: dict[str, tuple[dict[str, float], list[tuple[float, float]]]]) -> str:
    """``paired_calls``' result as table rows, one per part."""
    return "\n".join(paired_row(batch, name, totals, pairs) for name, (totals, pairs) in parts.items())


def per_call_cost(model, engine, layout, batch: int, device: str, calls: int = 2000) -> dict:
    """Microseconds per ``act_fn`` call of one decode step, plain and hooked.

    The decode loop of ``generate`` is launch-bound (the host issues kernels slower than
    the GPU runs them), so a hook's cost per token is what it adds on the host per layer
    call. Timed here in isolation, as the best of 5 rounds of ``calls`` calls: a figure
    that the host's run-to-run noise hardly moves.
    """
    mlp = engine.groups["lm"].mlps[0]
    x = torch.randn(batch, 1, mlp.gate_proj.out_features, device=device, dtype=model.dtype)
    ids = torch.ones(batch, 2, dtype=torch.long, device=device)
    plan = steering_plan(layout, batch, 0.005, seed=batch)
    modes = {
        "plain": contextlib.nullcontext,
        "capture": lambda: engine.session(capture={"lm": Capture()}),
        "steer": lambda: engine.session(interventions={"lm": plan}),
        "capture+steer": lambda: engine.session(capture={"lm": Capture()}, interventions={"lm": plan}),
    }
    out = {}
    with torch.inference_mode():
        for mode, ctx in modes.items():
            with ctx():
                model(ids)  # a prefill, then one decode step: act_fn calls are decode calls
                model(ids[:, :1])
                best = float("inf")
                for _ in range(5):
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(calls):
                        mlp.act_fn(x)
                    sync(device)
                    best = min(best, (time.perf_counter() - start) / calls)
            out[mode] = best * 1e6
    return out


def main() -> None:
    # Imported here: kimi_audio_throughput imports this module's helpers on hosts without polars.
    from esn_core.stats import write_counts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alternate-repeats", type=int, default=None,
                    help="runs per mode with hooks toggled every step (default: --repeats)")
    ap.add_argument("--alternate-periods", type=int, nargs="+", default=[2],
                    help="hooks on for one step in every P, for each P given (2: every other "
                         "step; 3 or more also shows whether a hooked step's cost spills into the next)")
    ap.add_argument("--r", type=float, default=0.005)
    ap.add_argument("--raw", help="write every timed run's clock stamps to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler kernel tables per mode at the last batch size")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="decode steps on a static cache replayed as CUDA graphs with the hooks "
                         "inside (GraphedDecode, as the Qwen2.5-Omni adapter's cuda_graphs; on CPU "
                         "its fixed-slot path without recording)")
    args = ap.parse_args()
    if args.alternate_repeats is None:
        args.alternate_repeats = args.repeats
    for period in args.alternate_periods:
        # A hooked decode step, a plain one before it and a whole period after it.
        if period < 2 or args.new < 2 * period:
            ap.error(f"--alternate-periods {period}: needs a period >= 2 and --new >= {2 * max(period, 2)}"
                     f" (got --new {args.new})")

    model, group, engine = hooked_model(args.shape, args.device, args.attention)
    layout = group.layout
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; torch {torch.__version__}; shape {args.shape}; N = {layout.n_neurons}; "
          f"decode attention {args.attention}")
    print(f"prompt {args.prompt} tokens, {args.new} new tokens, median of {args.repeats}")

    clock = StepClock(args.device)
    graphs = graphed_decoder(model, args.device) if args.cuda_graphs else None
    if graphs is not None:
        print("decode steps: CUDA graphs on static caches, hooks inside"
              + ("" if args.device.startswith("cuda") else " (CPU: the fixed-slot path, no recording)"))
    caches: dict[int, object] = {}  # batch -> its static cache: graphs are recorded once per cache

    def generate(ids):
        clock.stamps.clear()
        clock.cpu_stamps.clear()
        clock.start = time.perf_counter()
        graphed = static_cache_keywords(model, caches, ids.shape[0], args.prompt + args.new) \
            if graphs is not None else {}
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                              min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([clock]), **graphed)

    rows = []
    raw: list[dict] = []  # every timed run's clock stamps, for --raw
    for batch in args.batches:
        ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (batch, args.prompt),
                            generator=torch.Generator().manual_seed(batch)).to(args.device)
        plan = steering_plan(layout, batch, args.r, seed=batch)
        modes = {
            "plain": contextlib.nullcontext,
            "plain again": contextlib.nullcontext,  # control: run-to-run noise of the baseline
            "capture": lambda: engine.session(capture={"lm": Capture()}),
            "steer": lambda: engine.session(interventions={"lm": plan}),
            "capture+steer": lambda: engine.session(capture={"lm": Capture()}, interventions={"lm": plan}),
        }
        times = {m: [] for m in modes}
        steps = {m: [] for m in modes}  # every decode step's seconds, all runs
        run_steps = {m: [] for m in modes}  # each run's median decode step
        cpu_steps = {m: [] for m in modes}  # the same in CPU seconds of the main thread
        prefills = {m: [] for m in modes}  # seconds to the first token
        outputs = {}
        collect = {m: [] for m in modes}
        entering = {m: [] for m in modes}  # seconds from entering the session to generate's call
        with torch.inference_mode():
            for mode in modes:  # warm-up
                with modes[mode]():
                    generate(ids)
            names = list(modes)
            for repeat in range(args.repeats):
                shift = repeat % len(names)
                for mode in names[shift:] + names[:shift]:
                    ctx = modes[mode]
                    gc.collect()
                    gc.disable()
                    sync(args.device)
                    t0 = time.perf_counter()
                    with ctx() as session:
                        out = generate(ids)
                        sync(args.device)
                        t1 = time.perf_counter()
                    times[mode].append(time.perf_counter() - t0)
                    gc.enable()
                    steps[mode].extend(np.diff(clock.stamps).tolist())
                    run_steps[mode].append(float(np.median(np.diff(clock.stamps))))
                    cpu_steps[mode].extend(np.diff(clock.cpu_stamps).tolist())
                    prefills[mode].append(clock.stamps[0] - clock.start)
                    entering[mode].append(clock.start - t0)
                    raw.append({"batch": batch, "mode": mode, "repeat": repeat, "start": clock.start,
                                "stamps": list(clock.stamps), "cpu_stamps": list(clock.cpu_stamps)})
                    collect[mode].append(time.perf_counter() - t1)
                    assert out.shape[1] == args.prompt + args.new
                    outputs[mode] = out
                    if mode == "capture":
                        counts = session.counts("lm")
        base = statistics.median(times["plain"])
        best = min(times["plain"])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "counts.parquet")
            write_counts(path, [f"a{i}" for i in range(batch)], counts.K, counts.T, layout)
            bytes_per_attempt = os.path.getsize(path) / batch
        print(f"batch {batch}: seconds per run " + "; ".join(
            f"{m} " + " ".join(f"{t:.3f}" for t in ts) for m, ts in times.items()))
        print(f"batch {batch}: median seconds spent leaving the session (counts to host): " + "; ".join(
            f"{m} {statistics.median(ts):.4f}" for m, ts in collect.items()))
        alternating = {period: alternate_steps(engine, plan, generate, ids, clock, args.alternate_repeats,
                                               args.device, raw, batch, period)
                       for period in args.alternate_periods}
        if args.profile and batch == args.batches[-1]:
            profile_modes(modes, generate, ids)
        # Capture only observes; a steered batch's empty-mask row is an untouched baseline.
        same_plain = torch.equal(outputs["plain again"], outputs["plain"])
        same_capture = torch.equal(outputs["capture"], outputs["plain"])
        same_baseline_row = (torch.equal(outputs["steer"][0], outputs["plain"][0]) if batch > 1
                             else "n/a (the only row steers)")
        print(f"batch {batch}: tokens identical: plain vs plain {same_plain}; capture vs plain "
              f"{same_capture}; steered batch's empty-mask row vs plain {same_baseline_row}"
              + ("" if same_plain else " (plain itself differs between runs here: the other two "
                 "say nothing; tests/test_hooks.py checks them)"))
        row = {"batch": batch, "plain_s": base}
        for mode in ("plain again", "capture", "steer", "capture+steer"):
            paired = [t / p for t, p in zip(times[mode], times["plain"])]
            q1, q3 = quartiles(paired)
            row[mode] = statistics.median(paired)
            row[mode + " (iqr)"] = (q1, q3)
            row[mode + " (min)"] = min(times[mode]) / best
            row[mode + " (step)"] = statistics.median(steps[mode]) / statistics.median(steps["plain"])
            row[mode + " (paired step)"] = statistics.median(
                s / p for s, p in zip(run_steps[mode], run_steps["plain"]))
            row[mode + " (cpu step)"] = (statistics.median(cpu_steps[mode])
                                         / statistics.median(cpu_steps["plain"]))
            row[mode + " (prefill)"] = statistics.median(
                t / p for t, p in zip(prefills[mode], prefills["plain"]))
        row["prefill_ms"] = statistics.median(prefills["plain"]) * 1e3
        row["alternating"] = alternating
        row["step_ms"] = statistics.median(steps["plain"]) * 1e3
        row["decode_ms"] = statistics.median(
            (r["stamps"][-1] - r["stamps"][0]) * 1e3 for r in raw if r["batch"] == batch and r["mode"] == "plain")
        row["entering_ms"] = {m: (statistics.median(entering[m]) - statistics.median(entering["plain"])) * 1e3
                              for m in modes}
        row["leaving_ms"] = {m: (statistics.median(collect[m]) - statistics.median(collect["plain"])) * 1e3
                             for m in modes}
        row["fast"] = fast_state_ratios(run_steps, times)
        row["bytes_per_attempt"] = bytes_per_attempt
        row["T"] = int(counts.T[0])
        row["per_call_us"] = per_call_cost(model, engine, layout, batch, args.device)
        rows.append(row)
        print(f"batch {batch:3d}: plain {base:.3f} s | plain again {row['plain again']:.3f}x | capture {row['capture']:.3f}x | "
              f"steer {row['steer']:.3f}x | capture+steer {row['capture+steer']:.3f}x | "
              f"counts {bytes_per_attempt / 1e6:.3f} MB/attempt (T={row['T']})", flush=True)
    if graphs is not None:
        stats = graphs.stats
        print(f"graphs: {stats.replays} decode steps replayed, {stats.captures} recorded in "
              f"{stats.capture_seconds:.2f} s, {stats.eager_calls} calls eager ({stats.reasons})")
    print("\nratios to plain generate: median of paired ratios [quartiles]; min of runs / min of plain")
    print("| batch | plain generate | plain again | capture | steering | capture+steering | counts per attempt |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(
            f"{r[m]:.3f}x [{r[m + ' (iqr)'][0]:.3f}, {r[m + ' (iqr)'][1]:.3f}]; {r[m + ' (min)']:.3f}x"
            for m in ("plain again", "capture", "steer", "capture+steer"))
        print(f"| {r['batch']} | {r['plain_s']:.3f} s | {cells} | {r['bytes_per_attempt'] / 1e6:.3f} MB |")
    print("\nper decode step: median over repeats of (a run's median step / the same repeat's "
          "plain run's); median step of all runs of a mode / that of plain runs (wall clock; "
          "main thread's CPU time)")
    print("| batch | plain step | plain again | capture | steering | capture+steering |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[m + ' (paired step)']:.3f}x; {r[m + ' (step)']:.3f}x; "
                           f"{r[m + ' (cpu step)']:.3f}x"
                           for m in ("plain again", "capture", "steer", "capture+steer"))
        print(f"| {r['batch']} | {r['step_ms']:.2f} ms | {cells} |")
    print(f"\nwhole runs in the host's fast state (run's median step <= {FAST_STATE:.2f}x the "
          "fastest run's of the batch): runs kept of all; median of their median steps over "
          "plain's; median of their whole-run times over plain's")
    print("| batch | plain | plain again | capture | steering | capture+steering |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fast = r["fast"]
        cells = " | ".join(f"{fast[m][0]}/{fast[m][1]}; {fast[m][2]:.3f}x; {fast[m][3]:.3f}x"
                           if m != "plain" else f"{fast[m][0]}/{fast[m][1]}"
                           for m in ("plain", "plain again", "capture", "steer", "capture+steer"))
        print(f"| {r['batch']} | {cells} |")
    for period in args.alternate_periods:
        what = ("every other step: per hooked step, its time over the mean of its two plain "
                "neighbours" if period == 2 else
                f"on for one step in {period}: per hooked step, its time over the mean of the plain "
                "step before it and the last of its period")
        print(f"\nhooked decode steps alternating with plain ones in the same generate (hooks taken "
              f"off and put back, {what}), median of all [quartiles of the runs' medians]; per run, "
              "mean hooked step / mean plain step, median of runs [quartiles]"
              + ("; then the plain step after a hooked one, over the same mean: ~1 unless the hooked "
                 "step's cost outlives it" if period > 2 else ""))
        print("| batch | plain/plain (control) | capture | steering | capture+steering |")
        print("|---|---|---|---|---|")
        for r in rows:
            cells = " | ".join(_alternating_cell(r["alternating"][period][m]) for m in ALTERNATING)
            print(f"| {r['batch']} | {cells} |")
    print("\nwhole generate composed from its parts: (time entering the session (a steering "
          "session compiles its operands there) + plain prefill x the prefill ratio + plain decode "
          "steps x the alternating step ratio + time leaving the session, each beyond plain's) / "
          "plain generate; the step ratio per step (median) and per run (mean) giving the two ends, "
          "over every period run; then entering and leaving, median ms")
    print("| batch | plain prefill + decode | capture | steering | capture+steering |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join("{:.3f}-{:.3f}x ({:.1f} + {:.1f} ms)".format(
            *composed_ratios(r, m), r["entering_ms"][m], r["leaving_ms"][m]) for m in ("capture", "steer", "capture+steer"))
        print(f"| {r['batch']} | {r['prefill_ms']:.1f} + {r['decode_ms']:.1f} ms | {cells} |")
    print("\nprefill (generate's call to its first token), median of paired ratios")
    print("| batch | plain prefill | plain again | capture | steering | capture+steering |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r[m + ' (prefill)']:.3f}x" for m in ("plain again", "capture", "steer", "capture+steer"))
        print(f"| {r['batch']} | {r['prefill_ms']:.1f} ms | {cells} |")
    if args.raw:
        with open(args.raw, "w") as f:
            json.dump({"device": name, "args": vars(args), "runs": raw}, f)
    layers = len(group.mlps)
    print(f"\nper act_fn call of a decode step (host microseconds, best of 5 x 2000 calls); "
          f"the hook's extra cost x {layers} layers, as a share of the plain decode step")
    print("| batch | plain | capture | steering | capture+steering |")
    print("|---|---|---|---|---|")
    for r in rows:
        us = r["per_call_us"]
        cells = " | ".join(
            f"{us[m]:.1f} us ({layers * (us[m] - us['plain']) / (r['step_ms'] * 1e3):+.1%})"
            for m in ("capture", "steer", "capture+steer"))
        print(f"| {r['batch']} | {us['plain']:.1f} us | {cells} |")


ALTERNATING = ("plain/plain", "capture", "steer", "capture+steer")

# A run is in the host's fast state when its median step is at most this much above the
# fastest run's of its batch (the lent hosts' two states lie ~1.6-1.8x apart).
FAST_STATE = 1.25


def composed_loops(whole: float, entering: float, leaving: float,
                   loops: list[tuple[float, float, float, list[float]]]) -> tuple[float, float]:
    """A whole call's hooked/plain ratio composed from its parts, each measured where the
    host's drift cancels: ``whole``, the plain call's seconds; entering and leaving the
    session (hooked only); and per hooked loop (prefill then decode steps) its plain
    prefill seconds, the prefill's paired ratio, its plain decode seconds and its decode
    steps' alternating ratios (e.g. a median and a mean ratio, the same kinds for every
    loop). Time outside the loops (``whole`` less theirs) runs no hook. Lowest and highest
    over the kinds of step ratio."""
    fixed = entering + leaving + sum(prefill * (ratio - 1) for prefill, ratio, _, _ in loops)
    kinds = {len(steps) for _, _, _, steps in loops}
    if len(kinds) != 1:
        raise ValueError("every loop needs the same kinds of step ratio")
    whole_ratios = [1 + (fixed + sum(decode * (steps[k] - 1) for _, _, decode, steps in loops)) / whole
                    for k in range(kinds.pop())]
    return min(whole_ratios), max(whole_ratios)


def composed_whole(prefill: float, decode: float, entering: float, leaving: float,
                   prefill_ratio: float, step_ratios: list[float]) -> tuple[float, float]:
    """``composed_loops`` for a call that is one prefill and its decode steps."""
    return composed_loops(prefill + decode, entering, leaving,
                          [(prefill, prefill_ratio, decode, step_ratios)])


def composed_ratios(row: dict, mode: str) -> tuple[float, float]:
    """Lowest and highest whole-generate ratio that the parts give (see the table's title)."""
    step_ratios = []
    for by_mode in row["alternating"].values():
        result = by_mode[mode]
        step_ratios += [statistics.median(result["steps"]), statistics.median(result["means"])]
    return composed_whole(row["prefill_ms"], row["decode_ms"], row["entering_ms"][mode],
                          row["leaving_ms"][mode], row[mode + " (prefill)"], step_ratios)


def fast_state_ratios(run_steps: dict[str, list[float]], times: dict[str, list[float]]) -> dict:
    """Per mode, from whole runs in the host's fast state only: (runs kept, runs, median of
    their median steps / plain's, median of their run times / plain's)."""
    limit = FAST_STATE * min(min(steps) for steps in run_steps.values())
    kept = {m: [i for i, step in enumerate(steps) if step <= limit] for m, steps in run_steps.items()}

    def median_kept(values: dict[str, list[float]], mode: str) -> float:
        picked = [values[mode][i] for i in kept[mode]]
        return statistics.median(picked) if picked else float("nan")

    return {m: (len(kept[m]), len(run_steps[m]),
                median_kept(run_steps, m) / median_kept(run_steps, "plain"),
                median_kept(times, m) / median_kept(times, "plain"))
            for m in run_steps}


def alternate_steps(engine, plan, generate, ids, clock, repeats: int, device: str,
                    raw: list[dict], batch: int, period: int = 2) -> dict:
    """Runs each hooked mode with its hooks on for one step in ``period`` (``Alternator``),
    in rotating order; returns per mode the pooled step ratios, each run's median step
    ratio and mean ratio, and the pooled spill ratios."""
    sessions = {
        "plain/plain": lambda: contextlib.nullcontext(None),
        "capture": lambda: engine.session(capture={"lm": Capture()}),
        "steer": lambda: engine.session(interventions={"lm": plan}),
        "capture+steer": lambda: engine.session(capture={"lm": Capture()}, interventions={"lm": plan}),
    }
    out = {m: {"steps": [], "runs": [], "means": [], "spill": []} for m in ALTERNATING}
    try:
        with torch.inference_mode():
            for repeat in range(repeats):
                shift = repeat % len(ALTERNATING)
                for mode in ALTERNATING[shift:] + ALTERNATING[:shift]:
                    gc.collect()
                    gc.disable()
                    sync(device)
                    with sessions[mode]() as session:
                        clock.after = alternator = Alternator(session, period)
                        generate(ids)
                        sync(device)
                        alternator.close()
                    gc.enable()
                    if "capture" in mode:  # counted: the prompt, then each hooked decode step
                        hooked_steps = sum(hooked_forward(f, period) for f in range(1, len(clock.stamps)))
                        assert session.counts("lm").T[0] == ids.shape[1] + hooked_steps
                    ratios, mean_ratio, spill = alternating_ratios(clock.stamps, period)
                    raw.append({"batch": batch, "mode": "alternating " + mode, "period": period, "repeat": repeat,
                                "start": clock.start, "stamps": list(clock.stamps),
                                "cpu_stamps": list(clock.cpu_stamps)})
                    out[mode]["steps"] += ratios
                    out[mode]["runs"].append(statistics.median(ratios))
                    out[mode]["means"].append(mean_ratio)
                    out[mode]["spill"] += spill
    finally:
        clock.after = None
    return out


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles, never outside the data (the default, exclusive method
    extrapolates from a few values)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def _alternating_cell(result: dict) -> str:
    (a, b), (c, d) = quartiles(result["runs"]), quartiles(result["means"])
    cell = (f"{statistics.median(result['steps']):.3f}x [{a:.3f}, {b:.3f}]; "
            f"{statistics.median(result['means']):.3f}x [{c:.3f}, {d:.3f}]")
    if result["spill"]:
        cell += f"; after it {statistics.median(result['spill']):.3f}x"
    return cell


def profile_modes(modes, generate, ids) -> None:
    """Kernel tables per mode (torch.profiler, one run each), then what each mode adds:
    the ops whose call count or device time differs from the plain run's."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for mode, ctx in modes.items():
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with ctx():
                generate(ids)
            torch.cuda.synchronize()
        events = prof.key_averages()
        tables[mode] = {e.key: (e.count, e.self_device_time_total / 1e3, e.self_cpu_time_total / 1e3)
                        for e in events}
        cuda_total = sum(e.self_device_time_total for e in events) / 1e3
        print(f"--- profile {mode}: total device time {cuda_total:.1f} ms")
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    plain = tables["plain"]
    for mode, table in tables.items():
        if mode == "plain":
            continue
        print(f"--- {mode} against plain: ops with other call counts or > 0.5 ms other device time "
              "(calls, device ms, host ms: plain -> mode)")
        for key in sorted(set(table) | set(plain)):
            (n0, d0, c0), (n1, d1, c1) = plain.get(key, (0, 0.0, 0.0)), table.get(key, (0, 0.0, 0.0))
            if n0 != n1 or abs(d1 - d0) > 0.5:
                print(f"  {key[:70]:70s} {n0:6d} -> {n1:6d} | {d0:8.2f} -> {d1:8.2f} | {c0:8.2f} -> {c1:8.2f}")


if __name__ == "__main__":
    main()
