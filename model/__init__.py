"""Llama-style decoder with tensor parallelism (megatron-core leaf layers) and an MTP tail."""

import warnings

with warnings.catch_warnings():
    # megatron-core announces at import time that Transformer Engine and Apex are missing and it
    # falls back to its own kernels; its leaf layers, all this package uses, need neither. Scoped
    # to this import: the importer's own warning filters are left as they were.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    import megatron.core.tensor_parallel  # noqa: F401

from model.config import DecoderConfig, ModelConfig, MTPConfig  # noqa: E402
from model.parallel import ParallelContext, single_process_context  # noqa: E402
from model.tail import MTPOutput  # noqa: E402
from model.transformer import MTPLanguageModel  # noqa: E402

__all__ = [
    "DecoderConfig",
    "MTPConfig",
    "MTPLanguageModel",
    "MTPOutput",
    "ModelConfig",
    "ParallelContext",
    "single_process_context",
]
