"""MiniCPM-o 4.5's TTS module: upstream's weight names, strict loading, config errors."""

import pytest
import torch

from esn_core.models.minicpm_tts import MiniCPMTTS, TTSConfigError, load_tts
from esn_core.models.weights import WeightNameError

TINY_TTS = dict(llm_dim=16, llm_intermediate_size=12, hidden_size=8, intermediate_size=12,
                num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1,
                num_audio_tokens=11, num_text_tokens=13, num_vq=1, projector_type="mlp",
                backbone_vocab_size=5)


def test_weight_names_are_upstreams():
    names = set(MiniCPMTTS(TINY_TTS).state_dict())
    # the names upstream's MiniCPMTTS saves (torch parametrization weight_norm on head_code)
    for name in ("emb_text.weight", "emb_code.0.weight",
                 "head_code.0.parametrizations.weight.original0",
                 "head_code.0.parametrizations.weight.original1",
                 "projector_spk.linear1.weight", "projector_spk.linear2.bias",
                 "projector_semantic.linear1.bias", "model.embed_tokens.weight",
                 "model.layers.1.mlp.gate_proj.weight", "model.norm.weight"):
        assert name in names, name
    assert MiniCPMTTS(TINY_TTS).model.layers[0].mlp.up_proj.weight.shape == (12, 8)


def test_load_is_strict_and_exact():
    torch.manual_seed(0)
    src = MiniCPMTTS(TINY_TTS)
    flat = {f"tts.{k}": v for k, v in src.state_dict().items()}
    flat["llm.model.norm.weight"] = torch.ones(16)  # other prefixes are not the TTS's business
    tts = load_tts(TINY_TTS, flat)
    for k, v in src.state_dict().items():
        assert torch.equal(tts.state_dict()[k], v), k
    x = torch.randn(1, 3, 16)
    assert torch.equal(tts.projector_spk(x), src.projector_spk(x))
    assert torch.equal(tts.head_code[0](x[..., :8]), src.head_code[0](x[..., :8]))
    missing = dict(flat)
    del missing["tts.emb_code.0.weight"]
    with pytest.raises(WeightNameError, match="emb_code.0.weight"):
        load_tts(TINY_TTS, missing)
    extra = dict(flat, **{"tts.stray.weight": torch.zeros(1)})
    with pytest.raises(WeightNameError, match="stray.weight"):
        load_tts(TINY_TTS, extra)


@pytest.mark.parametrize("field,value,message", [
    ("num_vq", 0, "num_vq"), ("hidden_size", "8", "hidden_size"),
    ("projector_type", "conv", "projector_type"), ("backbone_model", "gpt2", "backbone_model"),
    ("interleaved", True, "interleaved"), ("condition_type", "hidden", "condition_type"),
    ("num_key_value_heads", 3, "num_key_value_heads")])
def test_bad_config_value_names_the_field(field, value, message):
    with pytest.raises(TTSConfigError, match=message):
        MiniCPMTTS(dict(TINY_TTS, **{field: value}))


def test_projector_types():
    gated = MiniCPMTTS(dict(TINY_TTS, projector_type="minicpm"))
    assert gated.projector_spk.gate_proj.weight.shape == (12, 16)
    linear = MiniCPMTTS(dict(TINY_TTS, projector_type="default"))
    assert linear.projector_semantic.weight.shape == (8, 16) and linear.projector_semantic.bias is None


TINY_AUDIO = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, d_model=8,
                  encoder_ffn_dim=16, max_source_positions=10)


def test_audio_in_names_and_strict_load():
    from esn_core.models.minicpm_audio import AudioConfigError, MiniCPMAudioIn, load_audio_in

    torch.manual_seed(0)
    src = MiniCPMAudioIn(TINY_AUDIO, llm_hidden=16, pool_step=2)
    flat = src.state_dict()
    for name in ("apm.conv1.weight", "apm.embed_positions.weight",
                 "apm.layers.0.self_attn.k_proj.weight", "apm.layers.0.fc1.weight",
                 "apm.layer_norm.weight", "audio_projection_layer.linear1.weight"):
        assert name in flat, name
    assert flat["audio_projection_layer.linear1.weight"].shape == (16, 4)  # ffn // 4 -> LM
    got = load_audio_in(TINY_AUDIO, 16, 2, dict(flat, **{"tts.emb_text.weight": torch.ones(1)}))
    for k, v in flat.items():
        assert torch.equal(got.state_dict()[k], v), k
    short = {k: v for k, v in flat.items() if k != "apm.layer_norm.bias"}
    with pytest.raises(WeightNameError, match="apm.layer_norm.bias"):
        load_audio_in(TINY_AUDIO, 16, 2, short)
    with pytest.raises(AudioConfigError, match="audio_pool_step"):
        MiniCPMAudioIn(TINY_AUDIO, 16, 0)
    with pytest.raises(AudioConfigError, match="encoder_ffn_dim"):
        MiniCPMAudioIn(dict(TINY_AUDIO, encoder_ffn_dim=18), 16, 2)


def test_checkpoint_loads_every_weight(tmp_path):
    from safetensors.torch import load_file

    from esn_core.models.minicpm_checkpoint import load_checkpoint
    from tests.tiny_minicpm import build

    ckpt = build(tmp_path / "ckpt")
    parts = load_checkpoint(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    placed = {f"llm.{k}": v for k, v in parts.llm.state_dict().items()}
    placed |= parts.audio_in.state_dict()
    placed |= {f"tts.{k}": v for k, v in parts.tts.state_dict().items()}
    used = {k for k in saved if not k.startswith(("vpm.", "resampler."))}
    assert set(placed) == used  # 0 missing, 0 unexpected; vision skipped by rule
    for k in used:
        assert torch.equal(placed[k], saved[k]), k
    assert len(parts.llm.model.layers) == 2 and len(parts.tts.model.layers) == 2


def test_checkpoint_errors_name_the_file_or_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    from esn_core.models.minicpm_checkpoint import CheckpointError, load_checkpoint
    from tests.tiny_minicpm import build

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    ckpt = build(tmp_path / "ckpt")
    saved = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(ckpt)
    save_file(dict(saved, **{"mystery.weight": torch.zeros(1)}), str(ckpt / "model.safetensors"))
    with pytest.raises(WeightNameError, match="mystery.weight"):
        load_checkpoint(ckpt)
    del saved["llm.model.layers.1.mlp.gate_proj.weight"]
    save_file(saved, str(ckpt / "model.safetensors"))
    with pytest.raises(WeightNameError, match="layers.1.mlp.gate_proj"):
        load_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(ckpt)


def test_tied_head_and_bad_sub_config(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from esn_core.models.minicpm_checkpoint import load_checkpoint
    from tests.tiny_minicpm import build

    ckpt = build(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    saved = load_file(str(ckpt / "model.safetensors"))
    del saved["llm.lm_head.weight"]  # a tied checkpoint stores the embedding once
    save_file(saved, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    parts = load_checkpoint(ckpt)
    assert torch.equal(parts.llm.lm_head.weight, saved["llm.model.embed_tokens.weight"])
    config["tts_config"]["num_vq"] = 0
    (ckpt / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    with pytest.raises(TTSConfigError, match="num_vq"):
        load_checkpoint(ckpt)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_reads_the_special_tokens_and_the_chat_template(tmp_path):
    from esn_core.models.minicpm_checkpoint import SPECIAL_TOKENS, load_tokenizer
    from tests.tiny_minicpm import build

    tok = load_tokenizer(build(tmp_path / "ckpt"))
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(set(ids)) == len(SPECIAL_TOKENS) and all(i < 300 for i in ids)  # LM vocabulary
    text = tok.apply_chat_template(
        [{"role": "system", "content": "clone"}, {"role": "user", "content": "<unk><unk>hi"}],
        tokenize=False, add_generation_prompt=True, use_tts_template=True)
    assert text == ("<|im_start|>system\nclone<|im_end|>\n<|im_start|>user\n<unk><unk>hi"
                    "<|im_end|>\n<|im_start|>assistant\n<|tts_bos|>")
    encoded = tok.encode(text, add_special_tokens=False)
    assert encoded.count(tok.convert_tokens_to_ids("<unk>")) == 2  # placeholders only
    assert encoded[-1] == tok.convert_tokens_to_ids("<|tts_bos|>")
    assert tok.decode(tok.encode("the cat sat\n", add_special_tokens=False)) == "the cat sat\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_missing_tokenizer_file_is_named(tmp_path, name):
    from esn_core.models.minicpm_checkpoint import CheckpointError, load_tokenizer
    from tests.tiny_minicpm import build

    ckpt = build(tmp_path / "ckpt")
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_tokenizer(ckpt)


# --------------------------------------------------------------------------- EVC prompt


@pytest.mark.parametrize("n_samples,pool,expected", [
    # ceil(n/160) mel frames -> (f-1)//2+1 after the stride-2 conv -> (c-p)//p+1 pooled
    (16_000, 5, 10),  # 100 frames -> 50 -> 10
    (16_000, 2, 25),  # 100 -> 50 -> 25
    (16_161, 5, 10),  # 102 frames -> 51 -> 10
    (1_600, 2, 2),    # 10 -> 5 -> 2
    (320, 1, 1),      # 2 -> 1 -> 1
])
def test_audio_embedding_count_is_hand_computed(n_samples, pool, expected):
    from esn_core.models.minicpm_prompt import audio_embedding_count

    assert audio_embedding_count(n_samples, pool) == expected


def test_too_short_a_clip_is_an_error():
    from esn_core.models.minicpm_prompt import audio_embedding_count

    with pytest.raises(ValueError, match="too short"):
        audio_embedding_count(160, 5)  # 1 frame -> 1 -> 0 embeddings


def test_evc_prompt_is_voice_cloning_with_the_source_twice(tmp_path):
    from esn_core.models.minicpm_checkpoint import load_tokenizer
    from esn_core.models.minicpm_prompt import evc_prompt_ids, evc_prompt_text
    from tests.tiny_minicpm import build

    tok = load_tokenizer(build(tmp_path / "ckpt"))
    src = "<|audio_start|><unk><unk><unk><|audio_end|>"
    assert evc_prompt_text(tok, 3, "say it happy") == (
        "<|im_start|>system\nClone the voice in the provided audio prompt.\n" + src +
        "<|im_end|>\n<|im_start|>user\n" + src + "\nsay it happy<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<|tts_bos|>")
    ids = evc_prompt_ids(tok, 3, "say it happy")
    assert ids.count(tok.convert_tokens_to_ids("<unk>")) == 6
    assert ids[-1] == tok.convert_tokens_to_ids("<|tts_bos|>")
    with pytest.raises(ValueError, match="placeholders"):
        evc_prompt_ids(tok, 3, "say <unk> happy")


def test_source_encoding_equals_stock_whisper_and_gives_one_row_per_placeholder(tmp_path):
    import numpy as np

    from esn_core.models.minicpm_checkpoint import load_checkpoint
    from esn_core.models.minicpm_prompt import audio_embedding_count, encode_source, source_mel
    from tests.tiny_minicpm import build

    parts = load_checkpoint(build(tmp_path / "ckpt"))
    audio_in = parts.audio_in
    rng = np.random.default_rng(0)
    # 120 mel frames = the tiny encoder's full window (max_source_positions 60 x stride 2),
    # the only length stock WhisperEncoder.forward accepts: our steps must equal it there.
    full = (0.1 * rng.standard_normal(120 * 160)).astype(np.float32)
    mel = source_mel(full, 8)
    assert mel.shape == (8, 120)
    with torch.no_grad():
        stock = audio_in.apm(mel[None]).last_hidden_state
        pooled = audio_in.audio_avg_pooler(
            audio_in.audio_projection_layer(stock).transpose(1, 2)).transpose(1, 2)[0]
    torch.testing.assert_close(encode_source(audio_in, full, 8), pooled)
    short = full[:1700]  # 11 frames -> 6 -> 3 embeddings (pool step 2)
    assert encode_source(audio_in, short, 8).shape == (3, 16) == (
        audio_embedding_count(1700, 2), 16)
    too_long = np.zeros(130 * 160, dtype=np.float32)
    with pytest.raises(ValueError, match="max_source_positions"):
        encode_source(audio_in, too_long, 8)


# --------------------------------------------------------------------------- text pass


def _text_inputs(tmp_path, lengths=(1700, 3300, 2500)):
    import numpy as np

    from esn_core.models.minicpm_checkpoint import load_checkpoint, load_tokenizer
    from esn_core.models.minicpm_generate import prompt_embeddings
    from esn_core.models.minicpm_prompt import encode_source, evc_prompt_ids
    from tests.tiny_minicpm import build

    ckpt = build(tmp_path / "ckpt")
    parts, tok = load_checkpoint(ckpt, dtype=torch.float64), load_tokenizer(ckpt)
    rng = np.random.default_rng(1)
    unk = tok.convert_tokens_to_ids("<unk>")
    prompts = []
    for n, emotion in zip(lengths, ["happy", "sad", "angry"]):
        audio = encode_source(parts.audio_in, (0.1 * rng.standard_normal(n)).astype("float32"), 8)
        ids = evc_prompt_ids(tok, audio.shape[0], f"say it {emotion}")
        prompts.append(prompt_embeddings(parts.llm, ids, audio, unk))
    ends = (tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|tts_eos|>"))
    return parts, tok, prompts, ends, tok.convert_tokens_to_ids("<|endoftext|>")


def test_greedy_text_is_deterministic_and_batched_rows_equal_single_rows(tmp_path):
    from esn_core.models.minicpm_generate import greedy_batch

    parts, _, prompts, ends, pad = _text_inputs(tmp_path)
    batch = greedy_batch(parts.llm, prompts, ends, pad, max_new_tokens=6)
    again = greedy_batch(parts.llm, prompts, ends, pad, max_new_tokens=6)
    assert [r.tokens for r in batch] == [r.tokens for r in again]
    for b, p in enumerate(prompts):
        (alone,) = greedy_batch(parts.llm, [p], ends, pad, max_new_tokens=6)
        assert alone.tokens == batch[b].tokens and alone.ended == batch[b].ended
        torch.testing.assert_close(alone.hidden, batch[b].hidden)
        assert batch[b].prompt_length == p.shape[0]
        fed = len(batch[b].tokens) - (0 if batch[b].ended else 1)
        assert batch[b].hidden.shape == (fed, 16) and batch[b].n_positions == p.shape[0] + fed


def test_an_end_token_stops_its_row_only(tmp_path):
    from esn_core.models.minicpm_generate import greedy_batch

    parts, _, prompts, ends, pad = _text_inputs(tmp_path)
    free = greedy_batch(parts.llm, prompts, ends, pad, max_new_tokens=6)
    # an id one row says and the others never do, declared an end token: that row stops at
    # its first occurrence (the end fed, not counted), the other rows are untouched
    r, mine = next((r, t) for r in range(3) for t in free[r].tokens
                   if all(t not in free[o].tokens for o in range(3) if o != r))
    cut = free[r].tokens.index(mine)
    stopped = greedy_batch(parts.llm, prompts, (mine,) + ends, pad, max_new_tokens=6)
    assert stopped[r].tokens == free[r].tokens[:cut] and stopped[r].ended
    assert stopped[r].n_positions == prompts[r].shape[0] + cut
    for b in [o for o in range(3) if o != r]:
        assert stopped[b].tokens == free[b].tokens and not stopped[b].ended


def test_lm_capture_counts_the_positions_the_text_pass_reports(tmp_path):
    import numpy as np

    from esn_core.hooks import Capture, HookEngine, MLPGroup, find_gated_mlps
    from esn_core.models.minicpm_generate import greedy_batch

    parts, _, prompts, ends, pad = _text_inputs(tmp_path)
    free = greedy_batch(parts.llm, prompts, ends, pad, max_new_tokens=6)
    # declare row 0's third token an end token so one row ends early and the others cap
    stop = (free[0].tokens[2],) + ends
    group = MLPGroup(find_gated_mlps(parts.llm.model.layers), root=parts.llm, eos_token_ids=stop)
    assert len(group.mlps) == 2
    engine = HookEngine({"lm": group})
    with engine.session(capture={"lm": Capture()}) as session:
        rows = greedy_batch(parts.llm, prompts, stop, pad, max_new_tokens=6)
    counts = session.counts("lm")
    assert counts.T.tolist() == [r.n_positions for r in rows]
    assert rows[0].ended and rows[0].n_positions == prompts[0].shape[0] + 2
    for b, p in enumerate(prompts):
        with engine.session(capture={"lm": Capture()}) as alone:
            greedy_batch(parts.llm, [p], stop, pad, max_new_tokens=6)
        np.testing.assert_array_equal(alone.counts("lm").K[0], counts.K[b])


@pytest.mark.parametrize("penalty", [1.02, 4.0])  # upstream's greedy setting; one that bites
def test_greedy_text_equals_transformers_generate_with_upstreams_greedy_config(tmp_path, penalty):
    """Each batched row's answer is what transformers' own ``generate`` gives that row alone
    with upstream's ``chat(do_sample=False, num_beams=1)`` settings (repetition penalty on
    the generated tokens, the prompt fed as embeddings)."""
    from esn_core.models.minicpm_generate import greedy_batch

    parts, _, prompts, ends, pad = _text_inputs(tmp_path)
    rows = greedy_batch(parts.llm, prompts, ends, pad, max_new_tokens=12, repetition_penalty=penalty)
    for b, p in enumerate(prompts):
        out = parts.llm.generate(inputs_embeds=p[None], attention_mask=torch.ones(1, p.shape[0], dtype=torch.long),
                                 do_sample=False, num_beams=1, repetition_penalty=penalty,
                                 eos_token_id=list(ends), pad_token_id=pad, max_new_tokens=12)[0].tolist()
        cut = next((i for i, t in enumerate(out) if t in ends), len(out))
        assert rows[b].tokens == out[:cut] and rows[b].ended == (cut < len(out))
    if penalty > 2:  # a penalty this strong changes what the unpenalised answers repeat
        plain = greedy_batch(parts.llm, prompts, ends, pad, max_new_tokens=12, repetition_penalty=1.0)
        assert any(len(set(r.tokens)) < len(r.tokens) for r in plain)
        assert [r.tokens for r in plain] != [r.tokens for r in rows]


def test_reading_the_stop_flag_late_changes_no_answer_or_count(tmp_path, monkeypatch):
    """The text pass learns a step late that every row ended (``late_stop``): one more step
    runs, and the answers, fed states and counts are those of the flag read every step."""
    import numpy as np

    from sync_audit import late_and_every_step

    import esn_core.models.minicpm_generate as loop
    from esn_core.hooks import Capture, HookEngine, MLPGroup, find_gated_mlps

    parts, _, prompts, ends, pad = _text_inputs(tmp_path)
    free = loop.greedy_batch(parts.llm, prompts, ends, pad, max_new_tokens=6)
    stop = tuple(r.tokens[b % 2 + 1] for b, r in enumerate(free)) + ends  # every row ends early
    engine = HookEngine({"lm": MLPGroup(find_gated_mlps(parts.llm.model.layers), root=parts.llm,
                                        eos_token_ids=stop)})

    def run():
        with engine.session(capture={"lm": Capture()}) as session:
            rows = loop.greedy_batch(parts.llm, prompts, stop, pad, max_new_tokens=6)
        return rows, session.counts("lm")

    late, every = late_and_every_step(run, parts.llm, loop, monkeypatch)
    ((late_rows, late_counts), late_forwards), ((rows, counts), forwards) = late, every
    assert all(r.ended for r in late_rows)
    for a, b in zip(late_rows, rows):
        assert (a.tokens, a.n_positions, a.ended) == (b.tokens, b.n_positions, b.ended)
        assert torch.equal(a.hidden, b.hidden)
    np.testing.assert_array_equal(late_counts.T, counts.T)
    np.testing.assert_array_equal(late_counts.K, counts.K)
    assert late_forwards == forwards + 1


def test_the_text_pass_never_waits_for_the_device_per_step(tmp_path):
    """Its stop check is read a step late (``late_stop``): 8 steps wait as often as 3."""
    from sync_audit import SyncAudit

    from esn_core.models.minicpm_generate import greedy_batch

    parts, _, prompts, _, pad = _text_inputs(tmp_path)
    sites = []
    for steps in (3, 8):
        with SyncAudit() as audit:
            rows = greedy_batch(parts.llm, prompts, (10**6,), pad, max_new_tokens=steps)  # no end
        assert [len(r.tokens) for r in rows] == [steps] * 3
        sites.append((audit.sites, audit.uploads))
    assert sites[0][0] and sites[0] == sites[1]
