"""MiniCPM-o 4.5's text pass, batched: the EVC prompt's embeddings (audio placeholders
replaced by the source's audio embeddings) into stock ``Qwen3ForCausalLM``, greedy decoding
as upstream's ``chat(do_sample=False, num_beams=1)`` configures it (``prepare_generation_config``
of OpenBMB's 4.5 code): argmax after transformers' repetition penalty of 1.02 on the tokens
generated so far (the prompt is embeddings, so it is not penalised). Without ``num_beams=1``
upstream silently uses 3 beams (and a penalty of 1.2).

Rows are left-padded; a 2-D mask and per-row positions make a row's tokens equal to the row
run alone. Prefill feeds ``inputs_embeds``; decode steps feed the chosen ``input_ids`` so a
hook root on the LM sees fed end tokens. A row that ended keeps feeding its end token (the
hooks then count none of its later positions). The last layer's hidden state of every fed
answer token is kept: the TTS is conditioned on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esn_core.models.cache_keyword import cache_keyword
from esn_core.models.late_stop import LateFlag

# Upstream's greedy setting (do_sample=False, num_beams=1).
GREEDY_REPETITION_PENALTY = 1.02


@dataclass
class TextRow:
    tokens: list[int]  # answer ids up to (not including) the end token
    hidden: torch.Tensor  # [fed answer tokens, H] last-layer states where they were fed
    prompt_length: int
    ended: bool  # stopped at an end token (False: the length cap)

    @property
    def n_positions(self) -> int:
        """SPEC §1's T for the LM: the prompt plus every token fed back (an end token
        reached is fed once; at the cap the last answer token is not fed)."""
        return self.prompt_length + len(self.tokens) - (0 if self.ended else 1)


def prompt_embeddings(llm, ids: list[int], audio: torch.Tensor, placeholder: int) -> torch.Tensor:
    """``[len(ids), H]``: token embeddings with each run of ``placeholder`` ids replaced, in
    order, by the rows of ``audio`` (the prompt holds the source twice: reference + input)."""
    ids_t = torch.tensor(ids, device=llm.device)
    embeds = llm.get_input_embeddings()(ids_t).clone()
    where = torch.nonzero(ids_t == placeholder).flatten()
    if where.numel() % audio.shape[0]:
        raise ValueError(f"{where.numel()} audio placeholders for {audio.shape[0]} audio "
                         "embeddings per copy of the source")
    embeds[where] = audio.to(embeds.dtype).repeat(where.numel() // audio.shape[0], 1)
    return embeds


@torch.no_grad()
def greedy_batch(llm, prompts: list[torch.Tensor], end_ids: tuple[int, ...], pad_id: int,
                 max_new_tokens: int,
                 repetition_penalty: float = GREEDY_REPETITION_PENALTY) -> list[TextRow]:
    """Greedy answers of left-padded ``prompts`` (each ``[L_b, H]`` embeddings); a token a
    row has generated has its logit divided by ``repetition_penalty`` (multiplied if negative)."""
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    rows, width = len(prompts), max(p.shape[0] for p in prompts)
    hidden_size = prompts[0].shape[1]
    embeds = prompts[0].new_zeros(rows, width, hidden_size)
    mask = torch.zeros(rows, width, dtype=torch.long, device=embeds.device)
    for b, p in enumerate(prompts):
        embeds[b, width - p.shape[0]:] = p
        mask[b, width - p.shape[0]:] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache()
    # Only the last position's logits are read, and no prefill state conditions the TTS
    # (an answer token's state is taken where it is fed): at batch 256 the full logits and
    # every layer's states would each hold ~10 GB.
    cache_kw = {cache_keyword(llm): cache}
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
              use_cache=True, logits_to_keep=1, **cache_kw)
    # The loop's state lives on the device, and "has every row ended?" is read one step late
    # (late_stop.LateFlag): the host never waits for a step. In the one extra step after the
    # last row ends every row feeds an end token and keeps nothing.
    device = embeds.device
    late = LateFlag(device)
    ends = torch.tensor(end_ids, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    ended = torch.zeros_like(done)
    picks, kept, states = [], [], []  # per step: [B] ids, [B] answer tokens, [B, H] fed states
    seen = None  # [B, V] bool: tokens each row has generated
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # as generate scores them
        if seen is None:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        elif repetition_penalty != 1.0:
            penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
            logits = torch.where(seen, penalised, logits)
        picked = logits.argmax(dim=-1)
        seen[torch.arange(rows, device=seen.device), picked] = True
        stops = ~done & torch.isin(picked, ends)
        answer = ~done & ~stops  # a live row's token that is not an end token
        picks.append(picked)
        kept.append(answer)
        # A row that ended feeds the first end token from then on (the hooks count none of it).
        feed = torch.where(done, ends[0], picked)
        ended |= stops
        done |= stops
        if step == max_new_tokens - 1 or late.push(done.all()):
            break  # nothing left to feed; at the cap the last token is kept, not fed
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = llm(input_ids=feed[:, None], attention_mask=mask, position_ids=positions,
                  use_cache=True, output_hidden_states=True, **cache_kw)
        states.append(out.hidden_states[-1][:, -1])  # the state where this step's token was fed
    # to the host once, after the loop
    picks, kept = torch.stack(picks, 1).tolist(), torch.stack(kept, 1).tolist()
    fed = torch.stack(states, 1) if states else embeds.new_zeros(rows, 0, hidden_size)
    ended = ended.tolist()
    out_rows = []
    for b in range(rows):
        answer = [t for t, k in zip(picks[b], kept[b]) if k]
        # An answer token is fed (and has a state) unless it was the cap's last pick.
        steps = [i for i, k in enumerate(kept[b][: fed.shape[1]]) if k]
        out_rows.append(TextRow(answer, fed[b, steps], int(prompts[b].shape[0]), ended[b]))
    return out_rows
