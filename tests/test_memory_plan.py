"""The memory plan (pretrain/memory_plan.py) against what a model really holds on the CPU.

The CPU has no allocator peak to compare with, so each part is checked against its own count:
* activations: every tensor autograd saves for the backward, seen through saved-tensor hooks in
  a real forward (eager, fp32), for every objective and recompute mode — the plan's itemisation
  must come within 5 % (it does within 2 %);
* parameters and optimizer states: the tensors a real DeepSpeed engine holds after a step,
  ZeRO-1 and ZeRO-2 over two data-parallel ranks;
* every shipped config plans at its intended size (and the 8B shape fits an 80 GB card only
  with its memory options on).
GPU peaks beside the plan are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import DecoderConfig, ModelConfig, MTPConfig, MTPLanguageModel, single_process_context
from pretrain.memory_plan import GIB, _tail_activation, block_activation
from tests.distributed import run_world
from tests.model_fixtures import KINDS

REPO = Path(__file__).resolve().parents[1]


def _saved_bytes(forward, to_loss, skip: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs (storages in `skip`
    — parameters, inputs — aside); `to_loss(output)`, built outside the count, is
    backpropagated."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    to_loss(out).backward()
    return sum(seen.values())


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("kind", ("none", *KINDS))
def test_activation_itemisation_matches_the_saved_tensors(kind, mode):
    b, t, v, d = 2, 40, 512, 96
    depth = 0 if kind == "none" else 2
    dcfg = DecoderConfig(ModelConfig(vocab_size=v, hidden_size=d, num_layers=2, num_heads=3,
                                     num_kv_heads=1, ffn_hidden_size=160, max_seq_len=t,
                                     loss_chunk_tokens=64, recompute=mode), MTPConfig(kind, depth))
    dcfg.validate()
    torch.manual_seed(0)
    model = MTPLanguageModel(dcfg, single_process_context())
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, v, (b, t), generator=g),
             torch.randint(0, v, (b, depth + 1, t), generator=g))
    measured = _saved_bytes(lambda: model(*batch, mtp_weight=0.3), lambda out: out.loss,
                            _storages(model.parameters()))
    planned = (2 * block_activation(dcfg.model, mode, 1, False, False, 4) * b * t
               + _tail_activation(dcfg, mode, 1, False, False, 4, b * t)
               + 4 * v * d)  # the loss's fp32 head-weight gradient, kept for the backward
    assert abs(planned / measured - 1) < 0.05, (planned, measured)


def _sequence_parallel_block_saves(rank, world):
    """World 2: bytes a TP 2 sequence-parallel block saves for its backward (its input aside),
    per token and in units of d, eager and compiled (and compiled with the re-gather, its
    gradients beside those of the same block without it), beside the plan's figure."""
    from model import ModelConfig, ParallelContext
    from model.block import TransformerBlock

    b, t, d = 1, 128, 128
    out, grads = {}, {}
    for mode, compiled, regather in (("none", False, False), ("none", True, False),
                                     ("selective", True, False), ("selective", True, True),
                                     ("full", True, False)):
        torch._dynamo.reset()
        cfg = ModelConfig(vocab_size=64, hidden_size=d, num_layers=2, num_heads=4,
                          num_kv_heads=2, ffn_hidden_size=256, max_seq_len=t, recompute=mode)
        torch.manual_seed(0)
        block = TransformerBlock(cfg, ParallelContext(torch.distributed.group.WORLD,
                                                      sequence_parallel=True,
                                                      sequence_parallel_regather=regather))
        if compiled:
            block.compile_training_forward()
        torch.manual_seed(1 + rank)
        x = torch.randn(b, t // world, d, requires_grad=True)
        saved = _saved_bytes(lambda block=block, x=x: block(x), lambda y: y.square().sum(),
                             _storages([*block.parameters(), x]))
        key = (mode, compiled, regather) if regather else (mode, compiled)
        out[key] = (saved / (b * t * 4 * d), block_activation(
            cfg, mode, world, True, compiled, 4, regather) / (4 * d))
        if mode == "selective":
            grads[regather] = [x.grad, *(p.grad for p in block.parameters())]
    # the re-gather changes where the gather runs, not what the backward computes
    out["gradient difference"] = max(float((a - b).abs().max())
                                     for a, b in zip(grads[False], grads[True]))
    return out


def test_sequence_parallel_activations_match_the_saved_tensors():
    """Under sequence parallelism the compiled block keeps whole-sequence gathered inputs of its
    column-parallel layers (+d a token against eager's shards): the plan counts them, and
    parallel.sequence_parallel_regather takes them back (same gradients). A compiled block under
    full recomputation keeps next to nothing beside its input."""
    result = run_world(_sequence_parallel_block_saves, 2, timeout_s=240)[0]
    assert result.pop("gradient difference") < 1e-5
    full = result.pop(("full", True))[0]
    for key, (measured, planned) in result.items():
        assert abs(planned / measured - 1) < 0.03, (key, measured, planned)
    assert result[("none", True)][0] > result[("selective", True)][0]
    # the re-gather keeps d values a token less: the shards instead of the gathered inputs
    regathered = result[("selective", True, True)][0]
    assert abs(result[("selective", True)][0] - regathered - 1) < 0.05, result
    # Compiled full recomputation keeps its input (not counted here) and the rotary tables
    # (0.5 d a token at this size); with torch 2.11 it kept what selective keeps (6 d) until its
    # collectives were marked for recomputation (model/recompute.py).
    assert full < 0.15 * result[("selective", True)][0], result


def engine_state_bytes(rank, world):
    """World 2: a tiny model's DeepSpeed engine (fp32, as on the CPU) after a step — the bytes
    of its weights, of the optimizer state on this rank (fp32 master partition and Adam's
    moments) and of its gradient-reduction buckets — beside the plan's figures. (Gradients live
    inside DeepSpeed's reduction during the backward; their peak is left to the GPU
    measurements.)"""
    from pretrain.config import load_config, validate_layout
    from pretrain.distributed import build_topology, init_distributed
    from pretrain.engine import build_engine
    from pretrain.launch import detect_launch_env
    from pretrain.memory_plan import plan_memory
    from pretrain.runtime import resolve_runtime

    init_distributed(detect_launch_env(), 60)
    out = {}
    for zero, overlap in ((1, False), (1, True), (2, False)):
        cfg = load_config("configs/tiny-cpu.yaml", [
            f"parallel.zero_stage={zero}", "train.micro_batch_size=1",
            "train.global_batch_size=4", "model.hidden_size=64", "model.num_layers=2",
            "model.ffn_hidden_size=128", "model.vocab_size=512", "mtp.depth=2",
            f"parallel.overlap_comm={str(overlap).lower()}"])
        layout = validate_layout(cfg, world)
        topo = build_topology(layout)
        engine = build_engine(cfg, layout, topo, resolve_runtime(cfg, layout),
                              torch.device("cpu"), 16).engine
        for micro in range(layout.grad_accum):
            loss = engine(torch.randint(0, 512, (1, 16)), torch.randint(0, 512, (1, 3, 16)),
                          None, mtp_weight=0.3).loss
            engine.backward(loss)
            if micro == 0:
                # DeepSpeed's reduction buckets, allocated whole however small the model: under
                # ZeRO-1 they live from the first backward to the step's reduction (0.93 GiB at
                # the 8B shape with its defaults); ZeRO-2 frees them at each backward's end.
                buffers = sum(b.numel() * b.element_size()
                              for bucket in engine.optimizer.ipg_buckets.values()
                              for b in bucket.buffer)
            engine.step()
        weights = sum(p.numel() * 4 for p in engine.module.parameters())
        opt = engine.optimizer
        state = sum(t.numel() * t.element_size() for t in opt.single_partition_of_fp32_groups)
        state += sum(t.numel() * t.element_size() for s in opt.optimizer.state.values()
                     for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        plan = plan_memory(cfg, layout, 16, bf16=False, compiled=False)
        out[f"ZeRO-{zero}{' overlapped' if overlap else ''}"] = {
            "weights": (weights, plan.parts["parameters"]),
            "optimizer": (state, plan.parts["optimizer states"]),
            **({"buffers": (buffers, plan.parts["buffers"])} if zero == 1 else {})}
    return out


@pytest.mark.distributed
def test_states_match_a_real_deepspeed_engine():
    for rank_result in run_world(engine_state_bytes, 2, timeout_s=120):
        # no bucket without the overlap; two (50M elements each) with it
        assert rank_result["ZeRO-1"]["buffers"] == (0, 0), rank_result["ZeRO-1"]
        assert rank_result["ZeRO-1 overlapped"]["buffers"][0] == 2 * 50_000_000 * 4
        for zero, parts in rank_result.items():
            for part, (real, planned) in parts.items():
                # DeepSpeed pads each flat group partition to an alignment of a few elements.
                assert real == planned or abs(planned / real - 1) < 0.02, (
                    zero, part, real, planned)


@pytest.mark.parametrize("config,gpus", [("tiny-cpu", 1), ("gpt-110m", 1), ("gpt-350m", 1),
                                         ("gpt-1b", 1), ("llama3-8b", 2), ("llama3-70b", 32)])
def test_every_shipped_config_plans_at_its_size(config, gpus, capsys):
    from pretrain.cli import main

    assert main(["plan", "--config", f"configs/{config}.yaml", "--gpus", str(gpus),
                 "--gpu-memory", "80", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "total (pipeline stage" in out and "fits in 80.0 GiB" in out, out


def test_plan_shows_what_the_8b_memory_options_buy(tmp_path):
    """TP 2 on two 80 GB cards: ~77 GiB planned without sequence parallelism and recomputation
    at micro-batch 1, under 72 GiB with the config's (sequence parallelism, full recomputation,
    micro-batch 2) — the reason the config turns them on (measured: 70.1 GiB on H200s,
    benchmarks/RESULTS.md)."""
    import json

    from pretrain.cli import main

    totals = {}
    for name, extra in (("plain", ["parallel.sequence_parallel=false", "model.recompute=none",
                                   "train.micro_batch_size=1"]),
                        ("config", [])):
        path = tmp_path / f"{name}.json"
        assert main(["plan", "--config", "configs/llama3-8b.yaml", *extra, "--gpus", "2",
                     "--gpu-memory", "80", "--json", str(path)]) == 0
        totals[name] = json.loads(path.read_text())["total_bytes"] / GIB
    assert 74 < totals["plain"] < 80 and totals["config"] < 72, totals


def test_plan_refuses_bad_input_with_one_line(capsys):
    from pretrain.cli import main

    assert main(["plan", "--config", "configs/llama3-8b.yaml", "--gpus", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtp plan: config error:") and "does not divide" in err
    assert main(["plan", "--config", "configs/llama3-8b.yaml", "--gpus", "2",
                 "--gpu-memory", "0"]) == 2
