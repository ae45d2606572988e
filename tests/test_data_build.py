"""build_dataset: manifest contents, byte-identical rebuilds, up-to-date/overwrite, bad inputs."""

import json
import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline import (
    EOS_ID,
    SPECIAL_IDS,
    ShardLoader,
    build_dataset,
    document_order,
    load_manifest,
    split_validation,
)
from data_pipeline.shard_writer import file_sha256
from data_pipeline.sources import list_directory
from tests.test_data_common import (
    TINY,
    read_all_windows,
    tiny_config,
    tiny_dataset,
    write_corpus,
)


def test_manifest_records_everything(tmp_path_factory):
    data = tiny_dataset(tmp_path_factory)
    m = load_manifest(data)
    d = m.data
    assert d["vocab_size"] == TINY["vocab_size"] and d["special_ids"] == SPECIAL_IDS
    assert d["seq_len"] == 16 and d["max_depth"] == 3 and d["window_len"] == 20 and d["stride"] == 16
    assert d["dtype"] == "uint16"
    assert d["tokenizer"]["sha256"] == file_sha256(m.tokenizer_path)
    assert d["tokenizer"]["trained"] and d["tokenizer"]["sample_bytes"] > 0
    sp = spm.SentencePieceProcessor(model_file=str(m.tokenizer_path))
    assert sp.get_piece_size() == 320
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert d["splits"]["train"]["documents"] == 27 and d["splits"]["val"]["documents"] == 3
    for split in ("train", "val"):
        s = d["splits"][split]
        # stride-T windows of T+D+1 tokens: n windows use (n-1)*T + L tokens, the rest is dropped
        assert s["windows"] == (s["tokens"] - d["window_len"]) // 16 + 1
        assert s["dropped_tail_tokens"] == s["tokens"] - s["windows"] * 16
        assert sum(sh["num_samples"] for sh in s["shards"]) == s["windows"]
        for sh in s["shards"]:
            path = data / sh["name"]
            assert path.stat().st_size == sh["size"] and file_sha256(path) == sh["sha256"]
        assert [sh["num_samples"] for sh in s["shards"][:-1]] == [24] * (len(s["shards"]) - 1)
    assert d["skipped"]["unreadable"] == 0 and d["skipped"]["invalid_utf8"] == 0


def test_windows_hold_the_eos_separated_documents(tmp_path_factory):
    data = tiny_dataset(tmp_path_factory)
    m = load_manifest(data)
    sp = spm.SentencePieceProcessor(model_file=str(m.tokenizer_path))
    windows = read_all_windows(data, "train")
    stream = np.concatenate([windows[0]] + [windows[i][4:] for i in range(1, len(windows))])
    # consecutive windows overlap by max_depth + 1 = 4 tokens
    assert all((windows[i][:4] == windows[i - 1][-4:]).all() for i in range(1, len(windows)))
    corpus = data.parent / "corpus"
    refs = list_directory(corpus, ("**/*.py",))
    val = split_validation(refs, TINY["val_fraction"], seed=0)
    train = [r for r in document_order(refs, seed=0) if r.name not in val]
    eos_at = np.flatnonzero(stream == EOS_ID)
    # exact round trip of the first training documents (in seeded hash order), each + EOS
    assert sp.decode(stream[: eos_at[0]].tolist()) == (corpus / train[0].name).read_text()
    assert sp.decode(stream[eos_at[0] + 1: eos_at[1]].tolist()) == (corpus / train[1].name).read_text()
    assert len(eos_at) >= 20


def test_documents_are_written_in_a_seeded_order_that_mixes_sources(tmp_path):
    """Listed by path, a corpus is project after project; written in that order every shard
    would hold one project. The order depends on (seed, name) only."""
    corpus = tmp_path / "corpus"
    for project in ("alpha", "beta"):
        for i in range(40):
            (corpus / project).mkdir(parents=True, exist_ok=True)
            (corpus / project / f"m{i:02d}.py").write_text(f"x = {i}\n")
    refs = list_directory(corpus, ("**/*.py",))
    order = document_order(refs, seed=5)
    assert sorted(r.name for r in order) == sorted(r.name for r in refs)
    assert [r.name for r in document_order(refs[::-1], seed=5)] == [r.name for r in order]
    assert [r.name for r in document_order(refs, seed=6)] != [r.name for r in order]
    first_half = {r.name.split("/")[0] for r in order[:40]}
    assert first_half == {"alpha", "beta"}, first_half
    # projects alternate often: far more than the one switch of the listing order
    switches = sum(a.name[:5] != b.name[:5] for a, b in zip(order, order[1:]))
    assert switches > 20, switches


def test_rebuild_is_byte_identical_for_any_worker_count(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    m1 = build_dataset(tiny_config(corpus, tmp_path / "a", num_workers=1))
    m2 = build_dataset(tiny_config(corpus, tmp_path / "b", num_workers=2))
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert m1.data == m2.data
    # same inputs again: nothing is rewritten
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    m3 = build_dataset(tiny_config(corpus, tmp_path / "a", num_workers=1))
    assert m3.status == "up-to-date"
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    # changed inputs: refused without overwrite, rebuilt with it
    (corpus / "pkg0" / "mod_00.py").write_text("x = 1\n" * 50)
    with pytest.raises(ValueError, match="already holds a different dataset.*overwrite=True"):
        build_dataset(tiny_config(corpus, tmp_path / "a"))
    m4 = build_dataset(tiny_config(corpus, tmp_path / "a", overwrite=True))
    assert m4.status == "built" and m4.fingerprint != m1.fingerprint
    assert m4.data["splits"]["val"]["tokens"] != m1.data["splits"]["val"]["tokens"]  # mod_00: val
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["manifest.json", "tokenizer.model"]
        + [s["name"] for sp in ("train", "val") for s in m4.data["splits"][sp]["shards"]])


def test_reused_tokenizer_and_jsonl_source(tmp_path_factory, tmp_path):
    data = tiny_dataset(tmp_path_factory)
    tok = data / "tokenizer.model"
    lines = [json.dumps({"content": f"def f{i}(x):\n    return x * {i}\n" * 3}) for i in range(40)]
    lines[5] = "{not json"
    lines[6] = json.dumps({"other": "no content field"})
    lines[7] = json.dumps({"content": 17})
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(lines) + "\n\n")
    m = build_dataset(tiny_config(src, tmp_path / "out", jsonl_field="content", tokenizer_path=tok))
    assert m.data["tokenizer"]["trained"] is False
    assert m.data["tokenizer"]["sha256"] == file_sha256(tok)
    sk = m.data["skipped"]
    assert (sk["invalid_json"], sk["missing_field"]) == (1, 2)
    assert sk["examples"]["invalid_json"] == ["docs.jsonl:6"]
    assert m.data["splits"]["train"]["documents"] + m.data["splits"]["val"]["documents"] == 37
    with pytest.raises(ValueError, match="has vocab size 320 but vocab_size=400 was requested"):
        build_dataset(tiny_config(src, tmp_path / "out2", jsonl_field="content",
                                  tokenizer_path=tok, vocab_size=400))


def test_unreadable_and_invalid_utf8_files_are_counted(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=12)
    (corpus / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    os.symlink(tmp_path / "missing.py", corpus / "dangling.py")
    (corpus / "blank.py").write_text("\n\n")
    m = build_dataset(tiny_config(corpus, tmp_path / "out"))
    sk = m.data["skipped"]
    assert (sk["invalid_utf8"], sk["unreadable"], sk["empty"]) == (1, 1, 1)
    assert sk["examples"] == {"invalid_utf8": ["latin1.py"], "unreadable": ["dangling.py"],
                              "empty": ["blank.py"]}
    assert m.data["source"]["documents_listed"] == 15


def test_bad_inputs_get_clear_errors(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_files=8)
    with pytest.raises(ValueError, match=r"empty corpus.*matched no documents"):
        build_dataset(tiny_config(corpus, tmp_path / "o1", include=("**/*.rs",)))
    with pytest.raises(ValueError, match="neither 'stdlib', 'pinned-code', an existing directory"):
        build_dataset(tiny_config(tmp_path / "nope", tmp_path / "o2"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.py").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="no readable training documents"):
        build_dataset(tiny_config(bad, tmp_path / "o3", val_fraction=0.0))
    with pytest.raises(ValueError, match=r"train split has \d+ tokens .* fewer than one window of "
                                         r"seq_len \+ max_depth \+ 1 = 100004 tokens"):
        build_dataset(tiny_config(corpus, tmp_path / "o4", seq_len=100_000))
    assert not any((tmp_path / "o4").glob("*.tar"))  # nothing half-built left behind
    with pytest.raises(ValueError, match=r"the val split has \d+ tokens.*raise --val-fraction"):
        build_dataset(tiny_config(corpus, tmp_path / "o5", seq_len=1500, val_fraction=0.1))
    (tmp_path / "o6").mkdir()
    (tmp_path / "o6" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"already holds other files \(notes.txt"):
        build_dataset(tiny_config(corpus, tmp_path / "o6"))
    with pytest.raises(ValueError, match="BuildConfig.val_fraction = 1.5 is invalid"):
        tiny_config(corpus, tmp_path / "o7", val_fraction=1.5)
    with pytest.raises(ValueError, match="BuildConfig.vocab_size = 10 is invalid"):
        tiny_config(corpus, tmp_path / "o7", vocab_size=10)
    with pytest.raises(ValueError, match=r"vocab_size = 301 is too small: the corpus needs \d+ base"):
        build_dataset(tiny_config(corpus, tmp_path / "o8", vocab_size=301))
    with pytest.raises(ValueError, match="vocab_size = 5000 is too large for this corpus"):
        build_dataset(tiny_config(corpus, tmp_path / "o8", vocab_size=5000))


def test_manifest_mismatches_are_detected(tmp_path_factory, tmp_path):
    data = tmp_path / "copy"
    shutil.copytree(tiny_dataset(tmp_path_factory), data)
    with pytest.raises(ValueError, match="depth=4 exceeds the dataset's max_depth=3"):
        ShardLoader(data, "train", dp_rank=0, dp_size=1, num_workers=0, batch_size=2, seed=0, depth=4)
    with pytest.raises(ValueError, match="no dataset manifest"):
        load_manifest(tmp_path)
    (data / "tokenizer.model").write_bytes(b"replaced")
    with pytest.raises(ValueError, match="does not match the manifest's sha256"):
        load_manifest(data)


def test_token_counts_cover_the_first_windows_without_their_overlap(tmp_path_factory):
    from data_pipeline.token_counts import count_tokens

    data = tiny_dataset(tmp_path_factory)
    m = load_manifest(data)
    windows = np.stack(list(read_all_windows(data, "train").values()))  # [n, window_len], stored order
    stride = m.data["stride"]
    every = count_tokens(m, 10**9)
    assert every.shape == (m.vocab_size,) and every.dtype == np.int64
    assert np.array_equal(every, np.bincount(windows[:, :stride].ravel(), minlength=m.vocab_size))
    first = count_tokens(m, 3 * stride - 1)  # stops after the window that reaches the budget
    assert np.array_equal(first, np.bincount(windows[:3, :stride].ravel(),
                                             minlength=m.vocab_size))
    with pytest.raises(ValueError, match="max_tokens = 0"):
        count_tokens(m, 0)
