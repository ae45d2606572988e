"""Inference: the decoding engine (KV caches and device graphs reused across requests), plain and
self-speculative decoding with the MTP modules/heads."""

from model.generation.engine import DecodingEngine, generate, generate_speculative
from model.generation.sampling import GREEDY, SamplingConfig
from model.generation.stats import GenerationResult, SpeculativeStats

__all__ = ["GREEDY", "DecodingEngine", "GenerationResult", "SamplingConfig", "SpeculativeStats",
           "generate", "generate_speculative"]
