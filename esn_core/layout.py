"""The neuron coordinate system of one hooked module group.

A group is a list of hooked layers, layer ``l`` having ``D_l`` gate neurons. Neurons are
addressed either as ``(layer, neuron)`` or by a *flat index* ``offset[l] + n`` over all
layers jointly. With equal widths the flat index is SPEC's ``l * D + n``; it is also the
tie-breaking order of every selector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NeuronLayout:
    layer_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.layer_sizes or any(int(d) <= 0 for d in self.layer_sizes):
            raise ValueError(f"layer_sizes must be positive, got {self.layer_sizes!r}")
        object.__setattr__(self, "layer_sizes", tuple(int(d) for d in self.layer_sizes))

    @property
    def n_layers(self) -> int:
        return len(self.layer_sizes)

    @property
    def n_neurons(self) -> int:
        return int(sum(self.layer_sizes))

    @property
    def offsets(self) -> np.ndarray:
        """Start of each layer in the flat index, shape [L+1] (last entry = N)."""
        return np.concatenate([[0], np.cumsum(self.layer_sizes)]).astype(np.int64)

    def flat_index(self, layer, neuron) -> np.ndarray:
        layer = np.asarray(layer, dtype=np.int64)
        neuron = np.asarray(neuron, dtype=np.int64)
        sizes = np.asarray(self.layer_sizes, dtype=np.int64)
        if np.any((layer < 0) | (layer >= self.n_layers)):
            raise IndexError(f"layer out of range 0..{self.n_layers - 1}")
        if np.any((neuron < 0) | (neuron >= sizes[layer])):
            raise IndexError("neuron index out of range for its layer")
        return self.offsets[layer] + neuron

    def unflatten(self, flat) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices -> (layer, neuron) arrays."""
        flat = np.asarray(flat, dtype=np.int64)
        if np.any((flat < 0) | (flat >= self.n_neurons)):
            raise IndexError(f"flat index out of range 0..{self.n_neurons - 1}")
        layer = np.searchsorted(self.offsets, flat, side="right") - 1
        return layer, flat - self.offsets[layer]

    def split(self, flat: np.ndarray, axis: int = 0) -> list[np.ndarray]:
        """An array with a length-N axis -> one array per layer along that axis."""
        return np.split(np.asarray(flat), self.offsets[1:-1], axis=axis)

    def split_indices(self, flat_indices) -> list[np.ndarray]:
        """Flat neuron indices -> per-layer sorted local index arrays (empty where none)."""
        layer, neuron = self.unflatten(np.asarray(flat_indices, dtype=np.int64).ravel())
        return [np.sort(neuron[layer == l]) for l in range(self.n_layers)]

    def to_json(self) -> list[int]:
        return list(self.layer_sizes)
