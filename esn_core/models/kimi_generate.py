"""Kimi-Audio's two-stream step loop, batched, with one random generator per row.

Upstream's ``KimiAudio._generate_loop`` runs one row and draws from the global RNG; this
loop runs a left-padded batch and follows the same rules per row:

* every step yields a text token (greedy) and an audio token (sampled: log-softmax,
  temperature, top-k, one multinomial draw from the row's own ``torch.Generator``);
* the audio token is forced to the text blank for the first ``audio_delay`` steps (the
  audio stream lags the text stream);
* once a row's text has produced ``text_eos`` its text stream is forced to blank;
* a row ends when its audio token is an audio end token (``msg_end`` / ``media_end``), or
  after ``max_steps[b]`` steps (upstream: 12.5 × 120 tokens minus the prompt).

Each active row draws exactly once per step, in row order, from its own generator, so a
row's tokens do not depend on the other rows of the batch. A row that ended keeps feeding
an audio end token: the hooks' position root then knows it ended (``MLPGroup.eos_token_ids``)
and counts none of its later positions, as a single run would have stopped there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esn_core.models.kimi_tokens import SpecialIds, TwoStreams


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
    feats = torch.zeros(batch, width, dims.pop(), dtype=dtype) if dims else None
    for b, prompt in enumerate(prompts):
        start = width - len(prompt)
        audio[b, start:] = torch.tensor(prompt.audio)
        text[b, start:] = torch.tensor(prompt.text)
        where = torch.tensor(prompt.continuous, dtype=torch.bool)
        continuous[b, start:] = where
        mask[b, start:] = 1
        if feats is not None and features[b] is not None:
            n = int(where.sum())
            if features[b].shape[0] != n:
                raise ValueError(f"row {b}: {features[b].shape[0]} Whisper frames for "
                                 f"{n} audio-token positions")
            row = torch.zeros(len(prompt), feats.shape[-1], dtype=dtype)
            row[where] = features[b].to(dtype)
            feats[b, start:] = row
    to = dict(device=device)
    return PromptBatch(audio.to(**to), text.to(**to), continuous.to(**to), mask.to(**to),
                       None if feats is None else feats.to(**to))


def sample_audio(logits: torch.Tensor, generator: torch.Generator, sampling: Sampling) -> int:
    """One row's audio token, as upstream's sampler draws it (``logits``: ``[V]``)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if sampling.audio_temperature <= 1e-6:
        return int(torch.argmax(logprobs))
    logprobs = logprobs / sampling.audio_temperature
    probs = torch.exp(logprobs)
    if sampling.audio_top_k > 0:
        top, index = torch.topk(probs, min(sampling.audio_top_k, probs.numel()))
        pick = torch.multinomial(top, 1, generator=generator)
        return int(index[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


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
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    cache = DynamicCache()
    mask = batch.attention_mask
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    step_audio, step_text = batch.audio, batch.text
    features, continuous = batch.features, batch.continuous
    text_done = [False] * rows
    done = [cap < 1 for cap in max_steps]
    results = [RowResult([], [], 0, False) for _ in range(rows)]
    end = ids.msg_end
    step = 0
    while not all(done):
        text_logits, audio_logits = lm(
            input_ids=step_audio, text_input_ids=step_text, attention_mask=mask,
            position_ids=positions, cache=cache, continuous_features=features,
            is_continuous_mask=continuous,
        )
        next_text = text_logits.argmax(dim=-1).tolist()
        next_audio = [end] * rows
        for b in range(rows):
            if done[b]:
                next_text[b] = ids.text_blank
                continue
            result = results[b]
            result.steps += 1
            token = sample_audio(audio_logits[b], generators[b], sampling)
            if text_done[b]:
                next_text[b] = ids.text_blank
            elif next_text[b] == ids.text_eos:
                text_done[b] = True
            else:
                result.text_tokens.append(next_text[b])
            if step < sampling.audio_delay:
                token = ids.text_blank
            if token in ids.audio_ends:
                result.ended, done[b] = True, True
            else:
                if step >= sampling.audio_delay:
                    result.audio_tokens.append(token)
                if result.steps >= max_steps[b]:
                    done[b] = True
                    token = end  # fed once so the hooks see the row end; never sampled
            next_audio[b] = token
        step += 1
        step_audio = torch.tensor(next_audio, device=device)[:, None]
        step_text = torch.tensor(next_text, device=device)[:, None]
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        features = continuous = None
    return results
