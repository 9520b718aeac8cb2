"""A tiny MiniCPM-o 4.5 checkpoint folder in the real layout (config.json keys, safetensors
weight names under llm./apm./audio_projection_layer./tts./vpm.), random weights, seeded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3ForCausalLM

from esn_core.models.minicpm_audio import MiniCPMAudioIn
from esn_core.models.minicpm_checkpoint import SPECIAL_TOKENS, lm_config
from esn_core.models.minicpm_tts import MiniCPMTTS

TINY_CONFIG = dict(
    architectures=["MiniCPMO"], model_type="minicpmo", hidden_size=16, intermediate_size=24,
    num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_hidden_layers=2,
    vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    audio_pool_step=2,
    audio_config=dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, d_model=8,
                      encoder_ffn_dim=32, max_source_positions=60),
    tts_config=dict(llm_dim=16, llm_intermediate_size=12, hidden_size=8, intermediate_size=12,
                    num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1,
                    num_audio_tokens=11, num_text_tokens=300, num_vq=1, projector_type="mlp",
                    text_eos_token_id=1, audio_bos_token_id=2, normalize_projected_hidden=True,
                    backbone_vocab_size=5))


# A few sentences for a small BPE: the EVC instruction's words and ESD-like transcripts.
CORPUS = ["Repeat exactly the words spoken in this audio with the emotion happy sad angry",
          "surprise neutral you are a helpful assistant clone the voice in the reference",
          "the cat sat on the mat and the dog ran to the park"]

# Our reduced form of MiniCPM-o 4.5's chat template (Qwen3's turns; no tools, no thinking):
# it renders system/user/assistant turns as upstream's does and, like it, ends the
# generation prompt with <|tts_bos|> when use_tts_template is set.
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- if use_tts_template is defined and use_tts_template is true %}{{- '<|tts_bos|>' }}"
    "{%- endif %}{%- endif %}")


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """tokenizer.json (a BPE trained here, upstream's special tokens added after its
    vocabulary) and tokenizer_config.json with the hub's keys the loader reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # byte-level like Qwen's: every string encodes, and <unk> is only the audio placeholder
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS) + ["<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="MiniCPMOTokenizerFast", bos_token="<|im_start|>",
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        add_bos_token=False, chat_template=CHAT_TEMPLATE), indent=1))


def build(directory: Path, seed: int = 0, with_vision: bool = True,
          max_source_positions: int | None = None) -> Path:
    """``max_source_positions``: a longer audio window (the workflow's demo clips run longer
    than the tiny encoder's 1.2 s)."""
    config = json.loads(json.dumps(TINY_CONFIG))
    if max_source_positions is not None:
        config["audio_config"]["max_source_positions"] = max_source_positions
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(directory, config["vocab_size"])
    weights = {f"llm.{k}": v for k, v in Qwen3ForCausalLM(lm_config(config)).state_dict().items()}
    weights |= MiniCPMAudioIn(config["audio_config"], 16, config["audio_pool_step"]).state_dict()
    weights |= {f"tts.{k}": v for k, v in MiniCPMTTS(config["tts_config"]).state_dict().items()}
    if with_vision:
        weights["vpm.embeddings.patch_embedding.weight"] = torch.randn(4, 3, 2, 2)
        weights["resampler.query"] = torch.randn(2, 16)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory
