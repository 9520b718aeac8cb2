"""Kimi-Audio's batched step loop at full shape on random weights: utterances/hour, hooks, memory.

What is timed: ``KimiAudioAdapter.generate`` (prompt prefill + the two-stream step loop with
upstream's rules and one sampling generator per row), batch 1 against batched, with the
hooks off and capturing both groups (``lm``: 28 main layers, ``synth``: 6 MIMO layers).
The batch-1 loop stands in for upstream's loop, which is batch 1 only and cannot run here
(flash-attn, remote code): same rules, same model, one row per call.

With ``--speech`` each call is a whole conversion: the speech decoder (``speak_rows``: the
flow-matching DiT + BigVGAN, ``--speech-batch`` rows a call, then 16 kHz on the host, as the
adapter's ``convert`` runs it) decodes the call's codes, outside the hook session as in the
workflow. Its sizes are ``kimi_detokenizer_batched.py``'s (ASSUMED for the full shape: that
script's docstring says whence), random weights. Tables then give the whole call and the
LM's part (``text + codes``: prefill, step loop and session exit) from the same calls.

What is not timed (say so beside any figure): the source encoders (Whisper-large-v3 and the
WhisperVQ tokenizer, one row at a time); without ``--speech``, the speech decoder too. The
prompt's Whisper features are random tensors of the real width.

Workload (``workloads.esd_like``, Kimi's rates): source U(2, 5) s → 12.5 audio tokens a
second in the prompt (after a 24-token instruction); the answer's text ~3 tokens a second of
source; its speech the source's duration × U(0.85, 1.25) at 12.5 codes a second. Random
weights never end on their own, so ``ForcedEnds`` makes each row emit its text end and its
audio end exactly at its drawn lengths: rows of one batch finish at different steps, as real
conversions do.

Hook overhead per step (``alternating_overhead``): whole-run wall times on the lent GPU
hosts drift by more than the hooks cost, so each hooked mode (capture on both groups,
steering on ``lm``, both) also runs with its hooks on for every other step, and a hooked
step is compared with its plain neighbours; ``control`` shows what noise alone gives.

Whole-call capture cost (``--composed-repeats``): whole calls paired back to back still
drift by +-5-10 % on those hosts, so the whole call is also composed from its parts, each
measured where the drift cancels (``composed_overhead``): the prefill alone paired call by
call, entering and leaving the session timed apart, the decode steps by alternation, and the
plain call's prefill and decode times; a second figure takes capture's step ratios over the
alternation's ``control`` (which toggles nothing), cancelling the alternation's own bias.

``--stop-check both`` times each mode of the main table twice, the step loop reading "has
every row ended?" a step late (as the adapter runs, ``late_stop``) and every step (the host
waiting for each step), side by side; the other measurements run it late.

    python benchmarks/kimi_audio_throughput.py --shape full --device cuda --batches 1 64 \
        --alternate-repeats 4
    python benchmarks/kimi_audio_throughput.py --shape full --device cuda --batches 256 \
        --attempts 256 --repeats 0 --alternate-repeats 0 --composed-repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from hook_overhead import (  # noqa: E402
    ADAPTER_MODES as ALTERNATING, PAIRED_HEADER, Alternator, adapter_sessions, alternating_ratios,
    composed_whole, paired_calls, paired_rows, quartiles, rotated, steering_plan, sync,
)
from workloads import (  # noqa: E402
    Attempt, add_throughput_arguments, describe, esd_like, mode_ratio_lines, set_attention,
    spread, stop_flags_for, with_stop_check,
)
import esn_core.models.kimi_generate as step_loop  # noqa: E402
from esn_core.hooks import Capture, HookEngine  # noqa: E402
from esn_core.models.kimi_audio import TOKEN_RATE, KimiAudioAdapter  # noqa: E402
from esn_core.models.kimi_generate import Sampling, generate_two_streams  # noqa: E402
from esn_core.models.kimi_tokens import evc_prompt  # noqa: E402
from esn_core.models.kimi_detokenizer import Detokenizer  # noqa: E402
from kimi_detokenizer_batched import DIT, build as build_speech_decoder  # noqa: E402

SHAPES = {
    # Kimi-Audio-7B-Instruct's config.json (Qwen2-7B LM, 6 MIMO layers after layer 21).
    "full": dict(vocab_size=168448, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=8192),
    "tiny": dict(vocab_size=168448, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=8192,
                 kimia_mimo_layers=2, kimia_mimo_transformer_from_layer_index=2),
}
INSTRUCTION_TOKENS = 24
CODES_PER_CODEC = TOKEN_RATE / 50  # workloads draw speech at 50 codes/s; Kimi's are 12.5/s


def answer_codes(attempt: Attempt) -> int:
    return max(1, round(attempt.codec_tokens * CODES_PER_CODEC))


class ForcedEnds:
    """The LM with each row's text end at step ``text[b]`` and audio end at ``audio[b] + delay``,
    audio sampled among the audio codes only.

    Called as the step loop calls the LM (one call per step); the logits are edited on the
    device, so forcing adds no host sync. ``after_step``, if given, is called after each
    forward (the prefill's first): the per-step clock of ``alternating_overhead``."""

    def __init__(self, lm, ids, text_lengths, audio_lengths, delay: int, after_step=None):
        self.lm, self.ids, self.after_step = lm, ids, after_step
        device = next(lm.parameters()).device
        self.text_end = torch.tensor(text_lengths, device=device)
        self.audio_end = torch.tensor(audio_lengths, device=device) + delay
        # A trained audio head answers in audio codes; random weights would also pick text ids,
        # which the adapter drops, so the answer would be shorter than drawn.
        self.offset = lm.config.kimia_token_offset
        self.step = 0

    def __call__(self, **inputs):
        text, audio = self.lm(**inputs)
        step, self.step = self.step, self.step + 1
        text, audio = text.clone(), audio.clone()
        text[:, self.ids.text_eos] = torch.where(self.text_end == step, torch.inf, -torch.inf)
        ending = (self.audio_end == step)[:, None]
        audio[:, : self.offset] = -torch.inf
        forced = torch.full_like(audio, -torch.inf)
        forced[:, self.ids.msg_end] = 0.0
        if self.after_step is not None:
            self.after_step()
        return text, torch.where(ending, forced, audio)


def build(shape: str, device: str, dtype: str) -> KimiAudioAdapter:
    return KimiAudioAdapter.from_config(SHAPES[shape], device=device, dtype=dtype,
                                        sampling=Sampling())


def prompt_batch(adapter: KimiAudioAdapter, attempts: list[Attempt], seed: int):
    g = torch.Generator().manual_seed(seed)
    offset, width = adapter.config.kimia_token_offset, adapter.config.kimia_adaptor_input_dim
    lengths = [max(1, round(a.source_seconds * TOKEN_RATE)) for a in attempts]
    prompts = []
    for n in lengths:
        instruction = torch.randint(0, 1000, (INSTRUCTION_TOKENS,), generator=g).tolist()
        codes = (offset + torch.randint(0, 16384, (n,), generator=g)).tolist()
        prompts.append(evc_prompt(adapter.ids, instruction, codes))
    # The stand-in encoder features are drawn on the device: drawn on the host they cost
    # seconds at large batches, inside the timed calls, where a real job runs its encoder.
    on_device = torch.Generator(adapter.device).manual_seed(seed)
    drawn = torch.randn(sum(lengths), width, generator=on_device, device=adapter.device) * 0.1
    return adapter.batch(prompts, list(drawn.split(lengths)))


def attach_speech(adapter: KimiAudioAdapter, shape: str, max_rows: int, steps: int | None = None) -> None:
    """Give ``adapter`` a random-weight speech decoder of ``shape`` (the DiT's code vocabulary
    is the LM's audio vocabulary), run by ``speak_rows`` in calls of ``max_rows`` rows."""
    audio_codes = adapter.config.vocab_size - adapter.config.kimia_token_offset
    dit_config = dict(DIT[shape], semantic_vocab_size=audio_codes)
    dit, vocoder = build_speech_decoder(shape, str(adapter.device), adapter.dtype, dit_config)
    adapter.detokenizer = Detokenizer(dit, vocoder, steps=steps or (30 if shape == "full" else 3),
                                      max_rows=max_rows)


def run(adapter: KimiAudioAdapter, attempts: list[Attempt], seed: int, after_step=None):
    """One ``generate`` call on ``attempts`` with their lengths forced; returns its rows."""
    batch = prompt_batch(adapter, attempts, seed)
    real_lm = adapter.lm
    forced = ForcedEnds(real_lm, adapter.ids, [a.text_tokens for a in attempts],
                        [answer_codes(a) for a in attempts], adapter.sampling.audio_delay,
                        after_step)
    adapter.lm = forced  # the step loop calls adapter.lm; the hooks stay on the real LM
    try:
        return adapter.generate(batch, [seed + i for i in range(len(attempts))])
    finally:
        adapter.lm = real_lm


def timed_rows(adapter, engine, attempts, batch: int, mode: str, device: str) -> dict[str, float]:
    """Time to convert every attempt in calls of ``batch`` rows, hooks as ``mode`` says:
    ``whole`` seconds; of them ``leaving``, the time spent leaving the capture sessions (the
    counts reduced and copied to the host), which per-step figures do not see, and ``speech``,
    the speech decoder's (0 unless the adapter has one: ``attach_speech``)."""
    with stop_flags_for(mode, step_loop):
        return _timed_rows(adapter, engine, attempts, batch, mode.split("+")[0], device)


def _timed_rows(adapter, engine, attempts, batch: int, mode: str, device: str) -> dict[str, float]:
    sync(device)
    start, leaving, speech = time.perf_counter(), 0.0, 0.0
    for i in range(0, len(attempts), batch):
        chunk = attempts[i:i + batch]
        if mode == "capture":
            with engine.session(capture={"lm": Capture(), "synth": Capture()}):
                rows = run(adapter, chunk, seed=i)
                sync(device)
                exit_start = time.perf_counter()
            leaving += time.perf_counter() - exit_start
        else:
            rows = run(adapter, chunk, seed=i)
        if adapter.detokenizer is not None:
            sync(device)
            speech_start = time.perf_counter()
            adapter.speak_rows([r.codes for r in rows], [i + b for b in range(len(rows))])
            sync(device)
            speech += time.perf_counter() - speech_start
    sync(device)
    return {"whole": time.perf_counter() - start, "leaving": leaving, "speech": speech}


def paired_chunks(adapter, engine, attempts, batch: int, repeats: int, device: str):
    """``hook_overhead.paired_calls`` over every call of ``batch`` rows, ``repeats`` passes;
    session exits are inside capture's times, as a job pays them. With a speech decoder,
    the whole conversion and the LM's part (``text + codes``) from the same calls."""
    chunks = [attempts[i:i + batch] for i in range(0, len(attempts), batch)] * repeats

    def time_call(chunk, mode):
        t = timed_rows(adapter, engine, chunk, batch, mode, device)
        if adapter.detokenizer is None:
            return t["whole"]
        return {"whole conversion": t["whole"], "text + codes": t["whole"] - t["speech"]}

    return paired_calls(chunks, time_call)


def alternating_overhead(adapter, engine, attempts, batch: int, repeats: int, device: str,
                         period: int = 2, modes: tuple[str, ...] = ALTERNATING) -> dict[str, dict[str, list[float]]]:
    """Per-step hook cost: each hooked mode runs one ``generate`` with its hooks on for one
    step in ``period`` (``hook_overhead.Alternator``), and each hooked step is compared with
    its two plain neighbours, which share the machine's state of the moment (whole-run wall
    times on the lent hosts drift by more than the cost measured). ``control`` toggles
    nothing at the same Python cost: its ratio is what noise alone gives. Capture is on
    both groups; steering is on ``lm``, per-row masks of 0.5 % of its neurons, one row
    unsteered, as an evaluation batch mixes them."""
    plan = steering_plan(adapter.groups()["lm"].layout, batch, 0.005, seed=batch)
    sessions = adapter_sessions(engine, ("lm", "synth"), {"lm": plan})
    chunk = attempts[:batch]
    out = {m: {"steps": [], "runs": [], "means": []} for m in modes}
    for repeat in range(repeats):
        for mode in rotated(modes, repeat):
            stamps: list[float] = []
            with sessions[mode]() as session:
                alternator = Alternator(session, period)

                def after_step():
                    sync(device)
                    stamps.append(time.perf_counter())
                    alternator()

                try:
                    run(adapter, chunk, seed=repeat, after_step=after_step)
                finally:
                    alternator.close()
            ratios, mean_ratio, _ = alternating_ratios(stamps, period)
            out[mode]["steps"] += ratios
            out[mode]["runs"].append(statistics.median(ratios))
            out[mode]["means"].append(mean_ratio)
    return out


def prefill_call(adapter: KimiAudioAdapter, attempts: list[Attempt], seed: int) -> None:
    """The prompt's prefill alone: the step loop with every row capped at one forward."""
    batch = prompt_batch(adapter, attempts, seed)
    rows = len(attempts)
    generate_two_streams(adapter.lm, batch, adapter.ids, [seed + b for b in range(rows)],
                         [1] * rows, adapter.sampling)


def timed_prefill(adapter, engine, attempts, mode: str, device: str) -> dict[str, float]:
    """One prefill's seconds, hooks as ``mode`` says; with capture also the seconds spent
    entering and leaving its session (the counts to the host), timed apart."""
    sync(device)
    start = time.perf_counter()
    if mode != "capture":
        prefill_call(adapter, attempts, seed=0)
        sync(device)
        return {"prefill": time.perf_counter() - start, "entering": 0.0, "leaving": 0.0}
    session = engine.session(capture={"lm": Capture(), "synth": Capture()})
    session.__enter__()
    sync(device)
    entered = time.perf_counter()
    try:
        prefill_call(adapter, attempts, seed=0)
        sync(device)
    finally:
        ran = time.perf_counter()
        session.__exit__(None, None, None)
        sync(device)
    return {"prefill": ran - entered, "entering": entered - start,
            "leaving": time.perf_counter() - ran}


def composed_overhead(adapter, engine, attempts, batch: int, repeats: int, device: str) -> dict:
    """Whole-call capture cost composed from parts that are each measured where the host's
    drift cancels (whole calls paired back to back still drift by +-5-10 % on the lent
    hosts): the prefill alone, off and capture paired call by call (``repeats`` x 4 pairs);
    entering and leaving the session, timed apart in those calls; the decode steps'
    alternating ratio (``alternating_overhead``, ``repeats`` runs; its ``control``, which
    toggles nothing, printed beside it: the alternation's own bias); and the plain call's
    prefill and decode times (the median whole call off, ``repeats`` calls, minus the
    median prefill off). See ``hook_overhead.composed_whole``."""
    chunk = attempts[:batch]
    extra = {"entering": [], "leaving": []}

    def time_prefill(part, mode):
        t = timed_prefill(adapter, engine, part, mode, device)
        if mode == "capture":
            extra["entering"].append(t["entering"])
            extra["leaving"].append(t["leaving"])
        return t["prefill"]

    (totals, pairs), = paired_calls([chunk] * (4 * repeats), time_prefill).values()
    prefill_off = statistics.median(off for off, _ in pairs)
    prefill_ratio = totals["capture"] / totals["off"]
    whole_off = statistics.median(timed_rows(adapter, engine, chunk, batch, "off", device)["whole"]
                                  for _ in range(repeats))
    alternated = alternating_overhead(adapter, engine, attempts, batch, repeats, device,
                                      modes=("control", "capture"))
    step_ratios, control = ([statistics.median(alternated[m]["steps"]),
                             statistics.median(alternated[m]["means"])] for m in ("capture", "control"))
    entering, leaving = (statistics.median(extra[k]) for k in ("entering", "leaving"))
    decode_off = whole_off - prefill_off
    low, high = composed_whole(prefill_off, decode_off, entering, leaving, prefill_ratio, step_ratios)
    # The alternation can favour one parity of steps with nothing toggled (its control read
    # 0.965x at 256 rows once): capture's step ratios over the control's cancel that.
    corrected = composed_whole(prefill_off, decode_off, entering, leaving, prefill_ratio,
                               [s / c for s, c in zip(step_ratios, control)])
    return {"prefill_off": prefill_off, "prefill_ratio": prefill_ratio,
            "prefill_quartiles": quartiles([c / o for o, c in pairs]), "entering": entering,
            "leaving": leaving, "decode_off": decode_off, "step_ratios": step_ratios,
            "control_ratios": control,
            "whole_off": whole_off, "composed": (low, high), "over_control": corrected}


COMPOSED_HEADER = (
    "| batch | prefill off ms | prefill capture / off (sums) [pair quartiles] | entering ms "
    "| leaving ms | decode off s | capture step / plain neighbours (median, mean) "
    "| control step (median, mean) | whole call off s | composed capture / off "
    "| composed, steps over control |\n|---|---|---|---|---|---|---|---|---|---|---|")


def composed_row(batch: int, r: dict) -> str:
    (qa, qb), (low, high), (c_low, c_high) = r["prefill_quartiles"], r["composed"], r["over_control"]
    return (f"| {batch} | {1e3 * r['prefill_off']:.1f} | {r['prefill_ratio']:.3f}x [{qa:.3f}, {qb:.3f}] "
            f"| {1e3 * r['entering']:.2f} | {1e3 * r['leaving']:.1f} | {r['decode_off']:.3f} | "
            f"{r['step_ratios'][0]:.3f}x, {r['step_ratios'][1]:.3f}x | {r['control_ratios'][0]:.3f}x, "
            f"{r['control_ratios'][1]:.3f}x | {r['whole_off']:.3f} | "
            f"{low:.3f}x-{high:.3f}x | {c_low:.3f}x-{c_high:.3f}x |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_throughput_arguments(ap, SHAPES)
    ap.add_argument("--modes", nargs="+", choices=["off", "capture"], default=["off", "capture"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alternate-repeats", type=int, default=2,
                    help="runs per hooked mode for the per-step overhead (0: skip it)")
    ap.add_argument("--speech-batch", type=int, default=16,
                    help="rows per speech-decoder call (the adapter's detokenizer_batch)")
    ap.add_argument("--speech-steps", type=int, default=None,
                    help="Euler points per chunk (default: upstream's 30; tiny shape 3)")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    modes = with_stop_check(args.modes, args.stop_check)

    build_start = time.perf_counter()
    adapter = build(args.shape, args.device, dtype)
    engine = HookEngine(adapter.groups())
    attention = set_attention(adapter.lm, args.attention)
    if args.speech:
        attach_speech(adapter, args.shape, args.speech_batch, args.speech_steps)
    print(f"# Kimi-Audio {args.shape} shape, {dtype}, {args.device}, "
          f"built in {time.perf_counter() - build_start:.1f} s; {attention}; "
          + (f"whole conversions: speech decoder ({'ASSUMED sizes, ' if args.shape == 'full' else ''}"
             f"{adapter.detokenizer.steps} Euler points a chunk, {args.speech_batch} rows a call)"
             if args.speech else "text + codes only (no speech decoder)"))
    largest = max(args.batches)
    attempts = esd_like(args.attempts or largest, seed=args.seed)
    print(f"# workload: {describe(attempts)}; answer codes 12.5/s "
          f"({min(map(answer_codes, attempts))}-{max(map(answer_codes, attempts))})")
    timed_rows(adapter, engine, spread(attempts, 2), 2, "off", args.device)  # warm-up (kernels, allocator)

    rates: dict[tuple[int, str], float] = {}
    if args.repeats:
        print("| batch | rows | mode | s (median) | of which leaving sessions s | of which speech s "
              "| utterances/hour | peak GiB (both modes) |")
        print("|---|---|---|---|---|---|---|---|")
    for batch in sorted(args.batches) if args.repeats else ():
        rows = spread(attempts, args.single_rows) if batch == 1 else attempts
        timed_rows(adapter, engine, attempts[:batch], batch, "off", args.device)  # first call, untimed
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        # Modes interleaved repeat by repeat, so drift on the host hits them alike.
        times = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                times[mode].append(timed_rows(adapter, engine, rows, batch, mode, args.device))
        peak = (torch.cuda.max_memory_allocated() / 2**30
                if args.device.startswith("cuda") else float("nan"))
        for mode in modes:
            seconds, leaving, speech = (float(np.median([t[k] for t in times[mode]]))
                                        for k in ("whole", "leaving", "speech"))
            rates[batch, mode] = len(rows) / seconds * 3600
            print(f"| {batch} | {len(rows)} | {mode} | {seconds:.3f} | {leaving:.4f} | "
                  f"{speech:.3f} | {rates[batch, mode]:,.0f} | {peak:.1f} |")
    if args.alternate_repeats:
        print("\n| batch | mode | hooked step / plain neighbours: median [quartiles of runs] "
              "| mean hooked / mean plain [quartiles] | steps |")
        print("|---|---|---|---|---|")
        for batch in sorted(args.batches):
            result = alternating_overhead(adapter, engine, attempts, batch,
                                          args.alternate_repeats, args.device)
            for mode in ALTERNATING:
                r = result[mode]
                (a, b), (c, d) = quartiles(r["runs"]), quartiles(r["means"])
                print(f"| {batch} | {mode} | {statistics.median(r['steps']):.3f}x "
                      f"[{a:.3f}, {b:.3f}] | {statistics.median(r['means']):.3f}x "
                      f"[{c:.3f}, {d:.3f}] | {len(r['steps'])} |")
    if args.paired_repeats:
        print("\n" + PAIRED_HEADER)
        for batch in sorted(b for b in args.batches if b > 1):
            print(paired_rows(batch, paired_chunks(adapter, engine, attempts, batch,
                                                   args.paired_repeats, args.device)))
    if args.composed_repeats:
        print("\n" + COMPOSED_HEADER)
        for batch in sorted(args.batches):
            result = composed_overhead(adapter, engine, attempts, batch, args.composed_repeats,
                                       args.device)
            print(composed_row(batch, result), flush=True)
    for batch in sorted(args.batches) if args.repeats else ():
        print("\n".join(mode_ratio_lines(batch, modes, rates)))
        if batch != 1 and 1 in args.batches:
            for mode in modes:
                print(f"# batch {batch} {mode}: {rates[batch, mode] / rates[1, mode]:.1f}x "
                      f"the batch-1 loop")


if __name__ == "__main__":
    main()
