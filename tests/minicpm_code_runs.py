"""Seeded speech-code runs on tiny TTS models, for pinning ``generate_codes`` outputs.

``tests/data/minicpm_speech_codes_golden.json`` holds these runs' outputs as the loop gave
them before its per-step host syncs were removed (one sync a step instead of two); the loop
must keep giving them bit for bit. Regenerate only on a deliberate change of the draws:
``python -m tests.minicpm_code_runs``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from esn_core.models.minicpm_speech_codes import CodeSampling, SynthStep, generate_codes
from esn_core.models.minicpm_tts import MiniCPMTTS
from tests.tiny_minicpm import TINY_CONFIG

GOLDEN = Path(__file__).parent / "data" / "minicpm_speech_codes_golden.json"

# (name, num_vq, condition lengths, seeds, sampling): rows that end early and rows that reach
# the cap, one and two codebooks, the penalty/top-p/top-k path and the plain softmax path.
CASES = [
    ("vq1_mixed_ends", 1, [3, 6, 4, 5, 2], [1, 2, 3, 4, 5],
     dict(min_codes=0, max_codes=15, temperature=1.0, top_p=1.0, top_k=0)),
    ("vq1_default_filters", 1, [5, 3, 7], [4, 5, 6], dict(min_codes=0, max_codes=24)),
    ("vq1_min_codes_cap", 1, [4, 4], [3, 9], dict(min_codes=20, max_codes=20)),
    ("vq2_mixed_ends", 2, [3, 6, 4, 5], [11, 12, 13, 14],
     dict(min_codes=8, max_codes=14, temperature=1.0, top_p=0.9, top_k=5)),
]


def tiny_step(num_vq: int) -> SynthStep:
    torch.manual_seed(0)
    return SynthStep(MiniCPMTTS({**TINY_CONFIG["tts_config"], "num_vq": num_vq}).eval())


def run_case(num_vq, lengths, seeds, sampling) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    conds = [torch.randn(n, 8, generator=g) for n in lengths]
    rows = generate_codes(tiny_step(num_vq), conds, seeds, CodeSampling(**sampling))
    return [dict(codes=r.codes.tolist(), ended=r.ended, n_positions=r.n_positions) for r in rows]


def all_runs() -> dict:
    return {name: run_case(*args) for name, *args in CASES}


if __name__ == "__main__":
    tmp = GOLDEN.with_suffix(".tmp")
    tmp.write_text(json.dumps(all_runs(), indent=1) + "\n")
    tmp.replace(GOLDEN)
