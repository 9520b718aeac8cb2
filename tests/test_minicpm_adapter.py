"""MiniCPMOAdapter on the tiny checkpoint (the real loading path), with a stub vocoder:
the vocoder has its own tests (test_minicpm_vocoder.py)."""
import numpy as np
import pytest
import soundfile as sf
import torch

from esn_core.models.base import EVCRequest
from esn_core.models.minicpm_o import MiniCPMOAdapter
from esn_core.models.minicpm_speech_codes import CodeSampling


class StubVocoder:
    """960 samples per code at 24 kHz, the code value as the level (+ seed), like the real
    vocoder's shape contract; records its calls."""

    sample_rate = 24_000

    def __init__(self):
        self.calls = []  # (codes, seed, prompt length) per row, either path
        self.batches = []  # (rows, max_rows) per batch call; "alone" per __call__

    def __call__(self, codes, seed, prompt_wav_16k):
        self.batches.append("alone")
        return self._wave(codes, seed, prompt_wav_16k), self.sample_rate

    def batch(self, codes_per_row, seeds, prompts_wav_16k, max_rows=None):
        self.batches.append((len(codes_per_row), max_rows))
        return [self._wave(*row) for row in zip(codes_per_row, seeds, prompts_wav_16k)]

    def _wave(self, codes, seed, prompt_wav_16k):
        self.calls.append((list(codes), seed, len(prompt_wav_16k)))
        return np.repeat(np.asarray(codes, dtype=np.float32) / 20 + seed / 1000, 960)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.tiny_minicpm import build

    root = tmp_path_factory.mktemp("mcpm")
    ckpt = build(root / "ckpt")
    rng = np.random.default_rng(3)
    paths = []
    for i, n in enumerate([1700, 3300, 2500]):
        p = root / f"src{i}.wav"
        sf.write(p, (0.1 * rng.standard_normal(n)).astype("float32"), 16_000)
        paths.append(str(p))
    vocoder = StubVocoder()
    adapter = MiniCPMOAdapter(ckpt, max_new_tokens=5, vocoder=vocoder,
                              sampling=CodeSampling(min_codes=0, max_codes=8, top_p=1.0,
                                                    top_k=0, temperature=1.0))
    requests = [EVCRequest(f"a{i}", p, "t", "s", e, seed=10 + i)
                for i, (p, e) in enumerate(zip(paths, ["happy", "sad", "angry"]))]
    return adapter, requests, vocoder


def test_outputs_shapes_and_determinism(setup):
    adapter, requests, vocoder = setup
    first = adapter.convert(requests)
    codes = [c.clone() for c in adapter.last_codes]
    again = adapter.convert(requests)
    assert [o.attempt_id for o in first] == ["a0", "a1", "a2"]
    for o, p, c in zip(first, again, codes):
        assert o.sample_rate == 16_000 and o.waveform.dtype == np.float32
        assert o.waveform.size == len(c) * 640  # 960 samples at 24 kHz = 640 at 16 kHz
        assert o.decoded_text == p.decoded_text
        np.testing.assert_array_equal(o.waveform, p.waveform)
    # the vocoder got each row's codes, seed and its own source as the prompt wav
    assert [s for _, s, _ in vocoder.calls[-3:]] == [10, 11, 12]
    assert [n for _, _, n in vocoder.calls[-3:]] == [1700, 3300, 2500]


def test_batched_rows_equal_rows_alone(setup):
    adapter, requests, _ = setup
    batch = adapter.convert(requests)
    batch_codes, batch_synth = list(adapter.last_codes), list(adapter.last_synth_positions)
    for b, r in enumerate(requests):
        alone = adapter.convert([r])[0]
        assert alone.decoded_text == batch[b].decoded_text
        assert alone.n_positions == batch[b].n_positions
        assert torch.equal(adapter.last_codes[0], batch_codes[b])
        assert adapter.last_synth_positions[0] == batch_synth[b]
        np.testing.assert_array_equal(alone.waveform, batch[b].waveform)


def test_vocoder_rows_in_batches_or_one_call_per_row(setup, tmp_path):
    from tests.tiny_minicpm import build

    adapter, requests, vocoder = setup
    batched = adapter.convert(requests)
    assert vocoder.batches[-1] == (3, 16)  # all rows in one batch call, the default size
    try:
        adapter.vocoder_batch_size = 1
        alone = adapter.convert(requests)
        assert vocoder.batches[-3:] == ["alone"] * 3
    finally:
        adapter.vocoder_batch_size = 16
    for a, b in zip(alone, batched):
        np.testing.assert_array_equal(a.waveform, b.waveform)
    with pytest.raises(ValueError, match="vocoder_batch_size: 0 is not allowed; a whole number >= 1"):
        MiniCPMOAdapter(tmp_path / "not_read", vocoder=StubVocoder(), vocoder_batch_size=0)


def test_capture_counts_on_both_groups_equal_the_rows(setup):
    from esn_core.hooks import Capture, HookEngine

    adapter, requests, _ = setup
    engine = HookEngine(adapter.groups())
    with engine.session(capture={"lm": Capture(), "synth": Capture()}) as session:
        out = adapter.convert(requests)
    assert session.counts("lm").T.tolist() == [o.n_positions for o in out]
    assert session.counts("synth").T.tolist() == adapter.last_synth_positions


def test_steering_changes_output_and_leaving_restores_it(setup):
    from esn_core.hooks import HookEngine, Intervention

    adapter, requests, _ = setup
    base = adapter.convert(requests)
    base_codes = [c.clone() for c in adapter.last_codes]
    engine = HookEngine(adapter.groups())
    n = adapter.groups()["synth"].layout.n_neurons
    mask = np.arange(n)
    steer = Intervention("steer", tuple(mask for _ in requests), tuple(2000.0 for _ in requests))  # tiny MLPs add ~1e-3 to the stream
    with engine.session(interventions={"synth": steer}):
        adapter.convert(requests)
    steered = list(adapter.last_codes)
    assert any(not torch.equal(a, b) for a, b in zip(steered, base_codes))
    after = adapter.convert(requests)
    for a, b in zip(after, base):
        np.testing.assert_array_equal(a.waveform, b.waveform)
        assert a.decoded_text == b.decoded_text


def test_missing_checkpoint_or_vocoder_assets_are_named(tmp_path):
    from esn_core.models.minicpm_checkpoint import CheckpointError
    from esn_core.models.minicpm_vocoder import VocoderAssetError
    from tests.tiny_minicpm import build

    with pytest.raises(CheckpointError, match="absent does not exist"):
        MiniCPMOAdapter(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        MiniCPMOAdapter(tmp_path / "empty")
    ckpt = build(tmp_path / "ckpt")  # no token2wav assets beside it
    with pytest.raises(VocoderAssetError):
        MiniCPMOAdapter(ckpt)


def test_registered_under_its_name():
    from esn_core.models.base import _resolve, adapter_names

    assert "minicpm_o_4_5" in adapter_names()
    assert _resolve("esn_core.models.minicpm_o:MiniCPMOAdapter") is MiniCPMOAdapter


def test_config_sampling_mapping_and_unknown_keys(tmp_path):
    from tests.tiny_minicpm import build

    ckpt = build(tmp_path / "ckpt")
    adapter = MiniCPMOAdapter(ckpt, vocoder=StubVocoder(), sampling={"top_k": 7, "min_codes": 3})
    assert adapter.sampling == CodeSampling(top_k=7, min_codes=3)
    with pytest.raises(ValueError, match=r"unknown keys \['topk'\]"):
        MiniCPMOAdapter(ckpt, vocoder=StubVocoder(), sampling={"topk": 7})


def test_the_real_vocoder_path_on_tiny_token2wav_assets(tmp_path):
    """No stub: the adapter loads the token2wav assets beside the checkpoint, as on a real one."""
    pytest.importorskip("onnx")
    from tests.test_minicpm_vocoder import write_token2wav_assets
    from tests.tiny_minicpm import build

    ckpt = build(tmp_path / "ckpt")
    write_token2wav_assets(ckpt)
    src = tmp_path / "src.wav"
    sf.write(src, (0.1 * np.random.default_rng(0).standard_normal(3300)).astype("float32"), 16_000)
    adapter = MiniCPMOAdapter(ckpt, max_new_tokens=4, vocoder_steps=2,
                              sampling=CodeSampling(min_codes=3, max_codes=5))
    request = EVCRequest("a", str(src), "t", "s", "happy", seed=1)
    out = adapter.convert([request])[0]  # MiniCPMVocoder.batch (the default vocoder_batch_size)
    n_codes = adapter.last_codes[0].shape[0]
    assert n_codes >= 3 and out.waveform.size == n_codes * 640 and out.sample_rate == 16_000
    adapter.vocoder_batch_size = 1  # the per-row path: a one-row batch is the single-row call
    np.testing.assert_array_equal(adapter.convert([request])[0].waveform, out.waveform)


def test_overlapped_speech_gives_the_sequential_run_exactly(setup, tmp_path):
    from overlap_runs import assert_overlap_matches_sequential

    adapter, requests, _ = setup
    assert_overlap_matches_sequential(adapter, [r.source_path for r in requests], tmp_path)
