"""Neuron selectors (SPEC §4-5): LAP, LAPE, MAD, CAS and random, as pure array functions.

Input is an :class:`ActivationProbabilities` (emotions, ``P`` of shape ``[n_emotions, N]``,
the group's :class:`~esn_core.layout.NeuronLayout`); output is one :class:`Mask` per
requested emotion: flat neuron indices in rank order with their scores.

Conventions shared by every selector (SPEC §5):

- ``N_sel = floor(r · N)`` over all hooked layers jointly. ``r`` is read as the decimal the
  user wrote (``Fraction(repr(r))``), so ``r = 0.29`` with ``N = 100`` gives 29, not the 28
  that ``floor(0.29 * 100)`` gives in binary floating point.
- Ranking is by descending score; equal scores are ordered by the lower flat index
  (stable), so masks are deterministic.
- The cross-emotion statistics of LAPE, MAD and CAS run over *all* emotions present in the
  ``ActivationProbabilities``; choose the participants with
  :meth:`ActivationProbabilities.subset` (SPEC default: the four targets only).
- Emotions whose success set is empty are never turned into zero rows: they are excluded
  when the probabilities are built, listed in ``excluded``, and asking for their mask is a
  ``ValueError`` naming the emotion.

Scores stored in a mask: LAP and LAPE ``P^(e)``; MAD ``|P^(e) − P̄|``; CAS the margin
``Δ``; random ``0.0`` for every neuron (a random mask has no score; 0.0 keeps the Parquet
column finite, and its rank order is then ascending flat index, the tie-break order).

Random seeds: emotion ``e`` draws from ``numpy.random.SeedSequence(entropy=[seed,
EMOTIONS.index(e)])``, so each emotion's mask depends only on the global seed and its own
name, never on which other emotions are requested.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from esn_core.constants import EMOTIONS, TARGETS
from esn_core.io import SCHEMAS
from esn_core.layout import NeuronLayout

SELECTORS: tuple[str, ...] = ("lap", "lape", "mad", "cas", "random")
CROSS_EMOTION_SELECTORS: tuple[str, ...] = ("lape", "mad", "cas")

DEFAULT_LAPE_PERCENTILE = 95.0

# Schema-metadata key of a masks table: selector, layout and per-emotion requested/actual
# sizes. It lets an empty mask (zero rows) and the requested N_sel survive a round trip.
MASKS_METADATA_KEY = b"esn.masks"


# --------------------------------------------------------------------------- inputs


def _check_emotion_names(names: Iterable[str], what: str) -> None:
    for name in names:
        if name not in EMOTIONS:
            raise ValueError(f"{what}: unknown emotion {name!r}; known: {list(EMOTIONS)}")


@dataclass(frozen=True)
class ActivationProbabilities:
    """``P^(e)[l, n]`` for the emotions that have a success set (SPEC §4).

    Rows are stored in ``EMOTIONS`` order whatever order the caller used (CAS breaks
    argmax ties by that order); read a row with :meth:`row`. ``excluded`` lists emotions
    dropped upstream for an empty success set, so that asking for them can be refused
    with a reason.
    """

    emotions: tuple[str, ...]
    P: np.ndarray
    layout: NeuronLayout
    excluded: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        emotions = tuple(self.emotions)
        excluded = tuple(self.excluded)
        _check_emotion_names(emotions, "ActivationProbabilities.emotions")
        _check_emotion_names(excluded, "ActivationProbabilities.excluded")
        if len(set(emotions)) != len(emotions):
            raise ValueError(f"ActivationProbabilities.emotions has duplicates: {emotions}")
        both = sorted(set(emotions) & set(excluded))
        if both:
            raise ValueError(f"emotions {both} are listed both as present and as excluded")
        P = np.array(self.P, dtype=np.float64)  # a private copy: the object is immutable
        want = (len(emotions), self.layout.n_neurons)
        if P.shape != want:
            raise ValueError(f"P has shape {P.shape}, expected [n_emotions, N] = {want}")
        for emotion, row in zip(emotions, P):
            _check_probability_row(emotion, row)
        order = sorted(range(len(emotions)), key=lambda i: EMOTIONS.index(emotions[i]))
        P = P[order]
        P.setflags(write=False)
        object.__setattr__(self, "emotions", tuple(emotions[i] for i in order))
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "excluded", tuple(sorted(set(excluded), key=EMOTIONS.index)))

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, tuple[np.ndarray, int]], layout: NeuronLayout
    ) -> tuple["ActivationProbabilities", list[str]]:
        """Build ``P = K / T`` from ``{emotion: (K vector, T)}`` summed over a success set.

        Emotions with ``T == 0`` (empty success set) are dropped and returned, in
        ``EMOTIONS`` order, as the second element; they are also kept in ``excluded``.
        """
        _check_emotion_names(counts, "counts")
        present: list[str] = []
        rows: list[np.ndarray] = []
        excluded: list[str] = []
        for emotion in sorted(counts, key=EMOTIONS.index):
            K, T = counts[emotion]
            K, T = _checked_counts(emotion, K, T, layout.n_neurons)
            if T == 0:
                excluded.append(emotion)
                continue
            present.append(emotion)
            rows.append(K.astype(np.float64) / T)
        if not present:
            raise ValueError(f"no emotion has a non-empty success set (all excluded: {excluded})")
        probs = cls(tuple(present), np.stack(rows), layout, tuple(excluded))
        return probs, excluded

    @property
    def n_neurons(self) -> int:
        return self.layout.n_neurons

    def require(self, emotion: str) -> int:
        """Row index of ``emotion``; a ValueError that says why if it has no row."""
        if emotion in self.emotions:
            return self.emotions.index(emotion)
        if emotion in self.excluded:
            raise ValueError(
                f"emotion {emotion!r} was excluded from selection: its success set is empty"
            )
        raise ValueError(
            f"emotion {emotion!r} has no activation probabilities; present: {list(self.emotions)}"
        )

    def row(self, emotion: str) -> np.ndarray:
        return self.P[self.require(emotion)]

    def subset(self, emotions: Sequence[str]) -> "ActivationProbabilities":
        """Only the named emotions (the participants of cross-emotion statistics)."""
        rows = [self.require(e) for e in emotions]
        return ActivationProbabilities(
            tuple(emotions), self.P[rows], self.layout, self.excluded
        )


def _check_probability_row(emotion: str, row: np.ndarray) -> None:
    if np.isnan(row).any():
        raise ValueError(
            f"P for emotion {emotion!r} contains NaN; an emotion with an empty success set "
            "must be excluded (ActivationProbabilities.from_counts does this), not passed"
        )
    if (row < 0).any() or (row > 1).any():
        raise ValueError(
            f"P for emotion {emotion!r} has values outside [0, 1] "
            f"(min {row.min()}, max {row.max()})"
        )


def _checked_counts(emotion: str, K, T, n_neurons: int) -> tuple[np.ndarray, int]:
    K = np.asarray(K)
    if K.shape != (n_neurons,):
        raise ValueError(f"K for emotion {emotion!r} has shape {K.shape}, expected ({n_neurons},)")
    if not (np.issubdtype(K.dtype, np.integer) or np.issubdtype(K.dtype, np.bool_)):
        raise ValueError(f"K for emotion {emotion!r} must be integer counts, got dtype {K.dtype}")
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)):
        raise ValueError(f"T for emotion {emotion!r} must be an int, got {T!r}")
    T = int(T)
    if T < 0:
        raise ValueError(f"T for emotion {emotion!r} is negative: {T}")
    K = K.astype(np.int64)
    if K.size and (K.min() < 0 or K.max() > T):
        raise ValueError(
            f"K for emotion {emotion!r} must lie in [0, T={T}], got [{K.min()}, {K.max()}]"
        )
    return K, T


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Mask:
    """One selector's neurons for one emotion: flat indices in rank order (rank 1 first).

    ``requested`` is ``N_sel``; ``size`` may be smaller (CAS, LAPE: too few candidates).
    """

    selector: str
    emotion: str
    indices: np.ndarray
    scores: np.ndarray
    requested: int

    def __post_init__(self) -> None:
        indices = np.array(self.indices, dtype=np.int64).reshape(-1)
        scores = np.array(self.scores, dtype=np.float64).reshape(-1)
        where = f"mask {self.selector!r}/{self.emotion!r}"
        if indices.shape != scores.shape:
            raise ValueError(f"{where}: {indices.size} indices but {scores.size} scores")
        if np.unique(indices).size != indices.size:
            raise ValueError(f"{where}: duplicate neuron indices")
        if indices.size and indices.min() < 0:
            raise ValueError(f"{where}: negative neuron index {indices.min()}")
        if not np.isfinite(scores).all():
            raise ValueError(f"{where}: scores must be finite")
        if int(self.requested) < indices.size:
            raise ValueError(f"{where}: size {indices.size} exceeds requested {self.requested}")
        indices.setflags(write=False)
        scores.setflags(write=False)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "requested", int(self.requested))

    @property
    def size(self) -> int:
        return int(self.indices.size)


# --------------------------------------------------------------------------- sizes and ranking


def _exact_fraction(r: float) -> Fraction:
    if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)):
        raise ValueError(f"selection rate r must be a number, got {r!r}")
    if not math.isfinite(float(r)) or not 0 < float(r) <= 1:
        raise ValueError(f"selection rate r must be in (0, 1], got {r!r}")
    return Fraction(repr(float(r)))


def n_selected(r: float, n_neurons: int) -> int:
    """``N_sel = floor(r · N)``, with ``r`` taken as the decimal written."""
    return math.floor(_exact_fraction(r) * n_neurons)


def n_candidates(r: float, n_neurons: int) -> int:
    """LAPE pool size ``N_cand = floor(min(1, 5r) · N)``."""
    return math.floor(min(Fraction(1), 5 * _exact_fraction(r)) * n_neurons)


def top_k_stable(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first, equal scores by lower position.

    O(n) partition to find the k-th value, then a stable sort of only the chosen ones, so
    it stays fast at N = 530,432 while breaking ties exactly as a full stable sort would.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; ranking would be undefined")
    k = min(int(k), scores.size)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    neg = -scores  # ascending order of neg == descending order of scores
    kth = np.partition(neg, k - 1)[k - 1]
    better = np.flatnonzero(neg < kth)
    tied = np.flatnonzero(neg == kth)[: k - better.size]  # lowest positions win the tie
    chosen = np.concatenate([better, tied])
    return chosen[np.lexsort((chosen, neg[chosen]))]


def _mask_from_candidates(
    selector: str, emotion: str, scores: np.ndarray, candidates: np.ndarray, n_sel: int
) -> Mask:
    """Top ``n_sel`` of ``scores`` restricted to ``candidates`` (ascending flat indices)."""
    picked = candidates[top_k_stable(scores[candidates], n_sel)]
    return Mask(selector, emotion, picked, scores[picked], n_sel)


def _check_n(n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return int(n)


def _require_cross_emotion(probs: ActivationProbabilities, selector: str) -> None:
    # A contrast across emotions needs at least two of them; with one, CAS's second-largest
    # P does not exist and LAPE/MAD degenerate to constant scores.
    if len(probs.emotions) < 2:
        raise ValueError(
            f"selector {selector!r} compares emotions and needs at least two with success "
            f"sets; got {list(probs.emotions)} (excluded: {list(probs.excluded)})"
        )


# --------------------------------------------------------------------------- selectors


def select_lap(
    probs: ActivationProbabilities, targets: Sequence[str], n_sel: int
) -> dict[str, Mask]:
    """LAP: score ``P^(e)``; the top ``n_sel``."""
    n_sel = _check_n(n_sel, "n_sel")
    everyone = np.arange(probs.n_neurons)
    return {
        e: _mask_from_candidates("lap", e, probs.row(e), everyone, n_sel) for e in targets
    }


def select_mad(
    probs: ActivationProbabilities, targets: Sequence[str], n_sel: int
) -> dict[str, Mask]:
    """MAD: score ``|P^(e) − mean_e' P^(e')|``; the top ``n_sel``."""
    n_sel = _check_n(n_sel, "n_sel")
    _require_cross_emotion(probs, "mad")
    mean = emotion_sum(probs.P) / len(probs.emotions)
    everyone = np.arange(probs.n_neurons)
    return {
        e: _mask_from_candidates("mad", e, np.abs(probs.row(e) - mean), everyone, n_sel)
        for e in targets
    }


def emotion_sum(P: np.ndarray) -> np.ndarray:
    """``Σ_e P^(e)`` per neuron, independent of the order of the emotions.

    Each column is summed in ascending order of its values, so two neurons whose P vectors
    are permutations of each other get bit-identical sums (and MAD deviations that tie
    exactly, broken by flat index as SPEC says) instead of sums that round differently.
    """
    return np.sort(P, axis=0).sum(axis=0)


def cas_top_and_margin(probs: ActivationProbabilities) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron: row index of the top emotion (ties: first in EMOTIONS) and the margin.

    Rows are in EMOTIONS order and ``np.argmax`` returns the first maximum, which is the
    SPEC tie-break.
    """
    _require_cross_emotion(probs, "cas")
    top = np.argmax(probs.P, axis=0)
    ordered = np.sort(probs.P, axis=0)
    return top, ordered[-1] - ordered[-2]


def select_cas(
    probs: ActivationProbabilities, targets: Sequence[str], n_sel: int
) -> dict[str, Mask]:
    """CAS: score the margin ``P^(1) − P^(2)`` where ``e`` is the top emotion, else −∞.

    Only finite scores are eligible, so a mask has fewer than ``n_sel`` neurons when fewer
    neurons have ``e`` on top; ``Mask.requested`` keeps ``n_sel``.
    """
    n_sel = _check_n(n_sel, "n_sel")
    top, margin = cas_top_and_margin(probs)
    masks = {}
    for e in targets:
        owned = np.flatnonzero(top == probs.require(e))
        masks[e] = _mask_from_candidates("cas", e, margin, owned, n_sel)
    return masks


def lape_threshold(probs: ActivationProbabilities, percentile: float) -> float:
    """``τ_p``: the ``percentile``-th percentile of all P values of all emotions and neurons.

    ``numpy.percentile`` with its default ``method="linear"`` (interpolation between the
    two nearest order statistics at position ``q/100 · (n − 1)``).
    """
    q = float(percentile)
    if not 0 <= q <= 100:
        raise ValueError(f"LAPE percentile q must be in [0, 100], got {percentile!r}")
    return float(np.percentile(probs.P, q))


def normalised_entropy_terms(P: np.ndarray) -> np.ndarray:
    """``H = −Σ_e P̃ log P̃`` per column of ``P`` (natural log, 0 log 0 = 0).

    The emotion axis is sorted first so that two neurons whose P vectors are permutations
    of each other get bit-identical entropies and therefore tie-break by flat index, as
    SPEC intends, instead of by the rounding of a summation order. Columns must have a
    positive sum (LAPE survivors always do: some ``P > τ_p ≥ 0``).
    """
    P = np.sort(P, axis=0)
    total = emotion_sum(P)
    if (total <= 0).any():
        raise ValueError("entropy is undefined for a neuron whose P is zero for every emotion")
    p = P / total
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=0)


def lape_pool(
    probs: ActivationProbabilities, n_cand: int, percentile: float = DEFAULT_LAPE_PERCENTILE
) -> np.ndarray:
    """The LAPE candidate pool, ascending flat indices.

    Survivors have ``P^(e) > τ_p`` for at least one emotion; the pool is the ``n_cand``
    lowest-entropy survivors, equal entropies by lower flat index.
    """
    n_cand = _check_n(n_cand, "n_cand")
    _require_cross_emotion(probs, "lape")
    tau = lape_threshold(probs, percentile)
    survivors = np.flatnonzero((probs.P > tau).any(axis=0))
    if survivors.size == 0:
        return survivors.astype(np.int64)
    entropy = normalised_entropy_terms(probs.P[:, survivors])
    return np.sort(survivors[top_k_stable(-entropy, n_cand)])


def select_lape(
    probs: ActivationProbabilities,
    targets: Sequence[str],
    n_sel: int,
    n_cand: int,
    percentile: float = DEFAULT_LAPE_PERCENTILE,
) -> dict[str, Mask]:
    """LAPE: per emotion, the top ``n_sel`` of the pool by ``P^(e)`` (fewer if the pool is)."""
    n_sel = _check_n(n_sel, "n_sel")
    for e in targets:
        probs.require(e)  # refuse an excluded emotion before any work
    pool = lape_pool(probs, n_cand, percentile)
    return {e: _mask_from_candidates("lape", e, probs.row(e), pool, n_sel) for e in targets}


def random_rng(seed: int, emotion: str) -> np.random.Generator:
    """The generator of emotion ``emotion``'s random mask: SeedSequence([seed, index])."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"random selector seed must be a non-negative int, got {seed!r}")
    _check_emotion_names([emotion], "random selector")
    return np.random.default_rng(np.random.SeedSequence([int(seed), EMOTIONS.index(emotion)]))


def select_random(
    probs: ActivationProbabilities, targets: Sequence[str], n_sel: int, seed: int
) -> dict[str, Mask]:
    """Random: ``n_sel`` neurons uniformly without replacement, independently per emotion.

    Indices are stored ascending with score 0.0 (all scores equal, so the tie-break order
    is the rank order).
    """
    n_sel = _check_n(n_sel, "n_sel")
    if n_sel > probs.n_neurons:
        raise ValueError(f"n_sel {n_sel} exceeds the {probs.n_neurons} neurons available")
    masks = {}
    for e in targets:
        probs.require(e)  # same exclusion rule as the other selectors
        drawn = random_rng(seed, e).choice(probs.n_neurons, size=n_sel, replace=False)
        masks[e] = Mask("random", e, np.sort(drawn), np.zeros(n_sel), n_sel)
    return masks


# --------------------------------------------------------------------------- dispatcher


def select(
    selector: str,
    probs: ActivationProbabilities,
    r: float,
    targets: Sequence[str] = TARGETS,
    seed: int = 0,
    *,
    lape_percentile: float = DEFAULT_LAPE_PERCENTILE,
) -> dict[str, Mask]:
    """Masks of ``selector`` (case-insensitive name in SELECTORS) for each of ``targets``.

    ``N_sel = floor(r · N)``; ``seed`` is used by ``random`` only, ``lape_percentile`` (q)
    by ``lape`` only. The returned dict follows the order of ``targets``.
    """
    name = str(selector).lower()
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; known: {list(SELECTORS)}")
    targets = tuple(targets)
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets has duplicates: {list(targets)}")
    _check_emotion_names(targets, "targets")
    for e in targets:
        probs.require(e)
    n_sel = n_selected(r, probs.n_neurons)
    runners: dict[str, Callable[[], dict[str, Mask]]] = {
        "lap": lambda: select_lap(probs, targets, n_sel),
        "mad": lambda: select_mad(probs, targets, n_sel),
        "cas": lambda: select_cas(probs, targets, n_sel),
        "lape": lambda: select_lape(
            probs, targets, n_sel, n_candidates(r, probs.n_neurons), lape_percentile
        ),
        "random": lambda: select_random(probs, targets, n_sel, seed),
    }
    return runners[name]()


# --------------------------------------------------------------------------- tables and layers


def layer_indices(mask: Mask, layout: NeuronLayout) -> list[np.ndarray]:
    """Per-layer sorted neuron indices (int64) of ``mask``; an empty array for a layer without."""
    flat = np.sort(mask.indices)
    if flat.size and flat[-1] >= layout.n_neurons:
        raise ValueError(
            f"mask {mask.selector!r}/{mask.emotion!r} has flat index {flat[-1]} beyond "
            f"the layout's {layout.n_neurons} neurons"
        )
    bounds = np.searchsorted(flat, layout.offsets)
    return [
        flat[bounds[l] : bounds[l + 1]] - layout.offsets[l] for l in range(layout.n_layers)
    ]


def masks_to_table(masks: Mapping[str, Mask] | Iterable[Mask], layout: NeuronLayout) -> pa.Table:
    """One selector's masks as the ``masks`` table (emotion, layer, neuron, score, rank ≥ 1).

    Selector, layout and each emotion's requested/actual size go into the schema metadata
    under ``esn.masks``, so empty masks and ``N_sel`` survive ``io.write_table``.
    """
    mask_list = list(masks.values()) if isinstance(masks, Mapping) else list(masks)
    selectors = {m.selector for m in mask_list}
    if len(selectors) > 1:
        raise ValueError(f"a masks table holds one selector's masks, got {sorted(selectors)}")
    emotions = [m.emotion for m in mask_list]
    if len(set(emotions)) != len(emotions):
        raise ValueError(f"masks table: duplicate emotions {emotions}")
    columns: dict[str, list[np.ndarray]] = {c: [] for c in SCHEMAS["masks"]}
    for m in mask_list:
        layer, neuron = layout.unflatten(m.indices)
        columns["emotion"].append(np.full(m.size, m.emotion, dtype=object))
        columns["layer"].append(layer)
        columns["neuron"].append(neuron)
        columns["score"].append(m.scores)
        columns["rank"].append(np.arange(1, m.size + 1))
    arrays = [
        pa.array(np.concatenate(columns[c]) if mask_list else [], type=t)
        for c, t in SCHEMAS["masks"].items()
    ]
    summary = {
        "selector": mask_list[0].selector if mask_list else None,
        "layer_sizes": layout.to_json(),
        "masks": [{"emotion": m.emotion, "requested": m.requested, "size": m.size} for m in mask_list],
    }
    metadata = {MASKS_METADATA_KEY: json.dumps(summary).encode()}
    return pa.Table.from_arrays(arrays, names=list(SCHEMAS["masks"]), metadata=metadata)


def _masks_summary(table: pa.Table, selector: str | None) -> dict | None:
    raw = (table.schema.metadata or {}).get(MASKS_METADATA_KEY)
    if raw is not None:
        return json.loads(raw)
    if selector is None:
        raise ValueError(
            "masks table has no 'esn.masks' metadata (not written by masks_to_table?); "
            "pass selector= to read it, requested sizes then default to the actual sizes"
        )
    return None


def masks_from_table(
    table: pa.Table, layout: NeuronLayout, selector: str | None = None
) -> dict[str, Mask]:
    """Inverse of :func:`masks_to_table`; checks ranks are 1..n and the layout matches."""
    summary = _masks_summary(table, selector)
    if summary is not None and summary["layer_sizes"] != layout.to_json():
        raise ValueError(
            f"masks table was made for layer sizes {summary['layer_sizes']}, "
            f"not {layout.to_json()}"
        )
    emotion_col = np.asarray(table.column("emotion").to_pylist(), dtype=object)
    flat = layout.flat_index(
        table.column("layer").to_numpy(), table.column("neuron").to_numpy()
    )
    score = table.column("score").to_numpy().astype(np.float64)
    rank = table.column("rank").to_numpy().astype(np.int64)
    if summary is None:
        expected = [
            {"emotion": e, "requested": None, "size": None} for e in dict.fromkeys(emotion_col)
        ]
        name = selector
    else:
        expected, name = summary["masks"], summary["selector"]
    listed = {entry["emotion"] for entry in expected}
    stray = sorted(set(emotion_col) - listed)
    if stray:
        raise ValueError(f"masks table has rows for emotions {stray} missing from its metadata")
    masks = {}
    for entry in expected:
        e = entry["emotion"]
        rows = np.flatnonzero(emotion_col == e)
        rows = rows[np.argsort(rank[rows], kind="stable")]
        if not np.array_equal(rank[rows], np.arange(1, rows.size + 1)):
            raise ValueError(f"masks table: ranks of emotion {e!r} are not 1..{rows.size}")
        if entry["size"] is not None and entry["size"] != rows.size:
            raise ValueError(
                f"masks table: emotion {e!r} has {rows.size} rows, metadata says {entry['size']}"
            )
        requested = rows.size if entry["requested"] is None else entry["requested"]
        masks[e] = Mask(name, e, flat[rows], score[rows], requested)
    return masks
