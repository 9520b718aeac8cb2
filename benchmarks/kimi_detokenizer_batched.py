"""Kimi-Audio's speech decoder on rows of different code lengths: one row per call against
``Detokenizer.batch``, on one realistic mix, with the batched waveforms checked against
the per-row ones.

    python benchmarks/kimi_detokenizer_batched.py --shape full --device cuda --rows 32 --micro 8 32
    python benchmarks/kimi_detokenizer_batched.py --shape tiny --device cpu   # smoke test

What is timed: ``Detokenizer`` (chunked flow-matching DiT, ``--steps`` Euler points per
chunk, then BigVGAN with the cross-faded hand-over) on random weights, from codes to the
24 kHz waveform. Workload: ``workloads.esd_like`` answers (the source's duration x
U(0.85, 1.25)) at Kimi's 12.5 codes a second: ~21-78 codes, 1-3 chunks of 30 codes.

Paths:
- ``per row``: one row per call (the adapter before batching; upstream is one stream per
  call), timed on ``--per-row-rows`` rows spread over the mix, reported per row;
- ``batched mN``: ``Detokenizer.batch`` in calls of up to N rows (longest rows together);
  BigVGAN runs padded and masked (``ragged_time_axis``) when its output length is
  proportional to its input, else once per distinct mel length;
- ``batched mN, vocoder by length``: the same with the ragged vocoder off.
Each path is timed ``--repeats`` times (median); the table gives ms per row (DiT + BigVGAN)
and, on the rows the per-row path decoded, the batched waveform's max |difference| and
lowest SNR against them.

Shapes. ``tiny``: the test checkpoint's DiT (hidden 16, 2 blocks) and a 4-stage BigVGAN
(32 channels). ``full``: Kimi-Audio-7B-Instruct's ``audio_detokenizer/config.yaml`` and
``vocoder/config.json`` are files of its Hugging Face repository, which this project could
not read, and upstream's code (MoonshotAI/Kimi-Audio ``kimia_infer/models/detokenizer/``)
takes every size from them (``DiTPrefix``'s own defaults are hidden 1024, depth 12, 4
heads). The values below are ASSUMED: vllm-omni's fallback for a missing config (DiT
hidden 2304, 16 blocks, 18 heads, a 16384-code vocabulary, which is GLM-4-Voice's codebook;
BigVGAN upsampling 5-2-2-2-2-3-2 with kernels 9-4-4-4-4-5-4 from 2048 channels), with
BigVGAN-v2's resblocks (kernels 3, 7, 11; dilations 1, 3, 5; snakebeta) and our DiT's
``vanilla_mlp`` (mlp_ratio 4), sincos positions and RoPE. Replace them with the real files'
values when a run can read them (``--dit-config`` / ``--vocoder-config``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from workloads import (  # noqa: E402
    PartTimer, add_vocoder_arguments, codes_at, esd_like, random_codes, spread_indices,
    vocoder_device, worst_difference,
)

from esn_core.models.kimi_audio import TOKEN_RATE  # noqa: E402
from esn_core.models.kimi_detokenizer import DiT, Detokenizer  # noqa: E402

ROPE = {"max_position_embeddings": 4096, "rope_base": 10000.0, "rope_interpolation_factor": 1.0}
DIT = {
    "tiny": dict(input_size=80, semantic_vocab_size=48, hidden_size=16, depth=2, num_heads=2,
                 mlp_ratio=2.0, ffn_type="vanilla_mlp", position_embedding_type="sincos",
                 max_seq_len=4096, use_rope=True, rope_params=ROPE),
    # ASSUMED (module docstring): not the checkpoint's file.
    "full": dict(input_size=80, semantic_vocab_size=16384, hidden_size=2304, depth=16,
                 num_heads=18, mlp_ratio=4.0, ffn_type="vanilla_mlp",
                 position_embedding_type="sincos", max_seq_len=4096, use_rope=True,
                 rope_params=ROPE),
}
_MEL = dict(num_mels=80, sampling_rate=24000, hop_size=480, n_fft=1920, win_size=1920, fmin=0,
            fmax=None, resblock="1", activation="snakebeta", snake_logscale=True,
            use_tanh_at_final=False, use_bias_at_final=False)
VOCODER = {
    "tiny": dict(_MEL, upsample_rates=[8, 6, 5, 2], upsample_kernel_sizes=[16, 12, 11, 4],
                 upsample_initial_channel=32, resblock_kernel_sizes=[3],
                 resblock_dilation_sizes=[[1, 3]]),
    # ASSUMED (module docstring): not the checkpoint's file.
    "full": dict(_MEL, upsample_rates=[5, 2, 2, 2, 2, 3, 2],
                 upsample_kernel_sizes=[9, 4, 4, 4, 4, 5, 4], upsample_initial_channel=2048,
                 resblock_kernel_sizes=[3, 7, 11],
                 resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]]),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(shape: str, device: str, dtype: torch.dtype, dit_config=None, vocoder_config=None):
    """A random-weight DiT and BigVGAN of ``shape`` (or of the given config dicts)."""
    from bigvgan.bigvgan import BigVGAN
    from bigvgan.env import AttrDict

    torch.manual_seed(0)
    with torch.device(device):
        dit = DiT(dit_config or DIT[shape])
        vocoder = BigVGAN(AttrDict(vocoder_config or VOCODER[shape]), use_cuda_kernel=False)
    vocoder.remove_weight_norm()
    return (dit.to(dtype).eval().requires_grad_(False),
            vocoder.to(dtype).eval().requires_grad_(False))


def code_lengths(rows: int, seed: int) -> list[int]:
    """esd_like answers at 12.5 codes a second (the workload draws them at 50 a second)."""
    return [codes_at(a, TOKEN_RATE) for a in esd_like(rows, seed)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_vocoder_arguments(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights and activations (default: bfloat16 on CUDA, as the adapter)")
    parser.add_argument("--steps", type=int, default=None, help="Euler points per chunk (upstream 30)")
    parser.add_argument("--vocoder-by-length", action="store_true",
                        help="also time the batched paths with the ragged vocoder off")
    parser.add_argument("--dit-config", default=None, help="a JSON file of the DiT's model.dit section")
    parser.add_argument("--vocoder-config", default=None, help="BigVGAN's config.json")
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    device = vocoder_device(parser, args)
    dtype = DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    rows = args.rows or (6 if tiny else 32)
    micro = args.micro or ([rows] if tiny else [8, 32])
    per_row_rows = args.per_row_rows or (rows if tiny else 8)
    steps = args.steps or (3 if tiny else 30)
    repeats = args.repeats or (1 if tiny else 2)
    if min(micro) < 1 or rows < 1 or steps < 2:
        parser.error("--rows and --micro must be >= 1, --steps >= 2")

    def read(path):
        return json.loads(Path(path).read_text()) if path else None

    dit, vocoder = build(args.shape, device, dtype, read(args.dit_config), read(args.vocoder_config))
    lengths = code_lengths(rows, args.seed)
    vocab = dit.semantic_token_embedding.num_embeddings - 1
    codes = random_codes(lengths, vocab, args.seed + 1)
    seeds = [1000 + i for i in range(rows)]
    cuda = device == "cuda"
    parts = PartTimer.on(device)
    parts.wrap("dit", dit, "forward")
    parts.wrap("vocoder", vocoder, "forward")

    detokenizer = Detokenizer(dit, vocoder, steps=steps)
    proportional = detokenizer._vocoder_is_proportional()  # checked once, before any timing

    def decode(chosen, max_rows, ragged=True):
        """(median seconds, waveforms, DiT and vocoder seconds of that run, peak GiB)."""
        detokenizer.vocoder_ragged = ragged
        def run():
            generators = [torch.Generator(device=device).manual_seed(seeds[i]) for i in chosen]
            return detokenizer.batch([codes[i] for i in chosen], generators, max_rows=max_rows)

        seconds, waves, split, peak = parts.median_run(run, repeats, device)
        return seconds, [w.cpu() for w in waves], split["seconds"], peak

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"# Kimi-Audio detokenizer, {args.shape} shape{' (ASSUMED sizes)' if not tiny else ''}, "
          f"random weights, {str(dtype).removeprefix('torch.')} on {name}; torch {torch.__version__}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# {rows} rows, esd_like codes {min(lengths)}-{max(lengths)} (mean "
          f"{sum(lengths) / rows:.1f}) at 12.5 a second; {steps} Euler points per chunk; "
          f"median of {repeats}")
    print(f"# BigVGAN's output length {'is' if proportional else 'is NOT'} proportional to its "
          f"input: batched mels of different lengths go "
          f"{'through one padded call' if proportional else 'one call per length'}")
    decode([lengths.index(min(lengths))], 1)  # warm-up: kernels, allocator
    reference_rows = spread_indices(lengths, per_row_rows)
    results = []

    def report(label, chosen, measured, calls):
        seconds, waves, split, peak = measured
        ms = 1e3 * seconds / len(chosen)
        dit_ms, vocoder_ms = (1e3 * split[k] / len(chosen) for k in ("dit", "vocoder"))
        pairs = [(reference[i], w) for i, w in zip(chosen, waves) if i in reference]
        max_abs, low_snr = worst_difference(pairs)
        peak_text = f"{peak:.1f} GiB" if peak is not None else "-"
        print(f"| {label} | {len(chosen)} | {calls} | {ms:,.1f} ({dit_ms:,.1f} + {vocoder_ms:,.1f}) | "
              f"{max_abs:.2e} | {low_snr:.1f} dB | {peak_text} |", flush=True)
        results.append({"path": label, "rows": len(chosen), "calls": calls, "ms_per_row": ms,
                        "dit_ms_per_row": dit_ms, "vocoder_ms_per_row": vocoder_ms,
                        "max_abs": max_abs, "min_snr_db": low_snr, "peak_gib": peak})

    print("| path | rows | calls | ms per row (DiT + BigVGAN) | max abs diff vs per row | "
          "lowest SNR | peak memory |")
    print("|---|---|---|---|---|---|---|")
    single = decode(reference_rows, 1)
    reference = dict(zip(reference_rows, single[1]))
    report("per row", reference_rows, single, len(reference_rows))
    everything = list(range(rows))
    for size in micro:
        calls = -(-rows // size)
        report(f"batched m{size}", everything, decode(everything, size), calls)
        if args.vocoder_by_length:
            report(f"batched m{size}, vocoder by length", everything,
                   decode(everything, size, ragged=False), calls)
    per_row = results[0]["ms_per_row"]
    print("# per row / batched: " + ", ".join(
        f"{r['path']} {per_row / r['ms_per_row']:.2f}x" for r in results[1:]))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": name, "shape": args.shape, "dtype": str(dtype), "argv": sys.argv,
            "steps": steps, "lengths": lengths, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
