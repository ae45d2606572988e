"""Typed configuration of the decoder and its MTP objective.

These dataclasses are leaves of the project's one config tree (`pretrain.config`); the model library
only validates them. Every user mistake raises `ValueError` naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from model.loss_kernels import KERNEL_KINDS


def require_positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    """ValueError naming the config key unless `value` > 0 (or >= 0 with `allow_zero`)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} = {value} must be {'>= 0' if allow_zero else '> 0'}")


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
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation in the backward pass, for the trunk's and the MTP modules'
    blocks. 'selective': the attention core (RoPE and attention between the QKV and output
    projections) and the SwiGLU activation are recomputed instead of stored (cheap to redo,
    costly to keep); 'full': each block keeps only its input and is run again in the
    backward (about a third more compute). Values and gradients are unchanged."""
    recompute_num_layers: int | None = None
    """With recompute 'full': recompute only the first N trunk blocks (the first pipeline
    stages hold the most in-flight micro-batches); null recomputes every block."""

    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = (
        "loss_chunk_tokens", "loss_impl", "loss_kernels", "recompute", "recompute_num_layers")
    """Fields that change how the model runs, not the function it computes or its weights: a
    checkpoint resumes under other values of these."""

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
                     "loss_chunk_tokens", "num_kv_heads", "ffn_hidden_size"):
            if getattr(self, name) is not None:  # the two optional ones: None picks a default
                require_positive(f"model.{name}", getattr(self, name))
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
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"model.recompute = {self.recompute!r}; use 'none', 'selective' or "
                             "'full'")
        if self.recompute_num_layers is not None:
            require_positive("model.recompute_num_layers", self.recompute_num_layers)
            if self.recompute != "full":
                raise ValueError(
                    f"model.recompute_num_layers = {self.recompute_num_layers} applies to "
                    f"model.recompute = 'full' (it is {self.recompute!r}); set it to null")
        if self.loss_kernels not in ("auto", *KERNEL_KINDS):
            raise ValueError(f"model.loss_kernels = {self.loss_kernels!r}; use 'auto' or one of "
                             f"{KERNEL_KINDS}")
        require_positive("parallel.tp", tp_size)
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
    """Which multi-token objective the tail trains (docs/DESIGN.md, "The MTP objectives").

    `depth` D always counts the *extra* future tokens: labels have D+1 rows for every kind. The
    kinds are the objectives registered in `model.mtp` (each module there documents its own).
    """

    kind: str = "deepseek"
    """'none' (next-token only) or a registered objective: 'deepseek', 'parallel' (Meta's heads),
    'blockwise' (BPD), or one registered by the user (model/mtp/objective.py)."""
    depth: int = 1
    """D, the number of extra predicted tokens; 0 exactly when kind is 'none'."""
    options: dict[str, Any] = field(default_factory=dict)
    """Settings of the chosen objective, e.g. {detach_trunk: true} for 'deepseek'; each objective
    declares its own (`mtp.options.NAME=value` on the command line; `mtp.NAME=value` is accepted
    as a shorthand)."""

    @classmethod
    def fold_config_keys(cls, data: dict) -> dict:
        """A config mapping with the objective's options given at the top of the section (the
        shorthand, and the layout of configs written before options had their own mapping)
        moved under `options`."""
        names = {f.name for f in fields(cls)}
        loose = {k: v for k, v in data.items() if k not in names}
        if not loose:
            return data
        from model.mtp.objective import NO_MTP, objective_class

        kind = data.get("kind", cls.kind)
        declared = {} if kind == NO_MTP else objective_class(kind).options
        folded = {k: v for k, v in data.items() if k not in loose or k not in declared}
        options = dict(data.get("options") or {})
        for key in loose.keys() & declared.keys():
            if key in options and options[key] != loose[key]:
                raise ValueError(f"mtp.{key} and mtp.options.{key} disagree "
                                 f"({loose[key]!r} vs {options[key]!r}); give it once")
            options[key] = loose[key]
        if options:
            folded["options"] = options
        return folded

    def option(self, name: str) -> Any:
        """The value of one of the objective's options (its default when not given)."""
        from model.mtp.objective import objective_class

        spec = objective_class(self.kind).options[name]
        return self.options.get(name, spec.default)

    def validate(self) -> None:
        """Checks the kind, depth and options, and fills in the options' defaults."""
        from model.mtp.objective import NO_MTP, mtp_kinds, objective_class

        if self.kind not in mtp_kinds():
            raise ValueError(f"mtp.kind = {self.kind!r} is unknown; use one of {mtp_kinds()}")
        if self.kind == NO_MTP and self.depth != 0:
            raise ValueError(
                f"mtp.depth = {self.depth} with mtp.kind = 'none'; set mtp.depth = 0 or choose an "
                "MTP kind")
        if self.kind != NO_MTP and self.depth < 1:
            raise ValueError(
                f"mtp.depth = {self.depth} with mtp.kind = {self.kind!r}; an MTP objective needs "
                "mtp.depth >= 1 (or use mtp.kind = 'none')")
        declared = {} if self.kind == NO_MTP else objective_class(self.kind).options
        for name, value in self.options.items():
            owners = [k for k in mtp_kinds()[1:] if name in objective_class(k).options]
            if name not in declared:
                where = (f"it applies to kind {' / '.join(map(repr, owners))} only" if owners
                         else f"kind {self.kind!r} has "
                              f"{'the options ' + ', '.join(declared) if declared else 'no options'}")
                raise ValueError(f"mtp.options.{name} = {value!r} with mtp.kind = "
                                 f"{self.kind!r}: {where}")
            default = declared[name].default
            if type(value) is not type(default) and not (
                    isinstance(default, float) and type(value) is int):
                raise ValueError(f"mtp.options.{name} = {value!r} must be a "
                                 f"{type(default).__name__} like its default {default!r}")
        # Every option spelled out (defaults included), so that configs written by runs, exports
        # and checkpoints compare equal however the options were given.
        self.options = {name: self.options.get(name, spec.default)
                        for name, spec in declared.items()}
        if self.kind != NO_MTP:
            objective_class(self.kind).check_options(self)

    @property
    def freezes_trunk(self) -> bool:
        """The objective trains on a frozen main model."""
        from model.mtp.objective import NO_MTP, objective_class

        return self.kind != NO_MTP and objective_class(self.kind).freezes_trunk(self)


@dataclass
class DecoderConfig:
    """Model shape plus MTP objective: everything needed to build the network."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)

    def validate(self, tp_size: int = 1) -> None:
        self.model.validate(tp_size)
        self.mtp.validate()
