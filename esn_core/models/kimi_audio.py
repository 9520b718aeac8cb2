"""Kimi-Audio (Moonshot) behind the pipeline's interface: LM, audio inputs, step loop, groups.

What this module does, each part our own code on transformers' classes:

* **LM** (``kimi_modeling``): the 28 main layers (text head) and the 6 MIMO layers that
  branch after layer 21 (audio-token head), rebuilt from ``Qwen2DecoderLayer`` under Kimi's
  parameter names and loaded strictly (0 missing / 0 unexpected keys) from the checkpoint's
  safetensors; SDPA attention, 2-D padding mask, per-row positions.
* **Inputs**: the source is read at 16 kHz; ``whisper-large-v3/`` (transformers'
  ``WhisperEncoder``) gives continuous features, 4 frames stacked per audio token, mixed in
  through the LM's ``vq_adaptor``; the text instruction is tokenized by ``tiktoken`` on the
  checkpoint's ``tiktoken.model`` with Kimi's special-token table (``kimi_tokens``).
* **Source tokens** (``kimi_vq``): GLM-4-Voice's WhisperVQ encoder, rebuilt on transformers'
  Whisper layers, gives the source's discrete codes (12.5 Hz, one per Whisper row).
* **Generation** (``kimi_generate``): our batched two-stream loop with upstream's rules,
  greedy text and audio sampling from one ``torch.Generator`` per row (seeded by the
  request), so a batched row equals the row alone and one seed gives one output.
* **Speech** (``kimi_detokenizer``): upstream's chunked flow-matching DiT (30-code chunks,
  12-code look-ahead, Euler steps, prefix keys/values between chunks) in our code with SDPA,
  then PyPI's BigVGAN without its CUDA kernel, Hamming cross-fades between chunks; 24 kHz
  resampled to 16 kHz for judging. Each row's noise comes from a generator seeded with its
  request's seed (a generator of its own, apart from the sampling one), so a row's
  waveform depends only on its codes and seed.
* **Groups** (SPEC §1: the hooked gated MLPs ``g = act_fn(gate_proj(x))``): ``lm`` = the
  MLPs of the 28 main layers; ``synth`` = the MLPs of the 6 MIMO layers, the only gated
  MLPs on the speech path: the detokenizer's DiT uses plain fc1 → GELU → fc2 MLPs (no gate,
  so no SPEC §1 hook site) and BigVGAN is convolutional. Both groups' position root is the
  LM, called once per step with the audio stream as ``input_ids`` and the 2-D
  ``attention_mask``; its end ids are the audio end tokens (``msg_end``, ``media_end``).

Rows are generated together (one step loop per batch) and decoded to speech together too
(``Detokenizer.batch``, up to ``detokenizer_batch`` rows per call; upstream's detokenizer is
one stream per call): each row's waveform is its decode alone up to float rounding (the
batched kernels' reduction order, and the masked attention of shorter final chunks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from esn_core.hooks import MLPGroup, find_gated_mlps
from esn_core.models import audio as audio_io
from esn_core.models.audio import load_source
from esn_core.models.base import EVCOutput, EVCRequest, LALMAdapter, check_template
from esn_core.models.decode_attention import use_packed_decode_attention
from esn_core.models.kimi_generate import (
    PromptBatch, RowResult, Sampling, generate_two_streams, pad_prompts,
)
from esn_core.models.kimi_modeling import KimiAudioLM, kimi_config, read_config
from esn_core.models.kimi_checkpoint import (  # noqa: F401 (CheckpointError: re-exported)
    CONFIG, DETOKENIZER_DIR, TIKTOKEN, VOCODER_DIR, VQ_DIR, WHISPER_DIR, CheckpointError,
    check_checkpoint,
)
from esn_core.models.kimi_detokenizer import Detokenizer, load_dit, load_vocoder
from esn_core.models.kimi_tokens import KimiTokenizer, TwoStreams, evc_prompt
from esn_core.models.weights import load_exact, read_safetensors, weight_files
from esn_core.models.kimi_vq import SourceTokenizer
from esn_core.models.speech_overlap import StreamHandoff
from esn_core.option_values import check_arguments

SOURCE_RATE = 16_000
OUTPUT_RATE = 24_000  # BigVGAN's rate
TOKEN_RATE = 12.5  # audio tokens per second (upstream's length cap: 12.5 × 120 tokens)
INSTRUCTION_TEMPLATE = (
    "Repeat exactly the words spoken in this audio, word for word, and say them with the "
    "emotion: {emotion}. Reply with the words only."
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "float64": torch.float64}
# What the annotations cannot say: option -> (min, max), inclusive (the adapter's docstring
# says what each is). The config pre-check reads this literal from the source
# (esn_core.option_values); the constructor checks it too.
OPTION_RANGES = {"max_tokens": (1, None), "audio_temperature": (0, None), "audio_top_k": (0, None),
                 "audio_delay": (0, None), "batch_size": (1, None), "detokenizer_steps": (2, None),
                 "detokenizer_batch": (1, None)}


def load_lm(directory: Path, dtype: torch.dtype, device) -> KimiAudioLM:
    """The LM from ``directory``'s config and weights, every key accounted for."""
    config = read_config(directory / CONFIG)
    with torch.device("meta"):
        lm = KimiAudioLM(config)
    # Allocated once, on the device and in the dtype it runs in; the weights are copied in.
    lm = lm.to(dtype=dtype).to_empty(device=device).place(device, dtype)
    load_exact(lm, read_safetensors(weight_files(directory, [])), str(directory))
    return lm.eval()


# --------------------------------------------------------------------------- audio inputs


def to_16k(wave: np.ndarray, rate: int = OUTPUT_RATE) -> np.ndarray:
    """The vocoder's waveform at 16 kHz for judging, clipped to [-1, 1]."""
    return audio_io.to_16k(wave, rate)


def audio_token_count(n_samples: int) -> int:
    """Audio tokens (12.5 Hz) for ``n_samples`` at 16 kHz: upstream's ``(L - 1) // 1280 + 1``."""
    return (int(n_samples) - 1) // 1280 + 1 if n_samples > 0 else 0


class WhisperFeatures:
    """Continuous source features: Whisper-large-v3's encoder output, 4 frames per token.

    Upstream cuts the source into 30 s windows, pads each to 30 s (Whisper's fixed input),
    keeps the first ``4 × tokens`` encoder frames of each and stacks them four at a time
    (1280 × 4 = 5120 = the adaptor's input width).
    """

    WINDOW = 30 * SOURCE_RATE

    def __init__(self, directory: Path, dtype: torch.dtype, device):
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        config = WhisperConfig.from_pretrained(directory)
        config._attn_implementation = "sdpa"
        self.extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins,
                                                 sampling_rate=SOURCE_RATE)
        state = read_safetensors(weight_files(directory, []))
        for prefix in ("model.encoder.", "encoder."):
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
        self.encoder = WhisperEncoder(config)
        load_exact(self.encoder, state, f"{directory} (Whisper encoder)")
        self.encoder = self.encoder.to(device=device, dtype=dtype).eval()
        self.dtype, self.device = dtype, device

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        """``[audio_token_count(len(audio)), 4 × d_model]`` on the encoder's device."""
        pieces = []
        for start in range(0, len(audio), self.WINDOW):
            segment = audio[start:start + self.WINDOW]
            tokens = audio_token_count(len(segment))
            mel = self.extractor(segment, sampling_rate=SOURCE_RATE, padding="max_length",
                                 return_tensors="pt").input_features
            hidden = self.encoder(mel.to(self.device, self.dtype)).last_hidden_state[0]
            frames = hidden[: 4 * tokens]
            if frames.shape[0] < 4 * tokens:
                raise ValueError(f"Whisper gave {frames.shape[0]} frames for {tokens} tokens")
            pieces.append(frames.reshape(tokens, -1))
        return torch.cat(pieces)


# --------------------------------------------------------------------------- adapter


@dataclass
class Generated:
    """One row's answer: its text, its audio codes (0-based, the detokenizer's input)."""

    text: str
    codes: list[int]
    n_positions: int
    ended: bool


class KimiAudioAdapter(LALMAdapter):
    """Kimi-Audio: EVC prompts in, decoded text and 16 kHz speech out, ``lm``/``synth`` groups.

    ``path``: a local checkpoint in upstream's layout (see ``check_checkpoint``). ``dtype``:
    the LM's, Whisper's and the speech decoder's weights (default bfloat16 on CUDA, float32
    on CPU; the VQ tokenizer runs in float32).
    ``max_tokens``: upstream's cap on prompt + answer (12.5 × 120 = 1500 positions).
    ``audio_temperature`` / ``audio_top_k`` / ``audio_delay``: upstream's audio sampling
    (0.8, 10) and text-to-audio delay (6 steps). ``detokenizer_steps``: Euler points of
    each flow-matching chunk (upstream: 30). ``detokenizer_batch``: rows the speech decoder
    runs together in ``convert`` (1: one row at a time, bit for bit ``speak``).
    ``detokenizer_ragged_vocoder``: BigVGAN takes a chunk index's mels of different lengths
    in one padded call (when its output length is proportional to its input; else, or when
    off, one call per distinct length; which is faster depends on the device:
    benchmarks/kimi_detokenizer_batched.py times both). ``batch_size``:
    rows per ``convert`` call the workflow should send. ``overlap_speech``: the workflow
    runs a batch's speech decoder on a worker thread (its own CUDA stream) while the next
    batch's step loop runs (``speech_overlap``); the outputs are the same.
    """

    name = "kimi_audio"

    def __init__(self, path: str | os.PathLike, device: str | None = None,
                 dtype: Literal["bfloat16", "float16", "float32", "float64"] | None = None,
                 instruction_template: str | None = None,
                 max_tokens: int = int(TOKEN_RATE * 120), audio_temperature: float = 0.8,
                 audio_top_k: int = 10, audio_delay: int = 6, batch_size: int = 8,
                 detokenizer_steps: int = 30, detokenizer_batch: int = 16,
                 detokenizer_ragged_vocoder: bool = True, overlap_speech: bool = False):
        check_arguments(KimiAudioAdapter.__init__, OPTION_RANGES, locals())  # before the slow loads
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.path = check_checkpoint(path)
        self.tokenizer = KimiTokenizer(self.path / TIKTOKEN)
        lm = load_lm(self.path, DTYPES[dtype], device)
        self.whisper = WhisperFeatures(self.path / WHISPER_DIR, DTYPES[dtype], device)
        self.vq = SourceTokenizer(self.path / VQ_DIR, device)
        self.detokenizer = Detokenizer(
            load_dit(self.path / DETOKENIZER_DIR, device, DTYPES[dtype]),
            load_vocoder(self.path / VOCODER_DIR, device, DTYPES[dtype]),
            steps=int(detokenizer_steps), max_rows=int(detokenizer_batch),
            vocoder_ragged=bool(detokenizer_ragged_vocoder),
        )
        self._attach(lm, instruction_template, max_tokens,
                     Sampling(audio_temperature, audio_top_k, audio_delay), batch_size)
        self.overlap_speech = bool(overlap_speech)

    @classmethod
    def from_config(cls, fields: dict, tokenizer: KimiTokenizer | None = None, *,
                    device: str = "cpu", dtype: str = "float32", seed: int = 0,
                    max_tokens: int = int(TOKEN_RATE * 120),
                    sampling: Sampling = Sampling(), batch_size: int = 8) -> KimiAudioAdapter:
        """A random-weight LM of the shapes in ``fields`` (config.json keys), for benchmarks.

        Without a tokenizer there is no prompt text, but ``generate`` and ``groups`` work
        on ``TwoStreams`` prompts the caller builds.
        """
        self = cls.__new__(cls)
        self.path, self.tokenizer, self.whisper, self.vq = None, tokenizer, None, None
        self.detokenizer = None
        device = torch.device(device)
        # Built on the target device (a 7B model need not pass through host memory), with
        # the caller's RNG left as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.device(device):
                lm = KimiAudioLM(kimi_config(fields))
        lm = lm.place(device, DTYPES[dtype]).eval()
        self._attach(lm, None, max_tokens, sampling, batch_size)
        return self

    def _attach(self, lm: KimiAudioLM, instruction_template, max_tokens, sampling, batch_size):
        if max_tokens < 1 or batch_size < 1:
            raise ValueError("max_tokens and batch_size must be >= 1")
        self.lm = lm
        use_packed_decode_attention(lm)  # decode steps read the KV cache unexpanded
        self.config = lm.config
        self.sampling = sampling
        self.max_tokens = int(max_tokens)
        self.batch_size = int(batch_size)
        self.instruction_template = check_template(
            INSTRUCTION_TEMPLATE if instruction_template is None else instruction_template)
        first = next(lm.parameters())
        self.device, self.dtype = first.device, first.dtype
        if self.tokenizer is not None:
            self.ids = self.tokenizer.ids
            if self.tokenizer.vocab_size > self.config.kimia_token_offset:
                raise ValueError(f"{TIKTOKEN}: text vocabulary of {self.tokenizer.vocab_size} "
                                 f"overlaps the audio tokens at {self.config.kimia_token_offset}")
            if (self.ids.media_begin, self.ids.media_end) != (
                    self.config.kimia_media_begin, self.config.kimia_media_end):
                raise ValueError("config.json's kimia_media_begin/end do not match the "
                                 f"tokenizer's special table ({self.ids.media_begin}, "
                                 f"{self.ids.media_end})")
        else:
            from esn_core.models.kimi_tokens import SpecialIds, special_table

            base = self.config.kimia_media_begin - 18  # the table's layout, from the config
            self.ids = SpecialIds.from_table({t: base + i for i, t in enumerate(special_table())})
        ends = self.ids.audio_ends
        self._groups = {
            "lm": MLPGroup(find_gated_mlps(lm.model.layers), root=lm, eos_token_ids=ends),
            "synth": MLPGroup(find_gated_mlps(lm.model.mimo_layers), root=lm, eos_token_ids=ends),
        }
        expect = (self.config.num_hidden_layers, self.config.kimia_mimo_layers)
        found = (len(self._groups["lm"].mlps), len(self._groups["synth"].mlps))
        if found != expect:
            raise RuntimeError(f"found {found} main/MIMO gated MLPs, config says {expect}")

    def groups(self) -> dict[str, MLPGroup]:
        return dict(self._groups)

    # -- prompts -----------------------------------------------------------------------
    def instruction(self, target_emotion: str) -> str:
        return self.instruction_template.format(emotion=target_emotion)

    def prompt(self, target_emotion: str, audio_codes: Sequence[int]) -> TwoStreams:
        """One attempt's two streams; ``audio_codes``: the source's 0-based VQ codes."""
        if self.tokenizer is None:
            raise RuntimeError("this adapter was built without a tokenizer: no prompts")
        offset = self.config.kimia_token_offset
        audio = [offset + int(c) for c in audio_codes]
        return evc_prompt(self.ids, self.tokenizer.encode(self.instruction(target_emotion)), audio)

    def source_inputs(self, path: str | os.PathLike) -> tuple[list[int], torch.Tensor]:
        """A source's VQ codes and its Whisper features (one row per code)."""
        if self.vq is None or self.whisper is None:
            raise RuntimeError("this adapter was built without its audio encoders")
        audio = load_source(path)
        if audio.size == 0:
            raise ValueError(f"source audio {os.fspath(path)} is empty")
        codes, features = self.vq(audio), self.whisper(audio)
        if len(codes) != features.shape[0]:
            raise RuntimeError(f"{os.fspath(path)}: {len(codes)} VQ codes but "
                               f"{features.shape[0]} Whisper rows")
        return codes, features

    def prepare(self, requests: Sequence[EVCRequest]) -> PromptBatch:
        """One left-padded batch of EVC prompts (instruction, then the source audio)."""
        prompts, features = [], []
        for request in requests:
            codes, feats = self.source_inputs(request.source_path)
            prompts.append(self.prompt(request.target_emotion, codes))
            features.append(feats)
        return self.batch(prompts, features)

    def batch(self, prompts: list[TwoStreams], features: list[torch.Tensor | None]) -> PromptBatch:
        return pad_prompts(prompts, features, self.ids.pad, self.device, self.dtype)

    # -- generation --------------------------------------------------------------------
    def generate(self, batch: PromptBatch, seeds: Sequence[int]) -> list[Generated]:
        """The step loop on ``batch``; row ``b`` samples from a generator seeded ``seeds[b]``."""
        lengths = batch.lengths
        caps = [self.max_tokens - n for n in lengths]
        if min(caps) < 1:
            raise ValueError(f"max_tokens={self.max_tokens} leaves no room for an answer after "
                             f"a prompt of {max(lengths)} positions (source too long?)")
        results = generate_two_streams(self.lm, batch, self.ids, list(seeds), caps, self.sampling)
        return [self._answer(r, n) for r, n in zip(results, lengths)]

    def _answer(self, result: RowResult, prompt_length: int) -> Generated:
        offset = self.config.kimia_token_offset
        codes = [t - offset for t in result.audio_tokens if t >= offset]
        text_ids = [t for t in result.text_tokens if t < offset]
        text = self.tokenizer.decode(text_ids).strip() if self.tokenizer is not None else ""
        # SPEC §1's T: prompt positions plus every generated step fed back (the last is not).
        n_positions = prompt_length + max(result.steps - 1, 0)
        return Generated(text, codes, n_positions, result.ended)

    def speak(self, codes: Sequence[int], seed: int) -> np.ndarray:
        """The 16 kHz waveform of one row's audio codes; its noise from its own seed."""
        return self.speak_rows([codes], [seed], max_rows=1)[0]

    def speak_rows(self, codes: Sequence[Sequence[int]], seeds: Sequence[int],
                   max_rows: int | None = None) -> list[np.ndarray]:
        """16 kHz waveforms of many rows decoded together, row ``b``'s noise from a
        generator seeded ``seeds[b]`` (as ``speak`` draws it)."""
        if self.detokenizer is None:
            raise RuntimeError("this adapter was built without its speech decoder")
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        waves = self.detokenizer.batch([list(c) for c in codes], generators, max_rows=max_rows)
        return [to_16k(wave.cpu().numpy(), OUTPUT_RATE) for wave in waves]

    def convert(self, requests: list[EVCRequest]) -> list[EVCOutput]:
        return self.begin_convert(requests)()

    def begin_convert(self, requests: list[EVCRequest]):
        """Prompts, text and audio codes now (the step loop); the returned function decodes
        the speech (``speak_rows``) and returns ``convert``'s outputs."""
        if not requests:
            return lambda: []
        seeds = [r.seed for r in requests]
        rows = self.generate(self.prepare(requests), seeds)
        handoff = StreamHandoff(self.device, self.detokenizer, self.overlap_speech)

        def finish() -> list[EVCOutput]:
            with handoff:
                waves = self.speak_rows([row.codes for row in rows], seeds)
            return [
                EVCOutput(attempt_id=request.attempt_id, decoded_text=row.text,
                          waveform=wave, sample_rate=SOURCE_RATE, n_positions=row.n_positions)
                for request, row, wave in zip(requests, rows, waves)
            ]

        return finish
