"""Qwen2.5-Omni token2wav on rows of different code lengths: per row, equal-length buckets,
and ragged calls (padded, masked, cropped), side by side on one realistic mix.

    python3 benchmarks/token2wav_ragged.py --device cuda --rows 64 --micro 16 32 64
    python3 benchmarks/token2wav_ragged.py --tiny                 # CPU smoke test

token2wav (DiT 22 x 1024 + BigVGAN, the 7B checkpoint's shapes; ``--tiny``: shrunk) with
random weights in float32 on the device, TF32 matrix products as the adapter runs it
(``--precision highest`` for full float32), a random speaker, 10 ODE steps. The rows' code
lengths come from ``workloads.esd_like`` (speech 0.85-1.25x a 2-5 s source at 50 codes per
second: ~90-310 codes), or ``--codes N`` for all rows equal. Paths, all through the
adapter's ``token2wav_batch``:

- ``per row``: one row per call, as transformers' own ``generate`` runs it (timed on
  ``--per-row-rows`` rows spread over the mix, reported per row);
- ``buckets``: rows of equal code length share a call (the adapter before ragged batching);
- ``ragged mN``: rows sorted by length, calls of up to N rows padded to their longest;
  ``--dit-mask both`` times each size also with the DiT's mask built per head, as
  transformers builds it (``, per-head mask``), beside the adapter's one mask for all heads;
  ``--ode-solver both`` times each size also on transformers' own RK4 solver, which reads
  the time points back from the device four times an ODE step (``, transformers' solver``),
  beside the adapter's, which integrates the same steps without (``token2wav_solver``).

Every path is timed ``--repeats`` times (median) and reports ms per row and peak memory.
Accuracy: on ``--check-rows`` rows spread over the mix, each path's waveform against the
per-row decode of the same row and seed: max |difference| and the lowest SNR over the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from workloads import esd_like, snr_db, spread_indices  # noqa: E402

from esn_core.models import qwen_omni  # noqa: E402
from esn_core.models.qwen_omni import float32_matmul_precision, token2wav_batch  # noqa: E402


@contextlib.contextmanager
def transformers_solver():
    """Within: token2wav_batch integrates on transformers' own RK4 solver (as before
    ``token2wav_solver``), for timing the two side by side."""
    saved = qwen_omni.rk4_without_host_reads
    qwen_omni.rk4_without_host_reads = contextlib.nullcontext
    try:
        yield
    finally:
        qwen_omni.rk4_without_host_reads = saved

TINY = dict(
    dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                    emb_dim=8, enc_emb_dim=8, enc_dim=8, enc_channels=[16, 16, 16, 16, 48],
                    enc_attention_channels=8, enc_se_channels=8, look_ahead_layers=[1],
                    look_backward_layers=[0]),
    bigvgan_config=dict(upsample_initial_channel=16, upsample_rates=[5, 4],
                        upsample_kernel_sizes=[11, 8], resblock_kernel_sizes=[3],
                        resblock_dilation_sizes=[[1, 3, 5]]),
)


def build(tiny: bool, device: str):
    config = Qwen2_5OmniToken2WavConfig(**(TINY if tiny else {}))
    for sub in (config, config.dit_config, config.bigvgan_config):
        sub._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5OmniToken2WavModel(config).float().eval().requires_grad_(False)
    dit = config.dit_config
    generator = torch.Generator().manual_seed(1)
    speaker = {"cond": torch.randn(1, dit.enc_emb_dim, generator=generator).to(device),
               "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=generator).to(device)}
    return model, speaker


def calls_for(lengths, speaker, n_codes: int, device: str, steps: int) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    return [{"code": torch.randint(0, n_codes, (1, n), generator=generator).to(device),
             "conditioning": speaker["cond"], "reference_mel": speaker["ref_mel"],
             "num_steps": steps} for n in lengths]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes: a CPU smoke test")
    parser.add_argument("--rows", type=int, default=None, help="rows in the mix (default 64)")
    parser.add_argument("--codes", type=int, default=None, help="all rows this many codes")
    parser.add_argument("--micro", type=int, nargs="+", default=None,
                        help="rows per ragged call (default 16 32 64)")
    parser.add_argument("--paths", nargs="+", default=["per-row", "buckets", "ragged"],
                        choices=["per-row", "buckets", "ragged"])
    parser.add_argument("--per-row-rows", type=int, default=None)
    parser.add_argument("--check-rows", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10, help="ODE steps of the DiT")
    parser.add_argument("--precision", choices=["high", "highest"], default="high",
                        help="float32 matmul precision while token2wav runs (high = TF32)")
    parser.add_argument("--dit-mask", choices=["shared", "per-head", "both"], default="shared",
                        help="the DiT's attention mask built once for all heads (the adapter's "
                             "way) or once per head (transformers'); both: each ragged size twice")
    parser.add_argument("--ode-solver", choices=["stepwise", "transformers", "both"], default="stepwise",
                        help="ragged calls on the adapter's RK4 loop (stepwise), on transformers' "
                             "own solver, or both side by side")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    rows = args.rows or (6 if args.tiny else 64)
    micro = args.micro or ([2, 6] if args.tiny else [16, 32, 64])
    per_row_rows = args.per_row_rows or (2 if args.tiny else 8)
    check_rows = args.check_rows or (2 if args.tiny else 4)
    repeats = args.repeats or (1 if args.tiny else 2)
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

    model, speaker = build(args.tiny, device)
    scale = 0.05 if args.tiny else 1.0
    if args.codes:
        lengths = [args.codes] * rows
    else:
        lengths = [max(2, round(a.codec_tokens * scale)) for a in esd_like(rows, args.seed)]
    calls = calls_for(lengths, speaker, model.config.dit_config.num_embeds, device, args.steps)
    seeds = list(range(rows))
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    parts = {"dit": 0.0, "bigvgan": 0.0}

    def part_timer(name, fn):
        def wrapper(*a, **k):
            sync()
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                parts[name] += time.perf_counter() - start
        return wrapper

    model.code2wav_dit_model.sample = part_timer("dit", model.code2wav_dit_model.sample)
    model.code2wav_bigvgan_model.forward = part_timer("bigvgan", model.code2wav_bigvgan_model.forward)

    def timed(chosen, solver="stepwise", **kwargs):
        """(seconds of a median run, waveforms, peak GiB, DiT and BigVGAN seconds of that run)."""
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runs, waves = [], None
        for _ in range(repeats):
            parts.update(dit=0.0, bigvgan=0.0)
            sync()
            start = time.perf_counter()
            with float32_matmul_precision(args.precision), (
                    transformers_solver() if solver == "transformers" else contextlib.nullcontext()):
                waves = token2wav_batch(model, [calls[i] for i in chosen],
                                        [seeds[i] for i in chosen], **kwargs)
            sync()
            runs.append((time.perf_counter() - start, dict(parts)))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        seconds, split = sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]
        return seconds, waves, peak, split

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    shown = (f"all {args.codes} codes" if args.codes else
             f"ESD-like codes {min(lengths)}-{max(lengths)} (mean {sum(lengths) / rows:.1f})")
    print(f"# Qwen2.5-Omni token2wav {'tiny' if args.tiny else '7B'} on {name}; torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# {rows} rows, {shown}; {args.steps} ODE steps, float32 matmul precision "
          f"{args.precision}; median of {repeats}; distinct lengths {len(set(lengths))}")
    # One warm-up call (kernels, allocator) before anything is timed.
    timed([0], max_rows=1)
    check = [lengths.index(n) for n in sorted(set(lengths))]
    check = [check[int(round(i))] for i in torch.linspace(0, len(check) - 1, check_rows).tolist()]
    _, alone, _, _ = timed(check, max_rows=1)
    reference = dict(zip(check, alone))

    results = []

    def report(label, chosen, measured, calls_made):
        seconds, waves, peak, split = measured
        ms = 1e3 * seconds / len(chosen)
        dit, vocoder = (1e3 * split[k] / len(chosen) for k in ("dit", "bigvgan"))
        errs = [(reference[i], w) for i, w in zip(chosen, waves) if i in reference]
        max_abs = max(float((a - w).abs().max()) for a, w in errs) if errs else float("nan")
        low_snr = min(snr_db(a, w) for a, w in errs) if errs else float("nan")
        peak_text = f"{peak:.1f} GiB" if peak is not None else "-"
        print(f"| {label} | {len(chosen)} | {calls_made} | {ms:,.0f} ({dit:,.0f} + {vocoder:,.0f}) | "
              f"{max_abs:.2e} | {low_snr:.1f} dB | {peak_text} |", flush=True)
        results.append({"path": label, "rows": len(chosen), "calls": calls_made,
                        "ms_per_row": ms, "dit_ms_per_row": dit, "bigvgan_ms_per_row": vocoder,
                        "max_abs": max_abs, "min_snr_db": low_snr, "peak_gib": peak})

    print("| path | rows | calls | ms per row (DiT + BigVGAN) | max abs diff vs per row | lowest SNR "
          "| peak memory |")
    print("|---|---|---|---|---|---|---|")
    everything = list(range(rows))
    if "per-row" in args.paths:
        some = sorted(set(check) | set(spread_indices(lengths, per_row_rows)))
        report("per row", some, timed(some, max_rows=1), len(some))
    if "buckets" in args.paths:
        report("buckets", everything, timed(everything, max_rows=rows, ragged=False),
               len(set(lengths)))
    if "ragged" in args.paths:
        masks = {"shared": [True], "per-head": [False], "both": [True, False]}[args.dit_mask]
        solvers = ["stepwise", "transformers"] if args.ode_solver == "both" else [args.ode_solver]
        for size in micro:
            for shared in masks:
                for solver in solvers:
                    label = (f"ragged m{size}" + ("" if shared else ", per-head mask")
                             + (", transformers' solver" if solver == "transformers" else ""))
                    report(label, everything, timed(everything, solver, max_rows=size,
                                                    shared_mask=shared), -(-rows // size))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "argv": sys.argv, "lengths": lengths,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
