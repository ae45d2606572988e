"""Inference: KV-cache generation and self-speculative decoding with the MTP modules/heads."""

from model.generation.plain import generate
from model.generation.speculative import generate_speculative
from model.generation.stats import GenerationResult, SpeculativeStats

__all__ = ["GenerationResult", "SpeculativeStats", "generate", "generate_speculative"]
