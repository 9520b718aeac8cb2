"""The TTS condition of one answer: what MiniCPM-o 4.5 feeds its TTS backbone at step 0.

As OpenBMB's 4.5 code builds it (``MiniCPMO45/modeling_minicpmo.py`` of
OpenBMB/minicpm-o-4_5-pytorch-simple-demo at 67abcfd, ``_generate_speech_non_streaming``;
the published ports agree): for each answer token in the TTS span (after ``<|tts_bos|>``, up
to and without ``<|tts_eos|>``), ``emb_text(token) + projector_semantic(h)`` with ``h`` the LM's last-layer hidden state
where that token was fed, the projected part L2-normalised when the TTS config sets
``normalize_projected_hidden`` (the 4.5 checkpoint does; the config class defaults to off);
then ``emb_text(text_eos_token_id)`` and ``emb_text(audio_bos_token_id)``. No speaker
embedding (``projector_spk`` is unused in this path: the voice comes from the vocoder's
prompt wav).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Used when tts_config lacks the keys, as upstream's MiniCPMTTSConfig class defaults
# (configuration_minicpmo.py of the same code); a third-party fixture of the 4.5 checkpoint's
# config.json sets 151692 / 151687, which are then read.
DEFAULT_TEXT_EOS = 21133
DEFAULT_AUDIO_BOS = 21132


def tts_condition(tts, tokens: list[int], hidden: torch.Tensor) -> torch.Tensor:
    """``[len(tokens) + 2, hidden_size]`` condition for ``tokens`` (answer ids) and ``hidden``
    (``[len(tokens), llm_dim]`` their LM states)."""
    cfg = tts.config
    if hidden.shape[0] != len(tokens):
        raise ValueError(f"{len(tokens)} answer tokens but {hidden.shape[0]} hidden states "
                         "(the TTS needs one state per token)")
    table = tts.emb_text
    text_eos = int(cfg.get("text_eos_token_id", DEFAULT_TEXT_EOS))
    audio_bos = int(cfg.get("audio_bos_token_id", DEFAULT_AUDIO_BOS))
    ids = list(tokens) + [text_eos, audio_bos]
    too_big = [i for i in ids if not 0 <= i < table.num_embeddings]
    if too_big:
        raise ValueError(f"token ids {too_big[:4]} outside tts_config.num_text_tokens="
                         f"{table.num_embeddings}")
    device = table.weight.device
    embeds = table(torch.tensor(ids, device=device))
    if tokens:
        projected = tts.projector_semantic(hidden.to(device=device, dtype=table.weight.dtype))
        if cfg.get("normalize_projected_hidden", False):
            projected = F.normalize(projected, p=2, dim=-1)
        embeds = torch.cat([embeds[:len(tokens)] + projected, embeds[len(tokens):]])
    return embeds
