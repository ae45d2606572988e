"""`mtp prepare`: --help, a tiny end-to-end build, up-to-date rerun, user errors without traceback."""

import importlib

import pytest

from data_pipeline import ShardLoader, load_manifest
from pretrain import cli
from tests.test_data_common import write_corpus


@pytest.fixture(autouse=True)
def only_available_commands(monkeypatch):
    # The CLI lists every subcommand; tolerate ones not written yet so this file tests `prepare`.
    def exists(name):
        try:
            importlib.import_module(f"pretrain.commands.{name}")
            return True
        except ModuleNotFoundError:
            return False

    monkeypatch.setattr(cli, "COMMANDS", tuple(c for c in cli.COMMANDS if exists(c)))


def test_prepare_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["prepare", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("--source", "pinned-code", "stdlib", "--vocab-size", "--seq-len", "--max-depth",
                 "--overwrite", "--val-fraction", "--tokenizer", "examples:"):
        assert text in out


def test_prepare_end_to_end(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_files=20)
    out = tmp_path / "data"
    argv = ["prepare", "--source", str(corpus), "--out", str(out), "--vocab-size", "320",
            "--seq-len", "16", "--max-depth", "2", "--val-fraction", "0.1", "--shard-samples", "32",
            "--workers", "2", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "dataset built" in printed and "train: 18 documents" in printed
    m = load_manifest(out)
    assert m.seq_len == 16 and m.max_depth == 2 and m.vocab_size == 320
    batch = next(iter(ShardLoader(out, "train", dp_rank=0, dp_size=1, num_workers=0,
                                  batch_size=2, seed=0, depth=2)))
    assert batch["labels"].shape == (2, 3, 16)
    assert cli.main(argv) == 0
    assert "dataset is up to date" in capsys.readouterr().out


def test_prepare_user_errors_exit_2_with_one_message(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", n_files=6)
    base = ["--out", str(tmp_path / "data"), "--vocab-size", "320", "--no-progress"]
    assert cli.main(["prepare", "--source", str(tmp_path / "missing"), *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtp prepare: error: --source = ") and "Traceback" not in err
    assert cli.main(["prepare", "--source", str(corpus), "--seq-len", "100000", *base]) == 2
    err = capsys.readouterr().err
    assert "fewer than one window" in err and err.count("\n") == 1
    assert cli.main(["prepare", "--source", str(corpus), "--val-fraction", "2", *base]) == 2
    assert "--val-fraction = 2.0 is invalid" in capsys.readouterr().err
    assert cli.main(["prepare", "--source", str(corpus), *base, "--vocab-size", "260"]) == 2
    assert "--vocab-size = 260 is invalid" in capsys.readouterr().err
