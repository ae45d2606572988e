"""Document-masked attention (data.mask_cross_document: attention): in a packed window, every
depth's hidden states equal those of running each document on its own, for every MTP objective;
the FlexAttention block mask (the GPU path) gives the dense mask's values; and a training step
on packed windows with documents really differs from plain causal attention."""

from __future__ import annotations

import pytest
import torch

from data_pipeline import document_ids
from model import MTPLanguageModel, single_process_context
from model.attention import document_mask
from model.mtp import TailInputs
from tests.model_fixtures import KINDS, VOCAB, randomize_, tiny_config

EOS = 2


def _depth_states(model, ids, labels, mask):
    """Every depth's hidden state [B, T, d] (0: the main model's final-norm output)."""
    trunk = model.trunk(ids, mask)
    main = model.tail.final_norm(trunk)
    extra = []
    if model.tail.objective is not None:
        extra = model.tail.objective.depth_hiddens(TailInputs(
            trunk, main, labels, model.embedding, model.tail.final_norm, 0, mask))
    return [main] + [h for _, h in extra]


def test_document_ids_follow_the_label_rule():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8]])
    # An EOS belongs to the document it ends; the token after it starts the next one.
    assert document_ids(ids, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3]]


@pytest.mark.parametrize("kind", ("none", *KINDS))
def test_packed_documents_equal_documents_run_alone(kind):
    depth = 0 if kind == "none" else 2
    dcfg = tiny_config(kind, depth)
    torch.manual_seed(0)
    model = MTPLanguageModel(dcfg, single_process_context())
    randomize_(model)
    g = torch.Generator().manual_seed(1)
    # A packed stream: document A (7 tokens, ending with EOS), document B (5 tokens), and the
    # tokens after the window that B's deeper labels reach.
    stream = torch.randint(3, VOCAB, (1, 12 + depth + 1), generator=g)
    stream[0, 6] = EOS
    ids = stream[:, :12]
    labels = torch.stack([stream[:, 1 + j: 13 + j] for j in range(depth + 1)], dim=1)
    packed = _depth_states(model, ids, labels,
                           document_mask(document_ids(ids, EOS), flex=False))
    for lo, hi in ((0, 7), (7, 12)):  # each document alone, from position 0, plain causal
        alone = _depth_states(model, ids[:, lo:hi], labels[:, :, lo:hi], None)
        for j, (p, a) in enumerate(zip(packed, alone)):
            torch.testing.assert_close(p[:, lo:hi], a, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, j=j, lo=lo: f"depth {j}, doc at {lo}: {m}")
    # Without the mask document B sees document A: the check above is not vacuous.
    crossing = _depth_states(model, ids, labels, None)
    assert (crossing[0][:, 7:] - packed[0][:, 7:]).abs().max() > 1e-3


def test_flex_block_mask_equals_the_dense_mask():
    """The GPU path (FlexAttention block mask) computes the dense mask's attention; on the CPU
    FlexAttention has no backward, so the forward is compared."""
    from model.attention import _attend

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 16, generator=g)
    k, v = torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
    ids = torch.randint(3, VOCAB, (2, 64), generator=g)
    ids[0, [9, 30, 31]] = EOS
    ids[1, 50] = EOS
    doc = document_ids(ids, EOS)
    dense = _attend(q, k, v, document_mask(doc, flex=False), gqa=True)
    flex = _attend(q, k, v, document_mask(doc, flex=True), gqa=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
