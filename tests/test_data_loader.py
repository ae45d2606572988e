"""ShardLoader: coverage across DP ranks and workers, TP peers, exact resume, corrupt shards."""

import itertools
import shutil
from collections import Counter

import pytest
import torch

from data_pipeline import ShardError, ShardLoader, load_manifest, make_mtp_labels
from tests.test_data_common import read_all_windows, tiny_dataset

DEPTH = 2


def loader(data, split="train", **kw):
    args = {"dp_rank": 0, "dp_size": 1, "num_workers": 0, "batch_size": 3, "seed": 7,
            "depth": DEPTH, "shuffle_buffer": 50}
    args.update(kw)
    return ShardLoader(data, split, **args)


def rows(batches):
    """Each sample as a tuple of its T+D+1 tokens, rebuilt from input_ids and the last label row."""
    out = []
    for b in batches:
        for inp, lab in zip(b["input_ids"], b["labels"]):
            out.append(tuple(inp.tolist() + lab[-1, -(DEPTH + 1):].tolist()))
    return out


def take(ld, n_batches):
    return list(itertools.islice(iter(ld), n_batches))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory)


def test_batches_are_mtp_labels_of_stored_windows(data):
    m = load_manifest(data)
    stored = {tuple(w[: m.seq_len + DEPTH + 1].tolist()) for w in read_all_windows(data, "train").values()}
    batches = take(loader(data, mask_cross_document=True), 4)
    for b in batches:
        assert b["input_ids"].shape == (3, 16) and b["labels"].shape == (3, DEPTH + 1, 16)
        assert b["loss_mask"].dtype == torch.float32
        w = torch.cat([b["input_ids"], b["labels"][:, -1, -(DEPTH + 1):]], dim=1)
        ref = make_mtp_labels(w, DEPTH, m.eos_id, True)
        for got, want in zip((b["input_ids"], b["labels"], b["loss_mask"]), ref):
            assert torch.equal(got, want)
    assert set(rows(batches)) <= stored


def test_one_epoch_two_ranks_two_workers_sees_every_window_once(data):
    m = load_manifest(data)
    everything = Counter(tuple(w[: m.seq_len + DEPTH + 1].tolist())
                         for w in read_all_windows(data, "train").values())
    n = sum(everything.values())
    seen = Counter()
    for rank in (0, 1):
        ld = loader(data, dp_rank=rank, dp_size=2, num_workers=2, infinite=False)
        got = rows(list(ld))
        assert len(got) == ld.samples_per_epoch == (n + 1 - rank) // 2
        seen.update(got)
        # a TP peer of the same DP rank (other worker count) reads the very same batches
        peer = rows(list(loader(data, dp_rank=rank, dp_size=2, num_workers=0, infinite=False)))
        assert peer == got
    assert seen == everything
    # Training mode: each rank reads N // 2 distinct windows per epoch.
    tr = [rows(take(loader(data, dp_rank=r, dp_size=2, batch_size=1), n // 2)) for r in (0, 1)]
    assert sum((Counter(t) for t in tr), Counter()) <= everything
    assert len(tr[0]) == len(tr[1]) == n // 2


def test_fewer_shards_than_consumers(data):
    # val has 5 shards; 3 ranks x 2 workers = 6 readers: the split is by sample, not by shard.
    m = load_manifest(data)
    assert len(m.shards("val")) < 3 * 2
    everything = Counter(tuple(w[: m.seq_len + DEPTH + 1].tolist())
                         for w in read_all_windows(data, "val").values())
    seen = Counter()
    for rank in range(3):
        seen.update(rows(list(loader(data, "val", dp_rank=rank, dp_size=3, num_workers=2,
                                     batch_size=4))))
    assert seen == everything


def test_epochs_reshuffle_and_seed_matters(data):
    ld = loader(data, batch_size=1)
    n = ld.samples_per_epoch
    two = rows(take(ld, 2 * n))
    assert Counter(two[:n]) == Counter(two[n:]) and two[:n] != two[n:]
    assert ld.epoch == 2
    assert rows(take(loader(data, batch_size=1), 20)) == two[:20]
    assert rows(take(loader(data, batch_size=1, seed=8), 20)) != two[:20]
    unshuffled = rows(take(loader(data, batch_size=1, shuffle=False), 5))
    m = load_manifest(data)
    win = read_all_windows(data, "train")
    assert unshuffled == [tuple(win[i][: m.seq_len + DEPTH + 1].tolist()) for i in range(5)]


@pytest.mark.parametrize("save_workers,resume_workers", [(0, 0), (1, 1), (2, 2), (2, 1), (0, 2)])
def test_resume_is_exact(data, save_workers, resume_workers):
    bsz = 3
    ref_ld = loader(data, batch_size=bsz)
    n = ref_ld.samples_per_epoch
    ref = rows(take(ref_ld, (n // bsz) + 6))  # runs into epoch 1
    for k_batches in (1, 4, n // bsz - 1):  # the last one resumes across the epoch boundary
        ld = loader(data, batch_size=bsz, num_workers=save_workers)
        take(ld, k_batches)
        state = ld.state_dict()
        assert state["samples_consumed"] == k_batches * bsz
        fresh = loader(data, batch_size=bsz, num_workers=resume_workers)
        fresh.load_state_dict(state)
        assert rows(take(fresh, 4)) == ref[k_batches * bsz: (k_batches + 4) * bsz]


def test_resume_with_other_batch_size_and_full_tensors(data):
    ld = loader(data, batch_size=2, mask_cross_document=True)
    ref = take(ld, 6)
    a = loader(data, batch_size=2, num_workers=2, mask_cross_document=True)
    take(a, 2)
    b = loader(data, batch_size=2, num_workers=1, mask_cross_document=True)
    b.load_state_dict(a.state_dict())
    for got, want in zip(take(b, 4), ref[2:]):
        for key in ("input_ids", "labels", "loss_mask"):
            assert torch.equal(got[key], want[key])
    c = loader(data, batch_size=4)
    c.load_state_dict(a.state_dict())  # 4 samples consumed: continue with 4-sample batches
    assert rows(take(c, 1)) == rows(ref[2:4])
    with pytest.raises(ValueError, match="loader state has seed=7 but this loader has seed=8"):
        loader(data, seed=8).load_state_dict(a.state_dict())


def test_validation_one_pass_repeats(data):
    ld = loader(data, "val", batch_size=5, shuffle=False)
    first, second = rows(list(ld)), rows(list(ld))
    assert first == second and len(first) == ld.samples_per_epoch
    assert len(list(ld)) == ld.batches_per_epoch


def corrupted_copy(data, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(data, dst)
    return dst


def test_truncated_shard_is_named_or_skipped(data, tmp_path):
    d = corrupted_copy(data, tmp_path)
    shard = d / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"shard train-000002.tar: has 3000 bytes but the manifest "
                                         r"records \d+ \(truncated"):
        loader(d)
    ld = loader(d, skip_corrupt=True, infinite=False)
    assert list(ld.corrupt_shards) == ["train-000002.tar"] and ld.num_skipped_samples == 24
    m = load_manifest(d, check_files=False)
    assert len(rows(list(ld))) == m.num_samples("train") - 24


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_header_is_named_or_skipped(data, tmp_path, workers):
    d = corrupted_copy(data, tmp_path)
    shard = d / "train-000001.tar"
    raw = bytearray(shard.read_bytes())
    member = 512 + 512  # header + one data block (20 uint16 tokens) per sample
    raw[5 * member: 5 * member + 100] = b"\x07" * 100  # garbage in the 6th header, same size
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=r"shard train-000001.tar: is truncated or corrupt"):
        list(loader(d, shuffle=False, infinite=False, num_workers=workers))
    ld = loader(d, shuffle=False, infinite=False, num_workers=workers, skip_corrupt=True)
    got = rows(list(ld))
    assert list(ld.corrupt_shards) == ["train-000001.tar"]
    assert ld.num_skipped_samples == 24 - 5 and len(got) == ld.samples_per_epoch - 19
    problems = ld.verify()
    assert [p.shard for p in problems] == ["train-000001.tar"] and "sha256" in str(problems[0])


def test_verify_catches_flipped_token_byte(data, tmp_path):
    d = corrupted_copy(data, tmp_path)
    shard = d / "val-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[512 + 2] ^= 0x01  # inside the first sample's tokens: the tar stays readable
    shard.write_bytes(bytes(raw))
    assert loader(d).verify() == []  # train split untouched
    problems = loader(d, "val").verify()
    assert len(problems) == 1 and problems[0].shard == "val-000000.tar"


def run_steps(make, dp: int, global_batch: int, steps: int, state=None):
    """`steps` optimizer steps of `dp` data-parallel ranks of loaders `make(**kw)` (each rank
    walking its share in two micro-batches): per step, the Counter of sample rows over all
    ranks; and the (common) state of the ranks at the end."""
    micro = global_batch // (dp * 2)
    lds = [make(dp_rank=r, dp_size=dp, batch_size=micro, global_batch_size=global_batch)
           for r in range(dp)]
    for ld in lds:
        if state is not None:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in lds]
    per_step = []
    for _ in range(steps):
        per_step.append(Counter(rows([next(it) for it in its for _ in range(2)])))
    states = [ld.state_dict() for ld in lds]
    assert all(s == states[0] for s in states), "ranks disagree on the global position"
    return per_step, states[0]


@pytest.mark.parametrize("dp_before,dp_after", [(2, 1), (1, 4), (2, 4), (4, 2)])
def test_resume_at_another_data_parallel_size_continues_the_global_order(data, dp_before,
                                                                          dp_after):
    g, k, more = 8, 3, 9  # 96 samples: within epoch 0, so no sample may appear twice
    make = lambda **kw: loader(data, **kw)  # noqa: E731
    reference, _ = run_steps(make, 1, g, k + more)
    first, state = run_steps(make, dp_before, g, k)
    assert state["samples_consumed"] == k * g and state["step_in_progress"] is None
    resumed, _ = run_steps(make, dp_after, g, more, state=state)
    # Step by step the same samples (none repeated, none skipped), whatever the layout.
    assert first + resumed == reference
    everything = sum(reference, Counter())
    assert sum(first + resumed, Counter()) == everything and max(everything.values()) == 1


def test_reshard_across_an_epoch_boundary(data):
    ld = loader(data)
    n, g = ld.samples_per_epoch, 12
    steps = n // g + 3  # the resume point lies in epoch 0, the end in epoch 1
    make = lambda **kw: loader(data, **kw)  # noqa: E731
    reference, end = run_steps(make, 1, g, steps)
    first, state = run_steps(make, 2, g, steps - 5)
    resumed, end2 = run_steps(make, 3, g, 5, state=state)
    assert first + resumed == reference and end2 == end
    assert end["consumed_per_source"]["data"]["epoch"] == 1


def test_a_state_saved_mid_step_resumes_only_at_the_same_layout(data):
    a = loader(data, dp_rank=1, dp_size=2, batch_size=2, global_batch_size=8)
    ref = rows(take(loader(data, dp_rank=1, dp_size=2, batch_size=2, global_batch_size=8), 5))
    take(a, 3)  # one step (2 micro-batches) and half of the next
    state = a.state_dict()
    assert state["samples_consumed"] == 8 and state["step_in_progress"]["micro_batches"] == 1
    b = loader(data, dp_rank=1, dp_size=2, batch_size=2, global_batch_size=8, num_workers=2)
    b.load_state_dict(state)
    assert rows(take(b, 2)) == ref[6:10]
    with pytest.raises(ValueError, match="saved after 1 micro-batch.*step boundary"):
        loader(data, dp_size=1, batch_size=4, global_batch_size=8).load_state_dict(state)
