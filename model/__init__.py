"""Llama-style decoder with tensor parallelism (megatron-core leaf layers) and an MTP tail."""

from model.config import DecoderConfig, ModelConfig, MTPConfig
from model.parallel import ParallelContext, single_process_context
from model.tail import MTPOutput
from model.transformer import MTPLanguageModel

__all__ = [
    "DecoderConfig",
    "MTPConfig",
    "MTPLanguageModel",
    "MTPOutput",
    "ModelConfig",
    "ParallelContext",
    "single_process_context",
]
