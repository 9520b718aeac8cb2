"""Tiny random-weight checkpoints of the paper's judges, laid out like the released ones.

- ``tiny_emotion2vec_dir``: funasr's own ``Emotion2vec`` class (registered as "Emotion2vec")
  built from a small config.yaml, saved as model.pt beside tokens.txt with the nine
  emotion2vec+ labels -- the three files of ``iic/emotion2vec_plus_large``.
- ``tiny_qwen3_omni_dir``: ``Qwen3OmniMoeForConditionalGeneration`` from a small config
  (thinker with audio encoder, MoE text model, a one-block vision tower; no talker), saved
  with ``save_pretrained`` beside a byte-level Qwen2 tokenizer with Qwen's special tokens,
  a chat template and a Whisper feature extractor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

E2V_LABELS = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
)

_E2V_AUDIO = {
    "type": "AUDIO",
    "prenet_depth": 1,
    "prenet_layerdrop": 0.0,
    "prenet_dropout": 0.0,
    "start_drop_path_rate": 0.0,
    "end_drop_path_rate": 0.0,
    "num_extra_tokens": 2,
    "init_extra_token_zero": True,
    "mask_noise_std": 0.01,
    "mask_prob_min": None,
    "inverse_mask": False,
    "mask_prob": 0.5,
    "mask_prob_adjust": 0.05,
    "keep_masked_pct": 0.0,
    "mask_length": 5,
    "add_masks": False,
    "remove_masks": False,
    "mask_dropout": 0.0,
    "encoder_zero_mask": True,
    "mask_channel_prob": 0.0,
    "mask_channel_length": 64,
    "ema_local_encoder": False,
    "local_grad_mult": 1.0,
    "use_alibi_encoder": True,
    "alibi_scale": 1.0,
    "learned_alibi": False,
    "alibi_max_pos": None,
    "learned_alibi_scale": True,
    "learned_alibi_scale_per_head": True,
    "learned_alibi_scale_per_layer": False,
    "num_alibi_heads": 2,
    "model_depth": 1,
    "decoder": None,
    "extractor_mode": "layer_norm",
    # the released model's conv stack (strides 5*2^6 = 320, receptive field 400), narrow
    "feature_encoder_spec": "[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] + [(16, 2, 2)]",
    "conv_pos_width": 6,
    "conv_pos_groups": 2,
    "conv_pos_depth": 2,
    "conv_pos_pre_ln": False,
}

E2V_CONFIG = {
    "model": "Emotion2vec",
    "model_conf": {
        "loss_beta": 0.0,
        "loss_scale": None,
        "depth": 1,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "num_heads": 2,
        "norm_eps": 1e-5,
        "norm_affine": True,
        "encoder_dropout": 0.0,
        "post_mlp_drop": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "dropout_input": 0.0,
        "layerdrop": 0.0,
        "embed_dim": 16,
        "mlp_ratio": 2.0,
        "layer_norm_first": False,
        "average_top_k_layers": 1,
        "end_of_block_targets": False,
        "clone_batch": 1,
        "normalize": True,
        "modalities": {"audio": _E2V_AUDIO},
    },
    "tokenizer": "CharTokenizer",
    "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
}


def tiny_emotion2vec_dir(
    root: Path, seed: int = 0, favour: str | None = None, configuration_json: bool = False
) -> Path:
    """Write config.yaml, model.pt, tokens.txt of a tiny emotion2vec+ classifier into ``root``.

    ``favour``: a label whose classifier bias is raised so far that it wins every argmax.
    ``configuration_json``: also write the ModelScope ``configuration.json`` the released
    checkpoint carries (funasr then resolves the files through its ``file_path_metas``).
    """
    import funasr  # noqa: F401 - importing funasr registers its model classes
    from funasr.register import tables

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(E2V_CONFIG, allow_unicode=True), encoding="utf-8")
    (root / "tokens.txt").write_text("\n".join(E2V_LABELS) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    model = tables.model_classes["Emotion2vec"](model_conf=E2V_CONFIG["model_conf"], vocab_size=len(E2V_LABELS))
    if favour is not None:
        with torch.no_grad():
            model.proj.bias[E2V_LABELS.index(favour)] += 50.0
    torch.save(model.state_dict(), root / "model.pt")
    if configuration_json:
        (root / "configuration.json").write_text(
            json.dumps(
                {
                    "framework": "pytorch",
                    "task": "emotion-recognition",
                    "model": {"type": "funasr"},
                    "pipeline": {"type": "funasr-pipeline"},
                    "file_path_metas": {
                        "init_param": "model.pt",
                        "config": "config.yaml",
                        "tokenizer_conf": {"token_list": "tokens.txt"},
                    },
                }
            )
        )
    return root


# ---------------------------------------------------------------- Qwen3-Omni

QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's chat format for a user turn of audio + text, as the released template renders it.
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'audio' %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_tokenizer():
    """A byte-level Qwen2 tokenizer (256 byte tokens, no merges) with Qwen-Omni's specials."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for tok in QWEN_SPECIALS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "audio_token": "<|audio_pad|>",
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "audio_bos_token": "<|audio_start|>",
            "audio_eos_token": "<|audio_end|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_omni_dir(root: Path, seed: int = 0, processor: str = "parts") -> Path:
    """Save a tiny Qwen3-Omni-MoE checkpoint (weights, config, tokenizer, feature extractor).

    ``processor`` -- how the input side is laid out:
    "parts": tokenizer (chat template inside) + preprocessor_config.json (Whisper features);
    "nested": what ``Qwen3OmniMoeProcessor.save_pretrained`` writes for its audio side under
    transformers 5 -- processor_config.json with the feature extractor nested, the template
    in chat_template.jinja, the tokenizer without one;
    "full": a whole ``Qwen3OmniMoeProcessor`` saved (image and video processors too, as a
    released checkpoint has them); transformers needs torchvision to build it.
    """
    if processor not in ("parts", "nested", "full"):
        raise ValueError(f"processor must be parts, nested or full, got {processor!r}")
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor

    tokenizer = tiny_qwen_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIALS}
    n_mels = 16
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "moe_intermediate_size": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "interleaved": True,
        },
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
    }
    audio = {
        "num_mel_bins": n_mels,
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "d_model": 16,
        "output_dim": 32,
        "n_window": 50,
        "n_window_infer": 100,
        "downsample_hidden_size": 8,
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": 32,
        "deepstack_visual_indexes": [0],
        "patch_size": 4,
        "num_position_embeddings": 64,
    }
    config = Qwen3OmniMoeConfig(
        thinker_config={
            "text_config": text,
            "audio_config": audio,
            "vision_config": vision,
            "audio_token_id": ids["<|audio_pad|>"],
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "audio_start_token_id": ids["<|audio_start|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "user_token_id": ids["<|im_start|>"],
        },
        enable_audio_output=False,
        im_start_token_id=ids["<|im_start|>"],
        im_end_token_id=ids["<|im_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    feature_extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000)
    if processor == "full":
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeProcessor

        Qwen3OmniMoeProcessor(
            image_processor=Qwen2VLImageProcessor(),
            video_processor=Qwen2VLVideoProcessor(),
            feature_extractor=feature_extractor,
            tokenizer=tokenizer,
            chat_template=QWEN_CHAT_TEMPLATE,
        ).save_pretrained(root)
    elif processor == "nested":
        tokenizer.chat_template = None
        tokenizer.save_pretrained(root)
        (root / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE, encoding="utf-8")
        (root / "processor_config.json").write_text(
            json.dumps({"feature_extractor": feature_extractor.to_dict(), "processor_class": "Qwen3OmniMoeProcessor"})
        )
    else:
        tokenizer.save_pretrained(root)
        feature_extractor.save_pretrained(root)
    return root
