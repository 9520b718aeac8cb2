"""Kimi-Audio's text tokenizer (tiktoken) and its two-stream prompt layout.

The checkpoint's ``tiktoken.model`` holds the base BPE ranks (base64 token, rank per line).
Kimi appends a fixed table of ``N_SPECIAL`` special tokens right after the base vocabulary
(``SPECIAL_TOKENS`` in order, then ``<|reserved_token_20|>``...; the last one is padding),
so e.g. ``<|im_msg_end|>`` is ``n_base + 2`` (151645 in the real model). Audio tokens live
above the text vocabulary, at ``kimia_token_offset + code``.

A prompt is two aligned streams of equal length (``TwoStreams``): at every position the
audio stream carries a control token, a blank or an audio token, the text stream carries a
text token or a blank; the LM embeds both and adds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

N_SPECIAL = 421  # Kimi's special-token table, base vocabulary + 421 = the text vocabulary

# Kimi's named special tokens in table order (reserved slots keep their place).
SPECIAL_TOKENS = (
    "[BOS]", "[EOS]", "<|im_msg_end|>", "<|im_user_msg_start|>", "<|im_assistant_msg_start|>",
    "<|reserved_token_0|>", "<|reserved_token_1|>", "<|reserved_token_2|>",
    "<|reserved_token_3|>", "[EOT]", "<|reserved_token_4|>", "<|reserved_token_5|>",
    "<|reserved_token_6|>", "<|reserved_token_7|>", "<|reserved_token_8|>",
    "<|reserved_token_9|>", "<|reserved_token_10|>", "<|reserved_token_11|>",
    "<|im_media_begin|>", "<|reserved_token_12|>", "<|im_media_end|>",
    "<|reserved_token_13|>", "<|reserved_token_14|>", "<|im_kimia_text_blank|>",
    "<|im_kimia_text_eos|>", "<|reserved_token_15|>", "<|reserved_token_16|>",
    "<|im_kimia_user_msg_start|>", "<|im_kimia_assistant_msg_start|>",
    "<|reserved_token_17|>", "<|reserved_token_18|>", "<|reserved_token_19|>",
    "<|im_kimia_speech_ct_id|>", "<|im_kimia_speech_ctd_id|>",
)

# Moonshot's pre-tokenisation pattern (Han runs, cased words with contractions, 1-3 digits,
# punctuation runs, newlines, spaces).
PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


def special_table() -> list[str]:
    """All ``N_SPECIAL`` special tokens in id order (named ones, then reserved fillers)."""
    fillers = [f"<|reserved_token_{i}|>" for i in range(20, 20 + N_SPECIAL - len(SPECIAL_TOKENS))]
    return list(SPECIAL_TOKENS) + fillers


@dataclass(frozen=True)
class SpecialIds:
    """The ids the prompt and the step loop use."""

    msg_end: int
    media_begin: int
    media_end: int
    text_blank: int
    text_eos: int
    user_start: int
    assistant_start: int
    speech_ct: int
    speech_ctd: int
    pad: int

    @classmethod
    def from_table(cls, ids: dict[str, int]) -> SpecialIds:
        return cls(
            msg_end=ids["<|im_msg_end|>"],
            media_begin=ids["<|im_media_begin|>"],
            media_end=ids["<|im_media_end|>"],
            text_blank=ids["<|im_kimia_text_blank|>"],
            text_eos=ids["<|im_kimia_text_eos|>"],
            user_start=ids["<|im_kimia_user_msg_start|>"],
            assistant_start=ids["<|im_kimia_assistant_msg_start|>"],
            speech_ct=ids["<|im_kimia_speech_ct_id|>"],
            speech_ctd=ids["<|im_kimia_speech_ctd_id|>"],
            pad=ids[special_table()[-1]],
        )

    @property
    def audio_ends(self) -> tuple[int, int]:
        """Audio-stream tokens that end an answer (upstream's ``eod_ids``)."""
        return (self.msg_end, self.media_end)


class KimiTokenizer:
    """Text <-> ids with Kimi's vocabulary: tiktoken on the checkpoint's ``tiktoken.model``."""

    def __init__(self, path: str | Path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path)
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as err:  # tiktoken raises plain ValueErrors/binascii errors
            raise ValueError(f"{path} is not a tiktoken BPE file: {err}") from err
        self.n_base = len(ranks)
        if sorted(ranks.values()) != list(range(self.n_base)):
            raise ValueError(f"{path}: BPE ranks are not 0..{self.n_base - 1}")
        self.special = {tok: self.n_base + i for i, tok in enumerate(special_table())}
        self.encoding = tiktoken.Encoding(
            name=path.name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.ids = SpecialIds.from_table(self.special)
        self.vocab_size = self.n_base + N_SPECIAL

    def encode(self, text: str) -> list[int]:
        """Plain text only: special-token spellings in ``text`` are encoded as text."""
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids) -> str:
        """Text of the base-vocabulary ids (specials and audio ids are dropped)."""
        return self.encoding.decode([int(i) for i in ids if 0 <= int(i) < self.n_base])


@dataclass
class TwoStreams:
    """One prompt: audio-stream ids, text-stream ids, which positions carry Whisper features."""

    audio: list[int] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    continuous: list[bool] = field(default_factory=list)

    def add(self, audio: int, text: int, continuous: bool = False) -> None:
        self.audio.append(int(audio))
        self.text.append(int(text))
        self.continuous.append(bool(continuous))

    def __len__(self) -> int:
        return len(self.audio)


def evc_prompt(ids: SpecialIds, instruction: list[int], audio_tokens: list[int],
               speech_out: bool = True) -> TwoStreams:
    """Upstream's layout for one user turn (text instruction, then the source audio) and
    the assistant's start, as its prompt manager builds ``[text, audio]`` user messages.

    ``audio_tokens``: the source's discrete tokens, already offset into the vocabulary;
    their positions also take the source's Whisper features. ``speech_out``: the
    ``ctd`` marker that asks for a spoken answer (``ct`` for text only).
    """
    p = TwoStreams()
    p.add(ids.user_start, ids.text_blank)
    for token in instruction:
        p.add(ids.text_blank, token)
    p.add(ids.media_begin, ids.text_blank)
    for token in audio_tokens:
        p.add(token, ids.text_blank, continuous=True)
    p.add(ids.media_end, ids.text_blank)
    p.add(ids.speech_ctd if speech_out else ids.speech_ct, ids.text_blank)
    p.add(ids.msg_end, ids.text_blank)
    p.add(ids.assistant_start, ids.text_blank)
    return p
