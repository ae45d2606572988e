"""The opt-in compiled training path (model.compile) computes what the eager path computes."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from model import MTPLanguageModel, single_process_context
from model.block import TransformerBlock
from model.compile import compile_for_training, use_loss_kernels
from model.generation import SamplingConfig
from model.generation.runner import new_cache
from tests.model_fixtures import make_batch, randomize_, tiny_config


def _pair(dcfg):
    ctx = single_process_context()
    eager = MTPLanguageModel(dcfg, ctx)
    randomize_(eager)
    compiled = MTPLanguageModel(dcfg, ctx)
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


@pytest.mark.parametrize("kind,depth,recompute", [
    ("deepseek", 2, "selective"), ("parallel", 3, "full"), ("blockwise", 3, "none")])
def test_compiled_blocks_and_loss_kernels_match_eager(kind, depth, recompute):
    # Chunks of 7 rows over 2·12·depth rows: a ragged last chunk, i.e. two chunk shapes for the
    # dynamically shaped loss kernels.
    dcfg = tiny_config(kind, depth, loss_chunk_tokens=7, recompute=recompute)
    eager, compiled = _pair(dcfg)
    counters.clear()
    # DeepSeek modules and parallel heads are transformer blocks; BPD heads are single FFNs (eager).
    extra_blocks = 0 if kind == "blockwise" else depth
    assert compile_for_training(compiled) == dcfg.model.num_layers + extra_blocks
    use_loss_kernels(compiled, "inductor")
    # Same module tree: checkpoints and exports do not see the compilation.
    assert list(compiled.state_dict()) == list(eager.state_dict())

    ids, labels, mask = make_batch(depth)
    outs = []
    for model in (eager, compiled):
        out = model(ids, labels, mask, mtp_weight=0.3)
        out.loss.backward()
        outs.append(out)
    # Each block is one graph, recomputed regions included: a graph break inside a checkpoint
    # leaves the block to run as eager pieces (slower, and holding more memory than without
    # recomputation).
    assert not counters["graph_break"], dict(counters["graph_break"])
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
                            lambda x, mask=None, _c=calls: _c.append(1) or torch.zeros_like(x))
    m = dcfg.model
    ids = torch.randint(0, m.vocab_size, (1, 5))
    cache = new_cache(model, 1, 16)
    positions = torch.arange(5).unsqueeze(0)  # [1, 5]
    h = model.embedding(ids)
    for block, layer in zip(model.blocks, cache.layers(positions, attend_len=5)):
        h = block(h, layer)
    assert calls == [] and h.abs().sum() > 0
    model.blocks[0](h)  # without a cache: the compiled forward
    assert calls == [1]


@pytest.mark.parametrize("setting,compile,gpu_with_triton,expected", [
    ("auto", "auto", True, "triton"), ("auto", "auto", False, "inductor"),
    ("auto", False, True, "eager"), ("eager", "auto", True, "eager"),
    ("inductor", "auto", True, "inductor")])
def test_runtime_policy_resolves_loss_kernels(monkeypatch, setting, compile, gpu_with_triton,
                                              expected):
    """`model.loss_kernels: auto` becomes Triton only for a compiled run on a GPU with Triton,
    Inductor for other compiled runs, eager otherwise; an explicit choice is kept. The policy
    is what the model is then given."""
    from model import accelerator
    from model.compile import use_loss_kernels
    from pretrain.config import Layout, load_config
    from pretrain.runtime import resolve_runtime

    for name, value in (("is_cpu", False), ("triton_supported", gpu_with_triton),
                        ("device_name", "NVIDIA H200"), ("communication_backend", "nccl"),
                        ("graphs_supported", True)):
        monkeypatch.setattr(accelerator, name, lambda v=value: v)
    cfg = load_config("configs/tiny-cpu.yaml", [f"model.loss_kernels={setting}",
                                                f"train.compile={str(compile).lower()}"])
    policy = resolve_runtime(cfg, Layout(world=2, tp=1, pp=1, dp=2, grad_accum=1))
    assert policy.loss_kernels == expected and policy.compile == (compile == "auto")
    assert policy.bf16 and policy.fused_adam and policy.overlap_comm and policy.device_graphs
    model = MTPLanguageModel(tiny_config("deepseek", 1, loss_kernels=setting),
                             single_process_context())
    assert model.embedding.loss_kernels == ("eager" if setting == "auto" else setting)
    use_loss_kernels(model, policy.loss_kernels)
    assert model.embedding.loss_kernels == expected


def test_compiled_regions_of_the_mtp_tail():
    model = MTPLanguageModel(tiny_config("deepseek", 1), single_process_context())
    compile_for_training(model)
    # The DeepSeek input mix and the norms outside blocks are compiled regions of their own;
    # the norms inside blocks and inside the mix are covered by those regions.
    mtp = model.tail.objective.layers[0]
    assert mtp._compiled_mix is not None and mtp.out_norm._compiled_forward is not None
    assert model.tail.final_norm._compiled_forward is not None
    assert mtp.hidden_norm._compiled_forward is None
    assert all(b.attn_norm._compiled_forward is None
               for b in model.modules() if isinstance(b, TransformerBlock))


@pytest.mark.slow
def test_compiled_decoding_regions_are_whole_graphs(monkeypatch):
    """The engine's compiled regions — every cached block forward, the DeepSeek input mix, the
    norms, the plain and speculative commits and the drafter's catch-up (which inlines its
    blocks' regions) — trace without graph breaks and decode what the uncompiled engine
    decodes: on GPUs their fused kernels are what the device graphs replay. Traced with the
    eager backend here (Inductor's CPU build would cost minutes)."""
    from torch._dynamo.utils import counters

    from model.generation import DecodingEngine

    torch._dynamo.reset()  # below the recompile limit whatever other tests compiled before
    counters.clear()
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic=None: compile_(
        fn, backend="eager", fullgraph=True, dynamic=dynamic))
    dcfg = tiny_config("deepseek", 1, num_kv_heads=2, max_seq_len=64)  # 2 queries per KV head
    model = MTPLanguageModel(dcfg, single_process_context()).eval()
    randomize_(model)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    want = DecodingEngine(model, compile=False)
    want = (want.generate(prompts, 8).tokens, want.generate(prompts, 8, speculative=True).stats)
    engine = DecodingEngine(model, compile=True)
    mtp = model.tail.objective.layers[0]
    assert mtp._compiled_decoding_mix is not None and mtp.hidden_norm._compiled_inference is None
    assert model.tail.final_norm._compiled_inference is not None
    assert all(b._compiled_decoding is not None for b in model.modules()
               if isinstance(b, TransformerBlock))
    assert engine.generate(prompts, 8).tokens == want[0]
    spec = engine.generate(prompts, 8, speculative=True)
    assert spec.tokens == want[0] and spec.stats == want[1]
    # Every region compiled (whole: fullgraph), a few shapes each, none fell back to eager.
    assert 6 <= counters["stats"]["unique_graphs"] <= 14, dict(counters["stats"])  # 9 now
    # Drafting over a reduced vocabulary traces whole too (fullgraph: a break would raise).
    reduced = DecodingEngine(model, compile=True,
                             draft_vocab=torch.arange(0, dcfg.model.vocab_size, 2))
    assert reduced.generate(prompts, 8, speculative=True).tokens == want[0]
    # So does sampling, plain and speculative, top-p or not: its random numbers are drawn
    # before the compiled regions and give what the uncompiled engine draws.
    eager = DecodingEngine(model, compile=False)
    for sampling in (SamplingConfig(temperature=1.0, seed=3),
                     SamplingConfig(temperature=0.8, top_p=0.9, seed=4)):
        for speculative in (False, True):
            assert (engine.generate(prompts, 8, sampling, speculative=speculative).tokens
                    == eager.generate(prompts, 8, sampling, speculative=speculative).tokens)
