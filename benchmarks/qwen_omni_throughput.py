"""End-to-end EVC throughput of Qwen2.5-Omni through the adapter: thinker, talker, token2wav.

    python3 benchmarks/qwen_omni_throughput.py --device cuda --batches 1 16 64
    python3 benchmarks/qwen_omni_throughput.py --tiny                # CPU smoke test

The model is ``Qwen2_5OmniForConditionalGeneration`` at Qwen2.5-Omni-7B's shapes (thinker
28 x 3584/18944 with its audio encoder and vision tower, talker 24 x 896/18944, token2wav
DiT 22 x 1024 + BigVGAN) with random bf16 weights built directly on the device (token2wav
in float32, as transformers runs it), and a random speaker.

Workload (``--lengths``): ``esd`` (default) draws every attempt's source duration, answer
text length and answer speech length from the ESD-like distribution of
``benchmarks/workloads.py`` (source 2-5 s, ~3 text tokens per second, speech 0.85-1.25x the
source at 50 codec tokens per second) and forces each row to end exactly there
(``ForcedLengths``), so a batch holds prompts of different lengths (left padding), rows
that finish early, and token2wav codes of different lengths, as a real run does. ``fixed``
gives every attempt ``--audio-seconds`` of source, ``--text-tokens`` and ``--codec-tokens``
(the earlier benchmarks' workload). Each batch size runs ``max(batch, --min-attempts)``
attempts spread evenly over the drawn distribution (``workloads.spread``), in consecutive
batches, so a batch-1 loop is timed on the same kind of mix as a batch of 64; the
utterances per hour are attempts / time.

Per batch size and mode the script reports the time of the thinker's ``generate``, the
talker's ``generate`` and token2wav (summed over its calls; inside it the DiT sampler and
BigVGAN), the total, EVC utterances per hour and peak device memory. Modes: ``off`` (no
hooks), ``capture`` (counts on the ``lm`` and ``synth`` groups, as config/paper.yaml
samples), ``steer`` (``steer`` alpha=1 on a random 0.5% ``lm`` mask in every row), ``fp32``
(no hooks, token2wav's matrix products in full float32 as transformers leaves them). Modes
are interleaved round-robin, rotating the order every repeat, with Python's garbage
collector paused inside each timed run; the median of ``--repeats`` runs is reported, and
a mode's ratio to ``off`` is the median of the repeat-by-repeat ratios. A batch size that
does not fit is reported as OOM, so ``--batches 1 16 32 64 128`` finds the largest that fits.
``--token2wav-ragged off`` decodes only rows of equal code length together (the adapter's
earlier behaviour), for a side-by-side comparison. ``--cuda-graphs`` and ``--overlap-speech``
(``on`` or ``both``) add modes suffixed ``+graphs`` (the adapter's ``cuda_graphs``) and
``+overlap`` (its ``overlap_speech``: batch n's token2wav on a worker thread while batch n+1
decodes, so time with several batches, e.g. ``--min-attempts`` three times the batch); each
mode's ratio is against ``off`` with the same suffixes, and an overlapped mode is also
compared with the same mode one batch after another. ``--eager-batches 1`` with
``--cuda-graphs both`` runs the eager-decode modes at batch 1 only: the batch-1 loop as
upstream runs it, the anchor of "over the eager batch-1 loop", beside graphs at every size.
``--stop-check both`` adds modes suffixed ``+every-step-stop``: the adapter's
``late_stop_check`` off, so the host waits for each decode step's "every row finished?"
as transformers does on CUDA (upstream's loop, and the anchor where it ran); the script
prints each decode's step time read late against every step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from transformers import LogitsProcessorList  # noqa: E402
from workloads import (  # noqa: E402
    EVERY_STEP, ForcedLengths, PartTimer, describe, esd_like, fixed, set_attention, spread,
    with_stop_check,
)

from esn_core.hooks import Capture, HookEngine, Intervention
from esn_core.models.graphed_decode import GraphedDecode
from esn_core.models.qwen_omni import QwenOmniAdapter, audio_token_count, thinker_text_decoder
from esn_core.models.speech_overlap import SpeechWorker

MAJOR = int(transformers.__version__.split(".")[0])

# Qwen2.5-Omni's token ids (the real tokenizer's), used to lay out prompts without it.
IM_START, IM_END, NEWLINE = 151644, 151645, 198
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
AUDIO, AUDIO_BOS, AUDIO_EOS = 151646, 151647, 151648
SPEAKER_BOS = 151872
PAD = 151643


def _rope(head_dim: int) -> dict:
    half = head_dim // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # 7B: 16/24/24
    rope = {"rope_type": "default", "mrope_section": section, "rope_theta": 1_000_000.0}
    if MAJOR < 5:
        return {"rope_scaling": {**rope, "type": "default"}}
    return {"rope_parameters": rope}


def omni_config(tiny: bool) -> Qwen2_5OmniConfig:
    """Qwen2.5-Omni-7B's configuration, or the same layout shrunk (``tiny``)."""
    if tiny:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, **_rope(8))
        audio = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2,
                     encoder_ffn_dim=32, output_dim=32)
        vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                      out_hidden_size=32, fullatt_block_indexes=[0])
        talker = dict(embedding_size=32, hidden_size=24, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=8, **_rope(8))
        dit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                   emb_dim=8, enc_emb_dim=8, enc_dim=8, enc_channels=[16, 16, 16, 16, 48],
                   enc_attention_channels=8, enc_se_channels=8, look_ahead_layers=[1],
                   look_backward_layers=[0])
        bigvgan = dict(upsample_initial_channel=16, upsample_rates=[5, 4],
                       upsample_kernel_sizes=[11, 8], resblock_kernel_sizes=[3],
                       resblock_dilation_sizes=[[1, 3, 5]])
    else:
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, **_rope(128))
        audio = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                     encoder_ffn_dim=5120, output_dim=3584)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])
        talker = dict(embedding_size=3584, hidden_size=896, intermediate_size=18944,
                      num_hidden_layers=24, num_attention_heads=12, num_key_value_heads=4,
                      head_dim=128, **_rope(128))
        dit, bigvgan = {}, {}  # the config defaults are the 7B token2wav
    text.update(vocab_size=152064, max_position_embeddings=32768, use_sliding_window=False,
                tie_word_embeddings=False, eos_token_id=IM_END, pad_token_id=151643)
    ids = dict(audio_token_index=AUDIO, image_token_index=151655, video_token_index=151656,
               audio_start_token_id=AUDIO_BOS, audio_end_token_id=AUDIO_EOS,
               vision_start_token_id=151652, vision_end_token_id=151653)
    thinker = dict(text_config=text, audio_config=dict(num_mel_bins=128, **audio),
                   vision_config=vision, user_token_id=USER, **ids)
    talker.update(vocab_size=8448, max_position_embeddings=32768, use_sliding_window=False, **ids)
    return Qwen2_5OmniConfig(
        thinker_config=thinker, talker_config=talker,
        token2wav_config=dict(dit_config=dit, bigvgan_config=bigvgan), enable_audio_output=True,
    )


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    """Random weights, created on ``device`` (no host copy of a 10B-parameter model)."""
    config = omni_config(tiny)
    config._attn_implementation = "sdpa"
    for sub in (config.thinker_config, config.thinker_config.text_config,
                config.thinker_config.audio_config, config.thinker_config.vision_config,
                config.talker_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2_5OmniForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    model.token2wav.float()  # what generate would do; keep it out of the timings
    # A trained talker emits codebook entries (ids below the DiT's codec vocabulary) and its
    # specials; random weights would also pick the unused ids above, which token2wav cannot
    # embed. Zero rows give those ids logit 0, below the best real code at every step.
    codes = config.token2wav_config.dit_config.num_embeds - 1
    with torch.no_grad():
        model.talker.codec_head.weight[codes:] = 0
    dit = config.token2wav_config.dit_config
    generator = torch.Generator().manual_seed(1)
    model.speaker_map = {"Chelsie": {
        "cond": torch.randn(1, dit.enc_emb_dim, generator=generator),
        "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=generator),
        "bos_token": SPEAKER_BOS,
    }}
    return model.eval().requires_grad_(False)


def evc_inputs(attempts, device: str, dtype: torch.dtype, rng) -> dict:
    """EVC prompts as the processor lays them out (system, user audio + instruction), one per
    attempt with its own source duration, left-padded to the longest as the adapter pads."""
    window = 3000  # the 30 s window the feature extractor pads to
    system = [IM_START, SYSTEM, NEWLINE, *rng.integers(1000, 100_000, 40), IM_END, NEWLINE]
    instruction = [*rng.integers(1000, 100_000, 28), IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    rows, frames = [], []
    for attempt in attempts:
        frames.append(int(attempt.source_seconds * 100))  # Whisper features: 100 per second
        n_audio = int(audio_token_count(torch.tensor(frames[-1])))
        rows.append(system + [IM_START, USER, NEWLINE, AUDIO_BOS, *[AUDIO] * n_audio, AUDIO_EOS,
                              *instruction])
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (longest - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
    features = torch.randn(len(rows), 128, window, device=device, dtype=dtype)
    feature_mask = torch.zeros(len(rows), window, dtype=torch.long, device=device)
    for b, n in enumerate(frames):
        feature_mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "input_features": features, "feature_attention_mask": feature_mask}


class OmniPartTimer(PartTimer):
    """Times thinker.generate, talker.generate and token2wav.forward on the instance, and
    inside token2wav its DiT sampler (``dit``) and its vocoder (``bigvgan``).

    Each part waits for its own thread's CUDA stream, not the device, so that with
    ``+overlap`` the decode's parts do not wait for the speech worker's token2wav (and the
    parts then overlap in time: their sum exceeds the total)."""

    def __init__(self, model, device: str):
        cuda = str(device).startswith("cuda")
        super().__init__((lambda: torch.cuda.current_stream().synchronize()) if cuda else (lambda: None))
        self.wrap("thinker", model.thinker, "generate")
        self.wrap("talker", model.talker, "generate")
        self.wrap("token2wav", model.token2wav, "forward")
        self.wrap("dit", model.token2wav.code2wav_dit_model, "sample")
        self.wrap("bigvgan", model.token2wav.code2wav_bigvgan_model, "forward")
        # One stamp per forward (= per generated token): per-step times, robust to the few
        # slow runs a shared host produces.
        self.stamps: dict[str, list[float]] = {"thinker": [], "talker": []}
        for name in self.stamps:
            getattr(model, name).register_forward_pre_hook(
                lambda module, args, name=name: self.stamps[name].append(time.perf_counter()))

    def reset(self) -> None:
        super().reset()
        for stamps in self.stamps.values():
            stamps.clear()

    def step_seconds(self, name: str) -> list[float]:
        """Seconds between consecutive decode forwards (the prefill's interval left out)."""
        return np.diff(self.stamps[name][1:]).tolist()


def forced_lengths(adapter, attempts) -> dict:
    """``generate`` keywords that end row ``b``'s text and speech at its attempt's lengths."""
    return {
        "thinker_logits_processor": LogitsProcessorList(
            [ForcedLengths([a.text_tokens for a in attempts], [IM_END])]),
        "talker_logits_processor": LogitsProcessorList(
            [ForcedLengths([a.codec_tokens for a in attempts], adapter.talker_eos)]),
    }


def check_lengths(sequences, prompt_len: int, attempts) -> None:
    """Each row's text ended where it was forced to (the workload is what it says)."""
    answers = sequences[:, prompt_len:].cpu()
    for row, attempt in zip(answers, attempts):
        ends = torch.nonzero(row == IM_END).flatten()
        made = int(ends[0]) if ends.numel() else row.numel()
        if made != attempt.text_tokens:
            raise RuntimeError(f"thinker made {made} tokens, expected {attempt.text_tokens}")


GRAPHS = "+graphs"  # a mode's suffix: decode steps replayed as CUDA graphs
OVERLAP = "+overlap"  # a mode's suffix: token2wav beside the next batch's decode (overlap_speech)


def plain_mode(mode: str) -> str:
    """The hook-free mode run the same way (same suffixes): what a mode's ratio is against."""
    return "off" + mode[len(mode.split("+")[0]):]


def graph_runners(model, mode: str) -> list[GraphedDecode]:
    """What ``cuda_graphs`` installs (the thinker's text decoder and the talker's stack)."""
    return [GraphedDecode(thinker_text_decoder(model.thinker), mode), GraphedDecode(model.talker.model, mode)]


def check_graphs(adapter, engine, batch, graphed: list[GraphedDecode]) -> str:
    """One capture run through the graphs against the same fixed-slot path run eagerly
    (same static cache, same kernels): are tokens and counts identical?"""
    inputs, attempts, seeds = batch
    results = []
    for runners in (graph_runners(adapter.model, "eager"), graphed):
        adapter._graph_runners = runners
        with engine.session(capture={"lm": Capture(), "synth": Capture()}) as session:
            sequences, _ = adapter.generate(inputs, seeds, **forced_lengths(adapter, attempts))
        results.append((sequences.cpu(), {g: session.counts(g) for g in ("lm", "synth")}))
    (eager_seq, eager), (graph_seq, graphs) = results
    parts = []
    differing = (eager_seq != graph_seq).any(dim=0).nonzero().flatten()
    parts.append("tokens identical" if differing.numel() == 0 else
                 f"tokens differ from position {int(differing[0])} of {eager_seq.shape[1]}")
    for g in eager:
        k_diff = int((eager[g].K != graphs[g].K).sum())
        parts.append(f"{g} T {'identical' if np.array_equal(eager[g].T, graphs[g].T) else 'DIFFER'}, "
                     f"K {'identical' if k_diff == 0 else f'{k_diff} of {eager[g].K.size} differ'}")
    replays = sum(r.stats.replays for r in graphed)
    return (f"graphs vs the eager fixed-slot path on {len(attempts)} rows ({replays} graph "
            f"replays): " + "; ".join(parts))


def run_once(adapter, engine, mode, batches, steer_plans, timer, graphed=()) -> dict:
    """One timed pass over ``batches`` (a list of (inputs, attempts, seeds)) in one mode.

    ``+overlap``: as the workflow runs with ``overlap_speech``, each batch's token2wav on the
    speech worker (its own thread and CUDA stream) while the next batch's thinker and talker
    decode; the pass ends when the last batch's speech is on the host.
    """
    timer.reset()
    adapter._graph_runners = list(graphed) if GRAPHS in mode else []
    adapter.overlap_speech = OVERLAP in mode
    adapter.late_stop_check = EVERY_STEP not in mode
    mode = mode.split("+")[0]
    adapter.token2wav_tf32 = mode != "fp32"
    gc.collect()
    gc.disable()  # a collection inside one mode's run would be charged to that mode
    try:
        timer.sync()
        start = time.perf_counter()
        with SpeechWorker(adapter.overlap_speech, adapter.device) as speech:
            for inputs, attempts, seeds in batches:
                if mode in ("off", "fp32"):
                    scope = contextlib.nullcontext()
                elif mode == "capture":
                    scope = engine.session(capture={"lm": Capture(), "synth": Capture()})
                else:
                    scope = engine.session(interventions={"lm": steer_plans[len(attempts)]})
                with scope:
                    result, calls, row_seeds = adapter.generate_codes(
                        inputs, seeds, **forced_lengths(adapter, attempts))
                check_lengths(result[0], inputs["input_ids"].shape[1], attempts)
                speech.submit(adapter.begin_speech(calls, row_seeds), lambda waves: None)
        timer.sync()
        total = time.perf_counter() - start
    finally:
        gc.enable()
        adapter.overlap_speech = False
        adapter.late_stop_check = True
    steps = {f"{name}_steps": timer.step_seconds(name) for name in timer.stamps}
    return {**timer.seconds, "total": total, **steps}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes: a CPU smoke test")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", default=["off", "capture", "steer"],
                        choices=["off", "capture", "steer", "fp32"],
                        help="fp32 = no hooks, token2wav without TF32 (transformers' setting)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--lengths", choices=["esd", "fixed"], default="esd",
                        help="esd: per-row lengths drawn ESD-like (workloads.py); fixed: all equal")
    parser.add_argument("--length-scale", type=float, default=None,
                        help="multiply the drawn text and codec lengths (default 1; --tiny 0.05)")
    parser.add_argument("--min-attempts", type=int, default=8,
                        help="attempts timed per batch size at least (a batch-1 loop runs this many)")
    parser.add_argument("--batch1-attempts", type=int, default=None,
                        help="attempts the batch-1 loop runs (default: --min-attempts), spread "
                             "over the same draw, so one run can time it beside large batches")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn workload")
    parser.add_argument("--text-tokens", type=int, default=None, help="--lengths fixed")
    parser.add_argument("--codec-tokens", type=int, default=None, help="--lengths fixed")
    parser.add_argument("--audio-seconds", type=float, default=3.0, help="--lengths fixed")
    parser.add_argument("--token2wav-steps", type=int, default=10)
    parser.add_argument("--token2wav-batch-size", type=int, default=16,
                        help="most rows per token2wav call (1 = per row, transformers' way)")
    parser.add_argument("--token2wav-ragged", choices=["on", "off"], default="on",
                        help="off: only rows of equal code length share a token2wav call")
    parser.add_argument("--attention", choices=["packed", "stock"], default="packed",
                        help="decode-step attention: packed (the adapter's, the default) or "
                             "transformers' sdpa (before 5.23: the KV cache expanded per query head)")
    parser.add_argument("--eager-batches", type=int, nargs="+", default=None,
                        help="with --cuda-graphs both: the eager-decode modes only at these batch "
                             "sizes (e.g. 1: the batch-1 loop as upstream runs it, beside graphs)")
    parser.add_argument("--cuda-graphs", choices=["off", "on", "both"], default="off",
                        help="decode steps as CUDA graphs (static caches); both: each mode twice")
    parser.add_argument("--overlap-speech", choices=["off", "on", "both"], default="off",
                        help="token2wav of batch n beside the decode of batch n+1 (the adapter's "
                             "overlap_speech); both: each mode twice")
    parser.add_argument("--stop-check", choices=["late", "every-step", "both"], default="late",
                        help="late: the adapter's late_stop_check (the default), the host queues a "
                             "step before the last one ends; every-step: waits for it, as "
                             "transformers does on CUDA; both: each mode twice")
    parser.add_argument("--every-step-batches", type=int, nargs="+", default=None,
                        help="with --stop-check both: the every-step modes only at these batch sizes")
    parser.add_argument("--rate", type=float, default=0.005, help="steer mask share of lm neurons")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="cap this process's GPU memory (e.g. 78 = an 80 GB card)")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 16, 64])
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.text_tokens = args.text_tokens or (4 if args.tiny else 32)
    args.codec_tokens = args.codec_tokens or (8 if args.tiny else 200)
    scale = args.length_scale or (0.05 if args.tiny else 1.0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    elif args.memory_cap_gib:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), index)

    n_draw = max(max(args.batches), args.min_attempts)
    if args.lengths == "esd":
        # (at least 3 text tokens and 2 codes: two decode steps to time)
        draw = [type(a)(a.source_seconds, max(3, round(a.text_tokens * scale)),
                        max(2, round(a.codec_tokens * scale))) for a in esd_like(n_draw, args.seed)]
    else:
        draw = fixed(n_draw, args.audio_seconds, args.text_tokens, args.codec_tokens)
    started = time.perf_counter()
    model = build_model(args.tiny, device, dtype)
    built = time.perf_counter() - started
    adapter = QwenOmniAdapter.from_model(
        model, speaker="Chelsie", max_new_tokens=max(a.text_tokens for a in draw) + 1,
        talker_max_new_tokens=max(a.codec_tokens for a in draw) + 1,
        token2wav_steps=args.token2wav_steps, stop_token_ids=[IM_END, PAD],
        token2wav_batch_size=args.token2wav_batch_size,
        token2wav_ragged=args.token2wav_ragged == "on",
    )
    engine = HookEngine(adapter.groups())
    attention = set_attention(model, args.attention)
    timer = OmniPartTimer(model, device)
    graphed = graph_runners(model, "cuda" if device.startswith("cuda") else "eager") \
        if args.cuda_graphs != "off" else []
    if args.cuda_graphs != "off":
        suffixed = [m + GRAPHS for m in args.modes]
        args.modes = suffixed if args.cuda_graphs == "on" else args.modes + suffixed
    if args.overlap_speech != "off":
        suffixed = [m + OVERLAP for m in args.modes]
        args.modes = suffixed if args.overlap_speech == "on" else args.modes + suffixed
    args.modes = with_stop_check(args.modes, args.stop_check)
    n_lm = engine.layout("lm").n_neurons
    rng = np.random.default_rng(0)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# Qwen2.5-Omni {'tiny' if args.tiny else '7B'} throughput on {name}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}; built in {built:.1f} s; "
          f"{attention}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# workload {args.lengths}"
          + (f" (lengths x{scale:g})" if scale != 1 else "") + f": {describe(draw)}; each row ends "
          f"at its own lengths; token2wav {args.token2wav_steps} steps in calls of up to "
          f"{args.token2wav_batch_size} rows, ragged {args.token2wav_ragged}; median of {args.repeats}")
    print("| batch | attempts | mode | thinker | talker | token2wav (DiT + BigVGAN) | total "
          "| utterances/hour | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for batch in args.batches:
        wanted = args.batch1_attempts if batch == 1 and args.batch1_attempts else args.min_attempts
        chosen = spread(draw, max(batch, wanted))
        modes = [m for m in args.modes
                 if (GRAPHS in m or args.eager_batches is None or batch in args.eager_batches)
                 and (EVERY_STEP not in m or args.every_step_batches is None
                      or batch in args.every_step_batches)]
        batches = []
        for start in range(0, len(chosen), batch):
            attempts = chosen[start : start + batch]
            batches.append((evc_inputs(attempts, device, dtype, rng), attempts,
                            list(range(start, start + len(attempts)))))
        mask = np.sort(rng.choice(n_lm, int(args.rate * n_lm), replace=False))
        steer_plans = {len(a): Intervention.uniform("steer", mask, 1.0, len(a)) for _, a, _ in batches}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runs = defaultdict(list)
        try:
            for _ in range(args.warmup):
                run_once(adapter, engine, "off", batches[:1], steer_plans, timer)
            if graphed:
                # Records the plain graphs (what a job pays once), then checks the counting ones.
                started_graphs = time.perf_counter()
                run_once(adapter, engine, "off" + GRAPHS, batches[:1], steer_plans, timer, graphed)
                print(f"#   batch {batch}: first generate through the graphs {time.perf_counter() - started_graphs:.1f} s "
                      f"({sum(r.stats.captures for r in graphed)} graphs so far, "
                      f"{sum(r.stats.capture_seconds for r in graphed):.2f} s recording them)")
                print("#   " + check_graphs(adapter, engine, batches[0], graphed), flush=True)
            for repeat in range(args.repeats):
                # Rotate the order, so that no mode always runs first (or after another).
                shift = repeat % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    runs[mode].append(run_once(adapter, engine, mode, batches, steer_plans, timer, graphed))
        except torch.OutOfMemoryError:
            print(f"| {batch} | {len(chosen)} | all | OOM | | | | | |")
            results.append({"batch": batch, "oom": True})
            del batches
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
        peak_text = f"{peak:.1f} GiB" if peak is not None else "-"
        for mode in modes:
            med = {k: statistics.median(r[k] for r in runs[mode])
                   for k in runs[mode][0] if not k.endswith("_steps")}
            per_hour = len(chosen) / med["total"] * 3600
            ratio = ""
            plain = plain_mode(mode)  # hooks vs the same decode
            if plain in runs and mode != plain:
                # Median of the repeat-by-repeat ratios: each pair ran back to back.
                paired = statistics.median(
                    r["total"] / o["total"] for r, o in zip(runs[mode], runs[plain]))
                ratio = f" ({paired:.3f}x)"
            print(f"| {batch} | {len(chosen)} | {mode} | {med.get('thinker', 0):.2f} s | "
                  f"{med.get('talker', 0):.2f} s | {med.get('token2wav', 0):.2f} s "
                  f"({med.get('dit', 0):.2f} + {med.get('bigvgan', 0):.2f}) | "
                  f"{med['total']:.2f} s{ratio} | {per_hour:,.0f} | {peak_text} |", flush=True)
            step_ms = {name: 1e3 * statistics.median(t for r in runs[mode] for t in r[f"{name}_steps"])
                       for name in timer.stamps if any(r[f"{name}_steps"] for r in runs[mode])}
            results.append({"batch": batch, "attempts": len(chosen), "mode": mode, **med,
                            "utterances_per_hour": per_hour, "peak_gib": peak,
                            "step_ms": step_ms, "runs": runs[mode]})
        base = {r["mode"]: r["step_ms"] for r in results if r.get("batch") == batch and not r.get("oom")}
        print("#   median decode step (ms), ratio to off of the same decode: " + "; ".join(
            f"{mode} " + ", ".join(
                f"{name} {ms:.2f}" + (f" ({ms / base[plain][name]:.3f}x)"
                                      if (plain := plain_mode(mode)) in base
                                      and mode != plain and name in base[plain] else "")
                for name, ms in steps.items())
            for mode, steps in base.items()), flush=True)
        overlapped = [m for m in modes if OVERLAP in m and m.replace(OVERLAP, "") in runs]
        if overlapped:
            print("#   overlapped over one batch after another (total, median of paired repeats): " + ", ".join(
                f"{m} " + f"{statistics.median(o['total'] / r['total'] for o, r in zip(runs[m], runs[m.replace(OVERLAP, '')])):.3f}x"
                for m in overlapped))
        late = [m for m in modes if EVERY_STEP in m and m.replace(EVERY_STEP, "") in base]
        if late:
            print("#   stop flag read a step late over every step, per step: " + "; ".join(
                f"{m.replace(EVERY_STEP, '')} " + ", ".join(
                    f"{name} {ms:.2f} vs {base[m][name]:.2f} ms ({ms / base[m][name]:.3f}x)"
                    for name, ms in base[m.replace(EVERY_STEP, "")].items() if name in base[m])
                for m in late))
        if graphed and "off" in base and "off" + GRAPHS in base:
            print("#   graphs over eager decode, per step: " + ", ".join(
                f"{name} {base['off'][name] / ms:.2f}x" for name, ms in base["off" + GRAPHS].items()
                if name in base["off"]))
    for plain in dict.fromkeys(plain_mode(m) for m in args.modes):
        off = {r["batch"]: r["utterances_per_hour"] for r in results if r.get("mode") == plain}
        if 1 in off and len(off) > 1:
            print(f"# utterances/hour over the batch-1 loop ({plain}, same run): " + ", ".join(
                f"batch {b} {rate / off[1]:.1f}x" for b, rate in sorted(off.items()) if b != 1))
    # The anchor: batch 1 without hooks on the eager decode (overlapped if that is all that
    # ran), its stop flag read every step as upstream's transformers does, where that ran.
    ones = {r["mode"]: r["utterances_per_hour"] for r in results if r.get("batch") == 1 and not r.get("oom")}
    anchor = next((m for m in ("off" + EVERY_STEP, "off" + OVERLAP + EVERY_STEP, "off", "off" + OVERLAP)
                   if m in ones), None)
    if anchor:
        print(f"# utterances/hour over the eager batch-1 loop ({anchor}, same run): " + ", ".join(
            f"batch {r['batch']} {r['mode']} {r['utterances_per_hour'] / ones[anchor]:.1f}x"
            for r in results if r.get("batch") != 1 and not r.get("oom")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "argv": sys.argv, "torch": torch.__version__,
                       "transformers": transformers.__version__, "args": vars(args),
                       "workload": [vars(a) for a in draw], "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
