"""Learning-rate schedules: cosine and warmup-stable-decay, and what extending a run does."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, OptimConfig, load_config
from pretrain.schedules import learning_rate


def _curve(cfg: OptimConfig, steps: int) -> list[float]:
    return [learning_rate(cfg, s, steps) for s in range(steps)]


def test_cosine_warms_up_and_ends_at_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = _curve(cfg, 110)
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert learning_rate(cfg, 110, 110) == pytest.approx(0.1)


def test_wsd_holds_the_rate_then_decays_linearly_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_steps=20)
    lrs = _curve(cfg, 100)
    assert lrs[9] == pytest.approx(1.0) and set(lrs[10:80]) == {1.0}
    assert lrs[80] == pytest.approx(1.0 - 0.9 / 20) and lrs[99] == pytest.approx(0.1)
    assert all(b < a for a, b in zip(lrs[80:], lrs[81:]))
    # a fraction of the steps when decay_steps is not given
    frac = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.25)
    assert learning_rate(frac, 74, 100) == 1.0 and learning_rate(frac, 75, 100) < 1.0


def test_extending_a_run_keeps_wsd_and_moves_cosine():
    """A resume with a larger train.steps: WSD's curve up to the checkpoint (in its stable phase)
    and beyond is the longer run's, unchanged; cosine's rate jumps up at the checkpoint."""
    wsd = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_steps=20)
    cosine = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    step = 60  # the checkpoint, in WSD's stable phase of the 100-step run
    assert learning_rate(wsd, step, 100) == learning_rate(wsd, step, 200) == 1.0
    assert _curve(wsd, 200)[:180] == [min(1.0, (s + 1) / 10) for s in range(180)]
    jump = learning_rate(cosine, step, 200) - learning_rate(cosine, step, 100)
    assert jump > 0.3


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ConfigError, match=r"optim\.decay_fraction = 0"):
        load_config("configs/tiny-cpu.yaml", ["optim.schedule=wsd", "optim.decay_fraction=0"])
    with pytest.raises(ConfigError, match=r"optim\.schedule: 'linear' is not one of"):
        load_config("configs/tiny-cpu.yaml", ["optim.schedule=linear"])
