"""The Trainer on a weighted mixture (tokens per source in TensorBoard and in the checkpoint,
validation per source, an exact resume) and on remote copies of a dataset (HTTP on the loopback
interface, pipe:): the same losses as the local copy, transient failures recovered, permanent
ones named with nothing saved lost."""

from __future__ import annotations

import re
import shutil
import sysconfig
from pathlib import Path

import pytest

from data_pipeline import BuildConfig, SampleMix, build_dataset
from pretrain.config import ConfigError, config_from_dict
from tests import dist_data_cases as cases
from tests.distributed import run_world
from tests.fault_helpers import cli_calls, write_config
from tests.http_fixtures import serve
from tests.train_fixtures import MAX_DEPTH, SEQ, VOCAB, build_tiny_dataset, loss_scalars, tiny_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """The tiny dataset, and other stdlib packages tokenized with its tokenizer."""
    base = tmp_path_factory.mktemp("sources")
    code = build_tiny_dataset(base)
    src = base / "corpus2"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("logging", "urllib"):
        shutil.copytree(stdlib / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    extra = base / "extra"
    build_dataset(BuildConfig(source=str(src), out_dir=extra, vocab_size=VOCAB, seq_len=SEQ,
                              max_depth=MAX_DEPTH, val_fraction=0.3, shard_samples=64,
                              tokenizer_path=code / "tokenizer.model", num_workers=1,
                              progress=False))
    return code, extra


def test_mixture_trains_logs_per_source_and_resumes_exactly(two_sources, tmp_path):
    code, extra = two_sources
    sources = [{"path": str(code), "weight": 3.0, "name": "code"},
               {"path": str(extra), "weight": 1.0, "name": "extra"}]
    out = run_world(cases.mixture_training, 1, sources, str(tmp_path), timeout_s=300)[0]
    # Resume from step 2 reproduces steps 3-4 bit for bit.
    assert out["b"] == out["a"][2:]
    # Tokens per source: the interleaving's counts after each step (global batch 4 × SEQ).
    tb = out["tensorboard"]
    for step in (1, 2, 3, 4):
        counts = SampleMix([3, 1]).counts_at(4 * step)
        assert tb["data/tokens/code"][step] == counts[0] * SEQ
        assert tb["data/tokens/extra"][step] == counts[1] * SEQ
    assert out["position"]["consumed_per_source"] == {
        "code": {"samples": 12, "tokens": 12 * SEQ, "epoch": 0},
        "extra": {"samples": 4, "tokens": 4 * SEQ, "epoch": 0}}
    # Validation per source, and the mixture-weighted mean.
    for val in out["validation"]:
        per = {n: val[f"val/{n}/loss/total"] for n in ("code", "extra")}
        assert per["code"] != per["extra"]
        assert val["val/loss/total"] == pytest.approx((3 * per["code"] + per["extra"]) / 4)
    assert set(tb["val/code/loss/main"]) == set(tb["val/extra/loss/main"]) == {2, 4}


def test_mixture_config_is_validated():
    base = tiny_run(Path("unused"), Path("unused-run"))

    def with_data(**data):
        return config_from_dict({**base, "data": data})

    cfg = with_data(sources=[{"path": "a/code", "weight": 2}, {"path": "b/web"}])
    assert [(s.label, s.weight) for s in cfg.data.source_list()] == [("code", 2.0), ("web", 1.0)]
    for data, message in (
            ({"path": "x", "sources": [{"path": "y"}]}, "data.path = 'x' and data.sources"),
            ({"sources": [{"path": "y", "weight": 0}]}, r"data.sources\[0\].weight = 0.0"),
            ({"sources": [{"path": "a/d"}, {"path": "b/d"}]}, r"the name\(s\) \['d'\]"),
            ({"sources": [{"weight": 1}]}, r"data.sources\[0\].path is empty"),
            ({"sources": [{"path": "a", "wieght": 1}]}, "unknown key 'wieght'")):
        with pytest.raises(ConfigError, match=message):
            with_data(**data)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_training_from_http_and_pipe_equals_local_and_failures_keep_the_checkpoints(
        two_sources, tmp_path):
    code, _ = two_sources
    server = serve(code)
    try:
        def call(name, location, run_dir, *overrides, steps=4):
            run = tiny_run(code, run_dir, train={"steps": steps},
                           checkpoint={"interval": 2, "keep_last": 5})
            run["data"].update(path=location,
                               remote={"retries": 3, "backoff_s": 0.01})
            cfg = write_config(tmp_path / f"{name}.yaml", run)
            return {"argv": ["train", "--config", str(cfg), *overrides]}

        runs = {n: tmp_path / n for n in ("local", "http", "pipe", "drop")}
        snapshot = tmp_path / "drop-checkpoints-before"
        calls = [call("local", str(code), runs["local"]),
                 call("http", server.url("ok"), runs["http"]),
                 call("pipe", f"pipe:cat {code}/{{name}}", runs["pipe"]),
                 call("drop", server.url("drop"), runs["drop"]),
                 # resume the finished run for two more steps from damaged copies
                 {**call("corrupt", server.url("corrupt"), runs["drop"], "--resume", "auto",
                         steps=6),
                  "prepare": [("copytree", str(runs["drop"] / "checkpoints"), str(snapshot))]},
                 call("gone", server.url("gone"), runs["drop"], "--resume", "auto", steps=6)]
        results = dict(zip(("local", "http", "pipe", "drop", "corrupt", "gone"),
                           run_world(cli_calls, 1, calls, timeout_s=400)[0]))
    finally:
        server.shutdown()
    for name in ("local", "http", "pipe", "drop"):
        code_, _, err, _ = results[name]
        assert code_ == 0, (name, err[-3000:])
    want = loss_scalars(runs["local"])
    assert sorted(want["loss/total"]) == [1, 2, 3, 4]
    for name in ("http", "pipe", "drop"):
        assert loss_scalars(runs[name]) == want, name  # loss for loss, bit for bit
    drop_err = results["drop"][2]
    retried = re.findall(r"warning: rank 0: remote read failed, retrying: \S+/drop/train-\d+\.tar: "
                         r"curl exit 18.*retry 1/3", drop_err)
    assert retried, drop_err[-3000:]
    for name, problem in (("corrupt", r"sha256 differs from the manifest"),
                          ("gone", r"HTTP 404")):
        code_, _, err, _ = results[name]
        assert code_ == 2, (name, err[-3000:])
        line = rf"^mtp train: data error: shard train-\d+\.tar: {server.url(name)}train-\d+\.tar: "
        assert re.search(line + problem, err, re.M), (name, err[-3000:])
        assert "Traceback" not in err
    # The failed resumes changed nothing that was saved.
    assert _tree_bytes(runs["drop"] / "checkpoints") == _tree_bytes(snapshot)
