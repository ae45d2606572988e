"""The host side of a checkpoint save: buffers reserved ahead of the first save, packed into
slabs, and the safetensors file written from them without a second copy."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from pretrain.checkpoint_state import HostBuffers, write_safetensors


def test_reserved_buffers_are_disjoint_aligned_views_that_saves_reuse(monkeypatch):
    monkeypatch.setattr(HostBuffers, "SLAB_BYTES", 4096)
    layout = [("a|0|fp32", 300, torch.float32), ("b|0|fp32", 7, torch.float32),
              ("c|1|exp_avg", 1000, torch.float32),  # 4000 bytes: fills a slab alone
              ("d|0|fp32", 5, torch.bfloat16), ("e|0|fp32", 0, torch.float32),
              ("f|0|exp_avg_sq", 2000, torch.float32)]  # larger than a slab: slabs grow to 8192
    buffers = HostBuffers(pinned=False)
    buffers.reserve(layout)
    spans = []
    for key, numel, dtype in layout:
        buf = buffers._buffers[key]
        assert (buf.numel(), buf.dtype) == (numel, dtype)
        start = buf.data_ptr()
        assert start % HostBuffers.ALIGN == 0, key
        spans.append((start, start + numel * dtype.itemsize))
    spans.sort()
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no overlap
    data = sum(n * d.itemsize for _, n, d in layout)
    # 8192-byte slabs hold f (8000 B); c (4000 B) and the rest (1264 B after alignment) share one
    assert data <= buffers.reserved_bytes <= 8192 + 4000 + 1264 + 5 * HostBuffers.ALIGN

    t = torch.randn(300)
    copy = buffers.copy("a|0|fp32", t)
    assert copy.data_ptr() == buffers._buffers["a|0|fp32"].data_ptr()  # the reserved one
    assert torch.equal(copy, t)
    # A fragment whose size changed (not expected within a run) gets a buffer of its own.
    assert buffers.copy("b|0|fp32", torch.ones(9)).numel() == 9


def test_streamed_safetensors_file_reads_back_exactly(tmp_path):
    slab = torch.zeros(4096, dtype=torch.uint8)
    tensors = {
        "w|0|fp32": slab[0:400].view(torch.float32).copy_(torch.randn(100)),
        "w|0|exp_avg": slab[448:848].view(torch.float32).copy_(torch.randn(100)),
        "bf": torch.randn(3, 5).to(torch.bfloat16),
        "empty": torch.empty(0),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    path = tmp_path / "state.safetensors"
    write_safetensors(path, tensors)
    back = safetensors.torch.load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_a_stopped_reservation_leaves_the_saves_to_allocate():
    import threading

    stop = threading.Event()
    stop.set()  # the run ended before the reservation began its first slab
    buffers = HostBuffers(pinned=False)
    buffers.reserve([("a|0|fp32", 10, torch.float32)], stop)
    assert buffers.reserved_bytes == 0 and not buffers._buffers
    t = torch.randn(10)
    assert torch.equal(buffers.copy("a|0|fp32", t), t)


def test_host_memory_warning_names_the_need_and_the_fix():
    from pretrain.checkpoint_state import host_memory_available, host_memory_warning

    gib = 2**30
    assert host_memory_warning(47 * gib, 2, 256 * gib) is None  # the 8B run on a 256 GiB host
    text = host_memory_warning(47 * gib, 8, 256 * gib)
    assert "47.0 GiB" in text and "8 rank(s)" in text and "376.0 GiB" in text
    assert "256.0 GiB available" in text and "checkpoint.async_save=false" in text
    assert host_memory_warning(47 * gib, 8, None) is None  # unknown: say nothing
    available = host_memory_available()
    assert available is None or available > 0


def test_a_reservation_stopped_between_slabs_keeps_what_it_has(monkeypatch):
    monkeypatch.setattr(HostBuffers, "SLAB_BYTES", 1024)

    class StopAfterFirstSlab:  # what CheckpointWriter.wait_local's event looks like mid-way
        checks = 0

        def is_set(self):
            self.checks += 1
            return self.checks > 1

    layout = [(f"p{i}|0|fp32", 256, torch.float32) for i in range(3)]  # one 1 KiB slab each
    buffers = HostBuffers(pinned=False)
    buffers.reserve(layout, StopAfterFirstSlab())
    assert buffers.reserved_bytes == 1024 and len(buffers._buffers) == 1
    for key, numel, _ in layout:  # the reserved key is reused; the others are allocated anew
        buffers.copy(key, torch.ones(numel))
    assert buffers.allocated_by_saves == 2


def test_streamed_file_keeps_every_tensor_aligned_and_refuses_what_it_cannot_write(tmp_path):
    from safetensors import safe_open

    tensors = {"a_bf16": torch.ones(3, dtype=torch.bfloat16), "b_f32": torch.arange(5.0),
               "c_i64": torch.arange(2), "d_u8": torch.ones(3, dtype=torch.uint8)}
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, tensors)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    with safe_open(path, "pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
    import json

    header = json.loads(path.read_bytes()[8: 8 + header_len])
    for name, t in tensors.items():
        assert (8 + header_len + header[name]["data_offsets"][0]) % t.element_size() == 0, name
    with pytest.raises(ValueError, match="x: write_safetensors takes contiguous host tensors"):
        write_safetensors(tmp_path / "bad.safetensors", {"x": torch.ones(4, 4).t()})
    with pytest.raises(ValueError, match="torch.int8"):
        write_safetensors(tmp_path / "bad.safetensors", {"y": torch.ones(2, dtype=torch.int8)})
