"""Naturalness (MOS) estimators for generated speech (SPEC §7: mean naturalness, 1-5).

Every estimator has a ``name`` that is written beside each value (``mos_estimator`` in the
judgement table), so a table never mixes estimators silently.

``UTMOSEstimator`` -- ``utmos22_strong``, the UTMOS22 strong learner the paper reports.
The original code needs fairseq; the PyPI package ``utmos-pytorch`` (MIT) re-implements the
network without it and reads a converted checkpoint, which is loaded from a local file only:

- ``utmos_state_dict.pt``: a state dict of that network (keys as in the original
  ``BaselineLightningModule``, so a Lightning checkpoint's ``state_dict`` loads too);
  every key must be present, none is left at random;
- ``utmos_scripted.pt``: its TorchScript export, run with torch alone.

Both files are published at ``Blinorot/UTMOS-PyTorch`` on Hugging Face (``hf download
Blinorot/UTMOS-PyTorch utmos_state_dict.pt --local-dir DIR``). Clips are scored one at a
time (padding shifts UTMOS scores), at 16 kHz, as ``2 * mean(frame scores) + 3`` with the
strong learner's fixed listener (judge id 288, domain 0).

``DNSMOSEstimator`` -- Microsoft's DNSMOS, whose ONNX models ship inside the PyPI package
``speechmos`` (nothing to download): P.835 OVRL/SIG/BAK or P.808 MOS. It is NOT UTMOS: it
rates perceived quality of (noisy, processed) speech, which tracks naturalness only
partly; its values carry the name ``dnsmos-p835-ovrl`` (or the chosen ``-sig``/``-bak``,
``dnsmos-p808``). It judges 9.01 s windows (a shorter clip is looped to fill one, as
DNSMOS does), about one ONNX run per window.

A clip too short to score (under ``MIN_SAMPLES``) gets NaN, never a made-up value.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np

from esn_core.constants import SAMPLE_RATE
from esn_core.judges.base import load_audio_16k

if TYPE_CHECKING:
    import torch

UTMOS_NAME = "utmos22_strong"
UTMOS_HF_ID = "Blinorot/UTMOS-PyTorch"
UTMOS_JUDGE_ID = 288  # the listener the strong learner scores as (UTMOS22 demo / utmos-pytorch)
# 0.1 s; shorter clips are not speech any estimator can rate.
MIN_SAMPLES = SAMPLE_RATE // 10
DNSMOS_METRICS = {"ovrl": "ovrl_mos", "sig": "sig_mos", "bak": "bak_mos", "p808": "p808_mos"}


@runtime_checkable
class MOSEstimator(Protocol):
    """16 kHz mono waveforms in, one MOS (1-5, NaN if unscorable) per clip out."""

    name: str

    def predict(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        ...


def predict_paths(estimator: MOSEstimator, paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """MOS of sound files (any rate, resampled to 16 kHz first)."""
    return estimator.predict([load_audio_16k(p) for p in paths])


def _utmos_where(path: str | os.PathLike) -> str:
    folder = Path(path).parent
    return (
        f"put the utmos22_strong checkpoint there: `hf download {UTMOS_HF_ID} utmos_state_dict.pt "
        f"--local-dir {folder}` (or utmos_scripted.pt, the TorchScript export)"
    )


class UTMOSEstimator:
    """UTMOS22 strong learner from a local checkpoint; see the module docstring."""

    name = UTMOS_NAME

    def __init__(self, checkpoint_path: str | os.PathLike, device: str = "cpu") -> None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"UTMOS checkpoint {path} does not exist; {_utmos_where(path)}")
        import torch  # here, not at module level: judge jobs without UTMOS skip its 1.4 s import

        self.checkpoint_path = path
        self.device = str(device)
        self._scripted = _is_torchscript(path)
        if self._scripted:
            self.model = torch.jit.load(str(path), map_location=self.device).eval()
        else:
            self.model = _load_state_dict_model(path, self.device)

    def _score(self, wav: np.ndarray) -> float:
        import torch  # here, not at module level (see __init__)

        x = torch.as_tensor(np.asarray(wav, dtype=np.float32).ravel(), device=self.device)
        with torch.no_grad():
            if self._scripted:
                scorer = self.model.score if hasattr(self.model, "score") else self.model
                out = scorer(x.unsqueeze(0))  # (1, T): one mono clip
            else:
                frames = self.model(
                    wav=x.view(1, 1, -1),
                    domains=torch.zeros(1, dtype=torch.int, device=self.device),
                    judge_id=torch.full((1,), UTMOS_JUDGE_ID, dtype=torch.int, device=self.device),
                )
                out = frames.mean(dim=1).squeeze(1) * 2 + 3
        out = out.reshape(-1)
        if out.numel() != 1:
            raise RuntimeError(f"{self.checkpoint_path}: expected one score per clip, got {tuple(out.shape)}")
        return float(out[0])

    def predict(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        """One score per clip, clips scored one at a time (batch size 1, no padding)."""
        return np.array(
            [self._score(w) if np.asarray(w).size >= MIN_SAMPLES else np.nan for w in waveforms],
            dtype=np.float64,
        )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``constants.pkl``/``code/`` beside the data; state dicts don't."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _load_state_dict_model(path: Path, device: str) -> torch.nn.Module:
    import torch

    try:
        from utmos_pytorch.utmos_torch import UTMOSModel
    except ImportError as exc:
        raise ImportError(
            "UTMOS state-dict checkpoints need the PyPI package utmos-pytorch "
            "(`pip install utmos-pytorch`), or pass the TorchScript export utmos_scripted.pt"
        ) from exc
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of many kinds
        raise ValueError(f"{path}: not a readable UTMOS state dict: {exc}") from exc
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]  # a Lightning checkpoint
    if not isinstance(blob, dict) or not all(torch.is_tensor(v) for v in blob.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob.items()}
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = UTMOSModel()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise ValueError(
            f"{path}: not a utmos22_strong checkpoint: {len(missing)} weight(s) missing, "
            f"e.g. {missing[:3]}"
        )
    if unexpected:
        raise ValueError(f"{path}: unexpected weight(s) {unexpected[:3]} for utmos22_strong")
    return model.to(device).eval()


class DNSMOSEstimator:
    """DNSMOS from the ONNX models inside ``speechmos``; see the module docstring."""

    def __init__(self, metric: str = "ovrl", personalized: bool = False) -> None:
        if metric not in DNSMOS_METRICS:
            raise ValueError(f"metric must be one of {sorted(DNSMOS_METRICS)}, got {metric!r}")
        try:
            from speechmos.dnsmos import DNSMOS
        except ImportError as exc:
            raise ImportError(
                "DNSMOS needs the PyPI packages speechmos and onnxruntime "
                "(`pip install speechmos onnxruntime`)"
            ) from exc
        self.metric = metric
        self.personalized = bool(personalized)
        base = resources.files("speechmos")
        primary = base / ("pdnsmos_models" if personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
        p808 = base / "dnsmos_models" / "model_v8.onnx"
        for f in (primary, p808):
            if not f.is_file():
                raise FileNotFoundError(f"speechmos lacks its model file {f}; reinstall speechmos")
        self._dnsmos = DNSMOS(str(primary), str(p808))
        if metric == "p808":
            self.name = "dnsmos-p808"
        else:
            self.name = f"dnsmos-p835-{metric}" + ("-personalized" if personalized else "")

    def predict(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for w in waveforms:
            x = np.clip(np.asarray(w, dtype=np.float32).ravel(), -1.0, 1.0)
            if x.size < MIN_SAMPLES:
                out.append(np.nan)
                continue
            result = self._dnsmos(x, SAMPLE_RATE, self.personalized)
            out.append(float(result[DNSMOS_METRICS[self.metric]]))
        return np.array(out, dtype=np.float64)
