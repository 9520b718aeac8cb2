"""Kimi-Audio's two-stream step loop, batched, with one random generator per row.

Upstream's ``KimiAudio._generate_loop`` runs one row and draws from the global RNG; this
loop runs a left-padded batch and follows the same rules per row:

* every step yields a text token (greedy) and an audio token (sampled: log-softmax,
  temperature, top-k, one draw; upstream's ``torch.multinomial``, here an inverse-CDF
  lookup of a uniform from the row's own ``torch.Generator``: the same distribution);
* the audio token is forced to the text blank for the first ``audio_delay`` steps (the
  audio stream lags the text stream);
* once a row's text has produced ``text_eos`` its text stream is forced to blank;
* a row ends when its audio token is an audio end token (``msg_end`` / ``media_end``), or
  after ``max_steps[b]`` steps (upstream: 12.5 × 120 tokens minus the prompt).

Row ``b``'s uniforms are drawn before the loop, ``max_steps[b]`` of them from a CPU
generator seeded ``seeds[b]``, and step ``t`` uses the ``t``-th: a row's tokens do not
depend on the other rows of the batch, and the loop's state stays on the device (whether
every row has ended is read one step late, so the host never waits for a step). A row
that ended keeps feeding an audio end token: the hooks' position root then knows it ended
(``MLPGroup.eos_token_ids``) and counts none of its later positions, as a single run would
have stopped there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esn_core.models.kimi_tokens import SpecialIds, TwoStreams
from esn_core.models.late_stop import LateFlag
from esn_core.models.seeded_draws import draw_uniforms, inverse_cdf


@dataclass(frozen=True)
class Sampling:
    audio_temperature: float = 0.8
    audio_top_k: int = 10
    audio_delay: int = 6

    def __post_init__(self) -> None:
        if self.audio_temperature < 0 or self.audio_top_k < 0 or self.audio_delay < 0:
            raise ValueError("audio_temperature, audio_top_k and audio_delay must be >= 0")


@dataclass
class RowResult:
    text_tokens: list[int]  # up to (not including) text_eos
    audio_tokens: list[int]  # vocabulary ids after the delay, up to (not including) the end
    steps: int  # forward calls this row took part in (the last step's tokens are not fed)
    ended: bool  # stopped at an audio end token (False: the length cap)


@dataclass
class PromptBatch:
    """Left-padded prompts on one device."""

    audio: torch.Tensor  # [B, S] long
    text: torch.Tensor  # [B, S] long
    continuous: torch.Tensor  # [B, S] bool
    attention_mask: torch.Tensor  # [B, S] long, 1 = real
    features: torch.Tensor | None  # [B, S, F] Whisper features at continuous positions

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.attention_mask.sum(dim=1).tolist()]


def pad_prompts(prompts: list[TwoStreams], features: list[torch.Tensor | None], pad: int,
                device, dtype) -> PromptBatch:
    """Left-pad ``prompts``; ``features[b]``: ``[n_continuous_b, F]`` or None (no adaptor)."""
    width = max(len(p) for p in prompts)
    batch = len(prompts)
    audio = torch.full((batch, width), pad, dtype=torch.long)
    text = torch.full((batch, width), pad, dtype=torch.long)
    continuous = torch.zeros(batch, width, dtype=torch.bool)
    mask = torch.zeros(batch, width, dtype=torch.long)
    dims = {f.shape[-1] for f in features if f is not None}
    if len(dims) > 1:
        raise ValueError(f"Whisper features of different widths in one batch: {sorted(dims)}")
    # Built where the features are going: the Whisper encoder leaves them on the device.
    feats = torch.zeros(batch, width, dims.pop(), dtype=dtype, device=device) if dims else None
    rows, slots, placed = [], [], []  # where each row's features go, written in one copy
    for b, prompt in enumerate(prompts):
        start = width - len(prompt)
        audio[b, start:] = torch.tensor(prompt.audio)
        text[b, start:] = torch.tensor(prompt.text)
        continuous[b, start:] = torch.tensor(prompt.continuous, dtype=torch.bool)
        mask[b, start:] = 1
        if feats is not None and features[b] is not None:
            row_slots = [start + i for i, c in enumerate(prompt.continuous) if c]
            if features[b].shape[0] != len(row_slots):
                raise ValueError(f"row {b}: {features[b].shape[0]} Whisper frames for "
                                 f"{len(row_slots)} audio-token positions")
            rows += [b] * len(row_slots)
            slots += row_slots
            placed.append(features[b].to(device, dtype))
    if placed:
        feats[torch.tensor(rows, device=device), torch.tensor(slots, device=device)] = torch.cat(placed)
    to = dict(device=device)
    return PromptBatch(audio.to(**to), text.to(**to), continuous.to(**to), mask.to(**to), feats)


def sample_audio(logits: torch.Tensor, uniforms: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Each row's audio token (``logits``: ``[B, V]``, ``uniforms``: ``[B]`` in [0, 1)).

    Upstream's distribution: log-softmax, temperature, top-k, one draw; the draw is an
    inverse-CDF lookup of the row's uniform in its top-k probabilities, batched.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if sampling.audio_temperature <= 1e-6:
        return logprobs.argmax(dim=-1)
    probs = torch.exp(logprobs / sampling.audio_temperature)
    if sampling.audio_top_k > 0:
        probs, index = torch.topk(probs, min(sampling.audio_top_k, probs.shape[-1]), dim=-1)
    else:
        index = None
    pick = inverse_cdf(probs, uniforms)
    return pick if index is None else index.gather(1, pick[:, None])[:, 0]


# no_grad, not inference_mode: the hooks' counters are made during the loop and updated
# after it, which inference tensors would refuse.
@torch.no_grad()
def generate_two_streams(lm, batch: PromptBatch, ids: SpecialIds, seeds: list[int],
                         max_steps: list[int], sampling: Sampling) -> list[RowResult]:
    """Run the step loop on ``batch``; row ``b`` samples from a generator seeded ``seeds[b]``."""
    from transformers import DynamicCache

    rows = batch.audio.shape[0]
    if len(seeds) != rows or len(max_steps) != rows:
        raise ValueError(f"{rows} rows but {len(seeds)} seeds and {len(max_steps)} step caps")
    device = batch.audio.device
    # Row b draws once per step it takes part in, at most max_steps[b] times.
    uniforms = draw_uniforms(seeds, [max(int(c), 0) for c in max_steps], device)
    cache = DynamicCache()
    mask = batch.attention_mask
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    step_audio, step_text = batch.audio, batch.text
    features, continuous = batch.features, batch.continuous
    # The loop's state lives on the device, and "has every row ended?" is read one step late
    # (late_stop.LateFlag): the host never waits for a step. The one extra step after the
    # last row ends changes nothing: every row is inactive in it and feeds an end token.
    caps = torch.tensor(max_steps, device=device)
    done = caps < 1
    text_done = torch.zeros(rows, dtype=torch.bool, device=device)
    ended = torch.zeros_like(text_done)
    steps = torch.zeros(rows, dtype=torch.long, device=device)
    audio_ends = torch.tensor(sorted(ids.audio_ends), device=device)
    blank = torch.full((rows,), ids.text_blank, device=device)
    end = torch.full((rows,), ids.msg_end, device=device)
    texts, text_kept, audios, audio_kept = [], [], [], []
    step = 0
    late = LateFlag(device)
    finished = bool(done.all())  # no step to run at all (every cap below 1): no prefill either
    while not finished:
        text_logits, audio_logits = lm(
            input_ids=step_audio, text_input_ids=step_text, attention_mask=mask,
            position_ids=positions, cache=cache, continuous_features=features,
            is_continuous_mask=continuous,
        )
        active = ~done
        steps += active
        next_text = text_logits.argmax(dim=-1)
        is_eos = next_text == ids.text_eos
        # A row's text is kept up to its end token; the end token is fed once, then blanks.
        text_kept.append(active & ~text_done & ~is_eos)
        feed_text = torch.where(active & ~text_done, next_text, blank)
        text_done = text_done | (active & is_eos)
        token = sample_audio(audio_logits, uniforms[:, min(step, uniforms.shape[1] - 1)], sampling)
        if step < sampling.audio_delay:
            token = blank
        is_end = torch.isin(token, audio_ends)
        audio_kept.append(active & ~is_end & (step >= sampling.audio_delay))
        # A row at its cap feeds an end token once, so the hooks see the row end.
        capped = active & ~is_end & (steps >= caps)
        feed_audio = torch.where(active & ~capped, token, end)
        ended = ended | (active & is_end)
        done = done | (active & is_end) | capped
        texts.append(next_text)
        audios.append(token)
        step += 1
        step_audio, step_text = feed_audio[:, None], feed_text[:, None]
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        features = continuous = None
        finished = late.push(done.all())
    return collect_rows(texts, text_kept, audios, audio_kept, steps, ended)


def collect_rows(texts, text_kept, audios, audio_kept, steps, ended) -> list[RowResult]:
    """Per-step device tensors ``[B]`` of the loop → each row's kept tokens, on the host."""
    rows = steps.shape[0]
    if not texts:
        return [RowResult([], [], 0, False) for _ in range(rows)]
    text, keep_text = torch.stack(texts, 1).tolist(), torch.stack(text_kept, 1).tolist()
    audio, keep_audio = torch.stack(audios, 1).tolist(), torch.stack(audio_kept, 1).tolist()
    return [
        RowResult([t for t, k in zip(text[b], keep_text[b]) if k],
                  [a for a, k in zip(audio[b], keep_audio[b]) if k],
                  int(steps[b]), bool(ended[b]))
        for b in range(rows)
    ]
