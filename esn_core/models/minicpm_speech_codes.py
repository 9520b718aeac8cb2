"""MiniCPM-o 4.5's speech codes, batched: the TTS backbone run autoregressively from a
condition, one code per VQ codebook per step.

Followed from upstream ``MiniCPMTTS.generate`` (non-streaming; modeling_minicpmo.py) and its
``gen_logits`` / ``TTSSamplingParams``:

- step 0 feeds the whole condition at positions ``0..L-1``; step ``t >= 1`` feeds the sum over
  codebooks of ``emb_code[q](code of step t-1)`` at position ``L + t - 1``;
- logits: ``head_code[q]`` on the last hidden state, float, divided by the temperature (0.8);
- from step 1 on (never at step 0): the repetition penalty (1.05) over the row's last 16 codes
  of that codebook, raised to the code's count in the window (``penalty ** count``; negative
  logits multiplied, positive divided), then top-p 0.85 and then top-k 25, each keeping at
  least 3 codes (transformers' ``TopPLogitsWarper`` / ``TopKLogitsWarper`` rules);
- the end code (``num_audio_tokens - 1``) is masked while ``t < min_codes`` (upstream's
  ``min_new_token``, default 50);
- softmax and one draw. A row ends at the step its end code is drawn; that code is neither kept
  nor fed. Upstream returns ``new_tokens[:, 0:t]``: at the cap (no end code) the last drawn
  code is dropped too; reproduced here.

Batching (upstream asserts batch 1): conditions are left-padded, with a 2-D mask and per-row
positions, so a row's codes equal the row run alone. The draw is an inverse-CDF lookup of a
uniform drawn before the loop on the host from a generator seeded with the row's seed
(``draw_uniforms``), so a row draws the same codes in any batch and on any device; the
distribution is upstream's, the draws are not torch.multinomial's. A row that ended feeds the
end code at later steps (the hook root sees it fed and counts none of those positions).
The loop's state (each row's end and length) stays on the device: whether every row has
ended is read one step late (``late_stop.LateFlag``, so the host never waits for a step), and
the codes once after the loop.

SPEC §1's T for ``synth``: the condition's positions plus every code fed, ``L + len(codes)``
(the step that draws the end code feeds nothing after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from esn_core.models.cache_keyword import cache_keyword
from esn_core.models.late_stop import LateFlag
from esn_core.models.seeded_draws import draw_uniforms, inverse_cdf
from esn_core.option_values import check_arguments


# CodeSampling's ranges, as option_values reads them (the config pre-check reads this literal
# from the source for model.options.sampling; __post_init__ checks it too). top_k 0: no top-k;
# penalty_window 0: no repetition penalty; "(" excludes the bound.
SAMPLING_RANGES = {"temperature": (0, None, "()"), "repetition_penalty": (0, None, "()"),
                   "penalty_window": (0, None), "top_p": (0, 1, "(]"), "top_k": (0, None),
                   "min_keep": (1, None), "min_codes": (0, None), "max_codes": (1, None)}


@dataclass(frozen=True)
class CodeSampling:
    temperature: float = 0.8
    repetition_penalty: float = 1.05
    penalty_window: int = 16
    top_p: float = 0.85
    top_k: int = 25
    min_keep: int = 3
    min_codes: int = 50
    max_codes: int = 2048

    def __post_init__(self) -> None:
        check_arguments(CodeSampling, SAMPLING_RANGES, vars(self))


@dataclass
class CodeRow:
    codes: torch.Tensor  # [n, num_vq] long, without the end code
    condition_length: int
    ended: bool  # drew the end code (False: the cap)

    @property
    def n_positions(self) -> int:
        return self.condition_length + int(self.codes.shape[0])


class SynthStep(nn.Module):
    """One TTS step → per-codebook logits ``[B, num_vq, V]``: the ``synth`` group's root.

    Adapter-owned so the hook root sees every step's real mask and fed codes (upstream's
    ``tts.model`` receives only embeddings and positions). The prefill takes the condition's
    ``inputs_embeds``; a decode step takes ``input_ids`` ``[B, 1]`` (codebook 0's code) and,
    with more codebooks, ``other_codes`` ``[B, 1, num_vq - 1]``, and embeds their sum as
    upstream. A finished row feeds the end code, so the hooks stop counting it."""

    def __init__(self, tts):
        super().__init__()
        self.tts = tts
        self._cache_kw = cache_keyword(tts.model)  # read once: this runs every step

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None,
                position_ids=None, cache=None, other_codes=None):
        if inputs_embeds is None:
            inputs_embeds = self.tts.emb_code[0](input_ids)
            for q in range(1, len(self.tts.emb_code)):
                inputs_embeds = inputs_embeds + self.tts.emb_code[q](other_codes[..., q - 1])
        out = self.tts.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=True, **{self._cache_kw: cache})
        last = out.last_hidden_state[:, -1]
        with parametrize.cached():  # weight norm computed once per step, as upstream
            return torch.stack([head(last).float() for head in self.tts.head_code], dim=1)


def penalise_repeats(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` [N, V] with each code's logit scaled by ``penalty ** count`` of that code in
    ``history`` [N, W] (negative multiplied, positive divided); ``history`` < 0 is padding."""
    counts = torch.zeros_like(logits)
    valid = history >= 0
    counts.scatter_add_(1, history.clamp(min=0), valid.to(logits.dtype))
    # torch.full, not torch.tensor: made on the device, where torch.tensor would copy the
    # value from host memory every step (on CUDA a copy the host waits for).
    alpha = torch.pow(torch.full((), penalty, dtype=logits.dtype, device=logits.device), counts)
    return torch.where(logits < 0, logits * alpha, logits / alpha)


def top_p_top_k(logits: torch.Tensor, top_p: float, top_k: int, min_keep: int) -> torch.Tensor:
    """transformers' top-p then top-k filters (removed logits set to -inf)."""
    if top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[:, -min_keep:] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -torch.inf)
    if top_k > 0:
        k = min(max(top_k, min_keep), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    return logits


@torch.no_grad()
def generate_codes(step: SynthStep, conditions: list[torch.Tensor], seeds: list[int],
                   sampling: CodeSampling = CodeSampling()) -> list[CodeRow]:
    """Speech codes of each condition (``[L_b, hidden]``); row ``b`` draws from seed ``seeds[b]``."""
    from transformers import DynamicCache

    if len(conditions) != len(seeds):
        raise ValueError(f"{len(conditions)} conditions for {len(seeds)} seeds")
    tts = step.tts
    num_vq, vocab = len(tts.emb_code), tts.emb_code[0].num_embeddings
    end = vocab - 1
    rows, width = len(conditions), max(c.shape[0] for c in conditions)
    embeds = conditions[0].new_zeros(rows, width, conditions[0].shape[1])
    mask = torch.zeros(rows, width, dtype=torch.long, device=embeds.device)
    for b, c in enumerate(conditions):
        embeds[b, width - c.shape[0]:] = c
        mask[b, width - c.shape[0]:] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    uniforms = draw_uniforms(seeds, [sampling.max_codes * num_vq] * rows, embeds.device)
    history = torch.full((rows * num_vq, sampling.max_codes), -1, dtype=torch.long,
                         device=embeds.device)
    cache = DynamicCache()
    logits = step(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache)
    codes = torch.zeros(rows, sampling.max_codes, num_vq, dtype=torch.long, device=embeds.device)
    # The loop's state stays on the device, and "has every row ended?" is read one step late
    # (late_stop.LateFlag): the host never waits for a step. In the one extra step after the
    # last row ends every row feeds the end code, and its codes lie past every row's length.
    ended = torch.zeros(rows, dtype=torch.bool, device=embeds.device)
    late = LateFlag(embeds.device)
    # A row that never draws the end code keeps max_codes - 1: upstream drops the cap's last code.
    length = torch.full((rows,), sampling.max_codes - 1, dtype=torch.long, device=embeds.device)
    for t in range(sampling.max_codes):
        flat = logits.reshape(rows * num_vq, vocab) / sampling.temperature
        if t > 0:
            start = max(0, t - sampling.penalty_window)
            flat = penalise_repeats(flat, history[:, start:t], sampling.repetition_penalty)
            flat = top_p_top_k(flat, sampling.top_p, sampling.top_k, sampling.min_keep)
        if t < sampling.min_codes:
            flat[:, end] = -torch.inf
        u = uniforms[:, t * num_vq:(t + 1) * num_vq].reshape(-1)
        chosen = inverse_cdf(flat.softmax(dim=-1), u).view(rows, num_vq)
        hit = chosen.eq(end).any(dim=1) & ~ended
        length = torch.where(hit, t, length)
        ended |= hit
        codes[:, t] = chosen
        history[:, t] = chosen.reshape(-1)
        if t == sampling.max_codes - 1 or late.push(ended.all()):
            break
        fed = torch.where(ended[:, None], torch.full_like(chosen, end), chosen)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = step(input_ids=fed[:, :1], attention_mask=mask, position_ids=positions,
                      cache=cache, other_codes=fed[:, None, 1:] if num_vq > 1 else None)
    # to the host once, after the loop
    codes, length, ended = codes[:, :t + 1].cpu(), length.tolist(), ended.tolist()
    return [CodeRow(codes[b, :length[b]], int(conditions[b].shape[0]), ended[b])
            for b in range(rows)]
