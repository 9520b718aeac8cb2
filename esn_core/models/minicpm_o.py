"""MiniCPM-o 4.5 behind the adapter interface (issue 13).

One ``convert`` call: each source encoded alone (Whisper audio-in), the voice-cloning EVC
prompt, the greedy text pass of all rows at once (``minicpm_generate``), each answer's TTS
condition (``minicpm_tts_condition``), the speech codes of all rows at once
(``minicpm_speech_codes``), then the vocoder, each row with its own source as the prompt wav
and its own seed, in calls of up to ``vocoder_batch_size`` rows (``MiniCPMVocoder.batch``:
padded rows, each as if alone; 1 = the per-row path, one ``vocoder(codes, seed, wav)`` call
per row); its 24 kHz speech is resampled to 16 kHz. ``overlap_speech``: the workflow runs a
batch's vocoder on a worker thread (its own CUDA stream) while the next batch's text and
codes decode (``begin_convert``, ``speech_overlap``); the outputs are the same.

Groups: ``lm`` = the Qwen3 decoder's gated MLPs, rooted at the LM (it is fed the chosen ids
at decode steps); ``synth`` = ``tts.model``'s gated MLPs, rooted at the adapter-owned
``SynthStep`` (fed codes, the end code for finished rows). ``n_positions`` is the LM's T
(SPEC §1: the group the workflow reports for ``lm``); the synth T is kept per row in
``last_synth_positions`` for callers that need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from esn_core.hooks import MLPGroup, find_gated_mlps
from esn_core.models.audio import load_source, to_16k
from esn_core.models.base import EVCOutput, EVCRequest, LALMAdapter, check_template
from esn_core.models.decode_attention import use_packed_decode_attention
from esn_core.models.minicpm_speech_codes import CodeSampling, SynthStep, generate_codes
from esn_core.models.minicpm_tts_condition import tts_condition
from esn_core.models.speech_overlap import StreamHandoff
from esn_core.option_values import check_arguments

INSTRUCTION_TEMPLATE = "Repeat exactly the words spoken in this audio with the emotion {emotion}."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# What the annotations cannot say: option -> (min, max), inclusive. The config pre-check reads
# this literal from the source (esn_core.option_values); the constructor checks it too.
# max_new_tokens: the text answer's cap; vocoder_steps: Euler steps of the vocoder's flow;
# vocoder_batch_size: rows per vocoder call (1: one call per row).
OPTION_RANGES = {"max_new_tokens": (1, None), "vocoder_steps": (1, None), "vocoder_batch_size": (1, None)}
# Options given as a mapping of a dataclass's fields: option -> (module, class, its ranges'
# literal); the pre-check reads the fields and ranges from the source.
OPTION_MAPPINGS = {"sampling": ("esn_core.models.minicpm_speech_codes", "CodeSampling", "SAMPLING_RANGES")}


class MiniCPMOAdapter(LALMAdapter):
    name = "minicpm_o_4_5"

    def __init__(self, path: str | os.PathLike, device: str = "cpu",
                 dtype: Literal["float32", "bfloat16", "float64"] = "float32", max_new_tokens: int = 256,
                 sampling: CodeSampling | dict = CodeSampling(), instruction_template: str | None = None,
                 vocoder=None, vocoder_steps: int = 10, vocoder_batch_size: int = 16,
                 overlap_speech: bool = False):
        from esn_core.models.minicpm_checkpoint import load_checkpoint, load_tokenizer

        check_arguments(MiniCPMOAdapter.__init__, OPTION_RANGES, locals())  # before the slow loads
        path = Path(path)
        if isinstance(sampling, dict):  # a config file's options.sampling mapping
            unknown = set(sampling) - set(CodeSampling.__dataclass_fields__)
            if unknown:
                raise ValueError(f"model.options.sampling: unknown keys {sorted(unknown)}")
            sampling = CodeSampling(**sampling)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        parts = load_checkpoint(path, dtype=DTYPES[dtype])
        if vocoder is None:
            from esn_core.models.minicpm_vocoder import load_vocoder

            vocoder = load_vocoder(path, device, vocoder_steps)
        self._attach(parts, load_tokenizer(path), vocoder, torch.device(device),
                     max_new_tokens, sampling, instruction_template, vocoder_batch_size)
        self.overlap_speech = bool(overlap_speech)

    def _attach(self, parts, tokenizer, vocoder, device, max_new_tokens, sampling, template,
                vocoder_batch_size: int = 16):
        check_arguments(MiniCPMOAdapter.__init__, OPTION_RANGES,
                        dict(max_new_tokens=max_new_tokens, vocoder_batch_size=vocoder_batch_size))
        self.vocoder_batch_size = int(vocoder_batch_size)
        self.device = torch.device(device)
        self.parts, self.tokenizer, self.vocoder = parts, tokenizer, vocoder
        self.llm, self.tts = parts.llm.to(device).eval(), parts.tts.to(device).eval()
        use_packed_decode_attention(self.llm)  # decode steps read the KV cache unexpanded
        self.audio_in = parts.audio_in.to(device).eval()
        self.step = SynthStep(self.tts)
        self.max_new_tokens, self.sampling = int(max_new_tokens), sampling
        self.instruction_template = check_template(template or INSTRUCTION_TEMPLATE)
        ids = tokenizer.convert_tokens_to_ids
        self.placeholder, self.pad = ids("<unk>"), ids("<|endoftext|>")
        self.end_ids = (ids("<|tts_eos|>"), ids("<|im_end|>"))
        end_code = self.tts.emb_code[0].num_embeddings - 1
        self._groups = {
            "lm": MLPGroup(find_gated_mlps(self.llm.model.layers), root=self.llm,
                           eos_token_ids=self.end_ids),
            "synth": MLPGroup(find_gated_mlps(self.tts.model.layers), root=self.step,
                              eos_token_ids=(end_code,)),
        }
        self.last_synth_positions: list[int] = []
        self.last_codes: list[torch.Tensor] = []

    def groups(self) -> dict[str, MLPGroup]:
        return dict(self._groups)

    def instruction(self, target_emotion: str) -> str:
        return self.instruction_template.format(emotion=target_emotion)

    def convert(self, requests: list[EVCRequest]) -> list[EVCOutput]:
        return self.begin_convert(requests)()

    @torch.no_grad()
    def begin_convert(self, requests: list[EVCRequest]):
        """Prompts, text and speech codes now; the returned function vocodes them
        (``_vocode``) and returns ``convert``'s outputs."""
        from esn_core.models.minicpm_generate import greedy_batch, prompt_embeddings
        from esn_core.models.minicpm_prompt import encode_source, evc_prompt_ids

        if not requests:
            return lambda: []
        mel_bins = int(self.parts.config["audio_config"]["num_mel_bins"])
        prompts, sources = [], []
        for r in requests:
            audio = load_source(r.source_path)
            if audio.size == 0:
                raise ValueError(f"source audio {r.source_path} is empty")
            embeds = encode_source(self.audio_in, audio, mel_bins)
            ids = evc_prompt_ids(self.tokenizer, embeds.shape[0], self.instruction(r.target_emotion))
            prompts.append(prompt_embeddings(self.llm, ids, embeds, self.placeholder))
            sources.append(audio)
        texts = greedy_batch(self.llm, prompts, self.end_ids, self.pad, self.max_new_tokens)
        conditions = [tts_condition(self.tts, t.tokens[:t.hidden.shape[0]], t.hidden)
                      for t in texts]
        codes = generate_codes(self.step, conditions, [r.seed for r in requests], self.sampling)
        self.last_synth_positions = [c.n_positions for c in codes]
        self.last_codes = [c.codes for c in codes]
        code_rows = [c.codes[:, 0].tolist() for c in codes]
        handoff = StreamHandoff(self.device, self.vocoder, self.overlap_speech)

        @torch.no_grad()  # on the worker thread too (grad mode is per thread)
        def finish() -> list[EVCOutput]:
            with handoff:
                waves = self._vocode(code_rows, [r.seed for r in requests], sources)
            return [EVCOutput(r.attempt_id, self.tokenizer.decode(t.tokens), to_16k(wave, rate), 16_000,
                              t.n_positions) for r, t, (wave, rate) in zip(requests, texts, waves)]

        return finish

    def _vocode(self, codes: list[list[int]], seeds: list[int], sources: list) -> list[tuple]:
        """Each row's (wave, rate): batched calls, or one call per row at batch size 1."""
        if self.vocoder_batch_size == 1:
            return [self.vocoder(c, seed, src) for c, seed, src in zip(codes, seeds, sources)]
        waves = self.vocoder.batch(codes, seeds, sources, max_rows=self.vocoder_batch_size)
        return [(wave, self.vocoder.sample_rate) for wave in waves]
