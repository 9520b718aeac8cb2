"""MiniCPM-o 4.5's speech vocoder: 25 Hz S3 speech codes -> 24 kHz waveform, our own
implementation of Step-Audio2's ``Token2wav`` whole-utterance path (PyPI ``minicpmo-utils``,
``stepaudio2/token2wav.py``), loading the checkpoint's own asset files:

    <checkpoint>/assets/token2wav/  (or a folder given directly)
        flow.yaml, flow.pt            token -> mel flow (conformer encoder + CFM with a DiT)
        hift_original.pt or hift.pt   HiFT mel -> wave (keys ``generator.*``). minicpmo-utils
                                      1.0.7 ships the whole-utterance HiFT as hift_original.pt
                                      (its hift.pt + config.yaml are a streaming causal vocoder,
                                      which would fail the strict load, naming the file); older
                                      asset sets (vllm-omni's reader) hold it as hift.pt
        campplus.onnx                 CAM++ speaker embedding (onnxruntime)
        speech_tokenizer_v2_25hz.onnx S3 tokenizer for the prompt's speech tokens (onnxruntime)
    <checkpoint>/assets/HT_ref_audio.wav   default voice when no prompt is given (optional)

Why not the package: ``minicpmo-utils[tts]`` pins transformers<4.53 and onnxruntime<=1.21 (it
would replace ours), its plain install pins librosa 0.9.0 / pillow 10.4, it imports torchaudio
(PyPI has no CPU build for torch 2.13; the CUDA 2.11 one does not load) and it hard-codes CUDA.

Ratio: one code -> ``up_rate`` (2) mel frames -> 2 x 480 samples, i.e. 960 samples = 24000/25.
Seeding: the flow's start noise and HiFT's source phase/noise come from one generator seeded
by ``seed`` per call, so a row's audio does not depend on what ran before it.

Rows together (``MiniCPMVocoder.batch``): upstream decodes one utterance per call. Here rows
with different codes and different voice prompts share one flow call (``inference_rows``:
[prompt, codes] padded at the end, keys past each row's end masked) and one HiFT call
(``HiFTGenerator.rows``: the convs under ``ragged.ragged_time_axis``). Each row's generator
draws what the row alone draws, in the same order, so a batched row equals the row alone up to
the rounding of kernels run at another shape (CPU: 1e-15 in float64, 1e-7 / 120 dB SNR in
float32; tests/test_minicpm_vocoder.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.signal import resample_poly

from esn_core.models.flow_yaml import build_flow
from esn_core.models.hift import HiFTGenerator
from esn_core.models.weights import WeightNameError, load_exact
from esn_core.models.ragged import longest_first
from esn_core.models.s3_flow import CausalMaskedDiffWithXvec, FlowRow
from esn_core.models.speech_prompt_features import kaldi_fbank, tokenizer_log_mel, vocoder_mel

SAMPLE_RATE = 24000
CODE_RATE = 25
ASSET_SUBDIR = Path("assets") / "token2wav"
DEFAULT_VOICE = Path("assets") / "HT_ref_audio.wav"
FLOW_CONFIG, FLOW_WEIGHTS = "flow.yaml", "flow.pt"
HIFT_WEIGHTS = ("hift_original.pt", "hift.pt")  # first one present wins
SPEAKER_ONNX, TOKENIZER_ONNX = "campplus.onnx", "speech_tokenizer_v2_25hz.onnx"
REQUIRED = (FLOW_CONFIG, FLOW_WEIGHTS, SPEAKER_ONNX, TOKENIZER_ONNX)
HIFT_PREFIX = "generator."


class VocoderAssetError(FileNotFoundError):
    """A token2wav asset file is missing or unreadable; the message names the file."""


def asset_dir(checkpoint_dir: str | Path) -> Path:
    """``checkpoint_dir/assets/token2wav`` if it exists, else ``checkpoint_dir`` itself."""
    root = Path(checkpoint_dir)
    return root / ASSET_SUBDIR if (root / ASSET_SUBDIR).is_dir() else root


def _require(folder: Path) -> Path:
    """Checks every asset is there; returns the HiFT weight file to use."""
    for name in REQUIRED:
        if not (folder / name).is_file():
            raise VocoderAssetError(f"MiniCPM-o vocoder asset missing: {folder / name}")
    for name in HIFT_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise VocoderAssetError(f"MiniCPM-o vocoder asset missing: {folder / HIFT_WEIGHTS[0]} (or {HIFT_WEIGHTS[1]})")


def _state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or non-torch file: say which one
        raise VocoderAssetError(f"cannot read {path}: {err}") from err
    if not isinstance(state, dict):
        raise VocoderAssetError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_hift(path: Path) -> HiFTGenerator:
    """HiFT with the package's default architecture; ``generator.`` prefixes are removed."""
    state = {k.removeprefix(HIFT_PREFIX): v for k, v in _state(path).items()}
    model = HiFTGenerator()
    load_exact(model, state, f"HiFT weights in {path}")
    return model.eval()


def load_flow(config: Path, weights: Path) -> CausalMaskedDiffWithXvec:
    flow = build_flow(config)
    load_exact(flow, _state(weights), f"flow weights in {weights} (built from {config.name})")
    return flow.eval()


def _onnx_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise VocoderAssetError(f"cannot load ONNX model {path}: {err}") from err


@dataclass
class VoicePrompt:
    tokens: torch.Tensor  # (1, p) int64 speech tokens
    mel: torch.Tensor  # (1, p * up_rate, 80)
    speaker: torch.Tensor  # (1, spk_dim)


class MiniCPMVocoder:
    """``vocoder(codes, seed, prompt_wav_16k=None) -> (float32 wave, 24000)``."""

    def __init__(self, flow: CausalMaskedDiffWithXvec, hift: HiFTGenerator, speaker_session, tokenizer_session,
                 default_voice: np.ndarray | None, device: torch.device, n_timesteps: int = 10):
        if n_timesteps <= 0:
            raise ValueError(f"n_timesteps must be positive, got {n_timesteps}")
        self.flow, self.hift = flow.to(device), hift.to(device)
        self.speaker_session, self.tokenizer_session = speaker_session, tokenizer_session
        self.default_voice, self.device, self.n_timesteps = default_voice, device, n_timesteps
        self.sample_rate = SAMPLE_RATE
        self.samples_per_code = flow.up_rate * hift.hop_samples

    def prompt(self, wav_16k: np.ndarray) -> VoicePrompt:
        wav = np.asarray(wav_16k, dtype=np.float32)
        if wav.ndim != 1 or not np.isfinite(wav).all():
            raise ValueError(f"prompt_wav_16k must be a finite 1-D array, got shape {wav.shape}")
        audio = torch.from_numpy(wav)
        mel128 = tokenizer_log_mel(audio)[None]
        names = [i.name for i in self.tokenizer_session.get_inputs()]
        tokens = self.tokenizer_session.run(None, {names[0]: mel128.numpy(),
                                                   names[1]: np.array([mel128.shape[2]], dtype=np.int32)})[0]
        tokens = torch.from_numpy(np.asarray(tokens).reshape(1, -1).astype(np.int64))
        fbank = kaldi_fbank(audio)
        fbank = fbank - fbank.mean(dim=0, keepdim=True)
        speaker_input = self.speaker_session.get_inputs()[0].name
        speaker = torch.from_numpy(np.asarray(self.speaker_session.run(None, {speaker_input: fbank[None].numpy()})[0]))
        mel = vocoder_mel(torch.from_numpy(resample_poly(wav, 3, 2).astype(np.float32)))
        frames = tokens.shape[1] * self.flow.up_rate
        # as upstream: the mel is cut or edge-padded to exactly up_rate frames per prompt token
        mel = mel[:frames] if mel.shape[0] >= frames else torch.cat([mel, mel[-1:].expand(frames - mel.shape[0], -1)])
        return VoicePrompt(tokens, mel[None], speaker.reshape(1, -1).float())

    def __call__(self, codes: list[int], seed: int, prompt_wav_16k: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """One row alone (the per-row path): its flow call, then its HiFT call."""
        if len(codes) == 0:
            raise ValueError("the vocoder needs at least one speech code")
        voice = self.prompt(self._voice_wav(prompt_wav_16k))
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        to = lambda t: t.to(self.device)  # noqa: E731
        with torch.inference_mode():
            mel = self.flow.inference(to(torch.tensor([list(codes)], dtype=torch.long)), to(voice.tokens),
                                      to(voice.mel), to(voice.speaker), self.n_timesteps, generator)
            wave = self.hift(mel.float(), generator)
        return wave[0].float().cpu().numpy(), self.sample_rate

    def batch(self, codes_per_row: Sequence[Sequence[int]], seeds: Sequence[int],
              prompts_wav_16k: Sequence[np.ndarray | None], max_rows: int | None = None) -> list[np.ndarray]:
        """Each row's float32 wave at ``sample_rate``, as ``__call__(codes, seed, prompt)`` gives
        it, rows decoded together: calls of at most ``max_rows`` rows (None: all), longest
        [prompt + codes] first; each call runs the flow once (``inference_rows``) and HiFT once
        (``HiFTGenerator.rows``) on the padded rows. Each row keeps its own generator, seeded
        by its seed, drawn in the order and shapes of the row alone."""
        if not len(codes_per_row) == len(seeds) == len(prompts_wav_16k):
            raise ValueError(f"vocoder batch: {len(codes_per_row)} rows of codes, {len(seeds)} seeds and "
                             f"{len(prompts_wav_16k)} prompts; give one of each per row")
        for i, codes in enumerate(codes_per_row):
            if len(codes) == 0:
                raise ValueError(f"the vocoder needs at least one speech code (row {i} has none)")
        voices = [self.prompt(self._voice_wav(wav)) for wav in prompts_wav_16k]
        frames = [v.tokens.shape[1] + len(c) for v, c in zip(voices, codes_per_row)]
        waves: list[np.ndarray | None] = [None] * len(codes_per_row)
        for group in longest_first(frames, max_rows):
            decoded = self._decode([codes_per_row[i] for i in group], [seeds[i] for i in group],
                                   [voices[i] for i in group])
            for i, wave in zip(group, decoded):
                waves[i] = wave
        return waves

    def _decode(self, codes_per_row, seeds, voices: list[VoicePrompt]) -> list[np.ndarray]:
        generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        rows = [FlowRow(torch.tensor(list(codes), dtype=torch.long, device=self.device), v.tokens[0].to(self.device),
                        v.mel[0].to(self.device), v.speaker[0].to(self.device))
                for codes, v in zip(codes_per_row, voices)]
        with torch.inference_mode():
            mels = self.flow.inference_rows(rows, self.n_timesteps, generators)
            waves = self.hift.rows([mel.float() for mel in mels], generators)
        return [wave.float().cpu().numpy() for wave in waves]

    def _voice_wav(self, prompt_wav_16k: np.ndarray | None) -> np.ndarray:
        if prompt_wav_16k is not None:
            return prompt_wav_16k
        if self.default_voice is None:
            raise ValueError(f"no voice prompt given and no default voice ({DEFAULT_VOICE}) in the checkpoint")
        return self.default_voice


def _read_voice(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    import soundfile

    wav, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    wav = wav.mean(axis=1)
    if sr != 16000:
        g = np.gcd(int(sr), 16000)
        wav = resample_poly(wav, 16000 // g, int(sr) // g).astype(np.float32)
    return wav


def load_vocoder(checkpoint_dir: str | Path, device: str | torch.device | None = None,
                 n_timesteps: int = 10) -> MiniCPMVocoder:
    """Build the vocoder from the checkpoint's token2wav assets (see the module docstring)."""
    folder = asset_dir(checkpoint_dir)
    hift_file = _require(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flow = load_flow(folder / FLOW_CONFIG, folder / FLOW_WEIGHTS)
    hift = load_hift(hift_file)
    return MiniCPMVocoder(flow, hift, _onnx_session(folder / SPEAKER_ONNX), _onnx_session(folder / TOKENIZER_ONNX),
                          _read_voice(Path(checkpoint_dir) / DEFAULT_VOICE), device, n_timesteps)


__all__ = ["MiniCPMVocoder", "VocoderAssetError", "WeightNameError", "load_vocoder", "REQUIRED", "SAMPLE_RATE"]
