"""The staging ring that moves host batches to the device (its GPU path with fake pinned
buffers and events, since CI has no GPU; bench_training runs the real one)."""

import torch

from model import accelerator
from pretrain import device_feed
from pretrain.device_feed import DeviceFeeder


class _FakeEvent:
    def __init__(self, log):
        self.log, self.done = log, False

    def synchronize(self):
        self.log.append(self)
        self.done = True


def test_staging_ring_reuses_slots_after_their_event(monkeypatch):
    allocated, synced = [], []
    monkeypatch.setattr(accelerator, "is_cpu", lambda: False)

    def pinned(t):
        allocated.append(tuple(t.shape))
        return torch.empty_like(t)
    monkeypatch.setattr(device_feed.accelerator, "pinned_empty_like", pinned)
    events = []
    monkeypatch.setattr(device_feed.accelerator, "record_event",
                        lambda: events.append(_FakeEvent(synced)) or events[-1])
    feed = DeviceFeeder(torch.device("cpu"), slots=3)
    assert feed.staged
    outs = []
    for i in range(7):
        rows = 2 if i < 5 else 3  # a shape change (a short last batch) reallocates that slot
        batch = {"input_ids": torch.full((rows, 4), i), "labels": torch.full((rows, 2, 4), -i)}
        out = feed(batch)
        outs.append({k: v.clone() for k, v in out.items()})
        # The device copy is separate from the staging buffer (here .to() of a CPU tensor on
        # the CPU aliases it, so compare values now, before the slot is reused).
        assert all(torch.equal(out[k], batch[k]) for k in batch)
    # 3 slots × 2 keys at the first shape, then two slots reallocated for the new shape.
    assert allocated == [(2, 4), (2, 2, 4)] * 3 + [(3, 4), (3, 2, 4)] * 2
    # Batch i reuses slot i % 3 and first waits for the event recorded 3 batches earlier.
    assert synced == events[:4]
    assert [int(o["input_ids"][0, 0]) for o in outs] == list(range(7))


def test_cpu_batches_pass_through():
    feed = DeviceFeeder(torch.device("cpu"))
    batch = {"input_ids": torch.arange(6).view(2, 3)}
    assert not feed.staged and torch.equal(feed(batch)["input_ids"], batch["input_ids"])
