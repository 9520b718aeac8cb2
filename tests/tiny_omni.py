"""A tiny Qwen2.5-Omni checkpoint (thinker + audio encoder + vision tower, talker, token2wav).

Every part is the real transformers class with random weights, shrunk so that a batch of
EVC attempts runs in about a second on two CPU cores. The checkpoint directory holds what
the real ``Qwen/Qwen2.5-Omni-7B`` holds (``config.json``, safetensors weights,
``preprocessor_config.json``, a byte-level BPE tokenizer with the Qwen chat specials and
the ChatML chat template, ``spk_dict.pt``), so the adapter loads it through the same path
as the real checkpoint.

The tokenizer is trained here with the ``tokenizers`` library on a few sentences; its
special tokens carry Qwen's names (``<|im_start|>``, ``<|AUDIO|>``, ...) and the config's
token ids point at them, as in the real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TF_MAJOR = int(transformers.__version__.split(".")[0])

# Qwen's special tokens, in the order of the real vocabulary, then the talker's text-stream
# tokens and speaker start tokens (embedding rows only in the real model).
SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
    "<|audio_eos|>", "<|BOX|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>",
    "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
    "<|tts_pad|>", "<|tts_bos|>", "<|tts_eos|>", "<|spk_chelsie|>", "<|spk_ethan|>",
)

# The real checkpoint's chat template (ChatML with audio / image / video placeholders).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = (
    (
        "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
        "perceiving auditory and visual inputs, as well as generating text and speech."
    ),
    (
        "Repeat exactly the words spoken in this audio, word for word, and say them with the "
        "emotion: happy, angry, sad, surprise or neutral. Reply with the words only."
    ),
    "the quick brown fox jumps over the lazy dog while we talk about the weather today",
    "she sells sea shells by the sea shore and he reads a book in the garden",
)

SPEAKERS = ("Chelsie", "Ethan")
SOURCE_RATE = 16_000


def _train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return tok


def _tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(directory)
    # Name the tokenizer class and the multimodal specials as the real tokenizer_config does.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    named = {
        "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
        "audio_eos_token": "<|audio_eos|>", "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
    }
    config["tokenizer_class"] = "Qwen2TokenizerFast" if TF_MAJOR < 5 else "Qwen2Tokenizer"
    if TF_MAJOR < 5:
        config["extra_special_tokens"] = named
    else:
        config.update(named)
    config_path.write_text(json.dumps(config, indent=2))
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}, len(tokenizer)


def _rope(head_dim: int) -> dict:
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    key = "rope_scaling" if TF_MAJOR < 5 else "rope_parameters"
    rope = {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}
    if TF_MAJOR < 5:
        rope["type"] = "default"
    return {key: rope}


def tiny_config(ids: dict[str, int], vocab: int):
    from transformers import Qwen2_5OmniConfig

    hidden = 32
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, use_sliding_window=False, rms_norm_eps=1e-6,
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], **_rope(8),
    )
    audio = dict(
        num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
        d_model=16, output_dim=hidden, n_window=25, max_source_positions=200,
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=hidden,
        fullatt_block_indexes=[0],
    )
    specials = dict(
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
    )
    vision_ids = dict(
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
    )
    thinker = dict(
        text_config=text, audio_config=audio, vision_config=vision, user_token_id=0,
        **specials, **vision_ids,
    )
    talker = dict(
        vocab_size=64, embedding_size=hidden, hidden_size=24, intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=1024, use_sliding_window=False, rms_norm_eps=1e-6,
        tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62,
        tts_codec_mask_token_id=63, tts_text_pad_token_id=ids["<|tts_pad|>"],
        tts_text_start_token_id=ids["<|tts_bos|>"], tts_text_end_token_id=ids["<|tts_eos|>"],
        **specials, **vision_ids, **_rope(8),
    )
    token2wav = dict(
        dit_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2,
            emb_dim=8, mel_dim=16, num_embeds=64, repeats=2, block_size=8,
            look_ahead_layers=[1], look_backward_layers=[0], enc_emb_dim=8, enc_dim=8,
            enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8, enc_se_channels=8,
            max_position_embeddings=4096,
        ),
        bigvgan_config=dict(
            # Two upsampling stages (the real vocoder has six, x240): speech comes out at a
            # lower rate than 24 kHz, which nothing here depends on, at a fraction of the cost.
            mel_dim=16, upsample_initial_channel=16, resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[5, 4],
            upsample_kernel_sizes=[11, 8],
        ),
    )
    return Qwen2_5OmniConfig(
        thinker_config=thinker, talker_config=talker, token2wav_config=token2wav,
        enable_audio_output=True,
    )


def _widen(model: torch.nn.Module, seed: int) -> None:
    """Random weights wide enough that activations take both signs and argmaxes are decisive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith("token2wav"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def build_tiny_omni(directory: Path, seed: int = 0) -> Path:
    """Write a complete tiny Qwen2.5-Omni checkpoint to ``directory`` and return it."""
    from transformers import (
        Qwen2_5OmniForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids, vocab = _tokenizer(directory)
    config = tiny_config(ids, vocab)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    _widen(model, seed)
    model.save_pretrained(directory, max_shard_size="200KB")  # sharded, like the real one

    extractor = WhisperFeatureExtractor(
        feature_size=16, sampling_rate=SOURCE_RATE, hop_length=160, chunk_length=2, n_fft=400,
    )
    extractor.save_pretrained(directory)
    _write_processor_config(directory)

    generator = torch.Generator().manual_seed(seed + 1)
    speakers = {
        name: {
            "cond": torch.randn(1, 8, generator=generator),
            "ref_mel": torch.randn(1, 16, 16, generator=generator),
            "bos_token": ids[f"<|spk_{name.lower()}|>"],
        }
        for name in SPEAKERS
    }
    torch.save(speakers, directory / "spk_dict.pt")
    return directory


def _write_processor_config(directory: Path) -> None:
    """The image processor's settings and the processor class, as in the real checkpoint."""
    path = directory / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config.update({
        "processor_class": "Qwen2_5OmniProcessor",
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "min_pixels": 3136, "max_pixels": 12845056,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    })
    path.write_text(json.dumps(config, indent=2))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def write_source(path: Path, seconds: float, seed: int, rate: int = SOURCE_RATE) -> Path:
    """A short noisy tone standing in for a neutral recording."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(path, wave.astype(np.float32), rate)
    return Path(path)
