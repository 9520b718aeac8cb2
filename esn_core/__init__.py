"""esn_core: neuron-level emotion control for speech-generative LALMs.

The model-independent library behind the ESN Snakemake workflow: hooks, statistics,
selectors, judges, metrics and Parquet I/O. See SPEC.md for the method.
"""

__version__ = "0.1.0"
