"""The two baselines of `bench_training.py`, each trained on one GPU with a plain torch loop.

* `PlainGPT`: what a user would write by hand (nanoGPT-like): the same Llama shape as ours
  (RMSNorm, RoPE, GQA through SDPA, SwiGLU, untied or tied head), fp32 parameters under bf16
  autocast, the whole model + cross-entropy under `torch.compile`, fused AdamW.
* megatron-core's own `GPTModel` (local spec: no Transformer Engine) configured to the same shape,
  with `mtp_num_layers` 0 or 1, fp32 parameters under bf16 autocast, fused AdamW.

Both consume random token batches already on the GPU (no data loader), which favours them.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from model import accelerator


class _Rotary(nn.Module):
    def __init__(self, head_dim: int, seq: int, theta: float = 10000.0):
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(seq).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, H, T, hd]
        t = x.shape[-2]
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
        return x * self.cos[:t].to(x.dtype) + rot * self.sin[:t].to(x.dtype)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int, seq: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.norm1 = nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.proj = nn.Linear(heads * self.hd, d, bias=False)
        self.norm2 = nn.RMSNorm(d, eps=1e-5)
        self.gate_up = nn.Linear(d, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)
        self.rope = _Rotary(self.hd, seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(
            [self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], dim=-1)
        q = q.view(b, t, self.heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True,
                                           enable_gqa=self.kv_heads != self.heads)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainGPT(nn.Module):
    def __init__(self, shape: dict):
        super().__init__()
        d = shape["hidden"]
        self.embed = nn.Embedding(shape["vocab"], d)
        self.blocks = nn.ModuleList(
            _Block(d, shape["heads"], shape["kv_heads"], shape["ffn"], shape["seq"])
            for _ in range(shape["layers"]))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.head = nn.Linear(d, shape["vocab"], bias=False)
        if shape["tie"]:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * shape["layers"]) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def megatron_gpt(shape: dict, mtp_layers: int):
    """megatron-core GPTModel (local spec) with `mtp_layers` DeepSeek MTP layers, on this GPU."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"], num_query_groups=shape["kv_heads"],
        ffn_hidden_size=shape["ffn"], normalization="RMSNorm", layernorm_epsilon=1e-5,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, params_dtype=torch.float32,
        mtp_num_layers=mtp_layers or None, mtp_loss_scaling_factor=0.1)
    layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    mtp_spec = (get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False)
                if mtp_layers else None)
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec, vocab_size=shape["vocab"],
        max_sequence_length=shape["seq"], position_embedding_type="rope",
        share_embeddings_and_output_weights=shape["tie"], mtp_block_spec=mtp_spec)
    return model.to(accelerator.current_device())
