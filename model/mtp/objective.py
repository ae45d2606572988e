"""What an MTP objective is, and the registry that every other part of the project reads.

An objective is an `nn.Module` subclass of `MTPObjective` that lives in the output tail. It
declares everything the rest of the pipeline needs to know about it:

* `depth_hiddens(inputs)`: the hidden states it scores at each extra depth (the tail stacks them
  with the main depth and runs the one shared head + cross-entropy over all of them);
* `options`: its own settings (`mtp.options.NAME` in a run config) with defaults and docs, and
  `check_options` for anything beyond their types;
* `reads_future_tokens`: whether it embeds future tokens with the shared input embedding (then the
  last pipeline stage uses that embedding, not only the head);
* `shares_with_main_model`: which parts of an exported main model the tail reads at inference;
* `freezes_trunk(mtp)`: whether the main model stays frozen while the tail trains;
* `drafter`: the `model.generation.drafters.Drafter` subclass that drafts with it.

What is derived rather than declared: its parameter names and shapes (the export layout) and its
forward FLOPs per token (the cost model) come from an instance built on the meta device, so a new
objective writes no shape tables. Subclassing with a `kind` registers the objective:

    class LinearHeads(MTPObjective, kind="linear"):
        drafter = LinearDrafter
        def __init__(self, dcfg, ctx): ...
        def depth_hiddens(self, x): return [(k, head(x.main)) for k, head in ...]

The built-in objectives are imported on first lookup, so importing this module stays cheap and
free of cycles.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from model.attention import DocumentMask
    from model.config import DecoderConfig, MTPConfig
    from model.embedding import SharedEmbedding
    from model.generation.drafters import Drafter
    from model.parallel import ParallelContext

NO_MTP = "none"
"""`mtp.kind` of the next-token baseline: no objective, no tail parameters."""

_BUILTIN_MODULES = ("model.mtp.deepseek", "model.mtp.parallel_heads", "model.mtp.blockwise")
_REGISTRY: dict[str, type[MTPObjective]] = {}


@dataclass(frozen=True)
class Option:
    """One setting of an objective: its default (which also fixes its type) and what it does."""

    default: Any
    doc: str


@dataclass
class TailInputs:
    """Everything an objective may read to produce its depths' hidden states."""

    trunk: torch.Tensor
    """[B, T, d] the last block's output (the residual stream, before the final norm)."""
    main: torch.Tensor
    """[B, T, d] the final-norm output: what the main next-token head scores."""
    labels: torch.Tensor
    """[B, D+1, T] token ids; row j is the token j+1 ahead, so labels[:, k-1] = t_{i+k}."""
    shared: SharedEmbedding
    """The shared embedding and head (embed future tokens with `shared(ids)`)."""
    final_norm: nn.Module
    """The main model's final norm (objectives that reuse it, like Meta's heads)."""
    step: int
    """The optimizer step (identical on every rank): seeds per-step choices."""
    mask: DocumentMask | None = None
    """Attention within documents of the packed window (None: plain causal); pass it to the
    objective's transformer blocks."""


class MTPObjective(nn.Module):
    """Base class of the multi-token objectives; see the module docstring."""

    kind: ClassVar[str]
    options: ClassVar[dict[str, Option]] = {}
    reads_future_tokens: ClassVar[bool] = False
    shares_with_main_model: ClassVar[tuple[str, ...]] = ("lm_head (shared head)",)
    drafter: ClassVar[type[Drafter]]

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        if kind == NO_MTP or not kind.isidentifier():
            raise ValueError(f"MTP objective kind {kind!r} is not allowed: use an identifier "
                             f"other than {NO_MTP!r}")
        if kind in _REGISTRY and _REGISTRY[kind].__qualname__ != cls.__qualname__:
            raise ValueError(f"MTP objective kind {kind!r} is already registered by "
                             f"{_REGISTRY[kind].__module__}.{_REGISTRY[kind].__qualname__}")
        cls.kind = kind
        _REGISTRY[kind] = cls

    def __init__(self, dcfg: DecoderConfig, ctx: ParallelContext):
        super().__init__()

    def depth_hiddens(self, x: TailInputs) -> list[tuple[int, torch.Tensor]]:
        """(depth j, hidden [B, T, d] scored against labels[:, j]) for the depths trained at
        `x.step`, in increasing j ≥ 1. The hidden states are what the shared head reads (after
        whatever norm the objective applies)."""
        raise NotImplementedError

    @classmethod
    def check_options(cls, mtp: MTPConfig) -> None:
        """Raise ValueError for option combinations the objective cannot train."""

    @classmethod
    def freezes_trunk(cls, mtp: MTPConfig) -> bool:
        """Whether the main model (embedding, blocks, final norm, head) stays frozen."""
        return False


def register_builtins() -> None:
    for name in _BUILTIN_MODULES:
        importlib.import_module(name)


def objective_kinds() -> tuple[str, ...]:
    """The registered objective kinds (built-ins first, then those registered later)."""
    register_builtins()
    return tuple(_REGISTRY)


def mtp_kinds() -> tuple[str, ...]:
    """Every valid `mtp.kind`: 'none' and each registered objective."""
    return (NO_MTP, *objective_kinds())


def objective_class(kind: str) -> type[MTPObjective]:
    register_builtins()
    if kind not in _REGISTRY:
        raise ValueError(f"mtp.kind = {kind!r} is unknown; use one of {mtp_kinds()}")
    return _REGISTRY[kind]
