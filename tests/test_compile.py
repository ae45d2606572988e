"""The opt-in compiled training path (model.compile) computes what the eager path computes."""

from __future__ import annotations

import pytest
import torch

from model import MTPLanguageModel, single_process_context
from model.block import TransformerBlock
from model.compile import compile_for_training
from model.kv_cache import KVCache
from tests.model_fixtures import make_batch, randomize_, tiny_config


def _pair(dcfg):
    ctx = single_process_context()
    eager = MTPLanguageModel(dcfg, ctx)
    randomize_(eager)
    compiled = MTPLanguageModel(dcfg, ctx)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


@pytest.mark.parametrize("kind,depth", [("deepseek", 2), ("parallel", 3), ("blockwise", 3)])
def test_compiled_blocks_and_loss_kernels_match_eager(kind, depth):
    # Chunks of 7 rows over 2·12·depth rows: a ragged last chunk, i.e. two chunk shapes for the
    # dynamically shaped loss kernels.
    dcfg = tiny_config(kind, depth, loss_chunk_tokens=7)
    eager, compiled = _pair(dcfg)
    # DeepSeek modules and parallel heads are transformer blocks; BPD heads are single FFNs (eager).
    extra_blocks = 0 if kind == "blockwise" else depth
    assert compile_for_training(compiled) == dcfg.model.num_layers + extra_blocks
    assert compiled.embedding.loss_kernels == "inductor" and eager.embedding.loss_kernels == "eager"
    # Same module tree: checkpoints and exports do not see the compilation.
    assert list(compiled.state_dict()) == list(eager.state_dict())

    ids, labels, mask = make_batch(depth)
    outs = []
    for model in (eager, compiled):
        out = model(ids, labels, mask, mtp_weight=0.3)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1].depth_loss, outs[0].depth_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1].depth_accuracy, outs[0].depth_accuracy, rtol=0, atol=0)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_cached_forward_of_a_compiled_block_stays_eager(monkeypatch):
    """Generation calls blocks with a KV cache; that path must not go through the compiled
    training forward (its cache state would trigger recompilation at every step)."""
    dcfg = tiny_config("none")
    _, model = _pair(dcfg)
    compile_for_training(model)
    calls = []
    for block in model.blocks:
        assert isinstance(block, TransformerBlock)
        monkeypatch.setattr(block, "_compiled_forward",
                            lambda x, _c=calls: _c.append(1) or torch.zeros_like(x))
    m = dcfg.model
    ids = torch.randint(0, m.vocab_size, (1, 5))
    cache = KVCache(m.num_layers, 1, m.kv_heads, 16, m.head_dim, torch.float32, ids.device)
    positions = torch.arange(5).unsqueeze(0)  # [1, 5]
    h = model.embedding(ids)
    for i, block in enumerate(model.blocks):
        h = block(h, cache.layer(i, positions, attend_len=5))
    assert calls == [] and h.abs().sum() > 0
    model.blocks[0](h)  # without a cache: the compiled forward
    assert calls == [1]


@pytest.mark.parametrize("setting,gpu_with_triton,expected", [
    ("auto", True, "triton"), ("auto", False, "inductor"), ("eager", True, "eager"),
    ("inductor", True, "inductor")])
def test_loss_kernel_choice(monkeypatch, setting, gpu_with_triton, expected):
    """`model.loss_kernels: auto` becomes Triton only on a GPU with Triton, Inductor otherwise,
    and only once the model is compiled; an explicit choice is kept."""
    from model import accelerator
    monkeypatch.setattr(accelerator, "triton_supported", lambda: gpu_with_triton)
    model = MTPLanguageModel(tiny_config("deepseek", 1, loss_kernels=setting),
                             single_process_context())
    assert model.embedding.loss_kernels == ("eager" if setting == "auto" else setting)
    compile_for_training(model)
    assert model.embedding.loss_kernels == expected
    # The DeepSeek input mix and the norms outside blocks are compiled regions of their own;
    # the norms inside blocks and inside the mix are covered by those regions.
    mtp = model.tail.objective.layers[0]
    assert mtp._compiled_mix is not None and mtp.out_norm._compiled_forward is not None
    assert model.tail.final_norm._compiled_forward is not None
    assert mtp.hidden_norm._compiled_forward is None
    assert all(b.attn_norm._compiled_forward is None
               for b in model.modules() if isinstance(b, TransformerBlock))
