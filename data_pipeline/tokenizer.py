"""Sentencepiece BPE tokenizer: training on a corpus sample, and checks on a reused model.

Settings chosen for source code, where whitespace is content:
* identity normalisation, no whitespace squeezing, no dummy prefix: decode(encode(x)) == x;
* "\\n" is a user-defined piece (training reads one line per sentence, so newlines would
  otherwise fall back to a byte token) and whitespace-only pieces are allowed (indentation runs
  such as 8 spaces become one token);
* byte_fallback: any character outside the vocabulary still encodes (no <unk> in practice);
* fixed special ids pad=0, bos=1, eos=2, unk=3.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from .config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID

# Stored in the .model's trainer spec; a constant keeps the file bytes independent of the machine
# (the learned pieces do not depend on it, measured).
_TRAIN_THREADS = 8
# Lines longer than this are left out of tokenizer training (long lines are rare in code).
_MAX_SENTENCE_BYTES = 8192


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> bytes:
    """Train a BPE model on `texts`; returns the serialized `.model` bytes (deterministic)."""
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts), model_writer=out, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9999,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            user_defined_symbols=["\n"], max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=_TRAIN_THREADS, minloglevel=2,
        )
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if small:
            raise ValueError(f"BuildConfig.vocab_size = {vocab_size} is too small: the corpus needs "
                             f"{small.group(2)} base pieces (specials, 256 byte-fallback bytes and "
                             f"its characters); raise --vocab-size above {small.group(2)}") from exc
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise ValueError(f"BuildConfig.vocab_size = {vocab_size} is too large for this corpus "
                             f"sample (sentencepiece: {msg}); lower --vocab-size or add data") from exc
        raise ValueError(f"sentencepiece training failed: {msg}") from exc
    return out.getvalue()


def load_processor(model_bytes: bytes) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    return sp


def check_tokenizer(model_bytes: bytes, vocab_size: int, where: str) -> None:
    """Raise ValueError if a reused model's vocab size or special ids differ from what is needed."""
    try:
        sp = load_processor(model_bytes)
    except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError on a bad file
        raise ValueError(f"{where} is not a valid sentencepiece model: {exc}") from exc
    if sp.get_piece_size() != vocab_size:
        raise ValueError(f"tokenizer {where} has vocab size {sp.get_piece_size()} but "
                         f"vocab_size={vocab_size} was requested; pass --vocab-size "
                         f"{sp.get_piece_size()} or train a new tokenizer")
    got = {"pad": sp.pad_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    if got != SPECIAL_IDS:
        raise ValueError(f"tokenizer {where} has special ids {got}, the pipeline needs "
                         f"{SPECIAL_IDS}; retrain it with `mtp prepare` (no --tokenizer)")
