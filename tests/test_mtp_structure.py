"""The tail shares the embedding and head, DeepSeek's chain is causal, detach really detaches."""

from __future__ import annotations

import torch

from model import MTPLanguageModel, single_process_context
from tests.model_fixtures import KINDS, VOCAB, make_batch, randomize_, tiny_config


def build(dcfg, seed=0):
    torch.manual_seed(seed)
    model = MTPLanguageModel(dcfg, single_process_context())
    randomize_(model)
    return model


def grads(model, mtp_weight, batch):
    model.zero_grad(set_to_none=True)
    model(*batch, mtp_weight=mtp_weight).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_tail_owns_no_vocabulary_matrix_and_uses_the_shared_one():
    for kind in KINDS:
        model = build(tiny_config(kind, 2))
        for n, p in model.tail.named_parameters():
            assert VOCAB not in p.shape, f"{kind}: tail parameter {n} {tuple(p.shape)} looks like a vocab matrix"
        # Gradients from the MTP losses arrive at the one shared head (and, for DeepSeek, at the
        # shared input embedding through the future-token embeddings).
        batch = make_batch(2)
        g0, g1 = grads(model, 0.0, batch), grads(model, 0.5, batch)
        assert not torch.allclose(g0["embedding.head_weight"], g1["embedding.head_weight"])
        emb_moved = not torch.allclose(g0["embedding.word_embeddings.weight"],
                                       g1["embedding.word_embeddings.weight"])
        assert emb_moved, kind  # every kind backpropagates its MTP loss into the trunk here


def test_tied_embeddings_share_storage():
    model = build(tiny_config("deepseek", 1, tie_embeddings=True))
    assert model.embedding.head_weight is None
    assert model.embedding.output_weight is model.embedding.word_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert not any("head_weight" in n for n in names)


def test_deepseek_chain_is_causal_and_parallel_heads_are_not():
    batch = make_batch(2)
    for kind, chained in (("deepseek", True), ("parallel", False)):
        model = build(tiny_config(kind, 2))
        before = model(*batch, mtp_weight=0.3).depth_loss.detach()
        first = model.tail.objective.layers[0] if kind == "deepseek" else model.tail.objective.heads[0]
        with torch.no_grad():
            for p in first.parameters():
                p.add_(0.2 * torch.randn_like(p))
        after = model(*batch, mtp_weight=0.3).depth_loss.detach()
        assert torch.equal(before[0], after[0])  # main loss untouched by the tail
        assert not torch.equal(before[1], after[1])  # depth 1 uses the changed weights
        assert (not torch.equal(before[2], after[2])) == chained, kind


def test_deepseek_detach_stops_mtp_gradients_at_the_trunk():
    batch = make_batch(2)
    dcfg = tiny_config("deepseek", 2)
    dcfg.mtp.options["detach_trunk"] = True
    model = build(dcfg)
    g0, g1 = grads(model, 0.0, batch), grads(model, 0.8, batch)
    for n in g0:
        if n.startswith("blocks.") or n == "tail.final_norm.weight":
            torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0, msg=n)
    # The shared embedding/head still learn from the MTP losses.
    assert not torch.allclose(g0["embedding.head_weight"], g1["embedding.head_weight"])
    # Without detach, the trunk does receive MTP gradients.
    model2 = build(tiny_config("deepseek", 2))
    h0, h1 = grads(model2, 0.0, batch), grads(model2, 0.8, batch)
    assert not torch.allclose(h0["blocks.0.mlp.down.weight"], h1["blocks.0.mlp.down.weight"])


def test_main_logits_agree_with_main_loss():
    model = build(tiny_config("deepseek", 1))
    ids, labels, _ = make_batch(1)
    logits = model.main_logits(ids)
    assert logits.shape == (ids.shape[0], ids.shape[1], VOCAB)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 0].flatten())
    out = model(ids, labels, None, mtp_weight=0.0)
    torch.testing.assert_close(out.depth_loss[0], ce, rtol=1e-5, atol=1e-6)
    assert not any(k.startswith("tail.objective") for k in model.main_model_state_dict())
