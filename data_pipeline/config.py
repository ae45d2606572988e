"""Typed configuration of the build step (`mtp prepare` / `build_dataset`) and fixed token ids."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

# Special ids of the tokenizers this pipeline trains. A reused (published) tokenizer keeps its own;
# the manifest records the ids of whichever was used and the loader reads them from there.
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
SPECIAL_IDS = {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID}

# Named sources that are not paths.
STDLIB_SOURCE = "stdlib"
PINNED_CODE_SOURCE = "pinned-code"

# Smallest usable BPE vocabulary: 4 specials + the newline symbol + 256 byte-fallback pieces,
# plus some room for characters and merges.
MIN_VOCAB_SIZE = 300


class BuildConfigError(ValueError):
    """A BuildConfig field whose value cannot work: `field = value problem; fix`. The fix may name
    fields as {field}. str() spells fields as this package's API does; `render(spell)` takes a
    front end's own spelling (`mtp prepare` names its flags)."""

    def __init__(self, field: str, value: object, problem: str, fix: str):
        self.field, self.value, self.problem, self.fix = field, value, problem, fix
        super().__init__(self.render(_python_name))

    def render(self, spell) -> str:
        """`spell(field)` → how the reader sets that field (e.g. "--out", "overwrite=True")."""
        names = {f.name: spell(f.name) for f in dataclasses.fields(BuildConfig)}
        return f"{spell(self.field)} = {self.value!r} {self.problem}; {self.fix.format(**names)}"


def _python_name(field: str) -> str:
    return f"{field}=True" if field in ("overwrite", "progress") else f"BuildConfig.{field}"


@dataclass
class BuildConfig:
    """Everything `build_dataset` needs; every field that changes the output is fingerprinted."""

    source: str
    """`stdlib`, `pinned-code`, a directory (files matched by `include`) or a `.jsonl` file."""
    out_dir: Path
    """Dataset directory: shards, `tokenizer.model` and `manifest.json` are written here."""
    include: tuple[str, ...] = ("**/*.py",)
    """Glob patterns (relative to a directory source) selecting the documents; one file = one document."""
    jsonl_field: str = "text"
    """Name of the string field holding the document text in each JSONL line."""
    vocab_size: int | None = 32000
    """BPE vocabulary size (trained tokenizer), or the expected size of a reused one (None: the
    reused tokenizer's own size)."""
    seq_len: int = 1024
    """T: input tokens per sample."""
    max_depth: int = 4
    """Largest MTP depth D any model may train with; windows hold T + max_depth + 1 tokens."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (by document, seeded); 0 disables."""
    seed: int = 0
    """Seed of the validation split and of the tokenizer training sample."""
    shard_samples: int = 4096
    """Windows per `.tar` shard (the last shard of a split holds the rest)."""
    tokenizer_path: Path | None = None
    """Reuse this tokenizer instead of training one: a Hugging Face `tokenizer.json`, a
    sentencepiece `.model` (e.g. a published model's), or a directory holding one."""
    eos_token: str | None = None
    """The reused tokenizer's end-of-text token, when its files do not name one (or to override
    them); documents are separated by it."""
    add_bos: bool = False
    """Start every document with the tokenizer's BOS token (as published Llama models were
    trained)."""
    tokenizer_sample_bytes: int = 20_000_000
    """Train the tokenizer on at most this many bytes of training documents (a seeded sample)."""
    num_workers: int | None = None
    """Tokenizer processes; None = all cores. The output never depends on it."""
    download_dir: Path | None = None
    """Where `pinned-code` keeps its downloads and extracted sources; None = OUT_DIR/downloads."""
    overwrite: bool = False
    """Replace a different dataset already in out_dir (otherwise refuse)."""
    progress: bool = True
    """Show tqdm progress bars."""
    extra: dict = field(default_factory=dict)
    """Free-form notes copied into the manifest (not fingerprinted)."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.tokenizer_path is not None:
            self.tokenizer_path = Path(self.tokenizer_path)
        if self.download_dir is not None:
            self.download_dir = Path(self.download_dir)
        if isinstance(self.include, str):
            self.include = (self.include,)
        self.include = tuple(self.include)
        self.validate()

    @property
    def window_len(self) -> int:
        """Stored tokens per sample: every depth up to max_depth gets a full row of labels."""
        return self.seq_len + self.max_depth + 1

    @property
    def download_root(self) -> Path:
        return self.download_dir if self.download_dir is not None else self.out_dir / "downloads"

    def validate(self) -> None:
        def bad(name: str, value: object, fix: str) -> BuildConfigError:
            return BuildConfigError(name, value, "is invalid", fix)

        if not isinstance(self.source, str) or not self.source:
            raise bad("source", self.source, f"give '{STDLIB_SOURCE}', '{PINNED_CODE_SOURCE}', a directory or a .jsonl file")
        if not self.include or not all(isinstance(p, str) and p for p in self.include):
            raise bad("include", self.include, "give at least one non-empty glob such as '**/*.py'")
        if not self.jsonl_field:
            raise bad("jsonl_field", self.jsonl_field, "name the JSON field holding the text, e.g. 'text'")
        if self.vocab_size is None:
            if self.tokenizer_path is None:
                raise bad("vocab_size", None, "give the vocabulary size of the tokenizer to train")
        elif not isinstance(self.vocab_size, int) or not 1 <= self.vocab_size <= 2**32 - 1 or (
                self.tokenizer_path is None and self.vocab_size < MIN_VOCAB_SIZE):
            raise bad("vocab_size", self.vocab_size, f"use an integer >= {MIN_VOCAB_SIZE} (byte fallback alone needs 256 ids)")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise bad("seq_len", self.seq_len, "use a positive integer such as 1024")
        if not isinstance(self.max_depth, int) or self.max_depth < 0:
            raise bad("max_depth", self.max_depth, "use 0 (next-token only) or more")
        if not 0.0 <= self.val_fraction < 1.0:
            raise bad("val_fraction", self.val_fraction, "use a fraction in [0, 1), e.g. 0.01")
        if not isinstance(self.shard_samples, int) or self.shard_samples < 1:
            raise bad("shard_samples", self.shard_samples, "use a positive number of windows per shard")
        if self.tokenizer_sample_bytes < 1:
            raise bad("tokenizer_sample_bytes", self.tokenizer_sample_bytes, "use a positive byte count")
        if self.num_workers is not None and self.num_workers < 1:
            raise bad("num_workers", self.num_workers, "use a positive count (or none: all cores)")
        if self.tokenizer_path is not None and not self.tokenizer_path.exists():
            raise bad("tokenizer_path", str(self.tokenizer_path), "point it to an existing tokenizer.json, sentencepiece .model, or a directory holding one")
        if self.eos_token is not None and self.tokenizer_path is None:
            raise bad("eos_token", self.eos_token, "it names a token of a reused tokenizer; give tokenizer_path too")

    def fingerprint_fields(self) -> dict:
        """The fields that determine the output bytes (paths and UI switches excluded)."""
        keep = ("include", "jsonl_field", "vocab_size", "seq_len", "max_depth", "val_fraction",
                "seed", "shard_samples", "tokenizer_sample_bytes")
        d = {k: getattr(self, k) for k in keep}
        # Only when set, so that datasets built before these options existed stay up to date.
        d.update({k: getattr(self, k) for k in ("eos_token", "add_bos") if getattr(self, k)})
        d["include"] = list(self.include)
        return d

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
