"""Typed configuration of the decoder and its MTP objective.

These dataclasses are leaves of the project's one config tree (`pretrain.config`); the model library
only validates them. Every user mistake raises `ValueError` naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from model.loss_kernels import KERNEL_KINDS

MTPKind = Literal["none", "deepseek", "parallel", "blockwise"]
MTP_KINDS: tuple[str, ...] = ("none", "deepseek", "parallel", "blockwise")


@dataclass
class ModelConfig:
    """Llama-style decoder shape."""

    vocab_size: int = 32000
    """Vocabulary size; must be divisible by the tensor-parallel size (pad the tokenizer's vocab)."""
    hidden_size: int = 768
    """Model width d."""
    num_layers: int = 12
    """Number of transformer blocks in the main model (MTP modules/heads come on top)."""
    num_heads: int = 12
    """Query heads; must be divisible by num_kv_heads and by the tensor-parallel size."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means num_heads (plain multi-head)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; None means Llama's rule: 8/3·d rounded up to a multiple of 256."""
    max_seq_len: int = 1024
    """Longest sequence the rotary tables are built for (training window T, or T + generated)."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Use the input embedding matrix as the output head."""
    init_std: float = 0.02
    """Std of the normal init; output projections of each block are scaled by 1/sqrt(2·layers)."""
    loss_chunk_tokens: int = 4096
    """Tokens per chunk in the fused head + cross-entropy: bounds the logits held at once to
    chunk × vocab/TP floats, whatever the number of MTP depths."""
    loss_impl: Literal["fused", "unfused"] = "fused"
    """'fused': chunked head + cross-entropy computing gradients on the fly (low memory).
    'unfused': full logits per depth and megatron-core's vocab_parallel_cross_entropy
    (reference/baseline; holds every depth's logits)."""
    loss_kernels: Literal["auto", "triton", "inductor", "eager"] = "auto"
    """Which build runs the fused loss's per-chunk softmax work (model/loss_kernels.py): 'auto'
    is 'triton' when the model is compiled for training on a GPU with Triton installed,
    'inductor' when compiled elsewhere, 'eager' otherwise. All give the same values up to
    rounding; the choice only changes speed and the memory of one chunk's gradient."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 256 * ((int(8 * self.hidden_size / 3) + 255) // 256)

    def validate(self, tp_size: int = 1) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len",
                     "loss_chunk_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} = {getattr(self, name)} must be a positive integer")
        if self.num_kv_heads is not None and self.num_kv_heads < 1:
            raise ValueError(f"model.num_kv_heads = {self.num_kv_heads} must be positive or null")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise ValueError(
                f"model.ffn_hidden_size = {self.ffn_hidden_size} must be positive or null")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size = {self.hidden_size} is not divisible by model.num_heads = "
                f"{self.num_heads}; pick a width that is a multiple of the head count")
        if self.head_dim % 2:
            raise ValueError(
                f"model.hidden_size / model.num_heads = {self.head_dim} must be even for rotary "
                "embeddings")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_heads = {self.num_heads} is not divisible by model.num_kv_heads = "
                f"{self.kv_heads}; each key/value head must serve a whole group of query heads")
        if self.loss_impl not in ("fused", "unfused"):
            raise ValueError(f"model.loss_impl = {self.loss_impl!r}; use 'fused' or 'unfused'")
        if self.loss_kernels not in ("auto", *KERNEL_KINDS):
            raise ValueError(f"model.loss_kernels = {self.loss_kernels!r}; use 'auto' or one of "
                             f"{KERNEL_KINDS}")
        if tp_size < 1:
            raise ValueError(f"tensor-parallel size {tp_size} must be >= 1")
        for name, value in (("num_heads", self.num_heads), ("num_kv_heads", self.kv_heads),
                            ("vocab_size", self.vocab_size), ("ffn_hidden_size", self.ffn_size)):
            if value % tp_size:
                hint = (" (pad the vocabulary to a multiple of the TP size)"
                        if name == "vocab_size" else "")
                raise ValueError(
                    f"model.{name} = {value} is not divisible by the tensor-parallel size "
                    f"{tp_size}; choose a TP size that divides it{hint}")


@dataclass
class MTPConfig:
    """Which multi-token objective the tail trains (DESIGN.md §2).

    `depth` D always counts the *extra* future tokens: labels have D+1 rows for every kind.
    deepseek: D sequential modules; parallel: D extra transformer-block heads (n = D+1 with the main
    head); blockwise: D extra residual FFN heads (k = D+1 with the base model's own head).
    """

    kind: MTPKind = "deepseek"
    """'none' (next-token only), 'deepseek', 'parallel' (Meta) or 'blockwise' (BPD)."""
    depth: int = 1
    """D, the number of extra predicted tokens; 0 exactly when kind is 'none'."""
    detach_trunk: bool = False
    """deepseek: stop MTP gradients at the main model's hidden state (the shared embedding and
    head still learn from the MTP losses)."""
    freeze_trunk: bool = False
    """blockwise: freeze the base model (embedding, blocks, final norm, head); only the extra FFN
    heads train (BPD's frozen-base setting)."""
    sample_one_loss: bool = False
    """blockwise: per step, train one extra head chosen from the step number instead of all D
    (BPD's memory saving); the choice is identical on every rank."""

    def validate(self) -> None:
        if self.kind not in MTP_KINDS:
            raise ValueError(f"mtp.kind = {self.kind!r} is unknown; use one of {MTP_KINDS}")
        if self.kind == "none" and self.depth != 0:
            raise ValueError(
                f"mtp.depth = {self.depth} with mtp.kind = 'none'; set mtp.depth = 0 or choose an "
                "MTP kind")
        if self.kind != "none" and self.depth < 1:
            raise ValueError(
                f"mtp.depth = {self.depth} with mtp.kind = {self.kind!r}; an MTP objective needs "
                "mtp.depth >= 1 (or use mtp.kind = 'none')")
        if self.detach_trunk and self.kind != "deepseek":
            raise ValueError(
                f"mtp.detach_trunk applies to kind 'deepseek' only (got {self.kind!r})")
        if (self.freeze_trunk or self.sample_one_loss) and self.kind != "blockwise":
            name = "freeze_trunk" if self.freeze_trunk else "sample_one_loss"
            raise ValueError(f"mtp.{name} applies to kind 'blockwise' only (got {self.kind!r})")


@dataclass
class DecoderConfig:
    """Model shape plus MTP objective: everything needed to build the network."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)

    def validate(self, tp_size: int = 1) -> None:
        self.model.validate(tp_size)
        self.mtp.validate()
