import pytest
import torch

from esn_core.models.minicpm_tts import MiniCPMTTS
from esn_core.models.minicpm_tts_condition import tts_condition
from tests.tiny_minicpm import TINY_CONFIG


@pytest.mark.parametrize("normalize", [False, True])
def test_condition_is_text_plus_projected_state_then_text_eos_and_audio_bos(normalize):
    torch.manual_seed(0)
    cfg = dict(TINY_CONFIG["tts_config"], num_text_tokens=13, text_eos_token_id=11, audio_bos_token_id=12,
               normalize_projected_hidden=normalize)
    tts = MiniCPMTTS(cfg).eval()
    hidden = torch.randn(3, 16)
    with torch.no_grad():
        got = tts_condition(tts, [4, 0, 7], hidden)
        proj = tts.projector_semantic(hidden)
        if normalize:
            proj = proj / proj.norm(dim=-1, keepdim=True)
        w = tts.emb_text.weight
        expected = torch.cat([w[[4, 0, 7]] + proj, w[[11, 12]]])
    assert got.shape == (5, 8)
    torch.testing.assert_close(got, expected)
    if normalize:
        assert torch.allclose((got[:3] - w[[4, 0, 7]]).norm(dim=-1), torch.ones(3))


def test_empty_answer_is_just_the_two_boundary_embeddings():
    cfg = dict(TINY_CONFIG["tts_config"], text_eos_token_id=1, audio_bos_token_id=2)
    tts = MiniCPMTTS(cfg)
    with torch.no_grad():
        got = tts_condition(tts, [], torch.zeros(0, 16))
    assert torch.equal(got, tts.emb_text.weight[[1, 2]])


def test_bad_inputs_are_named():
    tts = MiniCPMTTS(dict(TINY_CONFIG["tts_config"], num_text_tokens=13))
    with pytest.raises(ValueError, match="2 hidden states"):
        tts_condition(tts, [1, 2, 3], torch.zeros(2, 16))
    with pytest.raises(ValueError, match="num_text_tokens=13"):
        tts_condition(tts, [40], torch.zeros(1, 16))
