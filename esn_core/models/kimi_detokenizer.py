"""Kimi-Audio's speech decoder: a flow-matching DiT over audio codes, then BigVGAN.

Our rebuild of upstream's streaming detokenizer, under the parameter names of its
``audio_detokenizer/model.pt`` (``speech_model.*`` in its ``state_dict``) and with SDPA in
place of flash-attn:

* **DiT** (``DiT``): codes (×4 upsampled to 50 Hz mel frames) are embedded and added to
  the timestep embedding as the condition ``c``; each block is adaLN-Zero (shift / scale /
  gate from ``c``), full self-attention over the current chunk and the cached keys and
  values of the chunks before it, and a plain ``fc1 → GELU(tanh) → fc2`` MLP: no gate, so
  no SPEC §1 hook site (``g = act_fn(gate_proj(x))`` does not exist here). The sincos
  position embedding counts 1, 2, ... within each call (upstream builds it from the
  non-zero position ids); RoPE, when the config enables it, uses absolute positions.
* **Chunks** (``Streaming.chunk``): each chunk starts from Gaussian noise drawn from the
  row's generator and takes ``steps - 1`` Euler steps over ``linspace(0, 1, steps)``
  (torchdyn's Euler on that span, as upstream calls it). The last ``look_ahead`` frames of a
  non-final chunk are dropped and re-generated at the start of the next one; the kept
  frames are re-encoded once at t = 0.999 and their keys/values become the prefix the next
  chunk attends to (at most ``max_kv_tokens`` of them). Past 4096 positions the prefix and
  positions restart, as upstream does.
* **Vocoder** (``Detokenizer``): BigVGAN (PyPI ``bigvgan``, its torch activations: no CUDA
  kernel) turns each chunk's mel, with the previous chunk's held-back half, into 24 kHz
  audio; consecutive pieces are cross-faded with a Hamming window; the final chunk is
  returned whole.
* **Rows together** (``Detokenizer.batch``): upstream decodes one stream per call. Here the
  rows at one chunk index share each DiT call: their non-final chunks, look-aheads and
  prefixes are equally long, so they stack as they are; shorter final chunks are padded at
  the end (their real frames keep their positions) and their padded keys masked. BigVGAN
  takes all rows' mels of a chunk index in one call, padded and refilled per layer
  (``ragged.ragged_time_axis``) when its output length is a fixed multiple of its input's,
  else one call per distinct length. Each row's noise is drawn from its own generator as
  the row alone draws it, so a row's waveform equals its decode alone up to the rounding of
  kernels run at another batch size (bit-identical in float64 on CPU; float32 measured in
  tests/test_kimi_audio.py).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from torch import nn

from esn_core.models.dit_parts import HostConstant, modulate, timestep_features
from esn_core.models.ragged import key_padding, longest_first, ragged_time_axis
from esn_core.models.weights import load_exact

FRAME_SAMPLES = 480  # 24 kHz samples per 50 Hz mel frame (upstream hard-codes it)
MAX_POSITIONS = 4096
MEL_BINS = 80


def sincos_table(n: int, dim: int) -> torch.Tensor:
    """Sinusoidal rows ``[n, dim]`` (sin half, then cos half), row 0 zero (the padding row)."""
    half = dim // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -scale)
    angles = torch.arange(n, dtype=torch.float)[:, None] * freqs[None]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(n, 1)], dim=1)
    table[0] = 0
    return table


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, features: int = 256):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.features).to(self.mlp[0].weight.dtype))


PREFIX_TIME = 0.999  # upstream's time for the pass that caches the kept frames' keys


@functools.cache
def network_timesteps(steps: int) -> HostConstant:
    """The DiT's timestep at each of ``steps - 1`` Euler points, then at ``PREFIX_TIME``: t × 1000
    truncated, in float32 as upstream computes it (on the host), sent to a device once."""
    times = torch.linspace(0, 1, steps).tolist()[:-1] + [PREFIX_TIME]
    return HostConstant((torch.tensor(times, dtype=torch.float32) * 1000).long())


class SincosPositions(nn.Module):
    """Upstream's sinusoidal embedding: positions counted over the non-zero ids of a call."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.dim = dim
        self.table = HostConstant(sincos_table(size, dim))
        # An empty persistent buffer of upstream's (its dtype/device anchor): in the state dict.
        self.register_buffer("_float_tensor", torch.FloatTensor(1))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        real = (position_ids != 0).long()
        index = torch.cumsum(real, dim=1) * real
        # A count over a row's columns never exceeds their number: the table grows by what
        # the host knows (upstream reads the largest index back from the device, a wait per
        # call). Its rows do not depend on its size, so a longer table is the same table.
        if position_ids.shape[1] >= self.table.host.shape[0]:
            self.table = HostConstant(sincos_table(position_ids.shape[1] + 1, self.dim))
        return self.table.on(position_ids.device, self._float_tensor.dtype)[index]


def rope_table(dim: int, end: int, theta: float, interpolation: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(end).float() / float(interpolation)
    return torch.polar(torch.ones(end, dim // 2), torch.outer(t, freqs))


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x``: ``[B, N, H, D]``; ``freqs``: ``[B, N, D/2]`` complex; adjacent pairs rotate."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, :, None]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None, prefix=None, mask=None):
        """Attention of ``x`` over ``prefix`` (cached ``(k, v)``) and itself; returns the
        output and this call's full ``(k, v)`` (prefix included). ``mask``: None, or
        ``[B, 1, N, P + N]`` booleans, True where a query may see a key."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if prefix is not None:
            k, v = torch.cat([prefix[0], k], dim=1), torch.cat([prefix[1], v], dim=1)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1)), (k, v)


class Mlp(nn.Module):
    """timm's plain MLP: fc1 → GELU(tanh) → fc2 (no gate)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope=None, prefix=None, mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=2)
        attended, kv = self.attn(modulate(self.norm1(x), shift1, scale1), rope, prefix, mask)
        x = x + gate1 * attended
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x, kv


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The velocity network, from the ``model.dit`` section of ``audio_detokenizer/config.yaml``."""

    def __init__(self, dit: dict):
        super().__init__()
        if dit.get("ffn_type", "conv1d_conv1d") != "vanilla_mlp":
            raise ValueError(f"DiT ffn_type {dit.get('ffn_type')!r}: only 'vanilla_mlp' exists upstream")
        hidden, heads = dit["hidden_size"], dit["num_heads"]
        self.t_embedder = TimestepEmbedder(hidden)
        # One extra row: upstream's classifier-free-guidance token.
        self.semantic_token_embedding = nn.Embedding(dit["semantic_vocab_size"] + 1, hidden)
        self.input_linear = nn.Linear(dit["input_size"], hidden)
        kind = dit["position_embedding_type"]
        if kind == "sincos":
            self.position_embedding = SincosPositions(hidden, dit["max_seq_len"] + 1)
        elif kind == "learnable":
            self.position_embedding = nn.Embedding(dit["max_seq_len"] + 1, hidden)
        elif kind == "skip":
            self.position_embedding = None
        else:
            raise ValueError(f"DiT position_embedding_type {kind!r} is not sincos/learnable/skip")
        self.rope = None
        if dit.get("use_rope", False):
            params = dit.get("rope_params", {})
            table = rope_table(hidden // heads, params.get("max_position_embeddings", 4096),
                               params.get("rope_base", 10000.0),
                               params.get("rope_interpolation_factor", 1.0))
            self.rope = HostConstant(table[: dit["max_seq_len"]])
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, dit["mlp_ratio"]) for _ in range(dit["depth"]))
        self.final_layer = FinalLayer(hidden, dit["input_size"])

    def forward(self, x, positions, t, codes, prefix=None, mask=None):
        """Velocity at ``x`` ``[B, N, 80]``; ``positions`` ``[1, N]`` (shared by the rows);
        ``prefix``: per-block cached ``(k, v)`` or None; ``mask``: see ``Attention``.
        Returns the velocity and each block's ``(k, v)`` of this call (prefix included)."""
        h = self.input_linear(x)
        if self.position_embedding is not None:
            h = h + self.position_embedding(positions).to(h.dtype)
        rope = None if self.rope is None else self.rope.on(x.device)[positions]
        c = self.t_embedder(t)[:, None] + self.semantic_token_embedding(codes)
        kvs = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, c, rope, None if prefix is None else prefix[i], mask)
            kvs.append(kv)
        return self.final_layer(h, c), kvs


class Streaming:
    """Chunked flow matching of rows at the same chunk index: the prefix keys/values, the
    positions and the look-ahead codes carried from one chunk to the next.

    Every row's non-final chunk at a given index has the same length, look-ahead and prefix
    (all of them are the kept frames of equally long earlier chunks), so those rows stack
    without padding; only final chunks are shorter. They are padded at the end and their
    padded keys masked, so the real frames keep their positions and see what they see alone.
    """

    def __init__(self, dit: DiT, steps: int = 30, look_ahead: int = 48, max_kv_tokens: int = 900):
        if steps < 2:
            raise ValueError("the detokenizer needs at least 2 Euler points (steps >= 2)")
        self.dit, self.steps, self.look_ahead, self.max_kv = dit, steps, look_ahead, max_kv_tokens
        self.prefix = None  # per block (k, v), each [rows, P, heads, head_dim]
        self.start = 0
        self.tail: torch.Tensor | None = None  # [rows, look_ahead]: the codes to redo next chunk

    def reset_positions(self) -> None:
        self.prefix, self.start = None, 0

    def _velocity(self, x, codes, point: int, mask=None):
        """The DiT at Euler point ``point`` (``self.steps - 1``: the prefix pass's time)."""
        positions = torch.arange(self.start, self.start + x.shape[1], device=x.device)[None]
        steps = network_timesteps(self.steps).on(x.device)[point:point + 1]
        return self.dit(x, positions, steps, codes, self.prefix, mask)

    def _key_mask(self, lengths: list[int], steps: int, device) -> torch.Tensor:
        """``[rows, 1, steps, P + steps]``: every prefix key, and the chunk's real keys."""
        visible = ~key_padding(torch.tensor(lengths, device=device), steps)
        if self.prefix is not None:
            cached = self.prefix[0][0].shape[1]
            visible = torch.cat([visible.new_ones(len(lengths), steps, cached), visible], dim=2)
        return visible[:, None]

    def chunk(self, codes: torch.Tensor, generator: torch.Generator, final: bool) -> torch.Tensor:
        """One row's mel frames ``[n, 80]`` of ``codes`` (50 Hz, already upsampled)."""
        return self.chunks([codes], [generator], [final])[0]

    def chunks(self, codes: list[torch.Tensor], generators: list[torch.Generator],
               finals: list[bool]) -> list[torch.Tensor]:
        """Each row's mel frames of its next chunk (``codes[b]``: 50 Hz, upsampled). The rows
        are the ones this stream carries, in its order; afterwards it carries the rows whose
        chunk was not final, in the same order."""
        rows = len(codes)
        if self.tail is not None:
            if self.tail.shape[0] != rows:
                raise ValueError(f"the stream carries {self.tail.shape[0]} rows, got {rows}")
            codes = [torch.cat([tail, c]) for tail, c in zip(self.tail, codes)]
        lengths = [int(c.shape[0]) for c in codes]
        longest = max(lengths)
        keep = [b for b in range(rows) if not finals[b]]
        if any(lengths[b] != longest for b in keep):
            raise ValueError(f"non-final chunks of {sorted({lengths[b] for b in keep})} frames "
                             f"with a longest chunk of {longest}: only final chunks may be shorter")
        device = codes[0].device
        dtype = self.dit.input_linear.weight.dtype
        x = torch.zeros(rows, longest, MEL_BINS, dtype=dtype, device=device)
        padded = torch.zeros(rows, longest, dtype=torch.long, device=device)
        for b, (row_codes, generator) in enumerate(zip(codes, generators)):
            # Drawn exactly as the row alone draws it (its own generator, its own length).
            x[b, : lengths[b]] = torch.randn(lengths[b], MEL_BINS, generator=generator,
                                             device=generator.device).to(device, dtype)
            padded[b, : lengths[b]] = row_codes
        mask = self._key_mask(lengths, longest, device) if len(set(lengths)) > 1 else None
        times = torch.linspace(0, 1, self.steps).tolist()
        kvs = None
        for point, (t0, t1) in enumerate(zip(times[:-1], times[1:])):
            v, kvs = self._velocity(x, padded, point, mask)
            x = x + (t1 - t0) * v
        ahead = self.look_ahead
        mels = [x[b, : lengths[b] if finals[b] or not ahead else longest - ahead]
                for b in range(rows)]
        if not keep:
            self.prefix, self.tail = None, None
            return mels
        kept = torch.tensor(keep, device=device)
        if ahead:
            self.tail = padded[kept, -ahead:]
            if self.prefix is not None:
                self.prefix = [(k[kept], v[kept]) for k, v in self.prefix]
            # The kept frames, nearly clean, are what the next chunk attends to.
            _, kvs = self._velocity(x[kept, :-ahead], padded[kept, :-ahead], self.steps - 1)
        else:
            kvs = [(k[kept], v[kept]) for k, v in kvs]
        self.prefix = [(k[:, -self.max_kv:], v[:, -self.max_kv:]) for k, v in kvs]
        self.start += longest - ahead
        return mels


def _replicate_padded_modules() -> tuple[type, ...]:
    """BigVGAN's resampler and low-pass filter, which pad by replicating their input's edge."""
    try:
        from bigvgan.alias_free_activation.torch.filter import LowPassFilter1d
        from bigvgan.alias_free_activation.torch.resample import UpSample1d
    except ImportError:
        return ()
    return (UpSample1d, LowPassFilter1d)


class Detokenizer:
    """Audio codes → 24 kHz waveform, as upstream's ``detokenize_audio`` chunks them.

    ``batch`` decodes many rows together, each row's waveform as its decode alone: row
    ``b``'s noise comes from ``generators[b]`` in the order and shapes the row alone draws
    it, rows at the same chunk index share one DiT call per Euler step, and the vocoder runs
    once per chunk index on all rows' mels: padded and masked (``ragged_time_axis``) when
    its output length is proportional to its input (``vocoder_ragged``), otherwise one call
    per distinct mel length. ``__call__`` is the batch of one.
    """

    def __init__(self, dit: DiT, vocoder: nn.Module, chunk_tokens: int = 30, upsample: int = 4,
                 look_ahead_tokens: int = 12, steps: int = 30, max_kv_tokens: int = 900,
                 max_rows: int | None = None, vocoder_ragged: bool = True):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"detokenizer max_rows must be >= 1 or None, got {max_rows}")
        self.dit, self.vocoder = dit, vocoder
        self.chunk_tokens, self.upsample = chunk_tokens, upsample
        self.look_ahead = look_ahead_tokens * upsample
        self.steps, self.max_kv = steps, max_kv_tokens
        self.max_rows = max_rows
        self.vocoder_ragged = vocoder_ragged
        self._proportional: bool | None = None

    def __call__(self, codes: list[int], generator: torch.Generator) -> torch.Tensor:
        return self.batch([codes], [generator])[0]

    @torch.no_grad()
    def batch(self, codes_per_row: list[list[int]], generators: list[torch.Generator],
              max_rows: int | None = None) -> list[torch.Tensor]:
        """Each row's float32 waveform (empty for a row without codes); calls of at most
        ``max_rows`` rows (default: the detokenizer's, else all), longest rows together."""
        if len(codes_per_row) != len(generators):
            raise ValueError(f"{len(codes_per_row)} rows of codes but {len(generators)} generators")
        limit = max_rows or self.max_rows
        if limit is not None and limit < 1:
            raise ValueError(f"detokenizer max_rows must be >= 1, got {limit}")
        waves: list[torch.Tensor | None] = [torch.zeros(0) if not c else None for c in codes_per_row]
        coded = [i for i, c in enumerate(codes_per_row) if c]
        for members in longest_first([len(codes_per_row[i]) for i in coded], limit):
            group = [coded[j] for j in members]
            decoded = self._decode([list(codes_per_row[i]) for i in group],
                                   [generators[i] for i in group])
            for i, wave in zip(group, decoded):
                waves[i] = wave
        return waves

    def _decode(self, codes: list[list[int]], generators: list[torch.Generator]) -> list[torch.Tensor]:
        device = self.dit.input_linear.weight.device
        rows = [torch.tensor(c, dtype=torch.long, device=device) for c in codes]
        n_chunks = [-(-len(c) // self.chunk_tokens) for c in codes]
        stream = Streaming(self.dit, self.steps, self.look_ahead, self.max_kv)
        pieces: list[list[torch.Tensor]] = [[] for _ in rows]
        hand_over = [(None, None)] * len(rows)  # each row's (pre_mel, pre_wav)
        active = list(range(len(rows)))  # the rows the stream carries, in its order
        index = 0
        while active:
            finals = [index == n_chunks[r] - 1 for r in active]
            span = slice(index * self.chunk_tokens, (index + 1) * self.chunk_tokens)
            chunks = [rows[r][span].repeat_interleave(self.upsample) for r in active]
            mels = stream.chunks(chunks, [generators[r] for r in active], finals)
            waves = self._waves([self._vocoder_input(mel, hand_over[r][0])
                                 for r, mel in zip(active, mels)])
            for r, mel, wav, final in zip(active, mels, waves, finals):
                piece, pre_mel, pre_wav = self._hand_over(wav, mel, *hand_over[r], final)
                pieces[r].append(piece)
                hand_over[r] = (pre_mel, pre_wav)
            carried = [b for b, final in enumerate(finals) if not final]
            if carried:
                n = mels[carried[0]].shape[0]  # every carried row kept this many frames
                if stream.start + 2 * n > MAX_POSITIONS:
                    stream.reset_positions()
            active = [active[b] for b in carried]
            index += 1
        return [torch.cat(p).float() for p in pieces]

    # -- vocoder ---------------------------------------------------------------------------
    def _wave(self, mel: torch.Tensor) -> torch.Tensor:
        return self._waves([mel])[0]

    def _vocoder_is_proportional(self) -> bool:
        """Whether the vocoder's output length is a fixed multiple of its input's (then
        ``ragged_time_axis`` can batch mels of different lengths); checked once."""
        if self._proportional is None:
            weight = next(self.vocoder.parameters())
            one, two = (self.vocoder(torch.zeros(1, MEL_BINS, n, device=weight.device,
                                                 dtype=weight.dtype)).shape[-1] for n in (1, 2))
            self._proportional = two == 2 * one
        return self._proportional

    def _waves(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The vocoder's waveform of each mel ``[n_b, 80]``, as if each ran alone."""
        weight = next(self.vocoder.parameters())
        lengths = [int(m.shape[0]) for m in mels]
        if len(set(lengths)) == 1:
            stacked = torch.stack(mels).transpose(1, 2).to(weight.dtype)
            return list(self.vocoder(stacked)[:, 0])
        if self.vocoder_ragged and self._vocoder_is_proportional():
            longest = max(lengths)
            padded = mels[0].new_zeros(len(mels), MEL_BINS, longest, dtype=weight.dtype)
            for b, mel in enumerate(mels):
                padded[b, :, : lengths[b]] = mel.T
            with ragged_time_axis(self.vocoder, lengths, _replicate_padded_modules()):
                out = self.vocoder(padded)[:, 0]
            per_frame = out.shape[1] // longest
            return [out[b, : n * per_frame] for b, n in enumerate(lengths)]
        waves: list[torch.Tensor | None] = [None] * len(mels)
        for n in sorted(set(lengths)):
            same = [b for b, m in enumerate(lengths) if m == n]
            for b, wave in zip(same, self._waves([mels[b] for b in same])):
                waves[b] = wave
        return waves

    @staticmethod
    def _vocoder_input(mel: torch.Tensor, pre_mel: torch.Tensor | None) -> torch.Tensor:
        return mel if pre_mel is None else torch.cat([pre_mel, mel])

    def _vocode(self, mel, pre_mel, pre_wav, final):
        """One row's chunk through the vocoder and the hand-over (``_hand_over``)."""
        return self._hand_over(self._wave(self._vocoder_input(mel, pre_mel)), mel, pre_mel,
                               pre_wav, final)

    @staticmethod
    def _hand_over(wav, mel, pre_mel, pre_wav, final):
        """Upstream's hand-over between chunks: the first returns half its audio and keeps
        the rest; later ones re-vocode the kept mel with the new one and cross-fade."""
        n = mel.shape[0]
        if pre_mel is None:
            if final:
                return wav, None, None
            half = FRAME_SAMPLES * n // 2
            return wav[:half], mel[(-n) // 2:], wav[-half:]
        if final:
            return wav, None, None
        kept = pre_wav.shape[0]
        out_len = 2 * kept if wav.shape[0] > 2 * kept else wav.shape[0] // 2
        out = wav[:out_len].clone()
        window = torch.hamming_window(out_len, device=wav.device, dtype=wav.dtype)
        h = out_len // 2
        out[:h] = pre_wav[:h] * window[-h:] + out[:h] * window[:h]
        rest = wav.shape[0] - out_len
        return out, mel[-(rest // FRAME_SAMPLES):], wav[-rest:]

# --------------------------------------------------------------------------- loading


def load_dit(directory: Path, device, dtype) -> DiT:
    """``audio_detokenizer/config.yaml`` + ``model.pt`` (``state_dict`` → ``speech_model.*``)."""
    import yaml

    config = yaml.safe_load((directory / "config.yaml").read_text())
    try:
        dit_config = config["model"]["dit"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{directory / 'config.yaml'} has no model.dit section") from err
    if config.get("normalize_mel"):
        raise ValueError(f"{directory / 'config.yaml'}: normalize_mel is on; upstream's released "
                         "detokenizer has it off and this rebuild does not apply mel statistics")
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k[len("speech_model."):]: v for k, v in state.items() if k.startswith("speech_model.")}
    dit = DiT(dit_config)
    load_exact(dit, state, str(directory / "model.pt"))
    return dit.to(device=device, dtype=dtype).eval()


def load_vocoder(directory: Path, device, dtype) -> nn.Module:
    """``vocoder/config.json`` + ``model.pt`` (``generator``) into PyPI's BigVGAN, CPU-safe."""
    try:
        from bigvgan.bigvgan import BigVGAN
        from bigvgan.env import AttrDict
    except ImportError as err:
        raise ImportError(f"Kimi-Audio's vocoder needs PyPI's bigvgan ({err}): "
                          "pip install --no-deps bigvgan==2.4.1 (scripts/install.sh does)") from err

    h = AttrDict(json.loads((directory / "config.json").read_text()))
    if int(math.prod(h.upsample_rates)) != FRAME_SAMPLES:
        raise ValueError(f"{directory / 'config.json'}: upsample_rates multiply to "
                         f"{math.prod(h.upsample_rates)}, the detokenizer's frames are {FRAME_SAMPLES}")
    vocoder = BigVGAN(h, use_cuda_kernel=False)
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    load_exact(vocoder, state.get("generator", state), str(directory / "model.pt"))
    vocoder.remove_weight_norm()
    return vocoder.to(device=device, dtype=dtype).eval()
