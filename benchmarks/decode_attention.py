"""One decode step's attention at the three LALMs' shapes: the KV cache expanded per query
head (what transformers 5.17's SDPA does whenever a mask is passed) against the packed
step the adapters now use (``esn_core/models/decode_attention.py``), side by side.

    python3 benchmarks/decode_attention.py --device cuda --batches 1 64 256 --lengths 256 768
    python3 benchmarks/decode_attention.py --tiny            # CPU smoke test

Per model shape (query heads / key-value heads / head dim, layers), batch and cached length:
one layer's attention call (query ``[B, H, 1, D]``, the cache ``[B, H_kv, L, D]`` in bf16,
each row's keys real up to its own length between L/2 and L, the rest masked as a static
cache's unwritten tail is), device time per call as the median of ``--repeats``, and that
times the model's layers: the attention part of one decode step. ``installed`` is whatever
this transformers' own ``sdpa`` function does with the same call (5.17: expanded). The
expanded path is written out here (``repeat_interleave`` then SDPA), so the comparison
does not depend on the installed version. ``max diff``: largest absolute difference
between the packed and the expanded outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # esn_core without an install

from esn_core.models.decode_attention import packed_decode_attention  # noqa: E402

# name: (query heads, key/value heads, head dim, layers) as each model's config says
SHAPES = {
    "qwen-thinker": (28, 4, 128, 28),  # Qwen2.5-Omni-7B thinker
    "qwen-talker": (12, 4, 128, 24),   # Qwen2.5-Omni-7B talker
    "kimi": (28, 4, 128, 34),          # Kimi-Audio-7B: 28 main + 6 MIMO layers
    "minicpm": (32, 8, 128, 36),       # MiniCPM-o 4.5's Qwen3-8B
}
TINY = {"tiny": (4, 2, 8, 2)}


class _Layer(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def expanded(layer, query, key, value, mask, scaling):
    """transformers 5.17's masked path: key/value heads copied once per query head."""
    groups = layer.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def packed(layer, query, key, value, mask, scaling):
    return packed_decode_attention(layer, query, key, value, mask, scaling=scaling)


def installed(layer, query, key, value, mask, scaling):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](layer, query, key, value, mask, scaling=scaling)


def timed(function, args, repeats: int, device: str) -> float:
    """Median milliseconds of one call (device time on CUDA)."""
    function(*args)  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            function(*args)
            times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def operands(heads, kv_heads, dim, batch, length, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=g, device=device, dtype=dtype)
    key = torch.randn(batch, kv_heads, length, dim, generator=g, device=device, dtype=dtype)
    value = torch.randn(batch, kv_heads, length, dim, generator=g, device=device, dtype=dtype)
    real = torch.randint(length // 2, length + 1, (batch, 1), generator=g, device=device)
    mask = (torch.arange(length, device=device)[None, :] < real)[:, None, None, :]
    return query, key, value, mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: a smoke test")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="cached positions")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY if args.tiny else {m: SHAPES[m] for m in (args.models or SHAPES)}
    batches = args.batches or ([2] if args.tiny else [1, 64, 256])
    lengths = args.lengths or ([16] if args.tiny else [256, 768])
    repeats = args.repeats or (3 if args.tiny else 20)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    import transformers

    print(f"# decode-step attention on {name}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {dtype}; median of {repeats}")
    print(f"# {' '.join(sys.argv)}")
    print("| model | batch | cached | expanded ms/layer | packed ms/layer | speed-up | installed ms/layer "
          "| expanded ms/step | packed ms/step | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    with torch.no_grad():
        for model, (heads, kv_heads, dim, layers) in shapes.items():
            layer = _Layer(heads // kv_heads)
            for batch in batches:
                for length in lengths:
                    q, k, v, mask = operands(heads, kv_heads, dim, batch, length, dtype, device)
                    call = (layer, q, k, v, mask, dim ** -0.5)
                    try:
                        ms = {path: timed(fn, call, repeats, device)
                              for path, fn in (("expanded", expanded), ("packed", packed),
                                               ("installed", installed))}
                    except torch.OutOfMemoryError:
                        print(f"| {model} | {batch} | {length} | OOM | | | | | | |")
                        continue
                    diff = float((packed(*call)[0].float()
                                  - expanded(*call)[0].float()).abs().max())
                    print(f"| {model} | {batch} | {length} | {ms['expanded']:.4f} | {ms['packed']:.4f} | "
                          f"{ms['expanded'] / ms['packed']:.2f}x | {ms['installed']:.4f} | "
                          f"{ms['expanded'] * layers:.3f} | {ms['packed'] * layers:.3f} | {diff:.2e} |",
                          flush=True)
                    results.append({"model": model, "batch": batch, "cached": length, "layers": layers,
                                    **{f"{p}_ms": t for p, t in ms.items()}, "max_diff": diff})
                    del q, k, v, mask
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "argv": sys.argv, "torch": torch.__version__,
                       "transformers": transformers.__version__, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
