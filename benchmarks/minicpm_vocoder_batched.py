"""MiniCPM-o 4.5's speech vocoder on rows of different code lengths: one row per call against
``MiniCPMVocoder.batch``, on one realistic mix, with the batched waveforms checked against
the per-row ones.

    python benchmarks/minicpm_vocoder_batched.py --shape full --device cuda --rows 64 --micro 4 16 64
    python benchmarks/minicpm_vocoder_batched.py --shape tiny --device cpu   # smoke test

What is timed: ``MiniCPMVocoder`` (our rebuild of Step-Audio2's token2wav: the S3 flow, a
conformer encoder then ``--steps`` Euler steps of the CFM's DiT, then HiFT) on random
weights, from codes and each row's voice prompt to the 24 kHz waveform, in float32 (the
adapter's vocoder runs in float32; upstream's ``float16`` option is off by default). Each row's
prompt is its source utterance at 16 kHz, as the adapter passes it; the prompt's speech tokens
and speaker vector come from stand-ins for the two ONNX models (``S3TokenizerStandIn``,
``CampplusStandIn``: the real models' input/output layouts, 25 tokens a second, negligible
cost), so the figures leave out the real ONNX models' CPU time (per row on both paths).
Workload: ``workloads.esd_like`` answers (the source's duration x U(0.85, 1.25)) at MiniCPM's
25 codes a second, at least the code loop's 50 (``CodeSampling.min_codes``): ~50-156 codes
after a 50-125-token prompt (the source, 2-5 s).

Paths:
- ``per row``: ``vocoder(codes, seed, prompt)``, one row per call (the adapter with
  ``vocoder_batch_size=1``; upstream is one utterance per call), timed on ``--per-row-rows``
  rows spread over the mix, reported per row;
- ``batched mN``: ``MiniCPMVocoder.batch`` in calls of up to N rows (the adapter's
  ``vocoder_batch_size``, default 16; longest [prompt + codes] together): one flow call
  (``inference_rows``) and one HiFT call (``HiFTGenerator.rows``) per group.
Each path is timed ``--repeats`` times (median); the table gives ms per row (flow + HiFT; the
rest is the prompt features and the copies to the host), the flow calls counted, and, on the
rows the per-row path decoded, the batched waveform's max |difference| and lowest SNR
against them.

Shapes. ``tiny``: the test checkpoint's flow (tests/test_minicpm_vocoder.py's
``TINY_FLOW_YAML``: hidden 16, one conformer block, one up block, a one-block DiT, 64 codes)
and the narrow HiFT of its float64 test (base 32 channels, F0 predictor 16; the same layers,
rates and STFT: the full-width HiFT the test checkpoint keeps costs ~3 s a row on 2 CPU cores).
``full``: HiFT is ``HiFTGenerator()`` with its defaults, as minicpmo-utils 1.0.7 builds the
whole-utterance vocoder (``stepaudio2/token2wav.py``, ``_get_original_vocoder``: no config;
base 512 channels, upsampling 8-5-3, iSTFT n_fft 16 hop 4, F0 predictor 512). The flow's
sizes are ASSUMED: they come from the checkpoint's ``assets/token2wav/flow.yaml``, which this
project could not read (neither the upstream demo repository nor the package holds it); the
values below are those vllm-omni's MiniCPM-o reader checks the file against (tests'
``PUBLISHED_FLOW_YAML``), which a public Step-Audio2 flow server also hard-codes and loads
``flow.pt`` into strictly: input/hidden 512, 6 conformer blocks + 4 up blocks (8 heads, 2048
units), a 16-block DiT (hidden 512, 8 heads of 64, mlp_ratio 4), speaker 192, 6561 codes.
Replace them with the real file (``--flow-config``: the checkpoint's flow.yaml itself) and
HiFT's arguments (``--hift-config``: a JSON object of ``HiFTGenerator`` keywords) when a run
can read them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from workloads import (  # noqa: E402
    PartTimer, add_vocoder_arguments, codes_at, esd_like, random_codes, spread_indices,
    vocoder_device, worst_difference,
)

from esn_core.models.flow_yaml import build_flow  # noqa: E402
from esn_core.models.hift import HiFTGenerator  # noqa: E402
from esn_core.models.minicpm_speech_codes import CodeSampling  # noqa: E402
from esn_core.models.minicpm_vocoder import CODE_RATE, MiniCPMVocoder  # noqa: E402

_FLOW_YAML = """\
flow: !new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: {hidden}
    output_size: 80
    spk_embed_dim: {speaker}
    output_type: 'mel'
    vocab_size: {vocab}
    encoder: !new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: {hidden}
        output_size: {hidden}
        input_layer: 'linear'
        pre_lookahead_len: 3
        num_blocks: {blocks}
        num_up_blocks: {up_blocks}
        up_stride: 2
        up_scale_factor: 2
        attention_heads: {heads}
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        key_bias: true
        linear_units: {units}
        dropout_rate: 0.1
    decoder: !new:cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: {mlp_ratio}
            depth: {depth}
            num_heads: {heads}
            head_dim: {head_dim}
            hidden_size: {hidden}
"""
FLOW_YAML = {
    "tiny": _FLOW_YAML.format(hidden=16, speaker=8, vocab=64, blocks=1, up_blocks=1, heads=2,
                              units=32, mlp_ratio=2.0, depth=1, head_dim=8),
    # ASSUMED (module docstring): not read from the checkpoint's flow.yaml.
    "full": _FLOW_YAML.format(hidden=512, speaker=192, vocab=6561, blocks=6, up_blocks=4, heads=8,
                              units=2048, mlp_ratio=4.0, depth=16, head_dim=64),
}
HIFT = {"tiny": dict(base_channels=32, f0_channels=16), "full": {}}  # full: upstream's defaults


class _Input(NamedTuple):
    name: str


class S3TokenizerStandIn:
    """The S3 tokenizer's layout: (1, 128, T) log-mel at 100 frames a second + its length ->
    (1, ceil(T / 4)) int64 tokens at 25 a second, in [0, vocab) (a function of the frames, so a
    row's tokens are the same on every path)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def get_inputs(self):
        return [_Input("feats"), _Input("feats_length")]

    def run(self, _outputs, feeds):
        frames = feeds["feats"].mean(axis=1)[:, ::4]
        return [(np.abs(frames) * 1000).astype(np.int64) % self.vocab]


class CampplusStandIn:
    """CAM++'s layout: (1, T, 80) fbank -> (1, speaker) vector (time mean, fixed projection)."""

    def __init__(self, speaker: int):
        self.weight = np.random.default_rng(0).standard_normal((80, speaker)).astype(np.float32) / 80

    def get_inputs(self):
        return [_Input("input")]

    def run(self, _outputs, feeds):
        return [feeds["input"].mean(axis=1) @ self.weight]


def build(shape: str, device: str, steps: int, flow_config=None, hift_config=None) -> MiniCPMVocoder:
    """A random-weight vocoder of ``shape`` (or of the given flow.yaml path / HiFT keywords)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder, torch.device(device):
        if flow_config is None:
            flow_config = Path(folder) / "flow.yaml"
            flow_config.write_text(FLOW_YAML[shape])
        flow = build_flow(Path(flow_config))
        hift = HiFTGenerator(**(hift_config if hift_config is not None else HIFT[shape]))
    flow, hift = flow.eval().requires_grad_(False), hift.eval().requires_grad_(False)
    speaker = flow.spk_embed_affine_layer.in_features
    return MiniCPMVocoder(flow, hift, CampplusStandIn(speaker), S3TokenizerStandIn(flow.vocab_size),
                          None, torch.device(device), n_timesteps=steps)


def source_wav(seconds: float, seed: int) -> np.ndarray:
    """A voiced stand-in for the source utterance at 16 kHz: a harmonic tone at a random pitch
    with a syllable-rate envelope and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    pitch = rng.uniform(100, 250)
    tone = sum(np.sin(2 * np.pi * k * pitch * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(3, 5) * t)
    return (0.2 * tone * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_vocoder_arguments(parser)
    parser.add_argument("--steps", type=int, default=10,
                        help="flow Euler steps (the adapter's vocoder_steps, default 10)")
    parser.add_argument("--flow-config", default=None, help="a token2wav flow.yaml (the checkpoint's own)")
    parser.add_argument("--hift-config", default=None, help="a JSON file of HiFTGenerator keywords")
    args = parser.parse_args(argv)
    tiny = args.shape == "tiny"
    device = vocoder_device(parser, args)
    rows = args.rows or (6 if tiny else 64)
    micro = args.micro or ([rows] if tiny else [4, 16, 64])
    per_row_rows = args.per_row_rows or (rows if tiny else 8)
    repeats = args.repeats or (1 if tiny else 2)
    if min(micro) < 1 or rows < 1 or args.steps < 1:
        parser.error("--rows, --micro and --steps must be >= 1")

    hift_config = json.loads(Path(args.hift_config).read_text()) if args.hift_config else None
    vocoder = build(args.shape, device, args.steps, args.flow_config, hift_config)
    attempts = esd_like(rows, args.seed)
    lengths = [codes_at(a, CODE_RATE, CodeSampling().min_codes) for a in attempts]
    codes = random_codes(lengths, vocoder.flow.vocab_size, args.seed + 1)
    sources = [source_wav(a.source_seconds, args.seed + 2 + i) for i, a in enumerate(attempts)]
    seeds = [1000 + i for i in range(rows)]
    cuda = device == "cuda"
    parts = PartTimer.on(device)
    parts.wrap("flow", vocoder.flow, "inference_rows")  # the per-row path's inference calls it
    parts.wrap("hift", vocoder.hift, "forward")  # the per-row path
    parts.wrap("hift", vocoder.hift, "rows")  # the batched path

    def decode(chosen, max_rows):
        """(median seconds, waves, that run's part seconds and calls, peak GiB); ``max_rows``
        None: one ``vocoder(...)`` call per row."""
        def run():
            if max_rows is None:
                return [vocoder(codes[i], seeds[i], sources[i])[0] for i in chosen]
            return vocoder.batch([codes[i] for i in chosen], [seeds[i] for i in chosen],
                                 [sources[i] for i in chosen], max_rows=max_rows)

        return parts.median_run(run, repeats, device)

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    sizes = " (ASSUMED flow sizes)" if not tiny and args.flow_config is None else ""
    prompt_tokens = [int(np.ceil(len(s) / 640)) for s in sources]  # 25 a second at 16 kHz
    print(f"# MiniCPM-o vocoder (S3 flow + HiFT), {args.shape} shape{sizes}, random weights, "
          f"float32 on {name}; torch {torch.__version__}")
    print(f"# {' '.join(sys.argv)}")
    print(f"# {rows} rows, esd_like codes {min(lengths)}-{max(lengths)} (mean "
          f"{sum(lengths) / rows:.1f}) at 25 a second after prompts of ~{min(prompt_tokens)}-"
          f"{max(prompt_tokens)} tokens (the source); {args.steps} flow steps; median of {repeats}")
    decode([lengths.index(min(lengths))], None)  # warm-up: kernels, allocator
    reference_rows = spread_indices(lengths, per_row_rows)
    results = []

    def report(label, chosen, measured):
        seconds, waves, split, peak = measured
        ms = 1e3 * seconds / len(chosen)
        flow_ms, hift_ms = (1e3 * split["seconds"][k] / len(chosen) for k in ("flow", "hift"))
        calls = split["calls"]["flow"]
        max_abs, low_snr = worst_difference(
            [(reference[i], w) for i, w in zip(chosen, waves) if i in reference])
        peak_text = f"{peak:.1f} GiB" if peak is not None else "-"
        print(f"| {label} | {len(chosen)} | {calls} | {ms:,.1f} ({flow_ms:,.1f} + {hift_ms:,.1f}) | "
              f"{max_abs:.2e} | {low_snr:.1f} dB | {peak_text} |", flush=True)
        results.append({"path": label, "rows": len(chosen), "calls": calls,
                        "hift_calls": split["calls"]["hift"], "ms_per_row": ms,
                        "flow_ms_per_row": flow_ms, "hift_ms_per_row": hift_ms,
                        "max_abs": max_abs, "min_snr_db": low_snr, "peak_gib": peak})

    print("| path | rows | calls | ms per row (flow + HiFT) | max abs diff vs per row | "
          "lowest SNR | peak memory |")
    print("|---|---|---|---|---|---|---|")
    single = decode(reference_rows, None)
    reference = dict(zip(reference_rows, single[1]))
    report("per row", reference_rows, single)
    everything = list(range(rows))
    for size in micro:
        report(f"batched m{size}", everything, decode(everything, size))
    per_row = results[0]["ms_per_row"]
    print("# per row / batched: " + ", ".join(
        f"{r['path']} {per_row / r['ms_per_row']:.2f}x" for r in results[1:]))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": name, "shape": args.shape, "dtype": "torch.float32", "argv": sys.argv,
            "steps": args.steps, "lengths": lengths, "prompt_tokens": prompt_tokens,
            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
