"""MiniCPM-o's vocoder (esn_core.models.minicpm_vocoder) on tiny token2wav assets built here:
the same file names, YAML tags and weight names as the checkpoint's ``assets/token2wav``,
tiny sizes (HiFT keeps its fixed default architecture, as upstream builds it without config);
the two ONNX models are small graphs with the real models' input/output layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esn_core.models import minicpm_vocoder as mv
from esn_core.models.flow_yaml import build_flow
from esn_core.models.hift import HiFTGenerator
from esn_core.models.s3_flow_encoder import RelPositionAttention, relative_positions
from esn_core.models.speech_prompt_features import kaldi_fbank, tokenizer_log_mel, vocoder_mel

VOCAB = 64
TINY_FLOW_YAML = """\
sample_rate: 24000
token_mel_ratio: 2
flow: !new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: 16
    output_size: 80
    spk_embed_dim: 8
    output_type: 'mel'
    vocab_size: {vocab}
    encoder: !new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: 16
        output_size: 16
        pre_lookahead_len: 3
        num_blocks: 1
        num_up_blocks: 1
        up_stride: !ref <token_mel_ratio>
        up_scale_factor: 2
        attention_heads: 2
        linear_units: 32
        dropout_rate: 0.1
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
    decoder: !new:cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: 2.0
            depth: 1
            num_heads: 2
            head_dim: 8
            hidden_size: 16
""".format(vocab=VOCAB)


def _tokenizer_onnx(path):
    """(1, 128, T) log-mel + (1,) length -> (1, ceil(T/4)) int64 codes in [0, VOCAB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes = [
        helper.make_node("ReduceMean", ["feats"], ["m"], axes=[1], keepdims=0),
        helper.make_node("Slice", ["m", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("Mul", ["s", "k"], ["sk"]),
        helper.make_node("Abs", ["sk"], ["a"]),
        helper.make_node("Cast", ["a"], ["i"], to=TensorProto.INT64),
        helper.make_node("Mod", ["i", "v"], ["tokens"]),
    ]
    consts = [numpy_helper.from_array(np.array(x, dtype=np.int64), n) for n, x in
              (("starts", [0]), ("ends", [2**31]), ("axes", [1]), ("steps", [4]), ("v", [VOCAB]))]
    consts.append(numpy_helper.from_array(np.array([1000.0], dtype=np.float32), "k"))
    graph = helper.make_graph(
        nodes, "tiny_s3", [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
                           helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "N"])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _campplus_onnx(path):
    """(1, T, 80) fbank -> (1, 8) speaker vector (time mean, then a fixed projection)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((80, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["m", "w"], ["embedding"])], "tiny_campplus",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def write_token2wav_assets(checkpoint):
    """The tiny token2wav assets under ``checkpoint/assets/token2wav`` (seeded: the same
    weights every call), as a real checkpoint holds them; needs the ``onnx`` package."""
    assets = checkpoint / "assets" / "token2wav"
    assets.mkdir(parents=True)
    (assets / "flow.yaml").write_text(TINY_FLOW_YAML)
    torch.manual_seed(0)
    torch.save(build_flow(assets / "flow.yaml").state_dict(), assets / "flow.pt")
    hift = HiFTGenerator()
    torch.save({"generator." + k: v for k, v in hift.state_dict().items()}, assets / "hift_original.pt")
    _tokenizer_onnx(assets / "speech_tokenizer_v2_25hz.onnx")
    _campplus_onnx(assets / "campplus.onnx")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("onnx")  # writes the tiny ONNX files; installed by scripts/install.sh --test
    root = tmp_path_factory.mktemp("minicpm_ckpt")
    write_token2wav_assets(root)
    return root


@pytest.fixture(scope="module")
def vocoder(checkpoint):
    return mv.load_vocoder(checkpoint, device="cpu", n_timesteps=2)


def _voice(seconds=0.4, hz=220.0):
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


CODES = [3, 17, 5, 60, 0, 22, 9]


def test_output_is_960_samples_per_code_at_24k(vocoder):
    wave, sr = vocoder(CODES, seed=1, prompt_wav_16k=_voice())
    assert sr == 24000 and vocoder.samples_per_code == 960 == 24000 // 25
    assert wave.dtype == np.float32 and wave.shape == (len(CODES) * 960,)
    assert np.isfinite(wave).all() and np.abs(wave).max() <= 0.99 and wave.std() > 0


def test_seeded_per_call(vocoder):
    voice = _voice()
    first, _ = vocoder(CODES, seed=7, prompt_wav_16k=voice)
    other, _ = vocoder(CODES, seed=8, prompt_wav_16k=voice)
    again, _ = vocoder(CODES, seed=7, prompt_wav_16k=voice)
    assert np.array_equal(first, again)  # what ran in between does not matter
    assert not np.allclose(first, other)  # the flow's start noise (and HiFT's source) are random


def test_prompt_changes_the_voice(vocoder):
    a, _ = vocoder(CODES, seed=1, prompt_wav_16k=_voice(hz=220.0))
    b, _ = vocoder(CODES, seed=1, prompt_wav_16k=_voice(hz=330.0))
    assert not np.allclose(a, b)


def test_prompt_features_line_up(vocoder):
    voice = vocoder.prompt(_voice(seconds=0.4))
    # 6400 samples -> 40 log-mel frames at 100 Hz (Whisper drops the last STFT frame) -> 10 tokens
    # (every 4th) -> 20 mel frames at 50 Hz, which is also 9600 samples at 24 kHz / 480
    assert voice.tokens.shape == (1, 10) and voice.mel.shape == (1, 20, 80) and voice.speaker.shape == (1, 8)


def test_no_prompt_and_no_default_voice_is_an_error(vocoder):
    with pytest.raises(ValueError, match="HT_ref_audio.wav"):
        vocoder(CODES, seed=1)


def test_code_outside_the_vocabulary_is_an_error(vocoder):
    with pytest.raises(ValueError, match=f"speech code {VOCAB} .*\\[0, {VOCAB}\\)"):
        vocoder([1, VOCAB], seed=1, prompt_wav_16k=_voice())


ALL_ASSETS = (*mv.REQUIRED, "hift_original.pt")


def _link_assets(checkpoint, folder, names, rename=None):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / (rename or {}).get(name, name)).symlink_to(checkpoint / "assets" / "token2wav" / name)


@pytest.mark.parametrize("name", ALL_ASSETS)
def test_missing_asset_names_the_file(checkpoint, tmp_path, name):
    folder = tmp_path / "token2wav"
    _link_assets(checkpoint, folder, [other for other in ALL_ASSETS if other != name])
    with pytest.raises(mv.VocoderAssetError, match=str(folder / name)):
        mv.load_vocoder(folder, device="cpu")


def test_older_asset_sets_hold_hift_as_hift_pt(checkpoint, tmp_path, vocoder):
    _link_assets(checkpoint, tmp_path, ALL_ASSETS, rename={"hift_original.pt": "hift.pt"})
    older = mv.load_vocoder(tmp_path, device="cpu", n_timesteps=2)
    assert np.array_equal(older(CODES, 4, _voice())[0], vocoder(CODES, 4, _voice())[0])


def test_unexpected_flow_weight_names_the_file(checkpoint, tmp_path):
    src = checkpoint / "assets" / "token2wav"
    _link_assets(checkpoint, tmp_path, [name for name in ALL_ASSETS if name != "flow.pt"])
    state = torch.load(src / "flow.pt", weights_only=True)
    state["decoder.estimator.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "flow.pt")
    with pytest.raises(mv.WeightNameError, match=r"flow\.pt.*unexpected \['decoder\.estimator\.extra'\]"):
        mv.load_vocoder(tmp_path, device="cpu")


def test_relative_shift_picks_the_offset_of_each_query_key_pair():
    torch.manual_seed(0)
    attn = RelPositionAttention(heads=1, dim=4)
    t = 5
    scores = torch.randn(1, 1, t, 2 * t - 1)  # column c is offset (t-1-c)
    shifted = attn._shift(scores)
    for i in range(t):
        for j in range(t):
            assert shifted[0, 0, i, j] == scores[0, 0, i, t - 1 - (i - j)]
    table = relative_positions(3, 4)  # row 0: offset +2, row 2: offset 0, row 4: offset -2
    assert torch.allclose(table[0, 2], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(table[0, 0, 0], torch.sin(torch.tensor(2.0)))
    assert torch.allclose(table[0, 4, 0], torch.sin(torch.tensor(-2.0)))


def test_feature_frame_counts_and_silence():
    wav24 = torch.zeros(24000)
    assert vocoder_mel(wav24).shape == (50, 80)  # 480-sample hop: 50 Hz
    # silence: the magnitude floor sqrt(1e-9) times each filter's weight sum, clamped at 1e-5
    assert torch.all(vocoder_mel(wav24) == float(np.log(np.float32(1e-5))))
    assert tokenizer_log_mel(torch.zeros(16000)).shape == (128, 100)
    fb = kaldi_fbank(torch.zeros(16000))
    assert fb.shape == (98, 80)  # snip edges: 1 + (16000 - 400) // 160
    assert torch.allclose(fb, torch.full_like(fb, float(np.log(np.finfo(np.float32).eps))))


def test_kaldi_fbank_peaks_at_the_tone():
    # Kaldi mel scale, 80 triangles from 20 Hz to 8 kHz: a 1 kHz tone peaks in the band whose
    # centre is nearest 1 kHz on that scale (centre m = mel(20) + (m+1) * delta)
    t = torch.arange(16000) / 16000
    fb = kaldi_fbank(0.5 * torch.sin(2 * np.pi * 1000 * t))
    mel = lambda f: 1127 * np.log1p(f / 700)  # noqa: E731
    delta = (mel(8000) - mel(20)) / 81
    expected = int(np.argmin([abs(mel(20) + (m + 1) * delta - mel(1000)) for m in range(80)]))
    assert int(fb.mean(dim=0).argmax()) == expected


def test_default_voice_from_the_checkpoint(checkpoint, tmp_path):
    import soundfile

    root = tmp_path / "ckpt"
    (root / "assets").mkdir(parents=True)
    (root / "assets" / "token2wav").symlink_to(checkpoint / "assets" / "token2wav")
    t = np.arange(24000 * 2 // 5) / 24000  # 0.4 s at 24 kHz: resampled to 16 kHz on load
    soundfile.write(root / "assets" / "HT_ref_audio.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 24000)
    voc = mv.load_vocoder(root, device="cpu", n_timesteps=2)
    assert voc.default_voice.shape == (6400,)
    wave, _ = voc(CODES, seed=1)
    given, _ = voc(CODES, seed=1, prompt_wav_16k=voc.default_voice)
    assert np.array_equal(wave, given)


PUBLISHED_FLOW_YAML = """\
flow: !new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 6561
    encoder: !new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: 512
        output_size: 512
        input_layer: 'linear'
        pre_lookahead_len: 3
        num_blocks: 6
        num_up_blocks: 4
        up_stride: 2
        up_scale_factor: 2
        attention_heads: 8
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        key_bias: true
        linear_units: 2048
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: true
    decoder: !new:cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: 4.0
            depth: 16
            num_heads: 8
            head_dim: 64
            hidden_size: 512
"""


def test_published_flow_config_builds_the_full_size_model(tmp_path):
    # the settings the released flow.yaml is checked against by vllm-omni's MiniCPM-o reader;
    # built on the meta device (shapes only) to keep the test fast
    (tmp_path / "flow.yaml").write_text(PUBLISHED_FLOW_YAML)
    with torch.device("meta"):
        flow = build_flow(tmp_path / "flow.yaml")
    shapes = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    assert shapes["input_embedding.weight"] == (6561, 512)
    assert shapes["spk_embed_affine_layer.weight"] == (80, 192)
    assert shapes["encoder.encoders.5.self_attn.pos_bias_u"] == (8, 64)
    assert shapes["encoder.up_encoders.3.feed_forward.w_1.weight"] == (2048, 512)
    assert shapes["encoder.up_layer.conv.weight"] == (512, 512, 5)
    assert shapes["decoder.estimator.in_proj.weight"] == (512, 320)
    assert shapes["decoder.estimator.blocks.15.adaLN_modulation.1.weight"] == (9 * 512, 512)
    assert shapes["decoder.estimator.blocks.15.conv.block.6.weight"] == (512, 512, 3)
    assert shapes["decoder.estimator.final_layer.linear.weight"] == (80, 512)
    assert not any(k.startswith("encoder.encoders.6.") or ".blocks.16." in k for k in shapes)


def test_unknown_flow_class_names_the_file(tmp_path):
    (tmp_path / "flow.yaml").write_text(PUBLISHED_FLOW_YAML.replace("decoder_dit.DiT", "decoder.ConditionalDecoder"))
    with pytest.raises(ValueError, match=r"flow\.yaml: !new:cosyvoice2\.flow\.decoder\.ConditionalDecoder"):
        build_flow(tmp_path / "flow.yaml")


# -- batched rows (MiniCPMVocoder.batch) ---------------------------------------------------
# Rows of different code lengths and different prompts (0.3 / 0.4 / 0.6 s: 8 / 10 / 15 prompt
# tokens), so both the flow's [prompt, codes] axis and HiFT's mel axis are ragged.
ROWS = [([3, 17, 5, 60, 0, 22, 9], 1, (0.4, 220.0)),
        ([8, 1, 44, 13, 2, 63, 7, 7, 30, 11, 5, 19, 40, 2, 6], 2, (0.3, 300.0)),
        ([50, 4, 9, 21], 3, (0.6, 180.0))]
# float32: a batched row vs the row alone differs only by the rounding of kernels run at
# another shape (measured on CPU: max 1.0e-7, SNR >= 122 dB); a padding leak is ~1e-1
F32_MAX_ABS, F32_MIN_SNR_DB = 1e-6, 100.0


def _rows(order=(0, 1, 2)):
    picked = [ROWS[i] for i in order]
    return [c for c, _, _ in picked], [s for _, s, _ in picked], [_voice(*v) for _, _, v in picked]


def _snr_db(reference, other):
    return 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - other).astype(np.float64) ** 2))


def _assert_close_f32(alone, batched):
    assert batched.dtype == np.float32 and batched.shape == alone.shape
    assert np.abs(batched - alone).max() <= F32_MAX_ABS
    assert np.array_equal(batched, alone) or _snr_db(alone, batched) >= F32_MIN_SNR_DB


@pytest.fixture(scope="module")
def rows_alone(vocoder):
    return [vocoder(c, s, w)[0] for c, s, w in zip(*_rows())]


def test_batched_rows_equal_rows_alone_in_float32(vocoder, rows_alone):
    waves = vocoder.batch(*_rows())
    assert [w.shape for w in waves] == [(len(c) * 960,) for c, _, _ in ROWS]
    for alone, batched in zip(rows_alone, waves):
        _assert_close_f32(alone, batched)


def test_a_row_does_not_depend_on_its_neighbours_or_their_order(vocoder, rows_alone):
    reversed_rows = vocoder.batch(*_rows((2, 1, 0)))
    for alone, batched in zip(rows_alone, reversed_rows[::-1]):
        _assert_close_f32(alone, batched)
    codes, seeds, voices = _rows((0, 2))  # row 0 without the longest row beside it
    _assert_close_f32(rows_alone[0], vocoder.batch(codes, seeds, voices)[0])


def test_one_row_batch_is_the_single_row_call(vocoder, rows_alone):
    codes, seeds, voices = _rows((1,))
    assert np.array_equal(vocoder.batch(codes, seeds, voices)[0], rows_alone[1])


def test_micro_batches_give_each_row_its_own_wave(vocoder, rows_alone):
    # [prompt + codes] lengths 17, 23, 19: groups of two, longest first, are rows {1, 2} and {0}
    waves = vocoder.batch(*_rows(), max_rows=2)
    for alone, batched in zip(rows_alone, waves):
        _assert_close_f32(alone, batched)
    assert np.array_equal(waves[0], rows_alone[0])  # row 0 ran in a group of its own


def test_flow_and_hift_rows_equal_rows_alone_in_float64(vocoder):
    import copy

    from esn_core.models.s3_flow import FlowRow

    flow = copy.deepcopy(vocoder.flow).double()
    torch.manual_seed(6)  # a narrow HiFT (same layers, rates and STFT) keeps float64 fast
    hift = HiFTGenerator(base_channels=32, f0_channels=16).double().eval()
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    torch.manual_seed(5)
    rows = [FlowRow(torch.randint(0, VOCAB, (n,)), torch.randint(0, VOCAB, (p,)),
                    torch.randn(2 * p, 80, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
            for n, p in [(4, 5), (9, 2), (2, 7)]]
    batched = flow.inference_rows(rows, 2, [gen(i) for i in range(3)])
    for i, (row, mel) in enumerate(zip(rows, batched)):
        alone = flow.inference(row.tokens[None], row.prompt_tokens[None], row.prompt_mel[None],
                               row.speaker[None], 2, gen(i))[0]
        assert mel.shape == alone.shape == (80, 2 * len(row.tokens))
        assert (mel - alone).abs().max() <= 1e-12  # measured 1.9e-15; a leak is ~0.2
    mels = [torch.randn(80, n, dtype=torch.float64) for n in (5, 9, 2)]
    for i, (mel, wave) in enumerate(zip(mels, hift.rows(mels, [gen(i) for i in range(3)]))):
        alone = hift(mel[None], gen(i))[0]
        assert wave.shape == alone.shape == (mel.shape[1] * 480,)
        assert (wave - alone).abs().max() <= 1e-12  # measured 2.2e-16


def test_batch_inputs_are_checked(vocoder):
    codes, seeds, voices = _rows()
    with pytest.raises(ValueError, match="3 rows of codes, 2 seeds and 3 prompts"):
        vocoder.batch(codes, seeds[:2], voices)
    with pytest.raises(ValueError, match="row 1 has none"):
        vocoder.batch([codes[0], []], seeds[:2], voices[:2])
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        vocoder.batch(codes, seeds, voices, max_rows=0)
    with pytest.raises(ValueError, match="HT_ref_audio.wav"):
        vocoder.batch(codes[:1], seeds[:1], [None])


def test_the_flow_never_waits_for_the_device_per_euler_step(checkpoint):
    """The flow's time grid and the DiT's timestep frequencies go to the device once, not
    at every step (each such copy a wait for the device): 5 steps wait and upload as often
    as 2. The vocoder is loaded inside the audit, so that what loading makes is seen."""
    from sync_audit import SyncAudit

    seen = []
    for steps in (3, 2, 5):  # the first fills the process-wide caches: not compared
        with SyncAudit() as audit:
            mv.load_vocoder(checkpoint, device="cpu", n_timesteps=steps).batch(*_rows())
        seen.append((audit.sites, audit.uploads))
    assert seen[1] == seen[2], seen[1:]
