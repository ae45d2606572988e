"""Small model configs and batches shared by the model tests."""

from __future__ import annotations

import torch

from model import DecoderConfig, ModelConfig, MTPConfig
from model.mtp import objective_kinds

KINDS = objective_kinds()
"""Every registered MTP objective: tests parametrized over objectives read the registry."""

VOCAB = 96
SEQ = 12
BATCH = 2


def tiny_config(kind: str = "deepseek", depth: int = 1, **model_overrides) -> DecoderConfig:
    model = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=40, max_seq_len=32, loss_chunk_tokens=7)
    model.update(model_overrides)
    mtp = MTPConfig(kind=kind, depth=0 if kind == "none" else depth)
    return DecoderConfig(ModelConfig(**model), mtp)


def make_batch(depth: int, seed: int = 1, masked: bool = True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, depth + 1, SEQ), generator=g)
    mask = (torch.rand(BATCH, depth + 1, SEQ, generator=g) > 0.25).float() if masked else None
    return ids, labels, mask


def randomize_(model: torch.nn.Module, seed: int = 3) -> None:
    """Perturb every parameter (norm gains and zero-initialised projections included), so that a
    test cannot pass because some weights are still ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
