"""make_mtp_labels against a plain-Python reference, and the cross-document rule at EOS."""

import pytest
import torch

from data_pipeline import EOS_ID, make_mtp_labels
from data_pipeline.labels import _labels_torch


def naive_labels(window: list[int], t: int, depth: int, eos: int, mask_cross: bool):
    inputs = window[:t]
    labels = [[window[i + 1 + j] for i in range(t)] for j in range(depth + 1)]
    mask = []
    for j in range(depth + 1):
        row = []
        for i in range(t):
            crossed = any(window[k] == eos for k in range(i + 1, i + j + 1))
            row.append(0.0 if (mask_cross and crossed) else 1.0)
        mask.append(row)
    return inputs, labels, mask


@pytest.mark.parametrize("torch_path", [False, True])  # numpy (CPU) and torch (accelerator) code
@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("mask_cross", [False, True])
@pytest.mark.parametrize("extra", [0, 2])  # stored windows longer than T + D + 1
def test_labels_equal_naive_reference(depth, mask_cross, extra, torch_path):
    g = torch.Generator().manual_seed(depth * 10 + extra)
    t, b = 12, 5
    windows = torch.randint(3, 9, (b, t + depth + 1 + extra), generator=g)
    windows[torch.rand(windows.shape, generator=g) < 0.2] = EOS_ID  # many boundaries
    windows[0, 3] = windows[0, 4] = EOS_ID  # back-to-back EOS (an empty document)
    if torch_path:
        inp, lab, mask = _labels_torch(windows, t, depth, EOS_ID, mask_cross)
    else:
        inp, lab, mask = make_mtp_labels(windows, depth, EOS_ID, mask_cross, seq_len=t)
    assert inp.shape == (b, t) and lab.shape == (b, depth + 1, t) and mask.shape == lab.shape
    assert inp.dtype == torch.int64 and lab.dtype == torch.int64 and mask.dtype == torch.float32
    for r in range(b):
        ri, rl, rm = naive_labels(windows[r].tolist(), t, depth, EOS_ID, mask_cross)
        assert inp[r].tolist() == ri
        assert lab[r].tolist() == rl
        assert mask[r].tolist() == rm


def test_default_seq_len_uses_whole_window():
    w = torch.arange(10).view(1, 10)
    inp, lab, _ = make_mtp_labels(w, 2, EOS_ID, False)
    assert inp.tolist() == [list(range(7))]
    assert lab[0, 2].tolist() == list(range(3, 10))


def test_mask_at_eos_positions():
    e = EOS_ID
    # positions:      0  1  2  3  4  5  6  7
    w = torch.tensor([[5, 6, e, 7, 8, e, 9, 4]])
    _, lab, mask = make_mtp_labels(w, depth=2, eos_id=e, mask_cross_document=True, seq_len=5)
    assert lab[0].tolist() == [[6, e, 7, 8, e], [e, 7, 8, e, 9], [7, 8, e, 9, 4]]
    # Row 0 (next token) is never masked, including EOS -> first token of the next document.
    assert mask[0, 0].tolist() == [1, 1, 1, 1, 1]
    # Row 1 targets w[i+2]: masked iff w[i+1] is EOS. i=0 targets the EOS itself: kept.
    # i=1: input 6, EOS at 2, target 7 (next document): masked. i=2: input EOS acts as the
    # next document's BOS: kept. i=4: input 8, EOS at 5, target 9: masked.
    assert mask[0, 1].tolist() == [1, 0, 1, 1, 0]
    # Row 2 targets w[i+3]: masked iff an EOS is in w[i+1..i+2].
    # i=0: w[1..2] has EOS -> target 7 masked. i=1: EOS at 2 -> masked. i=2: w[3..4] clean, keep.
    # i=3: EOS at 5 -> masked. i=4: EOS at 5 -> masked.
    assert mask[0, 2].tolist() == [0, 0, 1, 0, 0]
    _, _, unmasked = make_mtp_labels(w, 2, e, False, seq_len=5)
    assert unmasked.eq(1).all()


def test_label_errors_are_clear():
    with pytest.raises(ValueError, match=r"must be \[B, L\]"):
        make_mtp_labels(torch.zeros(4, dtype=torch.long), 1, EOS_ID, False)
    with pytest.raises(ValueError, match="cannot hold seq_len=8 plus depth=3"):
        make_mtp_labels(torch.zeros(2, 10, dtype=torch.long), 3, EOS_ID, False, seq_len=8)
