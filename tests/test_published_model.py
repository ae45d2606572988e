"""A published model's tokenizer (a tokenizers `tokenizer.json`, or a sentencepiece model with
Llama's special ids) builds the dataset with its own ids."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import BuildConfig, build_dataset, load_manifest
from data_pipeline.build import document_order, split_validation
from data_pipeline.sources import list_directory, read_document
from data_pipeline.tokenizer import TextTokenizer
from tests.test_data_common import read_all_windows, write_corpus

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SEQ, DEPTH = 16, 2


def hf_tokenizer(out: Path, corpus: Path) -> Path:
    """A byte-level BPE in the style of GPT-2/Llama-3 tokenizers, saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|bos|>", "<|eot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.rglob("*.py"))], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>",
                                                eos_token="<|eot|>", pad_token="<|pad|>")
    fast.save_pretrained(out)
    return out / "tokenizer.json"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = tmp_path_factory.mktemp("published")
    corpus = write_corpus(base / "corpus", n_files=30, seed=3)
    tok_json = hf_tokenizer(base / "tokenizer", corpus)
    vocab = tokenizers.Tokenizer.from_file(str(tok_json)).get_vocab_size()
    data = base / "data"
    build_dataset(BuildConfig(source=str(corpus), out_dir=data, vocab_size=None, seq_len=SEQ,
                              max_depth=DEPTH, val_fraction=0.1, shard_samples=64,
                              tokenizer_path=tok_json, add_bos=True, num_workers=1,
                              progress=False))
    return {"base": base, "corpus": corpus, "tokenizer": tok_json, "vocab": vocab, "data": data}


def train_stream(data: Path, seq: int) -> np.ndarray:
    """The packed train token stream, rebuilt from the windows (stride seq_len)."""
    windows = read_all_windows(data, "train")
    return np.concatenate([windows[i][:seq] for i in sorted(windows)])


def test_tokenizer_json_round_trip_matches_the_tokenizers_library(published):
    m = load_manifest(published["data"])
    assert m.tokenizer_kind == "tokenizers" and m.tokenizer_name == "tokenizer.json"
    assert m.special_ids == {"pad": 0, "bos": 1, "eos": 2, "unk": None}
    assert m.data["tokenizer"]["special_tokens"]["eos"] == "<|eot|>"
    assert m.vocab_size == published["vocab"]
    lib = tokenizers.Tokenizer.from_file(str(published["tokenizer"]))
    refs = list_directory(published["corpus"], ("**/*.py",))
    val = split_validation(refs, 0.1, 0)
    expected = []
    for ref in document_order(refs, 0):
        if ref.name not in val:
            text, _ = read_document(ref, "text")
            expected += [1, *lib.encode(text, add_special_tokens=False).ids, 2]
    stream = train_stream(published["data"], SEQ)
    assert len(stream) > 500
    assert stream.tolist() == expected[:len(stream)]
    ours = TextTokenizer.from_file(m.tokenizer_path)
    text = "def f(x):\n    return x  # ünïcode\n"
    assert ours.encode(text) == lib.encode(text, add_special_tokens=False).ids
    assert ours.decode(ours.encode(text)) == text


def test_published_sentencepiece_model_keeps_its_special_ids(published, tmp_path):
    import sentencepiece as spm

    text = "\n".join(p.read_text() for p in sorted(published["corpus"].rglob("*.py")))
    out = io.BytesIO()
    # Llama's conventions: unk 0, bos 1, eos 2, no pad; a dummy prefix; identity normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.split("\n") if line]), model_writer=out,
        model_type="bpe", vocab_size=350, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", minloglevel=2)
    (tmp_path / "llama-tok").mkdir()
    (tmp_path / "llama-tok" / "tokenizer.model").write_bytes(out.getvalue())
    data = tmp_path / "data"
    m = build_dataset(BuildConfig(source=str(published["corpus"]), out_dir=data, vocab_size=None,
                                  seq_len=SEQ, max_depth=DEPTH, val_fraction=0.1,
                                  tokenizer_path=tmp_path / "llama-tok", num_workers=1,
                                  progress=False))
    assert m.special_ids == {"pad": None, "bos": 1, "eos": 2, "unk": 0}
    assert m.tokenizer_kind == "sentencepiece" and m.vocab_size == 350
    stream = train_stream(data, SEQ)
    sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    refs = list_directory(published["corpus"], ("**/*.py",))
    val = split_validation(refs, 0.1, 0)
    first = next(r for r in document_order(refs, 0) if r.name not in val)
    ids = sp.encode(read_document(first, "text")[0])
    assert stream[:len(ids) + 1].tolist() == [*ids, 2]
    with pytest.raises(ValueError, match="--eos-token 'nope' is not a piece"):
        build_dataset(BuildConfig(source=str(published["corpus"]), out_dir=tmp_path / "d2",
                                  vocab_size=None, tokenizer_path=tmp_path / "llama-tok",
                                  eos_token="nope", progress=False))
