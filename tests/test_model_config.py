"""Bad configurations raise errors that name the field and say how to fix it."""

from __future__ import annotations

import pytest
import torch

from model import MTPLanguageModel, single_process_context
from tests.model_fixtures import make_batch, tiny_config


@pytest.mark.parametrize(
    ("overrides", "tp", "match"),
    [
        (dict(num_heads=6, num_kv_heads=3, hidden_size=48), 4, r"model\.num_heads = 6 .*tensor-parallel size 4"),
        (dict(num_kv_heads=2), 4, r"model\.num_kv_heads = 2 .*tensor-parallel size 4"),
        (dict(vocab_size=97), 2, r"model\.vocab_size = 97 .*pad the vocabulary"),
        (dict(hidden_size=30), 1, r"model\.hidden_size = 30 is not divisible by model\.num_heads"),
        (dict(num_kv_heads=3), 1, r"model\.num_heads = 4 is not divisible by model\.num_kv_heads = 3"),
        (dict(hidden_size=20, num_heads=4, num_kv_heads=4), 1, r"must be even for rotary"),
        (dict(loss_chunk_tokens=0), 1, r"model\.loss_chunk_tokens = 0"),
        (dict(loss_impl="magic"), 1, r"model\.loss_impl"),
    ],
)
def test_bad_model_shape(overrides, tp, match):
    with pytest.raises(ValueError, match=match):
        tiny_config("deepseek", 1, **overrides).validate(tp)


@pytest.mark.parametrize(
    ("kind", "depth", "extra", "match"),
    [
        ("deepseek", 0, {}, r"mtp\.depth = 0 .*needs mtp\.depth >= 1"),
        ("parallel", -1, {}, r"mtp\.depth = -1"),
        ("none", 2, {}, r"mtp\.depth = 2 with mtp\.kind = 'none'"),
        ("medusa", 1, {}, r"mtp\.kind = 'medusa' is unknown"),
        ("parallel", 1, {"detach_trunk": True}, r"detach_trunk = True .*applies to kind 'deepseek'"),
        ("deepseek", 1, {"freeze_trunk": True}, r"freeze_trunk = True .*kind 'blockwise' only"),
        ("deepseek", 1, {"detach": True}, r"options\.detach .*has the options detach_trunk"),
        ("parallel", 1, {"detach": True}, r"kind 'parallel' has no options"),
        ("deepseek", 1, {"detach_trunk": "yes"}, r"detach_trunk = 'yes' must be a bool"),
    ],
)
def test_bad_mtp_config(kind, depth, extra, match):
    dcfg = tiny_config("deepseek", 1)
    dcfg.mtp.kind, dcfg.mtp.depth = kind, depth
    dcfg.mtp.options.update(extra)
    with pytest.raises(ValueError, match=match):
        dcfg.validate(1)


def test_mtp_options_shorthand_and_conflicts():
    """`mtp.NAME` is folded into `mtp.options.NAME` (the shorthand, and the layout of configs
    and checkpoints written before options had their own mapping)."""
    from pretrain.config import ConfigError, load_config

    cfg = load_config("configs/tiny-cpu.yaml", ["mtp.kind=blockwise", "mtp.freeze_trunk=true"])
    assert cfg.mtp.options == {"freeze_trunk": True, "sample_one_loss": False}
    assert cfg.mtp.freezes_trunk
    cfg = load_config("configs/tiny-cpu.yaml", ["mtp.options.detach_trunk=true"])
    assert cfg.mtp.option("detach_trunk") is True
    with pytest.raises(ConfigError, match=r"mtp\.detach_trunk and mtp\.options\.detach_trunk"):
        load_config("configs/tiny-cpu.yaml",
                    ["mtp.detach_trunk=true", "mtp.options.detach_trunk=false"])
    with pytest.raises(ConfigError, match=r"unknown key 'freeze_trunk' in mtp"):
        load_config("configs/tiny-cpu.yaml", ["mtp.freeze_trunk=true"])  # not a deepseek option


def test_model_refuses_an_invalid_config_at_construction():
    dcfg = tiny_config("deepseek", 0)
    dcfg.mtp.depth = 0
    with pytest.raises(ValueError, match=r"mtp\.depth"):
        MTPLanguageModel(dcfg, single_process_context())


def test_labels_with_the_wrong_depth_are_refused():
    torch.manual_seed(0)
    model = MTPLanguageModel(tiny_config("deepseek", 2), single_process_context())
    ids, labels, mask = make_batch(1)
    with pytest.raises(ValueError, match=r"labels carry 1 extra depths but the model's mtp\.depth is 2"):
        model(ids, labels, mask, mtp_weight=0.3)


def test_positions_beyond_max_seq_len_are_refused():
    torch.manual_seed(0)
    model = MTPLanguageModel(tiny_config("none", max_seq_len=8), single_process_context())
    ids, labels, _ = make_batch(0)
    with pytest.raises(ValueError, match=r"model\.max_seq_len = 8"):
        model(ids, labels)
