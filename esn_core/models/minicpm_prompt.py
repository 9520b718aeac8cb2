"""MiniCPM-o 4.5's EVC prompt, as its ``chat`` builds one for voice cloning.

Upstream (``MiniCPMO.chat`` with ``get_sys_prompt(ref_audio=source, mode="voice_cloning")``):

* system turn = the voice-cloning sentence, then the reference audio (here: the source);
* user turn = the source audio, then the instruction naming the target emotion;
* parts of one turn are joined with ``"\\n"`` (not streaming), and each audio becomes
  ``<|audio_start|>`` + one ``<unk>`` per audio embedding + ``<|audio_end|>``;
* the chat template renders the turns with ``add_generation_prompt``, ``enable_thinking=False``
  (an empty think block) and ``use_tts_template=True`` (the prompt ends with ``<|tts_bos|>``).

The number of embeddings of a clip of ``n`` samples at 16 kHz follows the audio side: mel
frames ``ceil(n / 160)``, Whisper's stride-2 convolution ``(f - 1) // 2 + 1``, then average
pooling over ``pool_step`` frames ``(c - pool_step) // pool_step + 1``.
"""

from __future__ import annotations

import math

VOICE_CLONING_SYSTEM = "Clone the voice in the provided audio prompt."
HOP_LENGTH = 160  # Whisper's mel hop at 16 kHz
AUDIO_PLACEHOLDER = "<unk>"


def audio_embedding_count(n_samples: int, pool_step: int) -> int:
    """Audio embeddings (= placeholders) a clip of ``n_samples`` at 16 kHz gives."""
    if pool_step < 1:
        raise ValueError(f"audio_pool_step must be >= 1, got {pool_step}")
    frames = math.ceil(int(n_samples) / HOP_LENGTH)
    conv = (frames - 1) // 2 + 1
    count = (conv - pool_step) // pool_step + 1
    if frames < 1 or count < 1:
        raise ValueError(f"a clip of {n_samples} samples is too short for one audio embedding "
                         f"(pool step {pool_step})")
    return count


def audio_placeholder(count: int) -> str:
    return "<|audio_start|>" + AUDIO_PLACEHOLDER * int(count) + "<|audio_end|>"


def evc_messages(n_embeddings: int, instruction: str) -> list[dict]:
    """The two turns of one EVC attempt; the source is both the voice reference and the
    audio to re-speak, so both placeholders have the same length."""
    source = audio_placeholder(n_embeddings)
    return [{"role": "system", "content": "\n".join([VOICE_CLONING_SYSTEM, source])},
            {"role": "user", "content": "\n".join([source, instruction])}]


def evc_prompt_text(tokenizer, n_embeddings: int, instruction: str) -> str:
    """The prompt string the chat template renders for one attempt."""
    return tokenizer.apply_chat_template(
        evc_messages(n_embeddings, instruction), tokenize=False, add_generation_prompt=True,
        enable_thinking=False, use_tts_template=True)


def evc_prompt_ids(tokenizer, n_embeddings: int, instruction: str) -> list[int]:
    """Token ids of one attempt's prompt; checks that exactly ``2 × n_embeddings`` ids are
    audio placeholders (an instruction that spells ``<unk>`` would shift the audio)."""
    ids = tokenizer.encode(evc_prompt_text(tokenizer, n_embeddings, instruction),
                           add_special_tokens=False)
    unk = tokenizer.convert_tokens_to_ids(AUDIO_PLACEHOLDER)
    if ids.count(unk) != 2 * n_embeddings:
        raise ValueError(f"the EVC prompt holds {ids.count(unk)} audio placeholders, expected "
                         f"{2 * n_embeddings}: does the instruction contain {AUDIO_PLACEHOLDER}?")
    return ids


def source_mel(audio, num_mel_bins: int):
    """A 16 kHz clip's log-mel ``[num_mel_bins, ceil(n / 160)]`` (Whisper's features,
    unpadded: the clip padded with zeros to whole hops, as the placeholder count assumes)."""
    import numpy as np
    import torch
    from transformers import WhisperFeatureExtractor

    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    frames = math.ceil(audio.size / HOP_LENGTH)
    audio = np.pad(audio, (0, frames * HOP_LENGTH - audio.size))
    extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16_000)
    mel = extractor(audio, sampling_rate=16_000, padding="do_not_pad", return_tensors="np")
    return torch.from_numpy(mel.input_features[0][:, :frames])


def encode_source(audio_in, audio, num_mel_bins: int):
    """The source's audio embeddings, one row per ``<unk>`` of its placeholder (this clip
    encoded alone)."""
    import torch

    with torch.no_grad():
        embeds = audio_in.encode(source_mel(audio, num_mel_bins))
    expected = audio_embedding_count(len(audio), audio_in.audio_avg_pooler.kernel_size[0])
    if embeds.shape[0] != expected:
        raise RuntimeError(f"the audio encoder gave {embeds.shape[0]} embeddings for a clip "
                           f"of {len(audio)} samples; the placeholder count is {expected}")
    return embeds
