"""Document sources: a directory tree, a JSONL file, or the interpreter's standard library.

Listing happens in the parent process and only records where each document lives (`DocRef`);
reading and decoding happen in the tokenizer processes (`read_document`) so that they run in
parallel. Listing order is sorted, hence deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Skip reasons: counted in the manifest and the console summary, never silent.
SKIP_UNREADABLE = "unreadable"
SKIP_INVALID_UTF8 = "invalid_utf8"
SKIP_EMPTY = "empty"
SKIP_INVALID_JSON = "invalid_json"
SKIP_MISSING_FIELD = "missing_field"
SKIP_REASONS = (SKIP_UNREADABLE, SKIP_INVALID_UTF8, SKIP_EMPTY, SKIP_INVALID_JSON, SKIP_MISSING_FIELD)

# Standard-library directories that are not ordinary source: third-party packages installed into
# the interpreter, generated pydoc topics, byte caches, and test fixtures (intentionally broken
# encodings and syntax, data files that happen to end in .py).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "pydoc_data", "encoded_modules",
                     "crashers", "leakers"}
_TEST_DIR_NAMES = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class DocRef:
    """Where one document lives: a whole file, or one line (byte range) of a JSONL file."""

    name: str  # unique, stable id (relative path, or `file.jsonl:LINE`); drives the val split
    path: str
    offset: int = 0
    length: int = -1  # -1: the whole file
    jsonl: bool = False


def stdlib_root() -> Path:
    """Source directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_stdlib_excluded(rel_parts: tuple[str, ...]) -> bool:
    dirs = rel_parts[:-1]
    if any(d in _STDLIB_SKIP_DIRS for d in dirs):
        return True
    # Data directories below a test package (test/tokenizedata, test_importlib/data01, ...).
    in_test = False
    for d in dirs:
        if in_test and "data" in d.lower() and not d.startswith("test_"):
            return True
        in_test = in_test or d in _TEST_DIR_NAMES or d.startswith("test_")
    return False


def list_stdlib() -> list[DocRef]:
    """All `.py` files of the standard library, minus site-packages and test fixture dirs."""
    root = stdlib_root()
    refs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for fn in filenames:
            if not fn.endswith(".py"):
                continue
            full = Path(dirpath) / fn
            rel = full.relative_to(root)
            if _is_stdlib_excluded(rel.parts):
                continue
            refs.append(DocRef(name=rel.as_posix(), path=str(full)))
    return sorted(refs, key=lambda r: r.name)


def list_directory(root: Path, include: tuple[str, ...]) -> list[DocRef]:
    """Files under `root` matching any glob in `include` (sorted by relative path).

    Dangling symlinks are listed on purpose: they fail to read and are counted as unreadable
    instead of silently vanishing from the corpus.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"source directory {str(root)!r} does not exist or is not a directory")
    seen: dict[str, DocRef] = {}
    for pattern in include:
        for p in root.glob(pattern):
            if p.is_dir():
                continue
            if not (p.is_file() or p.is_symlink()):
                continue
            rel = p.relative_to(root).as_posix()
            seen.setdefault(rel, DocRef(name=rel, path=str(p)))
    return [seen[k] for k in sorted(seen)]


def list_jsonl(path: Path) -> list[DocRef]:
    """One `DocRef` per non-blank line of a JSONL file (byte offsets, so workers seek directly)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"cannot open JSONL source {str(path)!r}: {exc.strerror}") from exc
    refs = []
    with f:
        offset = 0
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                refs.append(DocRef(name=f"{path.name}:{lineno}", path=str(path), offset=offset,
                                   length=len(line), jsonl=True))
            offset += len(line)
    return refs


def read_document(ref: DocRef, jsonl_field: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable document, else (None, skip_reason)."""
    try:
        with open(ref.path, "rb") as f:
            if ref.offset:
                f.seek(ref.offset)
            raw = f.read() if ref.length < 0 else f.read(ref.length)
    except OSError:
        return None, SKIP_UNREADABLE
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, SKIP_INVALID_UTF8
    if ref.jsonl:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None, SKIP_INVALID_JSON
        value = obj.get(jsonl_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            return None, SKIP_MISSING_FIELD
        text = value
    if not text.strip():
        return None, SKIP_EMPTY
    return text, None


def corpus_fingerprint(refs: list[DocRef]) -> str:
    """sha256 over every document's name and bytes: 'same inputs' means same content, not same mtime."""
    h = hashlib.sha256()
    done_paths: set[str] = set()
    for ref in refs:
        h.update(ref.name.encode() + b"\0")
        if ref.jsonl:
            if ref.path in done_paths:
                continue
            done_paths.add(ref.path)
        try:
            with open(ref.path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as exc:
            h.update(f"<unreadable:{exc.errno}>".encode())
        h.update(b"\0")
    return h.hexdigest()
