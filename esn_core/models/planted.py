"""The planted LALM: a tiny speech-generative model whose emotion neurons are known.

Like tracr's compiled transformers, its weights are *written*, not trained, so the
pipeline's answer can be checked: CAS/MAD must find the neurons planted here.

Model (all of it real transformers code on the hooked path):

* Vocabulary: the demo SENTENCES' words, four specials and one instruction token per
  emotion. Prompt = ``<bos> <target-emotion> w1 .. wn <eos>``.
* Residual stream, width ``H = word_dims + 1 + 5 + 4``, with reserved coordinates as in
  tracr: ``[0, word_dims)`` word content, one *bias* coordinate that is 1 at every position
  (Qwen2MLP has no biases, so thresholds read it), five *instruction* coordinates (one per
  emotion) and four *readout* coordinates ``r_e`` (one per target). Only content and
  readout coordinates are ever written, so the instruction channel stays clean.
* ``lm`` (the hook root ``PlantedLALM.lm``): input = word embedding + the instruction's
  style vector summed over the row's real positions (a global style embedding: every
  position sees the instruction, padding sees nothing) + the bias coordinate; then L
  residual blocks ``x = x + Qwen2MLP(Qwen2RMSNorm(x))``. No attention: positions are
  independent, so padding is exact and batched rows equal single runs.
* Written neurons in the middle-to-late layers, in *families* (``FAMILIES``; cells in
  ``config.families``). A family neuron's gate reads a random content direction plus the
  bias and its emotion's instruction coordinate, with offsets set so that it fires at a
  known share of positions with and without its emotion instructed; its up row reads the
  bias (``v > 0``). The *causal* families write ``r_e`` (plus a small content *leak*, so
  strong steering garbles words, WER rising as in Table 4); the *distractors* write
  nothing, so steering or silencing them changes nothing at all. Per target emotion:

  | family | n | P(g>0) own / other | writes | built to fool |
  |---|---|---|---|---|
  | strong | 8 | .92 / .08 | β r_e | (none: every selector should find it) |
  | rare | 4 | .50 / .002 | 9 β r_e | LAPE: below its percentile bar τ_p ≈ .76 |
  | correlated | 3 | .995 / .84 | nothing | LAP (top P), but only a .15 CAS margin |
  | anti | 1 | .05 / .70 | nothing | MAD: its deviation from P̄ is .49; CAS never |
  | generic | 3 (in all) | .99 for every emotion | nothing | LAP: ranked first for all |

  (A rare neuron fires half as often and, once on, less strongly, so its larger write
  makes the 4 rare neurons carry about as much of ``r_e`` as the 8 strong ones.)
  ``planted`` (the known answer) = strong + rare, 12 per emotion.
* Every other neuron is random: gate reads content (activation probability ~0.5, varying
  per word), very weakly the instruction and readout coordinates; writes small random
  content vectors. Earlier layers' writes drift the content a little, so random neurons
  pick up incidental emotion sensitivity (CAS margins up to ~.3, MAD deviations ~.3).
  A share of the longer words sit next to a near-homophone partner in embedding space,
  so these writes flip a few percent of decoded words (the WER filter matters).

Expected masks at ``N_sel`` = 12 (the derivation the known-answer test asserts; P̄ is the
mean over the four targets, τ_p LAPE's 95th percentile of all 4 × 1,024 P values):

| selector | score of each family for emotion e | mask of e | precision |
|---|---|---|---|
| CAS | strong .84, rare .50, correlated .15, anti and generic ≈ 0 (another emotion or a tie on top), random ≤ .3 | strong + rare | 12/12 |
| MAD (abs(P − P̄)) | strong .63, anti .49, rare .37, strong of other e .21, correlated .12, random ≤ .3 | strong + anti + 3 rare | 11/12 |
| LAP | generic .99, correlated .995, strong .92, random ≤ .9 | generic + correlated + 6 strong | 6/12 |
| LAPE | rare never survives (.50 < τ_p); pool = the 60 lowest-entropy survivors: strong, then random and correlated | 8 strong + 4 distractors | ≤ 8/12 |
| random | — | 12 uniform of 1,024 | 12/1024 × 12 ≈ .14 neurons |

Steering with α = 1 doubles the steered neurons' writes, so a mask moves ``s_e`` in
proportion to the causal ``r_e`` it holds: CAS all of it, MAD 7/8, LAPE 1/2, LAP 3/8,
random none. Self-effects therefore rank CAS ≈ MAD > LAPE, LAP > random ≈ 0.
* Decoded text = per-position argmax of the final content coordinates against the word
  embeddings (the stream carries its input word), specials dropped.
* Emotion strength ``s_e = sigmoid(gain · (m_e / readout_scale_e − 1) + logit_e)`` with
  ``m_e`` the mean of ``r_e`` over the row's real positions: ``logit_e`` is the baseline
  difficulty per emotion (sad easy, surprise hard, like the paper's Table 2). Half of
  ``r_e`` at baseline comes from the causal neurons, half straight from the instruction
  (its style vector), so steering all causal neurons moves the logit by about
  ``gain / 2`` and silencing them by ``−gain / 2``, without saturating.
  Output style = neutral + Σ_e s_e (STYLES[e] − neutral), jittered by the request's seed
  like a sampling TTS, spoken by espeak-ng in the speaker's demo voice.
* ``synth`` (the "talker", hook root ``PlantedLALM.talker``): Qwen2MLP blocks fed the
  CONTENT part of the final stream (instruction and readout coordinates zeroed). Its
  output only sets a rate factor within ±``talker_rate_span`` (2 %): it holds no emotion
  signal, the paper's Table 6 finding, planted here as a known negative.

Oracle front end: the model does not listen. It perceives the source audio through the
request's transcript, as if its audio encoder were perfect; words outside its vocabulary
become ``<unk>`` (decoded as a deletion).

Positions: one parallel forward pass per batch (no decode loop), so every real position
is a prefill position; ``Capture(count_positions='generated')`` therefore counts nothing
here, and ``'all'`` (SPEC's default) is the setting to use.

Weights are float64 so that the sign tests and argmaxes never depend on batch shape.
"""

from __future__ import annotations

import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from esn_core.constants import EMOTIONS, SAMPLE_RATE, TARGETS
from esn_core.demo_corpus import SENTENCES, SPEAKER_VOICES, DemoSpeaker, demo_speakers, render_speech
from esn_core.hooks import MLPGroup
from esn_core.layout import NeuronLayout
from esn_core.models.base import EVCOutput, EVCRequest, LALMAdapter
from esn_core.option_values import check_arguments
from esn_core.select import Mask, masks_to_table
from esn_core.styles import STYLES, EmotionStyle, blend

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
PROMPT_PREFIX = 2  # <bos> <emotion> before the words
_WORD = re.compile(r"[a-z']+")


def words_of(text: str) -> list[str]:
    """Lower-case word tokens (punctuation dropped), the planted model's tokenisation."""
    return _WORD.findall(text.lower())


def demo_vocabulary(sentences: Sequence[str] = SENTENCES) -> list[str]:
    return sorted({w for s in sentences for w in words_of(s)})


def emotion_token(emotion: str) -> str:
    return f"<{emotion}>"


# ---------------------------------------------------------------------------- config


@strict
class PlantedConfig(PreTrainedConfig):
    """Shapes, vocabulary, the planted neurons (ground truth) and the strength readout."""

    model_type = "esn_planted"

    words: list[str] | None = None
    word_dims: int = 54
    intermediate_size: int = 128
    num_hidden_layers: int = 8
    talker_num_layers: int = 2
    talker_intermediate_size: int = 64
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    # target emotion -> [[layer, neuron], ...] of the lm group (the known answer: the
    # causal neurons, strong then rare)
    planted: dict | None = None
    # family -> {emotion (or "all"): [[layer, neuron], ...]}: every written neuron by family
    # (FAMILIES), distractors included; the causal families together equal ``planted``
    families: dict | None = None
    readout_scale: list[float] | None = None  # per TARGETS, mean r_e at baseline
    strength_gain: float = 5.0
    strength_logit: list[float] | None = None  # per TARGETS
    talker_rate_span: float = 0.02

    def __post_init__(self, **kwargs):
        if self.words is None:
            self.words = demo_vocabulary()
        if self.planted is None:
            self.planted = {e: [] for e in TARGETS}
        if self.families is None:
            self.families = {}
        if self.readout_scale is None:
            self.readout_scale = [1.0] * len(TARGETS)
        if self.strength_logit is None:
            self.strength_logit = [0.0] * len(TARGETS)
        kwargs.pop("hidden_size", None)  # derived, never free
        self.hidden_size = self.word_dims + 1 + len(EMOTIONS) + len(TARGETS)
        super().__post_init__(**kwargs)

    @property
    def tokens(self) -> list[str]:
        return [*SPECIALS, *(emotion_token(e) for e in EMOTIONS), *self.words]

    # reserved coordinates of the residual stream
    @property
    def bias_dim(self) -> int:
        return self.word_dims

    def instruction_dim(self, emotion: str) -> int:
        return self.word_dims + 1 + EMOTIONS.index(emotion)

    def readout_dim(self, emotion: str) -> int:
        return self.word_dims + 1 + len(EMOTIONS) + TARGETS.index(emotion)

    def emotion_dims(self) -> list[int]:
        """Instruction and readout coordinates: what the talker never sees."""
        return list(range(self.word_dims + 1, self.hidden_size))


def _mlp_config(hidden: int, intermediate: int, config: PlantedConfig) -> Qwen2Config:
    return Qwen2Config(hidden_size=hidden, intermediate_size=intermediate,
                       hidden_act=config.hidden_act, num_hidden_layers=1)


# ---------------------------------------------------------------------------- modules


class ResidualMLPBlock(nn.Module):
    """``x + Qwen2MLP(Qwen2RMSNorm(x))``: a decoder layer without attention."""

    def __init__(self, hidden: int, intermediate: int, config: PlantedConfig):
        super().__init__()
        self.norm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.mlp = Qwen2MLP(_mlp_config(hidden, intermediate, config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class PlantedLM(nn.Module):
    """The ``lm`` group and its hook root: ``forward(input_ids=, attention_mask=)``."""

    def __init__(self, config: PlantedConfig):
        super().__init__()
        vocab, hidden = len(config.tokens), config.hidden_size
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.style_embed = nn.Embedding(vocab, hidden)  # nonzero for instruction tokens only
        self.layers = nn.ModuleList(
            ResidualMLPBlock(hidden, config.intermediate_size, config)
            for _ in range(config.num_hidden_layers)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.to(self.embed_tokens.weight.dtype).unsqueeze(-1)
        style = (self.style_embed(input_ids) * real).sum(dim=1, keepdim=True)
        x = self.embed_tokens(input_ids) + style
        for layer in self.layers:
            x = layer(x)
        return x


class PlantedTalker(nn.Module):
    """The ``synth`` group and its hook root: ``forward(inputs_embeds=, attention_mask=)``."""

    def __init__(self, config: PlantedConfig):
        super().__init__()
        hidden = config.hidden_size
        self.layers = nn.ModuleList(
            ResidualMLPBlock(hidden, config.talker_intermediate_size, config)
            for _ in range(config.talker_num_layers)
        )
        self.rate_head = nn.Linear(hidden, 1, bias=False)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row rate drive (before the ±span squashing), from real positions only."""
        y = inputs_embeds
        for layer in self.layers:
            y = layer(y)
        drive = self.rate_head(y).squeeze(-1)
        if attention_mask is None:
            return drive.mean(dim=1)
        real = attention_mask.to(drive.dtype)
        return (drive * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)


@dataclass
class PlantedOutput:
    hidden: torch.Tensor  # [B, S, H] final lm stream
    token_ids: torch.Tensor  # [B, S] decoded token per position
    strengths: torch.Tensor  # [B, len(TARGETS)] emotion strengths in (0, 1)
    rate_factor: torch.Tensor  # [B] talker's rate factor, 1 ± span


class PlantedLALM(PreTrainedModel):
    config_class = PlantedConfig
    base_model_prefix = "planted"
    main_input_name = "input_ids"

    def __init__(self, config: PlantedConfig):
        super().__init__(config)
        self.lm = PlantedLM(config)
        self.talker = PlantedTalker(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Planted weights are written by plant_model, never drawn here. A fresh model is
        # blank (zeros; RMSNorm gains 1) and from_pretrained must load every tensor (the
        # adapter refuses missing keys), so nothing is ever silently re-initialised.
        with torch.no_grad():
            if isinstance(module, Qwen2RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.zero_()

    def content_mask(self) -> torch.Tensor:
        mask = torch.ones(self.config.hidden_size, dtype=self.dtype, device=self.device)
        mask[self.config.emotion_dims()] = 0.0
        return mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PlantedOutput:
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask)
        words = slice(0, cfg.word_dims)
        token_ids = (hidden[..., words] @ self.lm.embed_tokens.weight[:, words].T).argmax(dim=-1)
        real = attention_mask.to(hidden.dtype)
        read = hidden[..., [cfg.readout_dim(e) for e in TARGETS]]
        mean_read = (read * real.unsqueeze(-1)).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)
        scale = torch.as_tensor(cfg.readout_scale, dtype=hidden.dtype, device=hidden.device)
        logit = torch.as_tensor(cfg.strength_logit, dtype=hidden.dtype, device=hidden.device)
        strengths = torch.sigmoid(cfg.strength_gain * (mean_read / scale - 1.0) + logit)
        drive = self.talker(inputs_embeds=hidden * self.content_mask(), attention_mask=attention_mask)
        rate_factor = 1.0 + cfg.talker_rate_span * torch.tanh(drive)
        return PlantedOutput(hidden, token_ids, strengths, rate_factor)


# ---------------------------------------------------------------------------- tokenizer


class PlantedTokenizer:
    """Word-level tokenizer of a PlantedConfig's vocabulary."""

    def __init__(self, config: PlantedConfig):
        self.tokens = config.tokens
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def encode(self, transcript: str, target_emotion: str) -> list[int]:
        if target_emotion not in EMOTIONS:
            raise ValueError(f"target emotion {target_emotion!r} is not one of {EMOTIONS}")
        ids = [self.index.get(w, UNK) for w in words_of(transcript)]
        return [BOS, self.index[emotion_token(target_emotion)], *ids, EOS]

    def batch(self, requests: Sequence[EVCRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` for one batch."""
        rows = [self.encode(r.transcript, r.target_emotion) for r in requests]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.as_tensor(row)
            mask[b, : len(row)] = 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        """Words of ``ids``; specials (including ``<unk>`` and instructions) are dropped."""
        first_word = len(SPECIALS) + len(EMOTIONS)
        return " ".join(self.tokens[i] for i in ids if i >= first_word)


# ---------------------------------------------------------------------------- planting


@dataclass(frozen=True)
class PlantingScales:
    """The constants of ``plant_model`` (relative to an instruction coordinate of 1).

    Calibrated on the demo corpus (5 speakers x 20 sentences, seed 0) with the embedded
    judge, as in tests/test_known_answer.py. Measured there: baseline match happy 42,
    angry 37, sad 78, surprise 33 % (identification speakers); every family fires within
    ±0.05 of its FAMILIES shares on the demo sentences, random neurons at ~0.5; CAS steer
    α = 1 self-effect +53 pp, deactivation −41 pp (unseen speakers).
    """

    word_norm: float = 3.0  # |word embedding|
    family_sharpness: float = 1.4  # κσ of a family gate (Family): how steeply g grows once on
    planted_write: float = 0.01  # β, write of one strong causal neuron into r_e
    rare_write: float = 0.09  # write of one rare causal neuron into r_e (fires less, writes more:
    #   4 rare neurons carry about as much of r_e as 8 strong ones)
    causal_share: float = 0.5  # share of r_e at baseline that the causal neurons write; the
    #   rest comes straight from the instruction (so steering them moves s_e without saturating)
    planted_leak: float = 0.03  # planted neurons' write into content (steering -> WER)
    random_gate_offset: float = 0.2  # std of random gates' bias term
    random_gate_instruction: float = 0.02  # random gates' weight on instruction coordinates
    random_gate_readout: float = 0.02  # random gates' weight on readout coordinates
    random_write: float = 0.002  # std of a random neuron's write per content coordinate
    random_readout_write: float = 0.002  # random neurons' writes into readout coordinates
    fragile_share: float = 0.3  # share of words of >= 5 letters given a near-homophone
    fragile_cosine: float = 0.97  # cosine between a fragile word and its partner
    talker_weight: float = 0.3
    # Baseline strength logits per TARGETS (happy, angry, sad, surprise), set against the
    # embedded judge's measured match-vs-strength curves on the demo corpus (50 % match
    # at s = 0.6, 0.3, 0.73, 0.82): sad easy, happy and angry moderate, surprise hard.
    strength_logit: tuple[float, ...] = (0.4, -1.0, 1.4, 1.3)


DEFAULT_SCALES = PlantingScales()


@dataclass(frozen=True)
class Family:
    """A kind of written neuron: how often it fires and whether it writes the readout.

    Its gate is ``κσ (w · content + c_off · bias + (c_on − c_off) · instruction_e)`` with a
    random content direction ``w``; ``c_on`` and ``c_off`` are read off the quantiles of
    ``w · content`` over the demo sentences' prompt positions, so that the neuron fires at
    a share ``p_on`` of positions when its emotion ``e`` is the instruction and ``p_off``
    otherwise, whatever ``w`` it drew (a generic family ignores the instruction).
    """

    name: str
    causal: bool  # writes the readout r_e (part of the known answer) or writes nothing
    p_on: float
    p_off: float
    fools: str  # the selector it is built to mislead (documentation)


FAMILIES: tuple[Family, ...] = (
    Family("strong", True, 0.92, 0.08, "none"),
    Family("rare", True, 0.50, 0.002, "lape"),
    Family("correlated", False, 0.995, 0.84, "lap"),
    Family("anti", False, 0.05, 0.70, "mad"),
    Family("generic", False, 0.99, 0.99, "lap"),
)
FAMILY = {f.name: f for f in FAMILIES}
GENERIC = "all"  # the emotion key of a family that belongs to no emotion

# neurons per target emotion (generic: in all); strong = per_emotion − rare
DEFAULT_FAMILY_SIZES: dict[str, int] = {"rare": 4, "correlated": 3, "anti": 1, "generic": 3}


def _family_positions(rng: np.random.Generator, width: int, per_emotion: int,
                      sizes: dict[str, int], layers: Sequence[int]) -> dict[str, dict[str, list[list[int]]]]:
    """Cells of every family, round-robin over ``layers``, no neuron used twice."""
    slots = {l: list(rng.permutation(width)) for l in layers}
    counts = {"strong": per_emotion - sizes["rare"], **sizes}
    families: dict[str, dict[str, list[list[int]]]] = {}
    turn = 0
    for family in FAMILIES:
        owners = [GENERIC] if family.name == "generic" else list(TARGETS)
        families[family.name] = {e: [] for e in owners}
        for e in owners:
            for _ in range(counts[family.name]):
                layer = int(layers[turn % len(layers)])
                turn += 1
                families[family.name][e].append([layer, int(slots[layer].pop())])
    return families


def _make_fragile_words(cfg: PlantedConfig, vectors: np.ndarray, rng: np.random.Generator,
                        s: PlantingScales) -> None:
    """Move a share of the longer words next to a partner word (cosine ``fragile_cosine``).

    Positions are independent, so without this a word is misdecoded either almost never
    or everywhere (a random drift crossing a wide margin). Near-homophone pairs give the
    stream's small random writes something to flip, word by word and emotion by emotion:
    a few percent of words at baseline, more when steering perturbs the stream.
    """
    first = len(SPECIALS) + len(EMOTIONS)
    long_words = [first + i for i, w in enumerate(cfg.words) if len(w) >= 5]
    n_fragile = int(round(s.fragile_share * len(long_words)))
    fragile = rng.choice(long_words, size=n_fragile, replace=False)
    for token in fragile:
        partner = int(rng.choice([t for t in range(first, len(vectors)) if t != token]))
        away = vectors[token] - (vectors[token] @ vectors[partner]) * vectors[partner]
        away /= np.linalg.norm(away)
        c = s.fragile_cosine
        vectors[token] = c * vectors[partner] + np.sqrt(1 - c * c) * away


def _write_lm(model: PlantedLALM, rng: np.random.Generator, s: PlantingScales) -> None:
    cfg = model.config
    W, H, D = cfg.word_dims, cfg.hidden_size, cfg.intermediate_size
    words = slice(0, W)
    instr = [cfg.instruction_dim(e) for e in EMOTIONS]
    reads = [cfg.readout_dim(e) for e in TARGETS]
    n_tokens = len(cfg.tokens)

    emb = np.zeros((n_tokens, H))
    vectors = rng.normal(size=(n_tokens, W))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    _make_fragile_words(cfg, vectors, rng, s)
    emb[:, words] = s.word_norm * vectors
    emb[:, cfg.bias_dim] = 1.0
    style = np.zeros((n_tokens, H))
    for e in EMOTIONS:
        style[cfg.tokens.index(emotion_token(e)), cfg.instruction_dim(e)] = 1.0

    layers = []
    for _ in range(cfg.num_hidden_layers):
        gate, up, down = np.zeros((D, H)), np.zeros((D, H)), np.zeros((H, D))
        # random neurons: content-driven gates (a unit-variance content term), weak
        # incidental emotion sensitivity, small content writes (decoding noise)
        gate[:, words] = rng.normal(size=(D, W)) / s.word_norm
        gate[:, cfg.bias_dim] = rng.normal(0.0, s.random_gate_offset, size=D)
        gate[:, instr] = rng.normal(0.0, s.random_gate_instruction, size=(D, len(instr)))
        gate[:, reads] = rng.normal(0.0, s.random_gate_readout, size=(D, len(reads)))
        up[:, words] = rng.normal(size=(D, W)) / s.word_norm
        up[:, cfg.bias_dim] = rng.normal(0.0, 0.5, size=D)  # v of either sign
        down[words, :] = rng.normal(0.0, s.random_write, size=(W, D))
        down[reads, :] = rng.normal(0.0, s.random_readout_write, size=(len(reads), D))
        layers.append((gate, up, down))

    def put(param: torch.Tensor, value: np.ndarray) -> None:
        param.copy_(torch.as_tensor(value, dtype=param.dtype))

    with torch.no_grad():
        put(model.lm.embed_tokens.weight, emb)
        put(model.lm.style_embed.weight, style)
        for l, (block, (gate, up, down)) in enumerate(zip(model.lm.layers, layers)):
            for name, owned in cfg.families.items():
                for emotion, cells in owned.items():
                    for layer, n in cells:
                        if layer == l:
                            _write_family_neuron(cfg, s, FAMILY[name], emotion, n, gate, up, down, rng)
            put(block.mlp.gate_proj.weight, gate)
            put(block.mlp.up_proj.weight, up)
            put(block.mlp.down_proj.weight, down)
    _set_family_thresholds(model)


def _set_family_thresholds(model: PlantedLALM) -> None:
    """Give every family neuron the offsets that make it fire as FAMILIES says.

    Layer by layer against the stream each layer really sees (earlier layers' writes drift
    the content a little): with its content direction ``w`` fixed, a neuron is on iff
    ``w · content > −c``, since a gate's sign ignores the RMS norm's positive scale and the
    bias and instruction coordinates are never written; so ``c = −quantile(1 − p)``.
    """
    cfg = model.config
    cells = [(l, n, FAMILY[name], e) for name, owned in cfg.families.items()
             for e, cs in owned.items() for l, n in cs]
    with torch.no_grad():
        x, instructed = _calibration_stream(model, SENTENCES)
        for l, block in enumerate(model.lm.layers):
            gate = block.mlp.gate_proj.weight
            content = x[:, : cfg.word_dims]
            for layer, n, family, emotion in cells:
                if layer != l:
                    continue
                score = (content @ gate[n, : cfg.word_dims]).numpy()
                if emotion == GENERIC:
                    c_on = c_off = -_threshold_for_share(score, family.p_on)
                else:
                    c_on = -_threshold_for_share(score[instructed == emotion], family.p_on)
                    c_off = -_threshold_for_share(score[instructed != emotion], family.p_off)
                # score already carries the factor κσ of the content weights
                gate[n, cfg.bias_dim] = c_off
                if emotion != GENERIC:
                    gate[n, cfg.instruction_dim(emotion)] = c_on - c_off
            x = block(x)


def _calibration_stream(model: PlantedLALM, sentences: Sequence[str]) -> tuple[torch.Tensor, np.ndarray]:
    """The lm's input stream at every real position of ``sentences`` x TARGETS prompts.

    Returns ``[positions, H]`` and the instructed emotion of each position.
    """
    tok = PlantedTokenizer(model.config)
    reqs = [EVCRequest(f"{e}-{i}", "", t, "", e, 0) for e in TARGETS for i, t in enumerate(sentences)]
    ids, mask = tok.batch(reqs)
    lm = model.lm
    real = mask.to(lm.embed_tokens.weight.dtype).unsqueeze(-1)
    x = lm.embed_tokens(ids) + (lm.style_embed(ids) * real).sum(dim=1, keepdim=True)
    keep = mask.bool()
    instructed = np.repeat(np.array([r.target_emotion for r in reqs]), mask.sum(dim=1).numpy())
    return x[keep], instructed


def _threshold_for_share(score: np.ndarray, share: float) -> float:
    """A threshold with ``mean(score > t)`` as close to ``share`` as the data allow.

    Candidates lie midway between distinct values, never on one: a frequent word's score
    on the threshold would leave its sign to rounding (and a position's share to chance).
    """
    values = np.unique(score)
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    above = 1.0 - np.searchsorted(np.sort(score), cuts, side="right") / score.size
    return float(cuts[np.argmin(np.abs(above - share))])


def _write_family_neuron(cfg: PlantedConfig, s: PlantingScales, family: Family, emotion: str, n: int,
                         gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                         rng: np.random.Generator) -> None:
    """One family neuron's content direction, up row and down column (offsets: later)."""
    W = cfg.word_dims
    gate[n] = 0.0
    gate[n, :W] = s.family_sharpness * rng.normal(size=W) / s.word_norm
    up[n] = 0.0
    up[n, cfg.bias_dim] = 1.0
    down[:, n] = 0.0  # distractors write nothing: steering them is inert
    if family.causal:
        leak = rng.normal(size=W)
        down[:W, n] = s.planted_leak * leak / np.linalg.norm(leak)
        down[cfg.readout_dim(emotion), n] = s.planted_write if family.name == "strong" else s.rare_write


def _write_talker(model: PlantedLALM, rng: np.random.Generator, s: PlantingScales) -> None:
    cfg = model.config
    H, D = cfg.hidden_size, cfg.talker_intermediate_size
    with torch.no_grad():
        for block in model.talker.layers:
            for proj, shape in ((block.mlp.gate_proj, (D, H)), (block.mlp.up_proj, (D, H)),
                                (block.mlp.down_proj, (H, D))):
                proj.weight.copy_(torch.as_tensor(rng.normal(0, s.talker_weight / np.sqrt(shape[1]), shape)))
        head = rng.normal(size=H)
        model.talker.rate_head.weight.copy_(torch.as_tensor(head / np.linalg.norm(head))[None])


def _write_direct_readout(model: PlantedLALM, causal: Sequence[float], share: float) -> None:
    """The instruction's own path to its readout: ``(1/share − 1)`` × the causal neurons' mean.

    Only the instructed emotion's ``r_e`` gets it, so the other emotions stay off; the
    families' gates never read ``r_e``, so their activation probabilities are unchanged.
    """
    if not 0 < share <= 1:
        raise ValueError(f"causal_share must be in (0, 1], got {share}")
    cfg = model.config
    with torch.no_grad():
        for emotion, mean in zip(TARGETS, causal):
            token = cfg.tokens.index(emotion_token(emotion))
            model.lm.style_embed.weight[token, cfg.readout_dim(emotion)] = (1.0 / share - 1.0) * mean


def _calibrate_readout(model: PlantedLALM, sentences: Sequence[str]) -> list[float]:
    """Mean ``r_e`` at baseline when ``e`` is the instruction, over ``sentences``.

    It fixes the unit of ``m_e`` so that ``strength_logit`` is the baseline strength's
    logit for an average sentence, whatever the other scales are.
    """
    tok = PlantedTokenizer(model.config)
    scales = []
    for emotion in TARGETS:
        reqs = [EVCRequest(str(i), "", t, "", emotion, 0) for i, t in enumerate(sentences)]
        ids, mask = tok.batch(reqs)
        with torch.no_grad():
            hidden = model.lm(input_ids=ids, attention_mask=mask)
        real = mask.to(hidden.dtype)
        read = hidden[..., model.config.readout_dim(emotion)]
        scales.append(float(((read * real).sum(1) / real.sum(1)).mean()))
    if min(scales) <= 0:
        raise RuntimeError(f"planted readout is not positive at baseline: {scales}")
    return scales


def plant_model(
    seed: int = 0,
    *,
    n_layers: int = 8,
    width: int = 128,
    per_emotion: int = 12,
    planted_layers: Sequence[int] | None = None,
    word_dims: int = 54,
    words: Sequence[str] | None = None,
    scales: PlantingScales = DEFAULT_SCALES,
    family_sizes: dict[str, int] | None = None,
) -> PlantedLALM:
    """Write a PlantedLALM with ``per_emotion`` causal neurons per target emotion.

    ``family_sizes`` (default DEFAULT_FAMILY_SIZES) says how many of them are rare and how
    many distractors of each kind are written beside them (zeros: causal neurons only).
    ``planted_layers`` defaults to the middle-to-late layers ``[L // 3, L)``.
    """
    rng = np.random.default_rng(seed)
    layers = list(planted_layers) if planted_layers is not None else list(range(n_layers // 3, n_layers))
    sizes = {**DEFAULT_FAMILY_SIZES, **(family_sizes or {})}
    unknown = sorted(set(family_sizes or {}) - set(DEFAULT_FAMILY_SIZES))
    if unknown:
        raise ValueError(f"family_sizes: unknown or derived families {unknown}; "
                         f"give {sorted(DEFAULT_FAMILY_SIZES)} (strong = per_emotion - rare)")
    if not 0 <= sizes["rare"] <= per_emotion or min(sizes.values()) < 0:
        raise ValueError(f"family_sizes {sizes} must be >= 0 with rare <= per_emotion={per_emotion}")
    total = (per_emotion + sizes["correlated"] + sizes["anti"]) * len(TARGETS) + sizes["generic"]
    if total > width * len(layers):
        raise ValueError(f"{total} planted neurons do not fit in {len(layers)} layers of {width}")
    families = _family_positions(rng, width, per_emotion, sizes, layers)
    config = PlantedConfig(
        words=list(words) if words is not None else demo_vocabulary(),
        word_dims=word_dims,
        intermediate_size=width,
        num_hidden_layers=n_layers,
        planted={e: families["strong"][e] + families["rare"][e] for e in TARGETS},
        families=families,
        strength_logit=list(scales.strength_logit),
    )
    model = PlantedLALM(config).to(torch.float64).eval()
    _write_lm(model, rng, scales)
    _write_talker(model, rng, scales)
    _write_direct_readout(model, _calibrate_readout(model, SENTENCES), scales.causal_share)
    _set_family_thresholds(model)  # again: the direct readout nudged the stream
    model.config.readout_scale = _calibrate_readout(model, SENTENCES)
    return model


def planted_ground_truth(model_or_config: PlantedLALM | PlantedConfig) -> pa.Table:
    """The planted neurons as a ``masks`` table (score 1, rank in planting order)."""
    cfg = model_or_config.config if isinstance(model_or_config, PlantedLALM) else model_or_config
    layout = lm_layout(cfg)
    masks = []
    for emotion in TARGETS:
        cells = np.asarray(cfg.planted.get(emotion, []), dtype=np.int64).reshape(-1, 2)
        flat = layout.flat_index(cells[:, 0], cells[:, 1])
        masks.append(Mask("planted", emotion, flat, np.ones(flat.size), flat.size))
    return masks_to_table(masks, layout)


def lm_layout(config: PlantedConfig) -> NeuronLayout:
    return NeuronLayout((config.intermediate_size,) * config.num_hidden_layers)


# ---------------------------------------------------------------------------- speaking


def speaker_voice(speaker: str) -> DemoSpeaker:
    """The demo voice of an ESD-style speaker id; other ids hash to a voice (stable)."""
    known = demo_speakers(len(SPEAKER_VOICES))
    if str(speaker) in known:
        return known[str(speaker)]
    return SPEAKER_VOICES[zlib.crc32(str(speaker).encode()) % len(SPEAKER_VOICES)]


def realised_style(strengths: Sequence[float], rate_factor: float, seed: int) -> EmotionStyle:
    """neutral + Σ_e s_e (STYLES[e] − neutral), jittered by ``seed``, rate × talker factor."""
    neutral = STYLES["neutral"]
    values = {k: getattr(neutral, k) for k in ("pitch", "range", "rate", "amplitude")}
    for emotion, s in zip(TARGETS, strengths):
        for k in values:
            values[k] += float(s) * (getattr(STYLES[emotion], k) - getattr(neutral, k))
    style = EmotionStyle(**values).jitter(np.random.default_rng([int(seed), 1]))
    style = replace(style, rate=style.rate * float(rate_factor))
    return blend(neutral, style, 1.0)  # blend at strength 1 = the style, clamped to espeak's limits


SILENCE = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
# What the annotations cannot say: option -> (min, max), inclusive; read by the config
# pre-check from the source (esn_core.option_values). speech_workers: threads rendering the
# speech of one batch (null: one per CPU core).
OPTION_RANGES = {"speech_workers": (1, None)}


class PlantedAdapter(LALMAdapter):
    """The planted LALM behind the adapter interface, loaded like a real checkpoint."""

    name = "planted"

    def __init__(self, path: str | Path | None = None, model: PlantedLALM | None = None,
                 speech_workers: int | None = None):
        check_arguments(PlantedAdapter.__init__, OPTION_RANGES, locals())
        self.speech_workers = speech_workers or os.cpu_count() or 1
        if (path is None) == (model is None):
            raise ValueError("PlantedAdapter needs exactly one of path= or model=")
        if model is None:
            model, info = PlantedLALM.from_pretrained(str(path), dtype=torch.float64, output_loading_info=True)
            if info["missing_keys"] or info["unexpected_keys"]:
                raise ValueError(f"{path}: checkpoint does not match PlantedLALM: {info}")
        self.model = model.eval()
        self.tokenizer = PlantedTokenizer(model.config)

    def groups(self) -> dict[str, MLPGroup]:
        return {
            "lm": MLPGroup.under(self.model.lm, position_root=self.model.lm),
            "synth": MLPGroup.under(self.model.talker, position_root=self.model.talker),
        }

    def forward(self, requests: Sequence[EVCRequest]) -> tuple[PlantedOutput, torch.Tensor]:
        ids, mask = self.tokenizer.batch(requests)
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask), mask

    def _texts(self, out: PlantedOutput, mask: torch.Tensor) -> list[str]:
        lengths = mask.sum(dim=1).tolist()
        return [
            self.tokenizer.decode(out.token_ids[b, PROMPT_PREFIX : lengths[b] - 1].tolist())
            for b in range(len(lengths))
        ]

    def decoded_texts(self, requests: Sequence[EVCRequest]) -> list[str]:
        """The text each request would decode, without synthesising speech (cheap)."""
        return self._texts(*self.forward(requests))

    def convert(self, requests: list[EVCRequest]) -> list[EVCOutput]:
        if not requests:
            return []
        out, mask = self.forward(requests)
        texts = self._texts(out, mask)
        styles = [realised_style(out.strengths[b].tolist(), float(out.rate_factor[b]), req.seed)
                  for b, req in enumerate(requests)]

        def speak(b: int) -> np.ndarray:
            # Nothing to say (every word decoded as a special) is silence, which the
            # judge flags as unmeasurable rather than an error.
            if not texts[b]:
                return SILENCE
            voice = speaker_voice(requests[b].speaker)
            return render_speech(texts[b], styles[b], voice.voice, voice.pitch_offset)

        # espeak-ng runs as a subprocess, so threads overlap its work (order is kept).
        with ThreadPoolExecutor(max_workers=self.speech_workers) as pool:
            waves = list(pool.map(speak, range(len(requests))))
        return [
            EVCOutput(req.attempt_id, text, wave, SAMPLE_RATE, int(mask[b].sum()))
            for b, (req, text, wave) in enumerate(zip(requests, texts, waves))
        ]
