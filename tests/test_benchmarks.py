"""The GPU benchmarks' drivers run on CPU with the toy shape (the numbers mean nothing here:
this checks the plumbing — rows in their own processes, results, table, profile)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.train_fixtures import build_tiny_dataset

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # whole training/export/eval runs in subprocesses


def _load_script(name: str):
    """benchmarks/NAME.py as a module (its main() reads sys.argv)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_training_smoke(tmp_path, monkeypatch):
    data = build_tiny_dataset(tmp_path / "fixture", max_depth=4)
    root = tmp_path / "bench-data"
    root.mkdir()
    (root / "stdlib-seq16").symlink_to(data)  # where the driver looks for the tiny shape's shards
    out = tmp_path / "train.json"
    profile, host_profile = tmp_path / "profile.txt", tmp_path / "host.txt"
    chunked = "ours-deepseek1+model.loss_chunk_tokens=8"  # a row with a config override
    # Two rows at a time (--concurrent, one per "GPU": a CUDA_VISIBLE_DEVICES that the CPU
    # ignores), the plain row first: its whole-model torch.compile takes as long as our two rows
    # together, which run beside it on the second core.
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_training.py", "--shapes", "tiny", "--rows",
         f"plain,ours-none,{chunked}", "--data", str(root), "--steps", "2", "--warmup", "1",
         "--gpus", "2", "--concurrent", "2",
         "--json", str(out), "--profile", f"tiny:ours-none={profile}",
         "--host-profile", f"tiny:{chunked}={host_profile}"],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["tiny"]
    assert set(rows) == {"ours-none", chunked, "plain"}
    for name, r in rows.items():
        assert "error" not in r, (name, r)
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == 2 and r["device"] == "cpu"
    assert rows["ours-none"]["compiled"] is False  # train.compile auto: off on CPU
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("| tiny |")]
    assert [ln.split("|")[2].strip() for ln in table] == ["plain", "ours-none", chunked]
    assert "by GPU time" in profile.read_text() and "GPU kernels" in profile.read_text()
    host = host_profile.read_text()
    assert "4 optimizer steps" in host and "by tottime" in host and "train_step" in host
    run_config = Path(tempfile.gettempdir()) / (
        "bench-training-tiny-ours-deepseek1_model.loss_chunk_tokens_8") / "config.yaml"
    assert yaml.safe_load(run_config.read_text())["model"]["loss_chunk_tokens"] == 8

    # The driver's refusals, through its main() in this process (a subprocess per refusal only
    # repeated the torch/DeepSpeed import that comes before them).
    bench = _load_script("bench_training")
    for argv, message in ((["--rows", "ours-none+nonsense"], "not a key=value"),
                          (["--rows", "plain+train.compile=true"], "our rows only"),
                          (["--rows", "ours-nothing"], "unknown row"),
                          (["--shapes", "110m"], "needs a GPU")):
        argv = ["bench_training.py", "--shapes", "tiny", *argv, "--data", str(root)]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            bench.main()
        assert message in str(exit_info.value.code), (argv, exit_info.value.code)


def test_bench_loss_kernels_smoke(tmp_path):
    """The loss-kernel benchmark on CPU (Triton through its interpreter): every build agrees
    with the eager one, and bad arguments are refused."""
    out = tmp_path / "loss.json"
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_loss_kernels.py", "--cpu", "--rows", "48",
         "--vocab", "96", "--dim", "16", "--chunk", "20", "--iters", "1", "--warmup", "0",
         "--json", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [b["build"] for b in data["builds"]] == ["eager", "inductor", "triton"]
    for b in data["builds"]:
        assert b["max_diff_loss"] < 1e-5 and b["max_diff_grad_w"] < 1e-5, b
        assert b["max_diff_tp_path"] < 1e-4, b
    assert "| triton |" in res.stdout
    bad = subprocess.run([sys.executable, "benchmarks/bench_loss_kernels.py", "--rows", "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "--rows must be >= 1" in bad.stderr


def test_bench_mixture_http_smoke(tmp_path):
    from tests.test_data_common import write_corpus

    corpus = write_corpus(tmp_path / "corpus", n_files=30)  # pkg0, pkg1, pkg2: the three sources
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_mixture_http.py", "--source", str(corpus),
         "--vocab-size", "320", "--seq-len", "16", "--max-depth", "2", "--shard-samples", "16",
         "--tokenizer-sample-bytes", "100000", "--build-workers", "1", "--batch-size", "4",
         "--batches", "20",
         "--workers", "0", "1", "--dp", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    table = res.stdout.split("| reader |")[1].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table] == [
        "local files", "local files", "loopback HTTP", "loopback HTTP",
        "loopback HTTP, rank 0 of DP=2"]
    for row in table:
        assert float(row.split("|")[3].replace(",", "")) > 0, row


def test_bench_generation_suite_smoke(tmp_path):
    """The decoding benchmark's whole GPU suite on CPU with the toy shape: training a D=1 and a
    D=3 model, their exports, `measure` of each at its depth (engine requests, replayed steps,
    the phase profile; drafts over the 64 most frequent tokens only, at the depth and one past
    it), the TP = 2 row under torchrun (gloo) and the table."""
    data = build_tiny_dataset(tmp_path / "fixture", max_depth=4)
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_generation.py", "suite", "--out", str(out),
         "--shapes", "tiny", "--data", str(data), "--train-steps", "2", "--batch-sizes", "1,2",
         "--requests", "1", "--prompt-len", "8", "--new-tokens", "6", "--replays", "2",
         "--profile", "--tp2", "--draft-vocab", "64", "--no-full-vocab", "--draft-tokens",
         "+0,+1", "--train-depths", "3,1"],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    suite = json.loads((out / "suite.json").read_text())["results"]
    assert set(suite) == {"tiny", "tiny TP=2"}
    models = suite["tiny"]["models"]
    # each depth drafting over the 64 most frequent tokens, D and D + 1 drafts a round
    assert set(models) == {"D=1 K=64", "D=1 N=2 K=64", "D=3 K=64", "D=3 N=4 K=64"}
    assert [(e["depth"], e["draft_tokens"], e["draft_vocab"]) for e in models.values()] == [
        (1, 1, 64), (1, 2, 64), (3, 3, 64), (3, 4, 64)]
    # each depth measured from the model trained at it (the TP = 2 row: the D=1 model's)
    assert [models[f"D={d} K=64"]["source"].endswith(f"export-tiny-d{d}") for d in (1, 3)] == [
        1, 1]
    assert suite["tiny TP=2"]["models"]["D=1"]["source"].endswith("export-tiny-d1")
    assert json.loads((out / "suite.json").read_text())["train_depths"] == [1, 3]
    for entry in models.values():
        assert [r["batch"] for r in entry["rows"]] == [1, 2]
        for r in entry["rows"]:
            assert r["identical_sequences"] == r["sequences"] == r["batch"]  # fp32: greedy
            assert len(r["acceptance_by_depth"]) == entry["draft_tokens"]
            for mode in ("plain", "speculative"):
                assert r[mode]["tokens_per_s"] > 0 and r[mode]["step_us"] > 0
                assert r[mode]["later_graphs_captured"] == 0  # none on the CPU anyway
        phases = entry["profile"]["speculative"]["phases"]
        assert set(phases) == {"decode.prefill", "decode.main", "decode.commit", "decode.draft"}
        assert all(p["kernels"] > 0 for p in phases.values())
    assert suite["tiny TP=2"]["tp"] == 2 and suite["tiny TP=2"]["models"]["D=1 K=64"]["rows"]
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("| tiny")]
    assert [ln.split("|")[1].strip() for ln in table[:12:2]] == [
        "tiny D=1 K=64", "tiny D=1 N=2 K=64", "tiny D=3 K=64", "tiny D=3 N=4 K=64",
        "tiny D=1 TP=2", "tiny D=1 K=64 TP=2"]


def test_replay_timeline_counts_device_busy_and_idle_time(monkeypatch):
    """Two replays of a three-kernel step with launch gaps between the kernels; host events and
    events without a duration are not the device's."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports its neighbours
    bench = _load_script("bench_generation")
    events = [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},
              {"cat": "ac2g", "name": "flow", "ts": 1}]
    for start in (100, 200):  # replay k: gemv 10 µs, norm 5 µs, memcpy 5 µs, gaps of 10 µs
        events += [{"cat": "kernel", "name": "gemv", "ts": start, "dur": 10},
                   {"cat": "kernel", "name": "norm", "ts": start + 20, "dur": 5},
                   {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": start + 35, "dur": 5}]
    t = bench.replay_timeline(events, replays=2, top=2)
    assert t["ops"] == 3 and t["busy_us"] == 20
    assert t["span_us"] == (240 - 100) / 2  # first start to last end, per replay
    assert t["top"] == [("gemv", 10), ("norm", 5)]  # heaviest first, cut at `top`
    assert bench.replay_timeline(events[:2], replays=2) == {}


def test_attention_kernels_reach_compiled_regions(monkeypatch):
    """`measure --attention`: each variant's compiled region runs the variant's kernel, not
    the one an earlier variant's cached graph chose (Inductor, CPU: flash, then math)."""
    import torch
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    bench = _load_script("bench_generation")
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    mask = torch.zeros(1, 1, 3, 16)
    ran = {}
    for name in ("flash", "math", "flash"):
        with bench.attention_kernels(name, fresh=True):
            attend = torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m))
            attend(q, k, v, mask)  # compiled here
            with torch.profiler.profile() as prof:
                attend(q, k, v, mask)
        ran[name] = {e.name for e in prof.events()} & {
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm"}
    # math: Inductor decomposes it into two batched matmuls around its own softmax
    assert ran == {"flash": {"aten::_scaled_dot_product_flash_attention_for_cpu"},
                   "math": {"aten::bmm"}}


def _frame(path: str, line: int, name: str) -> dict:
    return {"filename": path, "line": line, "name": name}


def test_memory_peak_reads_what_is_live_at_the_peak(tmp_path):
    """A hand-made allocator history: one block from before the window still live at the end,
    one from before it freed inside it, and a peak of two activations that the backward frees."""
    import pickle

    ours = [_frame("/x/torch/nn/functional.py", 10, "linear"),
            _frame("/repo/model/mlp.py", 47, "forward"), _frame("/repo/pretrain/trainer.py", 1, "x")]
    ds = [_frame("/x/site-packages/deepspeed/runtime/zero/stage_1_and_2.py", 5, "step")]
    gib = 2**30

    def ev(action, addr, size, frames, t):
        return {"action": action, "addr": addr, "size": size, "frames": frames, "time_us": t}

    events = [ev("free_requested", 7, 1 * gib, ds, 0), ev("free_completed", 7, 1 * gib, ds, 1),
              ev("alloc", 1, 2 * gib, ours, 10), ev("alloc", 2, 3 * gib, ours[1:], 20),
              ev("free_completed", 1, 2 * gib, ours, 30), ev("alloc", 3, 1 * gib, ds, 2_000_040),
              ev("free_completed", 2, 3 * gib, ours[1:], 2_000_050)]
    snapshot = {"device_traces": [events], "segments": [{"device": 0, "blocks": [
        {"address": 9, "size": 4 * gib, "state": "active_allocated", "frames": ds},
        {"address": 3, "size": 1 * gib, "state": "active_allocated", "frames": ds}]}]}
    bench = _load_script("memory_peak")
    best, at_us, groups = bench.peak(snapshot)
    # the weights (4) and the early block (freed at 1 µs) → 4 after it; +2 +3 = 9 at 20 µs
    assert best == 9 * gib and at_us == 20
    assert groups == {"model/mlp.py:47 forward": 5 * gib,
                      "deepspeed/runtime/zero/stage_1_and_2.py:5 step": 4 * gib}
    path = tmp_path / "rank00000.pickle"
    path.write_bytes(pickle.dumps(snapshot))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/memory_peak.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "peak allocated: 9.00 GiB at 0.000 s into the trace; live then:",
        "    5.00 GiB  model/mlp.py:47 forward",
        "    4.00 GiB  deepspeed/runtime/zero/stage_1_and_2.py:5 step"]
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks/memory_peak.py"), str(path),
                          "--device", "1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "no allocation history for device 1" in bad.stderr


def test_draft_cost_table_orders_what_a_smaller_draft_vocabulary_trades(tmp_path):
    """`bench_generation.py draft-cost`: a smaller K covers fewer held-out tokens, makes the
    draft a smaller share of a step and raises the speed-up bounds."""
    data = build_tiny_dataset(tmp_path / "fixture", max_depth=4)
    res = subprocess.run(
        [sys.executable, "benchmarks/bench_generation.py", "draft-cost", "--data", str(data),
         "--shapes", "tiny", "--draft-vocab", "128,32"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in res.stdout.splitlines()
            if ln.startswith("| tiny")]
    assert [r[1] for r in rows] == ["512 (all)", "128", "32"], rows
    covered, share, d1, d3 = ([float(r[i].rstrip("×")) for r in rows] for i in (2, 3, 4, 5))
    assert covered[0] == 1.0 and 0 < covered[2] < covered[1] < 1, covered
    assert share[2] < share[1] < share[0], share
    assert d1[0] < d1[1] < d1[2] < 2 and d3[0] < d3[1] < d3[2] < 4, (d1, d3)
