"""MiniCPM-o 4.5's batched EVC at full shape on random weights: utterances/hour, hooks, memory.

What is timed: the adapter's text pass (``greedy_batch`` on stock ``Qwen3ForCausalLM``), each
row's TTS condition and the batched speech codes (``generate_codes`` through ``SynthStep``),
batch 1 against batched, hooks off and capturing both groups (``lm``: 36 Qwen3 layers,
``synth``: the 20 TTS backbone layers). The batch-1 loop (same code, one row per call)
stands in for upstream's ``chat``, which is batch 1 only and cannot run on our transformers.

With ``--speech`` each call is a whole conversion: the vocoder (S3 flow + HiFT, the adapter's
``_vocode``: ``MiniCPMVocoder.batch`` in calls of ``--speech-batch`` rows, each row's source as
its voice prompt, then 16 kHz on the host) runs on the call's codes, outside the hook session
as in the workflow. Its sizes and the stand-ins for its two ONNX models are
``minicpm_vocoder_batched.py``'s (the flow's sizes ASSUMED: that script's docstring says
whence), random float32 weights; the sources are that script's voiced stand-ins. Tables then
give the whole call and the text + codes part from the same calls.

What is not timed (say so beside any figure): the Whisper audio-in (one row at a time; the
prompt's audio embeddings are random tensors of the LM's width); without ``--speech``, the
vocoder too.

Shapes: Qwen3-8B's (hidden 4096, 12,288 gate neurons, 36 layers, 32/8 heads, vocab 151,748)
and MiniCPMTTSConfig's defaults (hidden 768, 3072 neurons, 20 layers, 12 heads; 6,562 codes
= S3's 6,561 + the end code). Workload (``workloads.esd_like``): source U(2, 5) s → its audio
embeddings twice (voice reference + input) plus ``SYSTEM_TOKENS`` of prompt text; the answer's
text ~3 tokens a second of source; its speech the source's duration × U(0.85, 1.25) at 25
codes a second, at least upstream's 50. Random weights never end on their own, so the text
pass and the code loop are forced to end each row at its drawn lengths (``ForcedText``,
``ForcedCodes``): rows of a batch finish at different steps, as real conversions do.

``--composed-repeats`` composes the whole call's capture cost from parts measured where the
host's drift cancels, as ``kimi_audio_throughput.py`` does, for both loops (text, codes).
``--stop-check both`` times each mode of the main table twice, both loops reading "has every
row ended?" a step late (as the adapter runs, ``late_stop``) and every step, side by side.

    python benchmarks/minicpm_o_throughput.py --shape full --device cuda --batches 1 64 256
    python benchmarks/minicpm_o_throughput.py --shape full --device cuda --batches 256 \
        --attempts 256 --repeats 0 --alternate-repeats 0 --composed-repeats 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from hook_overhead import (  # noqa: E402
    ADAPTER_MODES as ALTERNATING, PAIRED_HEADER, Alternator, adapter_sessions, alternating_ratios,
    composed_loops, paired_calls, paired_rows, quartiles, rotated, steering_plan, sync,
)
from workloads import (  # noqa: E402
    Attempt, add_throughput_arguments, codes_at, describe, esd_like, mode_ratio_lines,
    set_attention, spread, stop_flags_for, with_stop_check,
)
import esn_core.models.minicpm_generate as text_loop  # noqa: E402
import esn_core.models.minicpm_speech_codes as code_loop  # noqa: E402
from esn_core.hooks import Capture, HookEngine  # noqa: E402
from esn_core.models.minicpm_checkpoint import MiniCPMParts, lm_config  # noqa: E402
from esn_core.models.minicpm_generate import greedy_batch  # noqa: E402
from esn_core.models.minicpm_o import MiniCPMOAdapter  # noqa: E402
from esn_core.models.minicpm_prompt import audio_embedding_count  # noqa: E402
from esn_core.models.minicpm_speech_codes import CodeSampling, generate_codes  # noqa: E402
from esn_core.models.minicpm_tts import MiniCPMTTS  # noqa: E402
from esn_core.models.minicpm_tts_condition import tts_condition  # noqa: E402
from esn_core.models.audio import to_16k  # noqa: E402
from minicpm_vocoder_batched import build as build_vocoder, source_wav  # noqa: E402

SHAPES = {
    "full": dict(
        lm=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151748,
                max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False),
        tts=dict(llm_dim=4096, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=20, num_key_value_heads=12, num_audio_tokens=6562,
                 num_text_tokens=151748, num_vq=1, projector_type="mlp",
                 normalize_projected_hidden=True)),
    "tiny": dict(
        lm=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, vocab_size=300, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False),
        tts=dict(llm_dim=16, hidden_size=8, intermediate_size=12, num_attention_heads=2,
                 num_hidden_layers=2, num_key_value_heads=1, num_audio_tokens=11,
                 num_text_tokens=300, num_vq=1, projector_type="mlp",
                 text_eos_token_id=5, audio_bos_token_id=6, normalize_projected_hidden=True)),
}
SYSTEM_TOKENS = 40  # the system prompt, the turns' markers and the instruction
CODE_RATE = 25  # S3 codes a second


class SpecialIds:
    """The four token names the adapter looks up, at the vocabulary's top (random weights:
    which ids they are does not matter, only that the forcing and the hooks agree)."""

    def __init__(self, vocab: int):
        self.ids = {"<unk>": vocab - 4, "<|endoftext|>": vocab - 3, "<|tts_eos|>": vocab - 2,
                    "<|im_end|>": vocab - 1}

    def convert_tokens_to_ids(self, name: str) -> int:
        return self.ids[name]


def answer_codes(attempt: Attempt, sampling: CodeSampling) -> int:
    return codes_at(attempt, CODE_RATE, sampling.min_codes)


class ForcedText:
    """The LM with each row's end token (the first end id) at answer step ``lengths[b]`` and
    never before; edited on the device, no host sync added."""

    def __init__(self, llm, end_ids, lengths, after_step=None):
        self.llm, self.end_ids, self.after_step = llm, list(end_ids), after_step
        self.__wrapped__ = llm  # callers read the LM's signature through it (cache keyword)
        self.at = torch.tensor(lengths, device=llm.device)
        self.calls = 0

    def __call__(self, **inputs):
        out = self.llm(**inputs)
        last = out.logits[:, -1]
        last[:, self.end_ids] = -torch.inf
        last[:, self.end_ids[0]] = torch.where(self.at == self.calls, 1e4, -torch.inf)
        self.calls += 1
        if self.after_step is not None:
            self.after_step()
        return out


class ForcedCodes(nn.Module):
    """``SynthStep`` with each row's end code drawn at step ``lengths[b]`` and never before."""

    def __init__(self, step, lengths, after_step=None):
        super().__init__()
        self.inner, self.tts, self.after_step = step, step.tts, after_step
        self.end = step.tts.emb_code[0].num_embeddings - 1
        self.at = torch.tensor(lengths, device=step.tts.emb_code[0].weight.device)
        self.calls = 0

    def forward(self, **inputs):
        logits = self.inner(**inputs)
        logits[:, :, self.end] = torch.where(self.at == self.calls, 1e4, -torch.inf)[:, None]
        self.calls += 1
        if self.after_step is not None:
            self.after_step()
        return logits


def build(shape: str, device: str, dtype: str) -> MiniCPMOAdapter:
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):  # random weights made in place, not moved there
            llm, tts = Qwen3ForCausalLM(lm_config(cfg["lm"])), MiniCPMTTS(cfg["tts"])
    finally:
        torch.set_default_dtype(previous)
    config = dict(cfg["lm"], tts_config=cfg["tts"], audio_pool_step=5)
    adapter = MiniCPMOAdapter.__new__(MiniCPMOAdapter)
    adapter._attach(MiniCPMParts(llm.eval(), nn.Identity(), tts.eval(), config),
                    SpecialIds(cfg["lm"]["vocab_size"]), vocoder=None, device=torch.device(device),
                    max_new_tokens=4096, sampling=CodeSampling(), template=None)
    return adapter


@functools.lru_cache(maxsize=None)
def source_of(seconds: float, seed: int):
    """A stand-in source wave, made once (a real job reads its source from disk)."""
    return source_wav(seconds, seed)


def speak(adapter: MiniCPMOAdapter, attempts: list[Attempt], codes, seed: int) -> list:
    """The call's 16 kHz waves, as the adapter's ``finish`` makes them (``_vocode``)."""
    rows = [c.codes[:, 0].tolist() for c in codes]
    sources = [source_of(a.source_seconds, i) for i, a in enumerate(attempts)]
    waves = adapter._vocode(rows, [seed + i for i in range(len(attempts))], sources)
    return [to_16k(wave, rate) for wave, rate in waves]


def prompts_for(adapter: MiniCPMOAdapter, attempts: list[Attempt], seed: int) -> list[torch.Tensor]:
    device = adapter.llm.device
    width = adapter.llm.config.hidden_size
    dtype = adapter.llm.model.embed_tokens.weight.dtype
    lengths = [SYSTEM_TOKENS + 2 * audio_embedding_count(int(a.source_seconds * 16000), 5)
               for a in attempts]
    # Drawn on the device: on the host, 512 rows of these cost seconds inside the timed calls
    # (a real job embeds its prompts on the device).
    g = torch.Generator(device).manual_seed(seed)
    drawn = torch.randn(sum(lengths), width, generator=g, device=device) * 0.02
    return list(drawn.to(dtype).split(lengths))


def convert(adapter: MiniCPMOAdapter, attempts: list[Attempt], seed: int,
            text_step=None, code_step=None):
    """Text, conditions and codes of ``attempts`` in one batch, each row ending at its lengths;
    returns (text rows, code rows, text seconds, code seconds). ``text_step`` / ``code_step``,
    if given, are called after each forward of the text pass / the code loop."""
    prompts = prompts_for(adapter, attempts, seed)
    device = str(adapter.llm.device)
    start = time.perf_counter()
    forced = ForcedText(adapter.llm, adapter.end_ids, [a.text_tokens for a in attempts],
                        text_step)
    texts = greedy_batch(forced, prompts, adapter.end_ids, adapter.pad, adapter.max_new_tokens)
    conditions = [tts_condition(adapter.tts, t.tokens[:t.hidden.shape[0]], t.hidden) for t in texts]
    sync(device)
    middle = time.perf_counter()
    if text_step is not None and hasattr(text_step, "finished"):
        text_step.finished()  # the code loop's prefill runs hooked
    step = ForcedCodes(adapter.step, [answer_codes(a, adapter.sampling) for a in attempts],
                       code_step)
    codes = generate_codes(step, conditions, [seed + i for i in range(len(attempts))],
                           adapter.sampling)
    sync(device)
    return texts, codes, middle - start, time.perf_counter() - middle


def timed_rows(adapter, engine, attempts, batch: int, mode: str) -> dict[str, float]:
    """Seconds for every attempt in calls of ``batch`` rows: ``whole``, and of it ``text``,
    ``codes`` and ``speech`` (the vocoder's; 0 unless the adapter has one)."""
    with stop_flags_for(mode, text_loop, code_loop):
        return _timed_rows(adapter, engine, attempts, batch, mode.split("+")[0])


def _timed_rows(adapter, engine, attempts, batch: int, mode: str) -> dict[str, float]:
    device = str(adapter.llm.device)
    sync(device)
    start, text_s, code_s, speech_s = time.perf_counter(), 0.0, 0.0, 0.0
    for i in range(0, len(attempts), batch):
        chunk = attempts[i:i + batch]
        if mode == "capture":
            with engine.session(capture={"lm": Capture(), "synth": Capture()}):
                _, codes, a, b = convert(adapter, chunk, seed=i)
        else:
            _, codes, a, b = convert(adapter, chunk, seed=i)
        text_s, code_s = text_s + a, code_s + b
        if adapter.vocoder is not None:
            sync(device)
            speech_start = time.perf_counter()
            speak(adapter, chunk, codes, seed=i)
            sync(device)
            speech_s += time.perf_counter() - speech_start
    sync(device)
    return {"whole": time.perf_counter() - start, "text": text_s, "codes": code_s, "speech": speech_s}


def paired_chunks(adapter, engine, attempts, batch: int, repeats: int):
    """``hook_overhead.paired_calls`` over every call of ``batch`` rows, ``repeats`` passes;
    with a vocoder, the whole conversion and the text + codes part from the same calls."""
    chunks = [attempts[i:i + batch] for i in range(0, len(attempts), batch)] * repeats

    def time_call(chunk, mode):
        t = timed_rows(adapter, engine, chunk, batch, mode)
        if adapter.vocoder is None:
            return t["whole"]
        return {"whole conversion": t["whole"], "text + codes": t["whole"] - t["speech"]}

    return paired_calls(chunks, time_call)


LOOPS = ("text", "codes")


class LoopClock:
    """After each forward of one loop: sync, stamp, alternate the session's hooks
    (``hook_overhead.Alternator``, a fresh one per loop so each loop's prefill runs hooked)."""

    def __init__(self, session, device: str):
        self.session, self.device = session, device
        self.stamps: list[float] = []
        self.alternator = Alternator(session, 2)

    def __call__(self) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        self.alternator()

    def finished(self) -> None:
        self.alternator.close()


def alternating_overhead(adapter, engine, attempts, batch: int, repeats: int,
                         modes: tuple[str, ...] = ALTERNATING):
    """Per-step hook cost in each loop: hooks on for every other forward of one conversion,
    each hooked step over its two plain neighbours (as ``kimi_audio_throughput``); capture
    and steering on both groups (steering: 0.5 % of each group's neurons per row, one row
    unsteered)."""
    device = str(adapter.llm.device)
    layouts = {name: group.layout for name, group in adapter.groups().items()}
    plans = {name: steering_plan(layout, batch, 0.005, seed=batch) for name, layout in layouts.items()}
    sessions = adapter_sessions(engine, ("lm", "synth"), plans)
    out = {(m, loop): {"steps": [], "means": []} for m in modes for loop in LOOPS}
    for repeat in range(repeats):
        for mode in rotated(modes, repeat):
            with sessions[mode]() as session:
                clocks = {loop: LoopClock(session, device) for loop in LOOPS}
                try:
                    convert(adapter, attempts[:batch], seed=repeat, text_step=clocks["text"],
                            code_step=clocks["codes"])
                finally:
                    for clock in clocks.values():
                        clock.finished()
            for loop, clock in clocks.items():
                ratios, mean_ratio, _ = alternating_ratios(clock.stamps, 2)
                out[mode, loop]["steps"] += ratios
                out[mode, loop]["means"].append(mean_ratio)
    return out


ONE_CODE = CodeSampling(min_codes=0, max_codes=1)  # the code loop's prefill alone


def timed_prefills(adapter, engine, attempts, conditions, mode: str) -> dict[str, float]:
    """The two loops' prefills alone (the text pass capped at one forward, the code loop at
    one code, on the conditions of the rows' real answers), hooks as ``mode`` says; with
    capture also the seconds spent entering and leaving its session, timed apart."""
    device = str(adapter.llm.device)
    prompts = prompts_for(adapter, attempts, seed=0)
    seeds = list(range(len(attempts)))
    session = engine.session(capture={"lm": Capture(), "synth": Capture()}) if mode == "capture" else None
    sync(device)
    start = time.perf_counter()
    if session is not None:
        session.__enter__()
        sync(device)
    entered = time.perf_counter()
    try:
        greedy_batch(adapter.llm, prompts, adapter.end_ids, adapter.pad, 1)
        sync(device)
        text_done = time.perf_counter()
        generate_codes(adapter.step, conditions, seeds, ONE_CODE)
        sync(device)
    finally:
        ran = time.perf_counter()
        if session is not None:
            session.__exit__(None, None, None)
            sync(device)
    return {"text prefill": text_done - entered, "code prefill": ran - text_done,
            "entering": entered - start, "leaving": time.perf_counter() - ran}


def composed_overhead(adapter, engine, attempts, batch: int, repeats: int) -> dict:
    """Whole-call capture cost composed from parts each measured where the host's drift
    cancels (as ``kimi_audio_throughput.composed_overhead``), for both loops: their
    prefills alone, off and capture paired call by call (``repeats`` x 4 pairs), entering
    and leaving the session timed apart in those calls, each loop's decode steps by
    alternation (``repeats`` runs), and the plain call's parts (median of ``repeats`` whole
    calls off). The TTS conditions (no hook) count as the text loop's decode time, so the
    composed cost errs high by their share."""
    chunk = attempts[:batch]
    texts, _, _, _ = convert(adapter, chunk, seed=0)
    conditions = [tts_condition(adapter.tts, t.tokens[:t.hidden.shape[0]], t.hidden) for t in texts]
    extra = {"entering": [], "leaving": []}

    def time_prefills(part, mode):
        t = timed_prefills(adapter, engine, part, conditions, mode)
        if mode == "capture":
            extra["entering"].append(t["entering"])
            extra["leaving"].append(t["leaving"])
        return {k: t[k] for k in ("text prefill", "code prefill")}

    prefills = paired_calls([chunk] * (4 * repeats), time_prefills)
    calls = [timed_rows(adapter, engine, chunk, batch, "off") for _ in range(repeats)]
    whole, loop_off = (statistics.median(c["whole"] - c["speech"] for c in calls),
                       {"text": statistics.median(c["text"] for c in calls),
                        "codes": statistics.median(c["codes"] for c in calls)})
    steps = alternating_overhead(adapter, engine, attempts, batch, repeats,
                                 modes=("control", "capture"))
    loops, out = [], {"whole_off": whole, "loops": {}}
    for loop, name in (("text", "text prefill"), ("codes", "code prefill")):
        totals, pairs = prefills[name]
        prefill_off = statistics.median(off for off, _ in pairs)
        result = steps["capture", loop]
        ratios = [statistics.median(result["steps"]), statistics.median(result["means"])]
        control = [statistics.median(steps["control", loop][k]) for k in ("steps", "means")]
        decode_off = loop_off[loop] - prefill_off
        loops.append((prefill_off, totals["capture"] / totals["off"], decode_off, ratios))
        out["loops"][loop] = {"prefill_off": prefill_off, "prefill_ratio": loops[-1][1],
                              "prefill_quartiles": quartiles([c / o for o, c in pairs]),
                              "decode_off": decode_off, "step_ratios": ratios,
                              "control_ratios": control}
    out["entering"], out["leaving"] = (statistics.median(extra[k]) for k in ("entering", "leaving"))
    out["composed"] = composed_loops(whole, out["entering"], out["leaving"], loops)
    # Each loop's step ratios over its control's (the alternation's own parity bias cancels).
    out["over_control"] = composed_loops(whole, out["entering"], out["leaving"], [
        (prefill, ratio, decode, [s / c for s, c in zip(steps_, out["loops"][loop]["control_ratios"])])
        for (prefill, ratio, decode, steps_), loop in zip(loops, LOOPS)])
    return out


COMPOSED_HEADER = (
    "| batch | loop | prefill off ms | prefill capture / off (sums) [pair quartiles] "
    "| decode off s | capture step / plain neighbours (median, mean) | control step (median, mean) |\n"
    "|---|---|---|---|---|---|---|")


def composed_rows(batch: int, r: dict) -> str:
    lines = []
    for loop, p in r["loops"].items():
        qa, qb = p["prefill_quartiles"]
        lines.append(f"| {batch} | {loop} | {1e3 * p['prefill_off']:.1f} | {p['prefill_ratio']:.3f}x "
                     f"[{qa:.3f}, {qb:.3f}] | {p['decode_off']:.3f} | {p['step_ratios'][0]:.3f}x, "
                     f"{p['step_ratios'][1]:.3f}x | {p['control_ratios'][0]:.3f}x, "
                     f"{p['control_ratios'][1]:.3f}x |")
    (low, high), (c_low, c_high) = r["composed"], r["over_control"]
    lines.append(f"# batch {batch}: entering {1e3 * r['entering']:.2f} ms, leaving "
                 f"{1e3 * r['leaving']:.1f} ms, whole call off {r['whole_off']:.3f} s (text + codes); "
                 f"composed capture / off {low:.3f}x-{high:.3f}x; steps over control "
                 f"{c_low:.3f}x-{c_high:.3f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_throughput_arguments(ap, SHAPES)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alternate-repeats", type=int, default=1,
                    help="conversions per hooked mode for the per-step overhead (0: skip it)")
    ap.add_argument("--speech-batch", type=int, default=16,
                    help="rows per vocoder call (the adapter's vocoder_batch_size)")
    ap.add_argument("--speech-steps", type=int, default=10,
                    help="the vocoder flow's Euler steps (the adapter's vocoder_steps)")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    modes = with_stop_check(["off", "capture"], args.stop_check)

    build_start = time.perf_counter()
    adapter = build(args.shape, args.device, dtype)
    engine = HookEngine(adapter.groups())
    attention = set_attention(adapter.llm, args.attention)
    if args.speech:
        adapter.vocoder = build_vocoder(args.shape, args.device, args.speech_steps)
        adapter.vocoder_batch_size = args.speech_batch
    print(f"# MiniCPM-o 4.5 {args.shape} shape, {dtype}, {args.device}, "
          f"built in {time.perf_counter() - build_start:.1f} s; {attention}; "
          + (f"whole conversions: vocoder ({'ASSUMED flow sizes, ' if args.shape == 'full' else ''}"
             f"float32, {args.speech_steps} flow steps, {args.speech_batch} rows a call)"
             if args.speech else "text + codes only (no vocoder)"))
    attempts = esd_like(args.attempts or max(args.batches), seed=args.seed)
    codes = [answer_codes(a, adapter.sampling) for a in attempts]
    print(f"# workload: {describe(attempts)}; answer codes 25/s ({min(codes)}-{max(codes)})")
    timed_rows(adapter, engine, spread(attempts, 2), 2, "off")  # warm-up (kernels, allocator)

    rates: dict[tuple[int, str], float] = {}
    if args.repeats:
        print("| batch | rows | mode | s (median) | text s | codes s | speech s | utterances/hour "
              "| peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
    for batch in sorted(args.batches) if args.repeats else ():
        rows = spread(attempts, args.single_rows) if batch == 1 else attempts
        timed_rows(adapter, engine, attempts[:batch], batch, "off")  # first call, untimed
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # modes interleaved, so drift hits them alike
            for mode in times:
                times[mode].append(timed_rows(adapter, engine, rows, batch, mode))
        peak = (torch.cuda.max_memory_allocated() / 2**30
                if args.device.startswith("cuda") else float("nan"))
        for mode, runs in times.items():
            total, text_s, code_s, speech_s = (float(np.median([r[k] for r in runs]))
                                               for k in ("whole", "text", "codes", "speech"))
            rates[batch, mode] = len(rows) / total * 3600
            print(f"| {batch} | {len(rows)} | {mode} | {total:.3f} | {text_s:.3f} | "
                  f"{code_s:.3f} | {speech_s:.3f} | {rates[batch, mode]:,.0f} | {peak:.1f} |")
    if args.alternate_repeats:
        print("\n| batch | loop | mode | hooked step / plain neighbours (median) "
              "| mean hooked / mean plain | steps |")
        print("|---|---|---|---|---|---|")
        for batch in sorted(args.batches):
            result = alternating_overhead(adapter, engine, attempts, batch, args.alternate_repeats)
            for loop in LOOPS:
                for mode in ALTERNATING:
                    r = result[mode, loop]
                    print(f"| {batch} | {loop} | {mode} | {statistics.median(r['steps']):.3f}x | "
                          f"{statistics.median(r['means']):.3f}x | {len(r['steps'])} |")
    if args.paired_repeats:
        print("\n" + PAIRED_HEADER)
        for batch in sorted(b for b in args.batches if b > 1):
            print(paired_rows(batch, paired_chunks(adapter, engine, attempts, batch,
                                                   args.paired_repeats)))
    if args.composed_repeats:
        print("\n" + COMPOSED_HEADER)
        for batch in sorted(args.batches):
            print(composed_rows(batch, composed_overhead(adapter, engine, attempts, batch,
                                                         args.composed_repeats)), flush=True)
    for batch in sorted(args.batches) if args.repeats else ():
        print("\n".join(mode_ratio_lines(batch, modes, rates)))
        if batch != 1 and 1 in args.batches:
            for mode in modes:
                print(f"# batch {batch} {mode}: {rates[batch, mode] / rates[1, mode]:.1f}x "
                      "the batch-1 loop")


if __name__ == "__main__":
    main()
