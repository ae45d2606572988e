"""Rank functions comparing tensor-parallel models with the single-process model (same weights)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _compare_one(dcfg, tp_ctx, single_ctx, mtp_weight=0.3, step=5):
    """The TP model (with whatever recomputation and sequence parallelism `dcfg` and `tp_ctx`
    ask for) against the plain single-process model: no recomputation, whole sequences."""
    import copy

    from model import MTPLanguageModel
    from model.sharding import full_grads, full_state_dict, load_full_state_dict
    from tests.model_fixtures import make_batch, randomize_

    ref_cfg = copy.deepcopy(dcfg)
    ref_cfg.model.recompute, ref_cfg.model.recompute_num_layers = "none", None
    torch.manual_seed(0)
    ref = MTPLanguageModel(ref_cfg, single_ctx)
    torch.manual_seed(0)
    tp = MTPLanguageModel(dcfg, tp_ctx)
    # Built from the same seed, the TP model already holds exactly the slices of the TP=1 model.
    fresh = full_state_dict(tp, tp_ctx.tp_group)
    for n, p in ref.named_parameters():
        assert torch.equal(fresh[n], p.detach()), f"init of {n} differs between TP=1 and TP={tp_ctx.tp_size}"

    randomize_(ref)
    load_full_state_dict(tp, {n: p.detach() for n, p in ref.named_parameters()}, tp_ctx.tp_group)
    batch = make_batch(dcfg.mtp.depth)
    out_ref = ref(*batch, mtp_weight=mtp_weight, step=step)
    out_ref.loss.backward()
    out_tp = tp(*batch, mtp_weight=mtp_weight, step=step)
    out_tp.loss.backward()

    torch.testing.assert_close(out_tp.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_tp.depth_loss, out_ref.depth_loss, rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    torch.testing.assert_close(out_tp.depth_accuracy, out_ref.depth_accuracy, rtol=0, atol=1e-6,
                               equal_nan=True)
    got = full_grads(tp, tp_ctx.tp_group)
    worst = 0.0
    for n, p in ref.named_parameters():
        if p.grad is None:
            assert got[n] is None or not got[n].any(), n
            continue
        assert got[n] is not None, f"{n}: no gradient under TP"
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        worst = max(worst, (got[n] - p.grad).abs().max().item())
    logits_ref = ref.main_logits(batch[0])
    torch.testing.assert_close(tp.main_logits(batch[0]), logits_ref, rtol=1e-5, atol=1e-5)
    return worst


def tensor_parallel_equals_single(rank, world, tp_size, cases):
    """Every rank: TP groups of `tp_size` consecutive ranks; each case is (kind, depth, model
    overrides, mtp options[, sequence_parallel]). Returns the worst gradient difference per
    case."""
    from megatron.core import parallel_state

    from model import ParallelContext, single_process_context
    from tests.model_fixtures import tiny_config

    single = single_process_context()
    groups = [dist.new_group(list(range(s, s + tp_size))) for s in range(0, world, tp_size)]
    group = groups[rank // tp_size]
    # megatron's own vocab_parallel_cross_entropy (loss_impl 'unfused') reads parallel_state.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    assert parallel_state.get_tensor_model_parallel_rank() == group.rank()

    worst = {}
    for kind, depth, overrides, mtp_options, *sp in cases:
        tp_ctx = ParallelContext(group, sequence_parallel=bool(sp and sp[0]))
        dcfg = tiny_config(kind, depth, **overrides)
        dcfg.mtp.options.update(mtp_options)
        dcfg.validate(tp_size)
        name = f"{kind}{depth}{overrides}{mtp_options}{'sp' if sp and sp[0] else ''}"
        if dcfg.model.loss_impl == "unfused":
            # The reference then also runs megatron's CE at TP=1, which needs parallel_state of
            # size 1: compare against the fused single-process model instead.
            ref_cfg = tiny_config(kind, depth, **{**overrides, "loss_impl": "fused"})
            ref_cfg.mtp.options.update(mtp_options)
            worst[name] = _compare_cross(dcfg, ref_cfg, tp_ctx, single)
            continue
        worst[name] = _compare_one(dcfg, tp_ctx, single)
    parallel_state.destroy_model_parallel()
    return worst


def _compare_cross(tp_cfg, ref_cfg, tp_ctx, single_ctx):
    """TP model with megatron's unfused CE vs single-process model with the fused CE."""
    from model import MTPLanguageModel
    from model.sharding import full_grads, load_full_state_dict
    from tests.model_fixtures import make_batch, randomize_

    torch.manual_seed(0)
    ref = MTPLanguageModel(ref_cfg, single_ctx)
    randomize_(ref)
    tp = MTPLanguageModel(tp_cfg, tp_ctx)
    load_full_state_dict(tp, {n: p.detach() for n, p in ref.named_parameters()}, tp_ctx.tp_group)
    batch = make_batch(tp_cfg.mtp.depth)
    a, b = ref(*batch, mtp_weight=0.3), tp(*batch, mtp_weight=0.3)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.depth_accuracy, a.depth_accuracy, rtol=0, atol=1e-6)
    got = full_grads(tp, tp_ctx.tp_group)
    worst = 0.0
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        worst = max(worst, (got[n] - p.grad).abs().max().item())
    return worst
