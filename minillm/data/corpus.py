"""Corpus readers: text files, directories, globs, a JSONL field and CSV/TSV columns.

Everything is read as a stream of :class:`Document`. Documents stay separate because next
sentence prediction, the train/validation split and document-aware attention masks need the
boundaries.

Input formats (``format="auto"`` picks by suffix):

* ``text`` (any other suffix): ``split="file"`` makes the whole file one document,
  ``"blank_lines"`` starts a new document at every run of blank lines, ``"lines"`` makes every
  non-blank line a document. ``"auto"`` (default) is ``"file"`` when the inputs name several
  files, and ``"blank_lines"`` for a single text file (an ``input.txt`` of a whole book: as one
  document it could not be split into training and validation documents). The split it resolves
  to is ``Corpus.text_split``.
* ``jsonl`` (``.jsonl``, ``.ndjson``): one JSON object per line; ``field`` names the text.
* ``csv`` / ``tsv`` (``.csv``, ``.tsv``): a header row; ``field`` names the text column.

Paths may be files, directories (every non-hidden file below, sorted) or glob patterns
(``data/**/*.txt``, sorted). A missing file or a pattern matching nothing is a
``FileNotFoundError`` naming it.

Bytes that are not UTF-8 are an error naming the file and the byte offset, unless the reader
is given ``errors="replace"`` (each bad byte becomes U+FFFD).

Duplicates. A :class:`Corpus` yields each text once, because the train/validation split is per
document: a document read twice could land in both splits. A file named twice (a folder and a
glob of it, a symlink, a relative and an absolute path: the same resolved path) is read once,
and a document whose text is exactly that of an earlier one (another file, JSONL line, CSV row
or blank-line block) is dropped. The first occurrence in input order is kept, so the result is
deterministic. ``Corpus.duplicate_files`` and ``Corpus.duplicate_documents`` say what was
dropped. Finding repeated texts keeps a 16-byte digest per distinct document, about 80 MB per
million documents.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("auto", "text", "jsonl", "csv", "tsv")
TEXT_SPLITS = ("auto", "file", "blank_lines", "lines")
ERRORS = ("strict", "replace")
# Part of every Corpus.fingerprint: bumped when the same inputs start to give other documents
# (2: duplicates dropped), so prepared shards and tokenizers cached under the old one are rebuilt.
READ_VERSION = 2


@dataclass(frozen=True)
class Document:
    """One document: a stable ``id`` (file, line or row) and its ``text``."""

    id: str
    text: str


def read_utf8(path: str | os.PathLike, errors: str = "strict") -> str:
    """The UTF-8 text of ``path``; invalid bytes raise a ValueError naming file and offset."""
    if errors not in ERRORS:
        raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 4]
        raise ValueError(
            f"{path}: invalid UTF-8 at byte offset {err.start} (bytes {bad!r}: {err.reason}); "
            f"fix the file or read it with errors='replace'"
        ) from None


def resolve_text_split(split: str, n_files: int) -> str:
    """What ``split="auto"`` means for inputs of ``n_files`` files: ``blank_lines`` for a single
    file, ``file`` otherwise; any other split is itself."""
    if split != "auto":
        return split
    return "blank_lines" if n_files == 1 else "file"


def read_text_file(path: str | os.PathLike, split: str = "file", errors: str = "strict") -> Iterator[Document]:
    """Documents of a plain-text file (see the module docstring for ``split``; not ``"auto"``,
    which depends on the other inputs: see :func:`resolve_text_split`)."""
    if split not in TEXT_SPLITS or split == "auto":
        raise ValueError(f"split must be one of {TEXT_SPLITS[1:]}, got {split!r}")
    text = read_utf8(path, errors)
    if split == "file":
        if text.strip():
            yield Document(str(path), text)
        return
    if split == "lines":
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                yield Document(f"{path}:{number}", line)
        return
    block: list[str] = []
    start = 1
    for number, line in enumerate(text.split("\n") + [""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            yield Document(f"{path}:{start}", "\n".join(block))
            block = []


def read_json_records(
    path: str | os.PathLike, fields: Sequence[str], errors: str = "strict"
) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file; each record must hold ``fields``."""
    for number, line in enumerate(read_utf8(path, errors).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        missing = [name for name in fields if not isinstance(record, dict) or name not in record]
        if missing:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{number}: no field {missing[0]!r} (found {keys})")
        yield number, record


def read_jsonl(path: str | os.PathLike, field: str = "text", errors: str = "strict") -> Iterator[Document]:
    """One document per JSON line, its text taken from ``field``."""
    for number, record in read_json_records(path, [field], errors):
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{number}: field {field!r} must be a string, got {type(value).__name__}")
        if value.strip():
            yield Document(f"{path}:{number}", value)


def read_table(
    path: str | os.PathLike, delimiter: str | None = None, errors: str = "strict"
) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a CSV (``,``) or TSV (``\\t``, chosen by ``.tsv``) file.

    TSV files are read without quote handling (GLUE files contain bare quotes).
    """
    path = Path(path)
    text = read_utf8(path, errors)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if delimiter == "\t":
        lines = [line for line in text.split("\n") if line.strip()]
        rows = [line.rstrip("\r").split("\t") for line in lines]
    else:
        rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row]
    if not rows:
        raise ValueError(f"{path}: empty table (no header row)")
    return rows[0], rows[1:]


def column_index(header: Sequence[str], column: str, path: str | os.PathLike) -> int:
    """Position of ``column`` in ``header``, or a ValueError naming the file and the column."""
    if column not in header:
        raise ValueError(f"{path}: no column {column!r} (columns: {list(header)})")
    return list(header).index(column)


def read_csv(path: str | os.PathLike, field: str = "text", errors: str = "strict") -> Iterator[Document]:
    """One document per CSV/TSV row, its text taken from column ``field``."""
    header, rows = read_table(path, errors=errors)
    index = column_index(header, field, path)
    for number, row in enumerate(rows, start=2):
        if index >= len(row):
            raise ValueError(f"{path}:{number}: row has {len(row)} columns, column {field!r} is number {index + 1}")
        if row[index].strip():
            yield Document(f"{path}:{number}", row[index])


def expand_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by ``inputs``: files as given, directories walked, globs expanded (sorted)."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"input pattern matched no file: {text}")
            files.extend(matches)
        elif path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise FileNotFoundError(f"input directory has no file: {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input file not found: {path}")
    return files


def detect_format(path: Path) -> str:
    """``jsonl``, ``csv``, ``tsv`` or ``text`` from the file suffix."""
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(suffix, "text")


def describe_duplicates(duplicates: dict[str, int | None]) -> str:
    """One line for logs and progress output from ``Corpus.duplicates`` (or the same counts as
    recorded by prepare), e.g. "dropped 3 input file(s) reached twice (same resolved path) and 2
    document(s) repeating an earlier document's text"."""
    files, documents = duplicates["files"], duplicates["documents"]
    parts = [f"{files} input file(s) reached twice (same resolved path)"] if files else []
    if documents:
        parts.append(f"{documents} document(s) repeating an earlier document's text")
    said = "dropped " + " and ".join(parts) if parts else "no duplicate dropped"
    return said if documents is not None else f"{said} (repeated texts are counted when the corpus is read)"


class Corpus:
    """A re-iterable set of documents from files, or from documents already in memory, each
    text once (see "Duplicates" in the module docstring).

    Args:
        inputs: paths, directories or globs (strings or ``Path``); or ``Document`` objects
            already in memory. The single input ``"default"`` is the embedded standard-library
            corpus (:mod:`minillm.data.default_corpus`).
        format: one of ``FORMATS``; ``"auto"`` chooses by suffix per file.
        field: JSONL field or CSV/TSV column holding the text.
        split: how plain-text files become documents (``TEXT_SPLITS``).
        errors: ``"strict"`` (invalid UTF-8 is an error naming file and offset) or ``"replace"``.

    Attributes:
        files: the input files, each resolved path once, in input order (empty for documents).
        duplicate_files: inputs left out because an earlier input reached the same file.
        duplicate_documents: documents left out on the latest complete pass because an earlier
            document had the same text; None until the corpus has been read through once.
    """

    def __init__(
        self,
        inputs: Iterable[str | os.PathLike | Document],
        format: str = "auto",
        field: str = "text",
        split: str = "auto",
        errors: str = "strict",
    ):
        if format not in FORMATS:
            raise ValueError(f"Corpus: format must be one of {FORMATS}, got {format!r}")
        if split not in TEXT_SPLITS:
            raise ValueError(f"Corpus: split must be one of {TEXT_SPLITS}, got {split!r}")
        if errors not in ERRORS:
            raise ValueError(f"Corpus: errors must be one of {ERRORS}, got {errors!r}")
        items = [inputs] if isinstance(inputs, (str, os.PathLike, Document)) else list(inputs)
        self.format, self.field, self.split, self.errors = format, field, split, errors
        self.documents: list[Document] | None = None
        self.text_split = resolve_text_split(split, 0)
        self.files: list[Path] = []
        self.duplicate_files: list[Path] = []
        self.duplicate_documents: int | None = None
        if items == ["default"]:
            from minillm.data.default_corpus import default_corpus_documents

            self.documents = default_corpus_documents()
        elif items and all(isinstance(x, Document) for x in items):
            self.documents = items
        elif any(isinstance(x, Document) for x in items):
            raise TypeError("Corpus: inputs mix Document objects and paths; pass one kind")
        else:
            seen: set[Path] = set()
            for path in expand_paths(items):
                resolved = path.resolve()
                (self.duplicate_files if resolved in seen else self.files).append(path)
                seen.add(resolved)
        self.text_split = resolve_text_split(split, len(self.files))

    def __iter__(self) -> Iterator[Document]:
        """Every document whose text no earlier document had; blank documents pass as they are."""
        seen: set[bytes] = set()
        dropped = 0
        for doc in self._read_inputs():
            if doc.text.strip():
                digest = hashlib.blake2b(doc.text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if digest in seen:
                    dropped += 1
                    continue
                seen.add(digest)
            yield doc
        self.duplicate_documents = dropped

    def _read_inputs(self) -> Iterator[Document]:
        """Every document of the inputs, repeated texts included (each file still read once)."""
        if self.documents is not None:
            yield from self.documents
            return
        for path in self.files:
            yield from self.read_file(path)

    def format_of(self, path: Path) -> str:
        """The format ``path`` is read with."""
        return detect_format(path) if self.format == "auto" else self.format

    def read_file(self, path: Path) -> Iterator[Document]:
        """Documents of one input file, with this corpus's format, field and errors."""
        fmt = self.format_of(path)
        if fmt == "jsonl":
            return read_jsonl(path, self.field, self.errors)
        if fmt in ("csv", "tsv"):
            return read_csv(path, self.field, self.errors)
        return read_text_file(path, self.text_split, self.errors)

    def fingerprint(self) -> str:
        """SHA-256 over ``READ_VERSION``, the reader settings and every input's bytes (files) or
        text (memory)."""
        h = hashlib.sha256()
        h.update(json.dumps([READ_VERSION, self.format, self.field, self.text_split, self.errors]).encode())
        if self.documents is not None:
            for doc in self.documents:
                for part in (doc.id, doc.text):
                    data = part.encode("utf-8", "surrogatepass")
                    h.update(len(data).to_bytes(8, "little"))
                    h.update(data)
            return h.hexdigest()
        for path in self.files:
            name = str(path.resolve()).encode()
            h.update(len(name).to_bytes(8, "little") + name)
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        return h.hexdigest()

    @property
    def duplicates(self) -> dict[str, int | None]:
        """``{"files": ..., "documents": ...}``: counts of ``duplicate_files`` and
        ``duplicate_documents`` (see :func:`describe_duplicates`)."""
        return {"files": len(self.duplicate_files), "documents": self.duplicate_documents}

    def describe(self) -> list[str]:
        """Short human-readable list of the inputs, for manifests and logs."""
        if self.documents is not None:
            return [f"<{len(self.documents)} documents in memory>"]
        return [str(p) for p in self.files]
