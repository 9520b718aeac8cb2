"""Kimi-Audio adapter on a tiny checkpoint in upstream's file layout (tests/tiny_kimi.py).

The checkpoint is written once per session from tensors named after upstream's state
dict and loaded through the adapter's real path (strict load, tiktoken file, Whisper
folder). Generation runs the real step loop: sampled audio, greedy text, per-row seeds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from overlap_runs import assert_overlap_matches_sequential
from tiny_kimi import BRANCH, MAIN_LAYERS, MIMO_LAYERS, build_checkpoint, write_sources

from esn_core.hooks import Capture, HookEngine, Intervention
from esn_core.models.kimi_audio import (
    CheckpointError, KimiAudioAdapter, audio_token_count, check_checkpoint, load_lm, load_source,
)
from esn_core.models.kimi_generate import Sampling
from esn_core.models.kimi_modeling import attention_bias
from esn_core.models.kimi_tokens import N_SPECIAL, KimiTokenizer, evc_prompt
from esn_core.models.weights import load_exact

SEEDS = [10, 11, 12]  # with these the tiny model caps row 0 and ends rows 1 and 2 early
EMOTIONS = ["happy", "sad", "angry"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("kimi") / "Kimi-Audio-tiny")


@pytest.fixture(scope="session")
def adapter(checkpoint) -> KimiAudioAdapter:
    # float64: a padded batch and a single run agree to the bit a sampled draw could notice.
    return KimiAudioAdapter(checkpoint, device="cpu", dtype="float64", max_tokens=100)


@pytest.fixture(scope="session")
def inputs(adapter, tmp_path_factory):
    """Three EVC prompts of different lengths with their Whisper features."""
    sources = write_sources(tmp_path_factory.mktemp("kimi_src"))
    features = [adapter.whisper(load_source(p)) for p in sources]
    prompts = [adapter.prompt(e, adapter.vq(load_source(p)))
               for p, e in zip(sources, EMOTIONS)]
    return prompts, features


def generate(adapter, inputs, rows=(0, 1, 2), seeds=None):
    prompts, features = inputs
    seeds = [SEEDS[r] for r in rows] if seeds is None else seeds
    return adapter.generate(adapter.batch([prompts[r] for r in rows], [features[r] for r in rows]), seeds)


def run(adapter, inputs, rows=(0, 1, 2), capture=None, interventions=None):
    engine = HookEngine(adapter.groups())
    with engine.session(capture=capture, interventions=interventions) as session:
        out = generate(adapter, inputs, rows)
    return out, session


# --------------------------------------------------------------------------- weights


def test_checkpoint_names_load_exactly_and_round_trip(checkpoint):
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    lm = load_lm(checkpoint, torch.float32, "cpu")
    state = lm.state_dict()
    assert set(state) == set(saved)  # 0 missing / 0 unexpected, names as upstream's
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert len([k for k in state if k.startswith("model.mimo_layers.")]) == 12 * MIMO_LAYERS  # q,k,v (w+b), o, 3 MLP, 2 norms
    # A state dict with one key renamed is refused with both names.
    broken = dict(saved)
    broken["model.layers.0.mlp.gate.weight"] = broken.pop("model.layers.0.mlp.gate_proj.weight")
    with pytest.raises(ValueError, match=r"tiny.*gate_proj.*gate\.weight"):
        load_exact(lm, broken, "Kimi-Audio-tiny/model.safetensors")


def test_mimo_branch_reads_its_layer_and_heads_are_text_then_audio(adapter):
    lm = adapter.lm
    ids = torch.randint(0, 300, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    pos = torch.arange(6)[None]
    text0, audio0 = lm(ids, ids, mask, pos)
    layer = lm.model.layers[BRANCH + 1]  # after the branch: the text head only
    saved = layer.mlp.down_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.mlp.down_proj.weight.mul_(3.0)
        text1, audio1 = lm(ids, ids, mask, pos)
    finally:
        with torch.no_grad():
            layer.mlp.down_proj.weight.copy_(saved)
    assert torch.equal(audio1, audio0) and not torch.allclose(text1, text0)
    # The heads by hand: text = lm_head(norm(main stack)), audio = mimo_output(mimo_norm(...)).
    text_h, audio_h = lm.model(ids, ids, mask, pos)
    torch.testing.assert_close(text0, text_h[:, -1] @ lm.lm_head.weight.T)
    torch.testing.assert_close(audio0, audio_h[:, -1] @ lm.mimo_output.weight.T)


def test_attention_mask_is_causal_blocks_padding_and_lets_padded_queries_see_themselves():
    mask = attention_bias(torch.tensor([[0, 1, 1], [1, 1, 1]]), 3)[:, 0]
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # A decode step: one query over every key, padded keys blocked.
    step = attention_bias(torch.tensor([[0, 1, 1, 1]]), 1)[:, 0]
    assert step.tolist() == [[[False, True, True, True]]]


def test_batch_places_each_rows_features_on_its_continuous_positions(adapter, inputs):
    prompts, features = inputs
    batch = adapter.batch(prompts, features)
    for b, f in enumerate(features):
        assert torch.equal(batch.features[b][batch.continuous[b]], f)
    assert not batch.features[~batch.continuous].any()


def test_batch_with_too_few_features_for_a_row_names_the_row(adapter, inputs):
    prompts, features = inputs
    short = [features[0], features[1][:-1], features[2]]
    n = sum(prompts[1].continuous)
    with pytest.raises(ValueError, match=rf"row 1: {n - 1} Whisper frames for {n} audio-token"):
        adapter.batch(prompts, short)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_takes_features_the_encoder_left_on_the_gpu(adapter, inputs):
    """The Whisper encoder leaves its features on the adapter's device; the padded batch must
    be built there (a CPU-built one failed on the H200: "Expected all tensors to be on the
    same device")."""
    from esn_core.models.kimi_generate import pad_prompts

    prompts, features = inputs
    on_cpu = pad_prompts(prompts, features, adapter.ids.pad, "cpu", torch.float64)
    on_gpu = pad_prompts(prompts, [f.cuda() for f in features], adapter.ids.pad, "cuda",
                         torch.float64)
    assert on_gpu.features.is_cuda and on_gpu.audio.is_cuda
    assert torch.equal(on_gpu.features.cpu(), on_cpu.features)


def test_left_padded_batch_equals_single_rows_logits(adapter, inputs):
    from transformers import DynamicCache

    prompts, features = inputs
    def logits(rows, steps=3):
        batch = adapter.batch([prompts[r] for r in rows], [features[r] for r in rows])
        cache, mask = DynamicCache(), batch.attention_mask
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = [adapter.lm(batch.audio, batch.text, mask, pos, cache, batch.features, batch.continuous)]
        for step in range(steps):
            feed = torch.full((len(rows), 1), 300 + step)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            pos = pos[:, -1:] + 1
            out.append(adapter.lm(feed, feed, mask, pos, cache))
        return out
    together = logits([0, 1, 2])
    for r in range(3):
        for step, (text, audio) in enumerate(logits([r])):
            torch.testing.assert_close(together[step][0][r : r + 1], text, rtol=0, atol=1e-9)
            torch.testing.assert_close(together[step][1][r : r + 1], audio, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- tokens


def test_tokenizer_places_kimis_special_table_after_the_base_vocabulary(adapter, checkpoint):
    tok = KimiTokenizer(checkpoint / "tiktoken.model")
    n = tok.n_base
    assert (tok.ids.msg_end, tok.ids.media_begin, tok.ids.media_end) == (n + 2, n + 18, n + 20)
    assert (tok.ids.text_blank, tok.ids.text_eos) == (n + 23, n + 24)
    assert (tok.ids.user_start, tok.ids.assistant_start) == (n + 27, n + 28)
    assert (tok.ids.speech_ct, tok.ids.speech_ctd, tok.ids.pad) == (n + 32, n + 33, n + N_SPECIAL - 1)
    text = "Repeat exactly the words, with the emotion: sad."
    ids = tok.encode(text)
    assert max(ids) < n and len(ids) < len(text.encode()) / 2  # merges used
    assert tok.decode(ids) == text
    # A special token's spelling in text is text; decoding drops specials and audio ids.
    assert all(i < n for i in tok.encode("<|im_msg_end|>"))
    assert tok.decode(ids + [tok.ids.text_eos, adapter.config.kimia_token_offset + 3]) == text


def test_prompt_follows_upstreams_two_stream_layout(adapter):
    ids = adapter.ids
    p = evc_prompt(ids, [5, 6], [900, 901, 902])
    blank = ids.text_blank
    assert p.audio == [ids.user_start, blank, blank, ids.media_begin, 900, 901, 902,
                       ids.media_end, ids.speech_ctd, ids.msg_end, ids.assistant_start]
    assert p.text == [blank, 5, 6] + [blank] * 8
    assert p.continuous == [False] * 4 + [True] * 3 + [False] * 4
    assert evc_prompt(ids, [], [], speech_out=False).audio[3] == ids.speech_ct


def test_whisper_features_give_one_stacked_row_per_audio_token(adapter):
    assert [audio_token_count(n) for n in (1, 1280, 1281, 16_000)] == [1, 1, 2, 13]
    features = adapter.whisper(np.zeros(16_000, dtype=np.float32))
    assert features.shape == (13, adapter.config.kimia_adaptor_input_dim)
    # Longer than Whisper's 30 s window: cut into windows, tokens counted per window.
    long = adapter.whisper(np.zeros(31 * 16_000, dtype=np.float32))
    assert long.shape[0] == audio_token_count(30 * 16_000) + audio_token_count(16_000)


def test_feature_rows_must_match_the_prompts_audio_positions(adapter, inputs):
    prompts, features = inputs
    with pytest.raises(ValueError, match="row 0: 3 Whisper frames"):
        adapter.batch([prompts[0]], [features[0][:3]])


# --------------------------------------------------------------------------- generation


def test_generation_is_deterministic_and_seeded_per_row(adapter, inputs):
    first, again = generate(adapter, inputs), generate(adapter, inputs)
    assert [(o.text, o.codes, o.n_positions) for o in first] == \
        [(o.text, o.codes, o.n_positions) for o in again]
    other = generate(adapter, inputs, seeds=[21, 22, 23])
    assert [o.codes for o in other] != [o.codes for o in first]
    # Text is greedy, but the audio stream it reads back is sampled: only codes must move.
    assert all(0 <= c < 48 for o in first for c in o.codes)


def test_batched_rows_equal_single_runs_including_rows_that_end_early(adapter, inputs):
    together = generate(adapter, inputs)
    ends = [o.ended for o in together]
    assert True in ends and False in ends  # the tiny model stops some rows, caps others
    for r in range(3):
        (alone,) = generate(adapter, inputs, rows=(r,))
        assert (alone.text, alone.codes, alone.n_positions, alone.ended) == \
            (together[r].text, together[r].codes, together[r].n_positions, together[r].ended)


def test_step_rules_delay_cap_and_text_blank(adapter, inputs):
    prompts, features = inputs
    batch = adapter.batch(prompts[:1], features[:1])
    n = batch.lengths[0]
    saved = adapter.sampling, adapter.max_tokens
    try:
        # Delay longer than the cap: every audio step is blank, so no codes, capped.
        adapter.sampling, adapter.max_tokens = Sampling(audio_delay=1000), n + 9
        (row,) = adapter.generate(batch, [1])
        assert row.codes == [] and not row.ended and row.n_positions == n + 8
        # Greedy audio (temperature 0) ignores the seed.
        adapter.sampling, adapter.max_tokens = Sampling(audio_temperature=0.0), n + 30
        a, b = adapter.generate(batch, [1])[0], adapter.generate(batch, [2])[0]
        assert a.codes == b.codes
    finally:
        adapter.sampling, adapter.max_tokens = saved


def test_sampler_draws_by_inverse_cdf_within_the_top_k():
    from esn_core.models.kimi_generate import sample_audio

    # Probabilities 0.5 / 0.3 / 0.2 (temperature 1); top-2 keeps 0.5, 0.3: cdf 0.5, 0.8.
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]] * 4))
    u = torch.tensor([0.0, 0.6, 0.7, 0.999])  # targets 0, 0.48, 0.56, 0.7992
    picks = sample_audio(logits, u, Sampling(audio_temperature=1.0, audio_top_k=2))
    assert picks.tolist() == [1, 1, 2, 2]
    # Without top-k, every id is reachable in its own order: cdf 0.2, 0.7, 1.0.
    picks = sample_audio(logits, torch.tensor([0.1, 0.3, 0.69, 0.71]),
                         Sampling(audio_temperature=1.0, audio_top_k=0))
    assert picks.tolist() == [0, 1, 1, 2]
    # Temperature 0 is the argmax, whatever the uniform.
    assert sample_audio(logits, u, Sampling(audio_temperature=0.0)).tolist() == [1] * 4


def test_sampler_frequencies_follow_the_tempered_top_k_distribution():
    from esn_core.models.kimi_generate import sample_audio
    from esn_core.models.seeded_draws import draw_uniforms

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]])
    sampling = Sampling(audio_temperature=0.8, audio_top_k=3)
    n = 20000
    u = draw_uniforms([5], [n], "cpu")[0]
    picks = sample_audio(logits.expand(n, -1), u, sampling)
    tempered = torch.softmax(logits[0] / 0.8, dim=0)
    top = torch.zeros(5)
    top[[2, 1, 4]] = tempered[[2, 1, 4]] / tempered[[2, 1, 4]].sum()
    freq = torch.bincount(picks, minlength=5).float() / n
    assert torch.allclose(freq, top, atol=0.015)  # 4 sigma at n = 20000 is ~0.014


# --------------------------------------------------------------------------- hooks


def test_groups_are_the_main_layers_and_the_mimo_branch(adapter):
    groups = adapter.groups()
    assert len(groups["lm"].mlps) == MAIN_LAYERS and len(groups["synth"].mlps) == MIMO_LAYERS
    assert all(m is l.mlp for m, l in zip(groups["lm"].mlps, adapter.lm.model.layers))
    assert all(m is l.mlp for m, l in zip(groups["synth"].mlps, adapter.lm.model.mimo_layers))
    assert groups["lm"].root is adapter.lm and groups["synth"].root is adapter.lm


def test_capture_counts_every_processed_position_and_batches_like_single_runs(adapter, inputs):
    both = {"lm": Capture(), "synth": Capture()}
    out, session = run(adapter, inputs, capture=both)
    for group in ("lm", "synth"):
        counts = session.counts(group)
        assert counts.T.tolist() == [o.n_positions for o in out]
        assert counts.K.max() <= counts.T.max()
    for r in range(3):
        _, alone = run(adapter, inputs, rows=(r,), capture=both)
        for group in ("lm", "synth"):
            np.testing.assert_array_equal(session.counts(group).K[r], alone.counts(group).K[0])
    generated = {"lm": Capture(count_positions="generated")}
    _, gen_session = run(adapter, inputs, capture=generated)
    prompt = adapter.batch(*[list(x) for x in inputs]).lengths
    assert gen_session.counts("lm").T.tolist() == [o.n_positions - n for o, n in zip(out, prompt)]


@pytest.mark.parametrize("group", ["lm", "synth"])
def test_steering_changes_the_row_it_masks_and_the_session_exit_restores(adapter, inputs, group):
    baseline = generate(adapter, inputs)
    n = adapter.groups()[group].layout.n_neurons
    empty = np.array([], dtype=np.int64)
    plan = {group: Intervention("steer", (np.arange(n), empty, empty), (4.0, 0.0, 0.0))}
    steered, _ = run(adapter, inputs, interventions=plan)
    # (The audio tokens are fed back, so a synth-only change reaches the text too.)
    assert steered[0].codes != baseline[0].codes
    for r in (1, 2):  # empty masks: untouched rows
        assert (steered[r].text, steered[r].codes) == (baseline[r].text, baseline[r].codes)
    after = generate(adapter, inputs)
    assert [(o.text, o.codes) for o in after] == [(o.text, o.codes) for o in baseline]


# --------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("part", [
    "config.json", "tiktoken.model", "model.safetensors", "whisper-large-v3/config.json",
    "whisper-large-v3/model.safetensors", "glm-4-voice-tokenizer/config.json",
    "glm-4-voice-tokenizer/preprocessor_config.json", "glm-4-voice-tokenizer/model.safetensors",
    "audio_detokenizer/config.yaml", "audio_detokenizer/model.pt", "vocoder/config.json",
    "vocoder/model.pt",
])
def test_a_missing_part_of_the_checkpoint_is_named(checkpoint, tmp_path, part):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / part).unlink()
    with pytest.raises(CheckpointError, match=part.replace(".", r"\.")):
        check_checkpoint(copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        KimiAudioAdapter(tmp_path / "nowhere", device="cpu")


def test_a_missing_shard_is_named(checkpoint, tmp_path):
    import json

    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    weight_map = {"model.norm.weight": "model-00001-of-00002.safetensors",
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        check_checkpoint(copy)


def test_from_config_builds_a_random_model_of_any_shape_for_benchmarks(checkpoint):
    import json

    fields = json.loads((checkpoint / "config.json").read_text())
    fields.update(num_hidden_layers=3, kimia_mimo_layers=1, kimia_mimo_transformer_from_layer_index=1)
    adapter = KimiAudioAdapter.from_config(fields, seed=1)
    assert [len(g.mlps) for g in adapter.groups().values()] == [3, 1]
    again = KimiAudioAdapter.from_config(fields, seed=1)
    assert torch.equal(adapter.lm.lm_head.weight, again.lm.lm_head.weight)
    with pytest.raises(ValueError, match="kimia_mimo_transformer_from_layer_index=5"):
        KimiAudioAdapter.from_config({**fields, "kimia_mimo_transformer_from_layer_index": 5})


def test_from_config_builds_the_7b_shape_without_weights_in_memory():
    fields = dict(vocab_size=168448, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=8192)
    adapter = KimiAudioAdapter.from_config(fields, device="meta", dtype="bfloat16")
    groups = adapter.groups()
    assert groups["lm"].layout.layer_sizes == (18944,) * 28
    assert groups["synth"].layout.layer_sizes == (18944,) * 6  # Kimi's defaults: 6 MIMO layers
    assert adapter.lm.model.branch == 21 and adapter.ids.msg_end == 151645
    assert adapter.lm.lm_head.weight.shape == (168448, 3584)


# --------------------------------------------------------------------------- speech


def test_detokenizer_names_load_exactly(checkpoint):
    from esn_core.models.kimi_detokenizer import load_dit

    saved = torch.load(checkpoint / "audio_detokenizer" / "model.pt", weights_only=True)["state_dict"]
    dit = load_dit(checkpoint / "audio_detokenizer", "cpu", torch.float32)
    state = dit.state_dict()
    assert {f"speech_model.{k}" for k in state} == set(saved)
    assert all(torch.equal(state[k[len("speech_model."):]], v) for k, v in saved.items())


def test_a_chunk_drops_its_look_ahead_and_leaves_its_keys_as_the_next_prefix(adapter):
    from esn_core.models.kimi_detokenizer import Streaming

    dit = adapter.detokenizer.dit
    stream = Streaming(dit, steps=4, look_ahead=48, max_kv_tokens=100)
    codes = torch.arange(120) % 48
    g = torch.Generator().manual_seed(0)
    mel = stream.chunk(codes, g, final=False)
    assert mel.shape == (72, 80) and stream.start == 72
    assert torch.equal(stream.tail, codes[None, -48:])  # [rows, look-ahead]
    assert all(k.shape[1] == 72 and v.shape[1] == 72 for k, v in stream.prefix)
    second = stream.chunk(codes, torch.Generator().manual_seed(1), final=False)
    assert second.shape == (120, 80)  # the 48 redone frames + 120 new - 48 held back
    assert all(k.shape[1] == 100 for k, _ in stream.prefix)  # trimmed to max_kv_tokens
    # The prefix matters: the same chunk (same redone tail, same noise) after a different
    # first chunk comes out different.
    runs = []
    for first in (codes, (codes + 5) % 48):
        stream = Streaming(dit, steps=4, look_ahead=48, max_kv_tokens=100)
        stream.chunk(first, torch.Generator().manual_seed(0), final=False)
        stream.tail = codes[None, -48:]
        runs.append(stream.chunk(codes, torch.Generator().manual_seed(1), final=True))
    assert runs[0].shape == runs[1].shape == (168, 80)  # final: nothing held back
    assert not torch.allclose(runs[0], runs[1])


def test_vocoder_hand_over_cross_fades_with_a_hamming_window(adapter):
    from esn_core.models.kimi_detokenizer import FRAME_SAMPLES, Detokenizer

    class Hold(torch.nn.Module):  # each mel frame's first bin, held for one frame
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, mel):
            return mel[:, :1, :].repeat_interleave(FRAME_SAMPLES, dim=2)

    det = Detokenizer(adapter.detokenizer.dit, Hold())
    first = torch.arange(8.0)[:, None].repeat(1, 80)
    out, pre_mel, pre_wav = det._vocode(first, None, None, final=False)
    assert out.shape[0] == 4 * FRAME_SAMPLES and torch.equal(pre_mel, first[4:])
    assert torch.equal(pre_wav, torch.arange(4.0, 8.0).repeat_interleave(FRAME_SAMPLES))
    second = 10 + torch.arange(8.0)[:, None].repeat(1, 80)
    out2, pre_mel2, pre_wav2 = det._vocode(second, pre_mel, pre_wav, final=False)
    wav = torch.cat([first[4:, 0], second[:, 0]]).repeat_interleave(FRAME_SAMPLES)
    n = 2 * pre_wav.shape[0]
    window = torch.hamming_window(n)
    expected = wav[:n].clone()
    expected[: n // 2] = pre_wav[: n // 2] * window[n // 2:] + wav[: n // 2] * window[: n // 2]
    torch.testing.assert_close(out2, expected)
    assert torch.equal(pre_wav2, wav[n:]) and torch.equal(pre_mel2, second[-4:])
    final, _, _ = det._vocode(second, pre_mel, pre_wav, final=True)
    assert torch.equal(final, wav)  # the last chunk comes back whole


def test_speech_length_follows_the_codes_and_the_seed_drives_the_noise(adapter):
    det = adapter.detokenizer
    one_frame = det._wave(torch.zeros(1, 80)).shape[0]
    extra = one_frame - 480  # what the vocoder's convolutions add to any length
    for n in (5, 30, 45, 75):
        codes = [(7 * i) % 48 for i in range(n)]
        wave = det(codes, torch.Generator().manual_seed(3))
        assert wave.shape[0] == n * 4 * 480 + extra, n  # no frame lost or doubled at a seam
    codes = list(range(40))
    a = det(codes, torch.Generator().manual_seed(3))
    assert torch.equal(a, det(codes, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, det(codes, torch.Generator().manual_seed(4)))


def test_convert_gives_text_16k_speech_and_batched_rows_equal_single_runs(adapter, tmp_path):
    from esn_core.models.base import EVCRequest

    sources = write_sources(tmp_path)
    requests = [EVCRequest(f"a{i}", str(p), "t", "spk", e, s)
                for i, (p, e, s) in enumerate(zip(sources, EMOTIONS, SEEDS))]
    outputs = adapter.convert(requests)
    assert [o.attempt_id for o in outputs] == ["a0", "a1", "a2"]
    rows = adapter.generate(adapter.prepare(requests), SEEDS)
    for out, row, request in zip(outputs, rows, requests):
        assert out.sample_rate == 16_000 and out.n_positions == row.n_positions
        assert out.decoded_text == row.text
        assert out.waveform.shape[0] == pytest.approx(len(row.codes) * 1280, abs=2)  # 80 ms a code
        assert np.array_equal(out.waveform, adapter.speak(row.codes, request.seed))
        (alone,) = adapter.convert([request])
        assert np.array_equal(alone.waveform, out.waveform) and alone.decoded_text == out.decoded_text
    assert adapter.convert([]) == []


def test_overlapped_speech_gives_the_sequential_run_exactly(adapter, tmp_path):
    assert_overlap_matches_sequential(adapter, write_sources(tmp_path), tmp_path)


def test_registry_builds_the_adapter(checkpoint):
    from esn_core.models.base import load_adapter

    adapter = load_adapter("kimi_audio", path=str(checkpoint), device="cpu", max_tokens=60,
                           detokenizer_batch=3, detokenizer_ragged_vocoder=False)
    assert isinstance(adapter, KimiAudioAdapter) and adapter.dtype == torch.float32
    assert adapter.detokenizer.max_rows == 3 and adapter.detokenizer.vocoder_ragged is False
    with pytest.raises(ValueError, match="detokenizer_batch: 0 is not allowed; a whole number >= 1"):
        KimiAudioAdapter(checkpoint, device="cpu", detokenizer_batch=0)


def test_a_cap_below_the_prompt_is_an_error_not_an_empty_answer(adapter, inputs):
    prompts, features = inputs
    batch = adapter.batch(prompts[:1], features[:1])
    saved = adapter.max_tokens
    try:
        adapter.max_tokens = batch.lengths[0]
        with pytest.raises(ValueError, match=f"max_tokens={batch.lengths[0]} leaves no room"):
            adapter.generate(batch, [1])
    finally:
        adapter.max_tokens = saved


def test_rotary_frequencies_stay_float32_in_a_low_precision_model(checkpoint):
    lm = load_lm(checkpoint, torch.bfloat16, "cpu")
    assert lm.lm_head.weight.dtype == torch.bfloat16
    assert lm.model.rotary_emb.inv_freq.dtype == torch.float32
    reference = 1.0 / (1e6 ** (torch.arange(0, 8, 2).float() / 8))  # head_dim 8, theta 1e6
    torch.testing.assert_close(lm.model.rotary_emb.inv_freq, reference)


def test_both_heads_equal_transformers_qwen2_stacks_built_from_the_same_tensors(adapter):
    """An independent reference: transformers' own ``Qwen2ForCausalLM``, fed the summed
    stream embeddings, gives the text logits from the main stack and the audio logits
    from the first ``BRANCH + 1`` main layers followed by the MIMO layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lm = adapter.lm
    state = {k: v.float() for k, v in lm.state_dict().items()}
    fields = {k: getattr(lm.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")}
    fields.update(rope_theta=1000000.0,  # transformers 4.x reads this, 5.x the parameters
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})

    def reference(layers: list[str], norm: str, head: str):
        model = Qwen2ForCausalLM(Qwen2Config(**fields, num_hidden_layers=len(layers),
                                             tie_word_embeddings=False)).eval()
        ref = {"model.embed_tokens.weight": state["model.embed_tokens.weight"],
               "model.norm.weight": state[norm], "lm_head.weight": state[head]}
        for i, prefix in enumerate(layers):
            ref.update({f"model.layers.{i}.{k[len(prefix) + 1:]}": v
                        for k, v in state.items() if k.startswith(prefix + ".")})
        model.load_state_dict(ref, strict=True)
        return model.double()

    main = [f"model.layers.{i}" for i in range(MAIN_LAYERS)]
    branch = main[: BRANCH + 1] + [f"model.mimo_layers.{i}" for i in range(MIMO_LAYERS)]
    text_ref = reference(main, "model.norm.weight", "lm_head.weight")
    audio_ref = reference(branch, "model.mimo_norm.weight", "mimo_output.weight")
    g = torch.Generator().manual_seed(0)
    audio_ids, text_ids = torch.randint(0, 400, (1, 9), generator=g), torch.randint(0, 400, (1, 9), generator=g)
    mask = torch.ones(1, 9, dtype=torch.long)
    text, audio = lm(audio_ids, text_ids, mask, torch.arange(9)[None], last_only=False)
    embeds = lm.model.embed(audio_ids, text_ids)
    with torch.no_grad():
        torch.testing.assert_close(text, text_ref(inputs_embeds=embeds).logits)
        torch.testing.assert_close(audio, audio_ref(inputs_embeds=embeds).logits)


def test_a_row_without_audio_codes_speaks_an_empty_waveform_not_padding(adapter):
    wave = adapter.speak([], seed=1)
    assert wave.dtype == np.float32 and wave.size == 0


# --------------------------------------------------------------------------- batched speech
# Rows of codes: 1 chunk (12, 30 codes), several chunks with final chunks of 15, 1 and 30
# codes (75, 61, 90), and a row without codes. Float32 on CPU, 3 Euler points.
DECODE_LENGTHS = [12, 75, 61, 30, 0, 90]
# Measured on CPU float32: batched vs alone, max |diff| 2.2e-7 on waves peaking at ~0.38
# (SNR >= 134 dB). BigVGAN's oneDNN convolutions round differently at another batch size
# and a shorter final chunk's masked attention differs in the last bits; in float64 (the
# adapter fixture) the two are bit-identical (test_convert_...).
MAX_ABS, MIN_SNR_DB = 2e-6, 110.0


def decode_codes(lengths=DECODE_LENGTHS):
    return [[(7 * i + r) % 48 for i in range(n)] for r, n in enumerate(lengths)]


def seeded(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    error = (reference.double() - other.double()).pow(2).sum()
    return float("inf") if error == 0 else float(10 * torch.log10(reference.double().pow(2).sum() / error))


@pytest.fixture(scope="module", params=["grouped", "ragged"])
def detokenizer32(checkpoint, request):
    """The checkpoint's detokenizer in float32. ``grouped``: its vocoder, whose output is
    2 samples longer than 480 per frame (a transposed convolution with odd k - s), so mels
    of different lengths go through one call per length. ``ragged``: a BigVGAN whose
    output is exactly 480 per frame, so they share a padded call (``ragged_time_axis``)."""
    import json

    from bigvgan.bigvgan import BigVGAN
    from bigvgan.env import AttrDict

    from esn_core.models.kimi_detokenizer import Detokenizer, load_dit, load_vocoder

    dit = load_dit(checkpoint / "audio_detokenizer", "cpu", torch.float32)
    vocoder = load_vocoder(checkpoint / "vocoder", "cpu", torch.float32)
    if request.param == "ragged":
        config = json.loads((checkpoint / "vocoder" / "config.json").read_text())
        config["upsample_kernel_sizes"] = [16, 12, 11, 4]  # every k - s even
        torch.manual_seed(7)
        vocoder = BigVGAN(AttrDict(config), use_cuda_kernel=False).eval()
        vocoder.remove_weight_norm()
    det = Detokenizer(dit, vocoder, steps=3)
    assert det._vocoder_is_proportional() == (request.param == "ragged")
    return det


@pytest.fixture(scope="module")
def alone32(detokenizer32):
    return [detokenizer32(c, g) for c, g in zip(decode_codes(), seeded(range(len(DECODE_LENGTHS))))]


def assert_close_to(alone, batched):
    assert [w.shape for w in batched] == [w.shape for w in alone]
    for n, a, b in zip(DECODE_LENGTHS, alone, batched):
        if n == 0:
            assert b.numel() == 0 and b.dtype == torch.float32
            continue
        assert float(a.abs().max()) > 0.1  # a real signal, far above the tolerance
        assert float((a - b).abs().max()) <= MAX_ABS and snr_db(a, b) >= MIN_SNR_DB, n


def test_batched_decode_equals_each_row_alone(detokenizer32, alone32):
    codes = decode_codes()
    batched = detokenizer32.batch(codes, seeded(range(len(codes))))
    assert_close_to(alone32, batched)
    # Calls of at most 2 rows (longest first): the same rows, the same tolerance.
    assert_close_to(alone32, detokenizer32.batch(codes, seeded(range(len(codes))), max_rows=2))
    # max_rows=1 is one row per call: the single-row path itself.
    ones = detokenizer32.batch(codes, seeded(range(len(codes))), max_rows=1)
    assert all(torch.equal(a, b) for a, b in zip(alone32, ones))
    n = detokenizer32.dit.input_linear.weight.shape[0]
    assert n == 16  # the tiny DiT (the tolerance above is for these shapes)


def test_batched_decode_ignores_row_order_and_other_rows_seeds(detokenizer32):
    codes = decode_codes()
    seeds = list(range(len(codes)))
    first = detokenizer32.batch(codes, seeded(seeds))
    assert all(torch.equal(a, b) for a, b in zip(first, detokenizer32.batch(codes, seeded(seeds))))
    # Rows are grouped by length, so any order gives the same calls: bit-identical rows.
    order = [4, 2, 5, 0, 3, 1]
    shuffled = detokenizer32.batch([codes[i] for i in order], seeded([seeds[i] for i in order]))
    assert all(torch.equal(first[i], w) for i, w in zip(order, shuffled))
    # A new seed for one row moves that row only; its batch-mates are untouched, to the bit.
    moved = detokenizer32.batch(codes, seeded([seeds[0], 99, *seeds[2:]]))
    assert not torch.allclose(moved[1], first[1], atol=1e-3)
    assert all(torch.equal(first[i], moved[i]) for i in range(len(codes)) if i != 1)
    with pytest.raises(ValueError, match="6 rows of codes but 5 generators"):
        detokenizer32.batch(codes, seeded(seeds[:5]))


def test_batched_decode_restarts_positions_like_each_row_alone(detokenizer32, monkeypatch):
    from esn_core.models import kimi_detokenizer

    codes = decode_codes([130, 100])  # 5 and 4 chunks
    before = [detokenizer32(c, g) for c, g in zip(codes, seeded([1, 2]))]
    # A 400-position window restarts after the second chunk (192 + 2 x 120 > 400).
    monkeypatch.setattr(kimi_detokenizer, "MAX_POSITIONS", 400)
    alone = [detokenizer32(c, g) for c, g in zip(codes, seeded([1, 2]))]
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(before, alone))  # it restarted
    batched = detokenizer32.batch(codes, seeded([1, 2]))
    for a, b in zip(alone, batched):
        assert float((a - b).abs().max()) <= MAX_ABS and snr_db(a, b) >= MIN_SNR_DB


def test_a_final_chunk_padded_beside_a_longer_one_sees_only_its_own_frames(adapter):
    from esn_core.models.kimi_detokenizer import Streaming

    dit = adapter.detokenizer.dit  # float64: the masked call equals the row alone exactly
    short, long = torch.arange(40) % 48, (3 * torch.arange(120)) % 48
    alone = Streaming(dit, steps=3).chunk(short, torch.Generator().manual_seed(5), final=True)
    stream = Streaming(dit, steps=3)
    mels = stream.chunks([long, short], seeded([6, 5]), [False, True])
    assert mels[1].shape == (40, 80) and mels[0].shape == (72, 80)
    torch.testing.assert_close(mels[1], alone, rtol=0, atol=1e-12)
    assert stream.tail.shape == (1, 48) and stream.prefix[0][0].shape[:2] == (1, 72)  # row 0 only
    with pytest.raises(ValueError, match="only final chunks may be shorter"):
        Streaming(dit, steps=3).chunks([long, short], seeded([6, 5]), [False, False])


def test_reading_the_stop_flag_late_changes_no_row_or_count(adapter, inputs, monkeypatch):
    """The loop learns a step late that every row ended (``late_stop``): one more step runs,
    and the rows and counts are those of the flag read every step."""
    import esn_core.models.kimi_generate as loop
    from sync_audit import late_and_every_step

    def run():
        engine = HookEngine(adapter.groups())
        with engine.session(capture={"lm": Capture(), "synth": Capture()}) as session:
            out = generate(adapter, inputs, seeds=[11, 11, 13])  # every row ends, at its own step
        return out, session

    ((late, late_session), late_forwards), ((every, every_session), every_forwards) = \
        late_and_every_step(run, adapter.groups()["lm"].root, loop, monkeypatch)
    assert all(o.ended for o in late) and len({len(o.codes) for o in late}) == 3
    assert [(o.text, o.codes, o.n_positions, o.ended) for o in late] == \
        [(o.text, o.codes, o.n_positions, o.ended) for o in every]
    for group in ("lm", "synth"):
        np.testing.assert_array_equal(late_session.counts(group).T, every_session.counts(group).T)
        np.testing.assert_array_equal(late_session.counts(group).K, every_session.counts(group).K)
    assert late_forwards == every_forwards + 1


def test_the_step_loop_never_waits_for_the_device_per_step(adapter, inputs):
    """Its stop check is read a step late (``late_stop``): 8 steps wait as often as 3."""
    from sync_audit import SyncAudit

    prompts, features = inputs
    batch = adapter.batch(prompts, features)
    saved = adapter.sampling, adapter.max_tokens
    sites = []
    try:
        for extra in (3, 8):
            # Audio blank throughout: every row runs to its cap, ``extra`` steps past the prompt.
            adapter.sampling, adapter.max_tokens = Sampling(audio_delay=1000), max(batch.lengths) + extra
            with SyncAudit() as audit:
                rows = adapter.generate(batch, [1, 2, 3])
            assert not any(r.ended for r in rows)
            sites.append((audit.sites, audit.uploads))
    finally:
        adapter.sampling, adapter.max_tokens = saved
    assert sites[0][0] and sites[0] == sites[1]


def test_the_speech_decoder_never_waits_for_the_device_per_euler_step(checkpoint):
    """Its DiT's tables (positions, rotary angles, timestep frequencies, the timesteps) are
    made on the host as upstream makes them and sent to the device once, not at every
    evaluation (each such copy a wait for the device): 4 Euler points a chunk wait and
    upload as often as 1. The adapter is built inside the audit, so that tables made at
    loading are seen on the host."""
    from sync_audit import SyncAudit

    codes = [[3, 5, 7, 9, 11] * 6, [2, 4, 6] * 5]
    seen = []
    for steps in (3, 2, 5):  # the first fills the process-wide caches: not compared
        with SyncAudit() as audit:
            speaker = KimiAudioAdapter(checkpoint, device="cpu", dtype="float32", detokenizer_steps=steps)
            waves = speaker.speak_rows(codes, [1, 2])
        assert [len(w) for w in waves] and all(np.isfinite(w).all() for w in waves)
        seen.append((audit.sites, audit.uploads))
    assert seen[1] == seen[2], seen[1:]
