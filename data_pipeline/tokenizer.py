"""Tokenizers: training a sentencepiece BPE on a corpus sample, and reading a published model's
tokenizer (a Hugging Face tokenizer.json or a sentencepiece .model) with its own special ids.

Settings chosen for source code, where whitespace is content:
* identity normalisation, no whitespace squeezing, no dummy prefix: decode(encode(x)) == x;
* "\\n" is a user-defined piece (training reads one line per sentence, so newlines would
  otherwise fall back to a byte token) and whitespace-only pieces are allowed (indentation runs
  such as 8 spaces become one token);
* byte_fallback: any character outside the vocabulary still encodes (no <unk> in practice);
* fixed special ids pad=0, bos=1, eos=2, unk=3.
A reused tokenizer keeps its own ids; the manifest records them (`TokenizerSpec`) and everything
downstream (document separation, label masks, export) reads them from there.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

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


# --- published tokenizers ---------------------------------------------------------------------

SENTENCEPIECE = "sentencepiece"
HF_TOKENIZERS = "tokenizers"
TOKENIZER_FILES = {SENTENCEPIECE: "tokenizer.model", HF_TOKENIZERS: "tokenizer.json"}
SPECIAL_KEYS = ("pad", "bos", "eos", "unk")


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer as the dataset records it: its file, kind, size and real special ids."""

    kind: str
    """`sentencepiece` (a .model) or `tokenizers` (a Hugging Face tokenizer.json)."""
    data: bytes
    vocab_size: int
    special_ids: dict[str, int | None]
    """pad/bos/eos/unk ids, None where the tokenizer has no such token; eos is always set (it
    separates documents)."""
    special_tokens: dict[str, str | None]

    @property
    def file_name(self) -> str:
        return TOKENIZER_FILES[self.kind]


def trained_spec(model_bytes: bytes) -> TokenizerSpec:
    """The spec of a tokenizer trained by `train_tokenizer` (fixed special ids)."""
    sp = load_processor(model_bytes)
    return TokenizerSpec(SENTENCEPIECE, model_bytes, sp.get_piece_size(), dict(SPECIAL_IDS),
                         {k: sp.id_to_piece(i) for k, i in SPECIAL_IDS.items()})


def read_tokenizer(path: str | Path, eos_token: str | None = None) -> TokenizerSpec:
    """A published model's tokenizer: a Hugging Face `tokenizer.json` (special tokens from the
    `tokenizer_config.json` or `special_tokens_map.json` beside it), a sentencepiece `.model`,
    or a directory holding one of them. `eos_token` names the document separator where the
    files do not (or overrides them)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise ValueError(f"--tokenizer {path}: the directory holds neither tokenizer.json nor "
                             "tokenizer.model")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"--tokenizer {path} does not exist")
    data = path.read_bytes()
    if path.suffix == ".json":
        return _hf_spec(path, data, eos_token)
    return _sentencepiece_spec(path, data, eos_token)


def _sentencepiece_spec(path: Path, data: bytes, eos_token: str | None) -> TokenizerSpec:
    try:
        sp = load_processor(data)
    except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError on a bad file
        raise ValueError(f"--tokenizer {path} is neither a tokenizer.json nor a valid "
                         f"sentencepiece model: {exc}") from exc
    ids = {"pad": sp.pad_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    ids = {k: (i if i >= 0 else None) for k, i in ids.items()}
    if eos_token is not None:
        eos = sp.piece_to_id(eos_token)
        if sp.id_to_piece(eos) != eos_token:
            raise ValueError(f"--eos-token {eos_token!r} is not a piece of {path}")
        ids["eos"] = eos
    tokens = {k: (sp.id_to_piece(i) if i is not None else None) for k, i in ids.items()}
    return _checked(TokenizerSpec(SENTENCEPIECE, data, sp.get_piece_size(), ids, tokens), path)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # transformers' serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_spec(path: Path, data: bytes, eos_token: str | None) -> TokenizerSpec:
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ValueError("reading a tokenizer.json needs the `tokenizers` package; install "
                         "the hf extra (pip install -e '.[hf]')") from exc
    try:
        tok = Tokenizer.from_str(data.decode())
    except Exception as exc:  # tokenizers raises plain Exception subclasses on a bad file
        raise ValueError(f"--tokenizer {path} is not a tokenizers JSON file: {exc}") from exc
    tokens: dict[str, str | None] = {k: None for k in SPECIAL_KEYS}
    for side in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if (path.parent / side).is_file():
            meta = json.loads((path.parent / side).read_text())
            for key in SPECIAL_KEYS:
                text = _token_text(meta.get(f"{key}_token"))
                if text is not None:
                    tokens[key] = text
    if eos_token is not None:
        tokens["eos"] = eos_token
    ids: dict[str, int | None] = {}
    for key, text in tokens.items():
        ids[key] = None if text is None else tok.token_to_id(text)
        if text is not None and ids[key] is None:
            raise ValueError(f"the {key} token {text!r} of {path} is not in its vocabulary")
    return _checked(TokenizerSpec(HF_TOKENIZERS, data, tok.get_vocab_size(with_added_tokens=True),
                                  ids, tokens), path)


def _checked(spec: TokenizerSpec, path: Path) -> TokenizerSpec:
    if spec.special_ids["eos"] is None:
        raise ValueError(f"--tokenizer {path} defines no end-of-text token, which the pipeline "
                         "needs to separate documents; name it with --eos-token TOKEN (e.g. "
                         "'</s>' or '<|endoftext|>')")
    return spec


class TextTokenizer:
    """encode/decode with a sentencepiece model or a tokenizer.json, without special tokens added
    (the pipeline adds the document separators itself)."""

    def __init__(self, kind: str, data: bytes):
        self.kind = kind
        if kind == SENTENCEPIECE:
            self._sp = load_processor(data)
        else:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(data.decode())

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        path = Path(path)
        return cls(HF_TOKENIZERS if path.suffix == ".json" else SENTENCEPIECE, path.read_bytes())

    def encode(self, text: str) -> list[int]:
        if self.kind == SENTENCEPIECE:
            return self._sp.encode(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.kind == SENTENCEPIECE:
            return self._sp.decode(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def size(self) -> int:
        """Ids the tokenizer has pieces for: 0 .. size - 1."""
        if self.kind == SENTENCEPIECE:
            return self._sp.get_piece_size()
        return self._tok.get_vocab_size(with_added_tokens=True)

    def known(self, ids: list[int]) -> list[int]:
        """`ids` with those past the tokenizer's pieces (a model's vocabulary may be padded
        beyond them, and a barely trained model can still produce such ids) replaced by the
        unknown piece, or dropped when the tokenizer has none."""
        unk = self._sp.unk_id() if self.kind == SENTENCEPIECE else self._tok.token_to_id("<unk>")
        size = self.size
        if unk is None or unk < 0:
            return [t for t in ids if t < size]
        return [t if t < size else unk for t in ids]
