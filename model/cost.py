"""The one cost model: parameters and forward FLOPs per token of each layer of the decoder.

It serves MFU (training FLOPs = 3 × forward) and the balancing of pipeline stages. Matmul FLOPs
are 2 × the weights a token passes through; attention adds the score and value products over the
full window, 4·T·(heads·head_dim) per token and block (the PaLM convention: causal masking is not
discounted). The MTP objective's share is read off an instance built on the meta device (no
memory, no init), so every objective is costed the same way without declaring anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from model.attention import Attention
from model.config import DecoderConfig, ModelConfig
from model.mtp.objective import NO_MTP, objective_class
from model.parallel import meta_context


@dataclass(frozen=True)
class LayerCost:
    params: int
    """Parameters at TP = 1."""
    flops: float
    """Forward FLOPs per input token."""


def _attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    return 4.0 * seq_len * cfg.num_heads * cfg.head_dim


def block_cost(cfg: ModelConfig, seq_len: int) -> LayerCost:
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    q, kv = cfg.num_heads * hd, cfg.kv_heads * hd
    matmul = d * (q + 2 * kv) + q * d + 3 * d * f
    return LayerCost(matmul + 2 * d, 2.0 * matmul + _attention_flops(cfg, seq_len))


@lru_cache(maxsize=64)
def _objective_cost(model_fields: tuple, kind: str, depth: int, options: tuple,
                    seq_len: int) -> LayerCost:
    """The objective's own parameters (TP = 1) and forward FLOPs per token, head excluded.
    (Arguments are tuples so that the result can be cached: building costs a few ms.)"""
    from model.config import MTPConfig

    cfg = ModelConfig(**dict(model_fields))
    dcfg = DecoderConfig(cfg, MTPConfig(kind, depth, dict(options)))
    with torch.device("meta"):
        module = objective_class(kind)(dcfg, meta_context())
    params = sum(p.numel() for p in module.parameters())
    matmul = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
    attention = sum(isinstance(m, Attention) for m in module.modules())
    return LayerCost(params, 2.0 * matmul + attention * _attention_flops(cfg, seq_len))


def tail_cost(dcfg: DecoderConfig, seq_len: int) -> tuple[LayerCost, LayerCost]:
    """(the main model's part of the tail: final norm + head, the MTP part: objective + one head
    per extra depth). The head's weights belong to the embedding layer, not to the tail."""
    cfg, mtp = dcfg.model, dcfg.mtp
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    main = LayerCost(cfg.hidden_size, head)
    if mtp.kind == NO_MTP:
        return main, LayerCost(0, 0.0)
    obj = _objective_cost(tuple(sorted(asdict(cfg).items())), mtp.kind, mtp.depth, tuple(sorted(mtp.options.items())),
                          seq_len)
    return main, LayerCost(obj.params, obj.flops + mtp.depth * head)


def embedding_cost(cfg: ModelConfig) -> LayerCost:
    """The shared embedding (and untied head weights): a lookup, no FLOPs of its own."""
    return LayerCost(cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2), 0.0)


def forward_flops_per_token(dcfg: DecoderConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per input token of the main model and of the MTP tail."""
    main, mtp = tail_cost(dcfg, seq_len)
    trunk = dcfg.model.num_layers * block_cost(dcfg.model, seq_len).flops
    return {"main": trunk + main.flops, "mtp": mtp.flops}


def layer_costs(dcfg: DecoderConfig, seq_len: int) -> list[LayerCost]:
    """[embedding, block_0 … block_{L-1}, tail (main part + MTP)]: the units of pipeline
    balancing, in model order."""
    main, mtp = tail_cost(dcfg, seq_len)
    block = block_cost(dcfg.model, seq_len)
    return [embedding_cost(dcfg.model), *[block] * dcfg.model.num_layers,
            LayerCost(main.params + mtp.params, main.flops + mtp.flops)]
