"""An audio LLM as emotion judge: Qwen3-Omni prompted with the clip for a five-way choice.

The paper reports this judge beside emotion2vec (SPEC §7, ``e2v / qwen3``). The model is
loaded from a local directory with transformers' Qwen3-Omni classes
(``Qwen3OmniMoeForConditionalGeneration``), thinker only: the config override
``enable_audio_output=False`` keeps the talker and code2wav modules from being built (their
weights in the checkpoint are skipped) and generation runs with ``return_audio=False``.

Prompt: the audio, then ``PROMPT`` listing ESD's five emotions as lettered options; decoding
is greedy with a short ``max_new_tokens``. The answer is read by ``parse_choice``; an answer
that names no option, or more than one, is recorded as ``raw_label='<unparseable: ...>'``
with label None and score 0, never guessed. ``score`` of a parsed answer is the geometric
mean probability of the generated answer tokens (the model's confidence in what it said).

Held out: the judge must not be the LALM under test. Construction is refused when
``model_under_test`` names the same directory or hub id as the judge (``same_model``).

Inputs are built by ``Qwen3OmniMoeProcessor`` when it can be loaded. transformers cannot
build that processor without torchvision (its video processor needs it), so where
torchvision is absent the same inputs are built from the checkpoint's tokenizer, chat
template and Whisper feature extractor exactly as the processor does for audio: features
padded to the longest clip, each audio placeholder expanded to the audio encoder's output
length (``_audio_token_count``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from esn_core.constants import EMOTIONS, SAMPLE_RATE
from esn_core.judges.base import EmotionJudge, Judgement, load_audio_16k, local_checkpoint_dir
from esn_core.judges.emotion2vec import unjudgeable

HF_ID = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
UNPARSEABLE_PREFIX = "<unparseable: "
LETTERS: tuple[str, ...] = tuple("ABCDE"[: len(EMOTIONS)])
CHOICES: dict[str, str] = dict(zip(LETTERS, EMOTIONS))
PROMPT = (
    "Listen to the speech. Which emotion does the speaker express?\n"
    + "\n".join(f"{letter}) {emotion}" for letter, emotion in CHOICES.items())
    + "\nAnswer with the letter of one option only."
)
DEFAULT_MAX_NEW_TOKENS = 8
# 0.1 s: the Whisper front end needs a few 10 ms frames to give the encoder one token.
MIN_SAMPLES = SAMPLE_RATE // 10
# Files a checkpoint directory needs besides its weights: model and tokenizer configs, and
# the audio front end's config, standalone (as released) or nested in processor_config.json
# (as transformers 5 saves a processor).
REQUIRED_FILES: tuple[str, ...] = ("config.json", "tokenizer_config.json")
PROCESSOR_FILES: tuple[str, ...] = ("preprocessor_config.json", "processor_config.json")
CHAT_TEMPLATE_FILES: tuple[str, ...] = ("chat_template.jinja", "chat_template.json")
WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "model.safetensors.index.json")

# Words that name an option (matched as whole words, case-insensitive).
_EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "neutrality"),
    "happy": ("happy", "happiness", "happily"),
    "angry": ("angry", "anger", "angrily"),
    "sad": ("sad", "sadness", "sadly"),
    "surprise": ("surprise", "surprised", "surprising", "surprisingly"),
}
_WORD_RE = {
    emotion: re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)
    for emotion, words in _EMOTION_WORDS.items()
}
_L = "".join(LETTERS)
# A letter on its own: "B", "(B)", "[b]", "**B**", "B."
_LETTER_ALONE = re.compile(rf"^[\W_]*([{_L}])[\W_]*$", re.IGNORECASE)
# A letter opening the answer, set off by punctuation: "B) happy", "(B) happy", "B. Happy", "B: ..."
_LETTER_LEAD = re.compile(rf"^[\s*_\"'`]*[(\[]?([{_L}])\s*[).:\]]", re.IGNORECASE)
# A letter introduced as the answer: "The answer is B", "Answer: (C)", "option d." -- a
# lower-case letter must end there (so "the answer is a happy voice" is not option A).
_LETTER_NAMED = re.compile(
    rf"\b(?i:answer|option|choice)\s*(?:is|:|-)?\s*[(\[]?"
    rf"(?:([{_L}])\b|([{_L.lower()}])(?=[\s)\].,:;!]*$|[)\].,:;!]))"
)
# A negation makes any reading a guess ("not happy", "it isn't sad"): refused.
_NEGATION = re.compile(r"\b(?:not|no|never|neither|nor|without|none)\b|n't\b", re.IGNORECASE)
# An upper-case letter closing the answer: "I think it's C", "So: D."
_LETTER_FINAL = re.compile(rf"(?<![\w'])([{_L}])[\s)\].!]*$")


def parse_choice(text: str | None) -> str | None:
    """The emotion an answer names, or None when it names none or more than one.

    Accepted: a bare letter ('B', '(B)'), a letter opening the answer ('B) happy',
    'B. Happy'), a letter introduced as the answer ('The answer is B'), an upper-case
    letter closing it ("I think it's C"), or an emotion word
    ('Happy.', 'The answer is happy', 'surprised'). Case is ignored, except that a lower-case
    letter counts only where it cannot be the article ('the answer is a happy voice' names
    happy, not option A). A letter and a word
    that disagree ('A. happy'), or two emotion words ('happy or sad', 'not happy but sad'),
    are ambiguous -> None; so is any answer holding a negation ('not happy').
    """
    if text is None:
        return None
    answer = text.strip()
    if not answer or _NEGATION.search(answer):
        return None
    named: set[str] = set()
    for pattern in (_LETTER_ALONE, _LETTER_LEAD, _LETTER_NAMED, _LETTER_FINAL):
        for match in pattern.finditer(answer):
            letter = next(g for g in match.groups() if g)
            named.add(CHOICES[letter.upper()])
    for emotion, pattern in _WORD_RE.items():
        if pattern.search(answer):
            named.add(emotion)
    return named.pop() if len(named) == 1 else None


def verdict_of_answer(text: str, confidence: float) -> Judgement:
    """The judgement recorded for a decoded answer."""
    emotion = parse_choice(text)
    if emotion is None:
        shown = repr(text.strip())
        if len(shown) > 200:
            shown = shown[:197] + "..."
        return Judgement(label=None, raw_label=f"{UNPARSEABLE_PREFIX}{shown}>", score=0.0)
    return Judgement(label=emotion, raw_label=text.strip(), score=float(confidence))


# ---------------------------------------------------------------- held-out check


def _normalised_id(ref: str | os.PathLike) -> tuple[str, str]:
    """(kind, key): ('path', realpath) for an existing path, else ('id', lowercased id)."""
    text = str(ref).strip()
    path = Path(text).expanduser()
    if path.exists():
        return "path", os.path.realpath(path)
    return "id", text.rstrip("/").lower()


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model references (directories or hub ids) name the same model.

    Two existing paths: same real path (symlinks resolved). Two ids: equal ignoring case
    and a trailing slash. A path and an id: the directory's name equals the id's last
    component (``/models/Qwen3-Omni-30B-A3B-Instruct`` vs ``Qwen/Qwen3-Omni-30B-A3B-Instruct``).
    """
    kind_a, key_a = _normalised_id(a)
    kind_b, key_b = _normalised_id(b)
    if kind_a == kind_b:
        return key_a == key_b
    path, hub_id = (key_a, key_b) if kind_a == "path" else (key_b, key_a)
    return Path(path).name.lower() == hub_id.rsplit("/", 1)[-1]


def check_held_out(judge_model: str | os.PathLike, model_under_test: str | os.PathLike | None) -> None:
    if model_under_test is not None and same_model(judge_model, model_under_test):
        raise ValueError(
            f"emotion judge must be held out: the LALM judge {str(judge_model)!r} is the LALM "
            f"under test {str(model_under_test)!r}; configure another judge model"
        )


# ---------------------------------------------------------------- checkpoint files


def where_to_get(model_dir: str | os.PathLike) -> str:
    return f"download it there with `hf download {HF_ID} --local-dir {model_dir}` (or from ModelScope)"


def check_checkpoint_dir(model_dir: str | os.PathLike) -> Path:
    """The directory, or an error naming the first missing file and where to get it."""
    path = local_checkpoint_dir(model_dir, "LALM judge", REQUIRED_FILES, where_to_get(model_dir))
    if not any((path / p).is_file() for p in PROCESSOR_FILES):
        raise FileNotFoundError(
            f"LALM judge checkpoint {path} lacks the audio processor config "
            f"({' or '.join(PROCESSOR_FILES)}); {where_to_get(path)}"
        )
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise FileNotFoundError(
            f"LALM judge checkpoint {path} has no weights ({' or '.join(WEIGHT_FILES)}); "
            f"{where_to_get(path)}"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"LALM judge checkpoint {path} lacks weight shard {missing[0]} "
                f"({len(missing)} of {len(shards)} missing); {where_to_get(path)}"
            )
    return path


# ---------------------------------------------------------------- inputs


def _audio_token_count(feature_lengths: torch.Tensor, n_window: int) -> torch.Tensor:
    """Audio encoder output length per clip (Qwen3-Omni's conv downsampling in chunks)."""
    chunk = n_window * 2
    leave = feature_lengths % chunk
    lengths = (leave - 1) // 2 + 1
    return ((lengths - 1) // 2 + 1 - 1) // 2 + 1 + (feature_lengths // chunk) * 13


class _AudioPromptProcessor:
    """``Qwen3OmniMoeProcessor``'s audio + text path, for environments without torchvision."""

    def __init__(self, model_dir: Path, n_window: int) -> None:
        from transformers import AutoFeatureExtractor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(model_dir)
        self.n_window = n_window
        self.audio_token = self.tokenizer.audio_token
        # The processor's template (chat_template.jinja / .json) wins over the tokenizer's,
        # as ProcessorMixin.from_pretrained has it.
        self.chat_template = _read_chat_template(model_dir) or self.tokenizer.chat_template
        if not self.chat_template:
            raise FileNotFoundError(
                f"LALM judge checkpoint {model_dir} has no chat template ({' or '.join(CHAT_TEMPLATE_FILES)})"
            )

    def apply_chat_template(self, conversations, add_generation_prompt: bool, tokenize: bool):
        return self.tokenizer.apply_chat_template(
            conversations,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
        )

    def __call__(self, text: list[str], audio: list[np.ndarray], return_tensors: str, padding: bool):
        feats = self.feature_extractor(
            audio,
            sampling_rate=SAMPLE_RATE,
            padding=True,
            truncation=False,
            return_attention_mask=True,
            return_tensors=return_tensors,
        )
        feature_mask = feats.pop("attention_mask")
        counts = _audio_token_count(feature_mask.sum(-1), self.n_window).tolist()
        expanded = []
        for prompt, count in zip(text, counts):
            if prompt.count(self.audio_token) != 1:
                raise ValueError(f"prompt must hold one audio placeholder {self.audio_token!r}: {prompt!r}")
            expanded.append(prompt.replace(self.audio_token, self.audio_token * int(count)))
        enc = self.tokenizer(expanded, padding=padding, padding_side="left", return_tensors=return_tensors)
        return {**enc, "input_features": feats["input_features"], "feature_attention_mask": feature_mask}


def _read_chat_template(model_dir: Path) -> str | None:
    jinja, legacy = (model_dir / name for name in CHAT_TEMPLATE_FILES)
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
    return None


def _load_processor(model_dir: Path, n_window: int):
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import Qwen3OmniMoeProcessor

        return Qwen3OmniMoeProcessor.from_pretrained(model_dir)
    return _AudioPromptProcessor(model_dir, n_window)


# ---------------------------------------------------------------- the judge


class LALMJudge(EmotionJudge):
    """Qwen3-Omni (thinker) answering a five-way multiple choice; see the module docstring."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        device: str = "cpu",
        batch_size: int = 8,
        model_under_test: str | os.PathLike | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        dtype: torch.dtype | str | None = None,
        name: str = "qwen3-omni",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_held_out(model_dir, model_under_test)
        self.model_dir = check_checkpoint_dir(model_dir)
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.name = name
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        from transformers import Qwen3OmniMoeForConditionalGeneration

        load_kwargs = {"dtype": dtype, "enable_audio_output": False}
        if self.device != "cpu":
            load_kwargs["device_map"] = self.device
        model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(self.model_dir, **load_kwargs)
        if getattr(model, "has_talker", False):
            model.disable_talker()
        self.model = model.to(self.device).eval()
        audio_config = model.config.thinker_config.audio_config
        self.processor = _load_processor(self.model_dir, int(getattr(audio_config, "n_window", 50)))
        tokenizer = self.processor.tokenizer
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if "<|im_end|>" in tokenizer.get_vocab():  # Qwen's end of turn
            eos.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.eos_token_ids = sorted(eos)
        if not self.eos_token_ids:
            raise ValueError(f"{self.model_dir}: the tokenizer defines no end-of-turn token")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    # ------------------------------------------------------------ inference

    def _conversation(self) -> list[dict]:
        return [
            {
                "role": "user",
                "content": [{"type": "audio", "audio": "clip.wav"}, {"type": "text", "text": PROMPT}],
            }
        ]

    @torch.no_grad()
    def answer(self, waveforms: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        """(decoded answer, confidence) per 16 kHz waveform, in batches of ``batch_size``."""
        out: list[tuple[str, float]] = []
        for start in range(0, len(waveforms), self.batch_size):
            out.extend(self._answer_batch(waveforms[start : start + self.batch_size]))
        return out

    def _answer_batch(self, waveforms: Sequence[np.ndarray]) -> list[tuple[str, float]]:
        texts = self.processor.apply_chat_template(
            [self._conversation() for _ in waveforms], add_generation_prompt=True, tokenize=False
        )
        audio = [np.asarray(w, dtype=np.float32).ravel() for w in waveforms]
        inputs = self.processor(text=list(texts), audio=audio, return_tensors="pt", padding=True)
        inputs = {
            k: (v.to(self.device, self.model.dtype) if torch.is_floating_point(v) else v.to(self.device))
            for k, v in inputs.items()
            if torch.is_tensor(v)
        }
        result = self.model.generate(
            **inputs,
            return_audio=False,
            thinker_max_new_tokens=self.max_new_tokens,
            thinker_do_sample=False,
            thinker_eos_token_id=self.eos_token_ids,
            thinker_pad_token_id=self.pad_token_id,
            thinker_return_dict_in_generate=True,
            thinker_output_scores=True,
        )
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = result.sequences[:, prompt_len:]
        logprobs = self.model.thinker.compute_transition_scores(
            result.sequences, result.scores, normalize_logits=True
        )
        answers = []
        for tokens, lp in zip(new_tokens.tolist(), logprobs.float().cpu()):
            n = next((i for i, t in enumerate(tokens) if t in self.eos_token_ids), len(tokens))
            text = self.processor.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            confidence = float(torch.exp(lp[:n].mean())) if n else 0.0
            answers.append((text, confidence))
        return answers

    def judge(self, paths: Sequence[str], speakers: Sequence[str]) -> list[Judgement]:
        """``EmotionJudge``: speakers are not used."""
        return [j for j, _ in self.judge_with_answers(paths, speakers)]

    def judge_with_answers(
        self, paths: Sequence[str], speakers: Sequence[str]
    ) -> list[tuple[Judgement, str | None]]:
        """(judgement, decoded answer) per clip; the answer is None for a clip too short to judge."""
        if len(paths) != len(speakers):
            raise ValueError(f"{len(paths)} clips but {len(speakers)} speakers")
        waveforms = [load_audio_16k(p) for p in paths]
        usable = [i for i, w in enumerate(waveforms) if w.size >= MIN_SAMPLES]
        answers = dict(zip(usable, self.answer([waveforms[i] for i in usable])))
        out: list[tuple[Judgement, str | None]] = []
        for i, wav in enumerate(waveforms):
            if i in answers:
                text, confidence = answers[i]
                out.append((verdict_of_answer(text, confidence), text))
            else:
                out.append((unjudgeable(int(wav.size), MIN_SAMPLES), None))
        return out
