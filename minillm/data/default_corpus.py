"""The embedded default corpus: English prose from the running Python's standard library.

Nothing can be downloaded at run time, and nothing of this corpus is committed: it is read
from the interpreter's own standard library the first time it is needed.

What goes in:

* every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, parsed with ``ast`` (never
  imported): its module docstring, then the docstrings of its classes and functions in source
  order. One document per module; docstrings are joined by a blank line.
* ``pydoc_data.topics``: the language reference topics behind ``help()``, one document per
  topic (id ``pydoc_data.topics:<name>``).

What stays out: ``site-packages``, test suites (any ``test``/``tests``/``idle_test`` folder,
``test_*.py`` files) and modules without docstrings. On CPython 3.11 this is about 2 MB in
~560 modules + ~90 topics.

Determinism: modules are visited in sorted order and ``ast`` does not depend on the machine,
so the cache file is byte-identical for a given Python version and standard library. The cache
lives in ``$MINILLM_CACHE_DIR`` or ``$XDG_CACHE_HOME/minillm`` or ``~/.cache/minillm``, one
JSONL file per Python version, written atomically (temporary file + ``os.replace``).

The same data yields a real labelled task (:func:`stdlib_classification_task`): which package a
docstring comes from, among the ``n_classes`` largest standard-library packages (directories
with at least 3 modules) plus ``"other"``, split by module so no module's docstrings appear in
two splits; and a synthetic sequence-to-sequence one (:func:`stdlib_seq2seq_task`): a docstring's
first line, said backwards word by word.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from minillm.data.corpus import Document

_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

OTHER_LABEL = "other"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where minillm caches derived data (see the module docstring)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("MINILLM_CACHE_DIR"):
        return Path(os.environ["MINILLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minillm"


def _cache_name() -> str:
    return f"default_corpus-{platform.python_implementation().lower()}-{platform.python_version()}.jsonl"


def _stdlib_modules(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, file) of every non-test ``.py`` file in the stdlib, sorted."""
    found = []
    for directory, subdirs, files in os.walk(root):
        rel_dir = Path(directory).relative_to(root)
        # prune while walking: site-packages alone can be far larger than the stdlib
        subdirs[:] = [
            d for d in subdirs
            if d not in _SKIP_PARTS and not d.startswith(".")
            and not (rel_dir == Path(".") and "-" in d)  # lib-dynload, config-3.11-...
        ]
        for name in files:
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            parts = list((rel_dir / name[:-3]).parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if not parts or parts == ["pydoc_data", "topics"]:
                continue  # topics are added one per document below
            found.append((".".join(parts), Path(directory) / name))
    return sorted(found)


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one file, in source order (depth first)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []  # e.g. lib2to3 test data written in Python 2: not prose we need
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _records(root: Path) -> list[dict]:
    """One JSON-able record per module/topic: id, package, is_package, docstrings."""
    modules = _stdlib_modules(root)
    package_dirs = {name.split(".")[0] for name, path in modules if "." in name or path.name == "__init__.py"}
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        docs = list(pool.map(_docstrings, [path for _, path in modules], chunksize=16))
    records = []
    for (name, _), strings in zip(modules, docs):
        if strings:
            top = name.split(".")[0]
            records.append({"id": name, "package": top, "is_package": top in package_dirs, "docstrings": strings})
    from pydoc_data.topics import topics  # the reference text behind help(); stdlib, no network

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            records.append(
                {"id": f"pydoc_data.topics:{name}", "package": "pydoc_data", "is_package": True, "docstrings": [text]}
            )
    return records


def build_default_corpus(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build (once) and return the cached JSONL of the default corpus.

    Each line is ``{"id", "package", "is_package", "docstrings", "text"}`` with ``text`` the
    docstrings joined by blank lines, so the file is also a plain JSONL corpus
    (``Corpus([path], field="text")``).
    """
    target = cache_root(cache_dir) / _cache_name()
    if target.is_file() and not force:
        return target
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library not found at {root} (sysconfig stdlib path)")
    records = _records(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                record["text"] = "\n\n".join(record["docstrings"])
                f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _load_records(cache_dir: str | os.PathLike | None) -> list[dict]:
    path = build_default_corpus(cache_dir)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def default_corpus_documents(cache_dir: str | os.PathLike | None = None) -> list[Document]:
    """The default corpus as documents (one per module / topic), in a fixed order."""
    return [Document(r["id"], r["text"]) for r in _load_records(cache_dir)]


@dataclass
class StdlibTask:
    """The stdlib-package classification task.

    ``labels[i]`` names class ``i``; each split is a list of ``(text, label_id)``; ``modules``
    maps split name to the modules it holds (disjoint by construction).
    """

    labels: list[str]
    train: list[tuple[str, int]]
    validation: list[tuple[str, int]]
    test: list[tuple[str, int]]
    modules: dict[str, list[str]]


# Modules of each package, ordered by hash, are dealt out in this pattern: the first three go
# to train, validation and test (every class appears in every split), then 8 of 10 to train.
_DEAL = ("train", "validation", "test", "train", "train", "train", "train", "train", "train", "train")


def stdlib_classification_task(
    n_classes: int = 8, cache_dir: str | os.PathLike | None = None, min_chars: int = 20
) -> StdlibTask:
    """Classify which standard-library package a docstring comes from.

    Args:
        n_classes: number of named packages; the labels are these plus ``"other"``.
        cache_dir: default-corpus cache directory (see :func:`build_default_corpus`).
        min_chars: docstrings shorter than this are dropped (``"Return x."`` says little).

    The packages are the ``n_classes`` standard-library packages (directories with >= 3
    modules) with the most docstrings. Splits are by module, deterministic.
    """
    if n_classes < 1:
        raise ValueError(f"stdlib_classification_task: n_classes must be >= 1, got {n_classes}")
    records = [r for r in _load_records(cache_dir) if r["package"] != "pydoc_data"]
    by_package: dict[str, list[dict]] = {}
    for r in records:
        by_package.setdefault(r["package"], []).append(r)
    sizes = {
        name: sum(len([d for d in r["docstrings"] if len(d) >= min_chars]) for r in rs)
        for name, rs in by_package.items()
        if rs[0]["is_package"] and len(rs) >= 3
    }
    if len(sizes) < n_classes:
        raise ValueError(f"stdlib_classification_task: n_classes={n_classes} but only {len(sizes)} packages qualify")
    named = sorted(sorted(sizes), key=lambda name: -sizes[name])[:n_classes]
    labels = sorted(named) + [OTHER_LABEL]
    label_of = {name: labels.index(name) for name in named}

    splits: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
    modules: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    groups: dict[int, list[dict]] = {}
    for name, rs in by_package.items():
        groups.setdefault(label_of.get(name, len(labels) - 1), []).extend(rs)
    for label, rs in sorted(groups.items()):
        ordered = sorted(rs, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
        for k, r in enumerate(ordered):
            split = _DEAL[k % len(_DEAL)]
            modules[split].append(r["id"])
            splits[split].extend((d, label) for d in r["docstrings"] if len(d) >= min_chars)
    for name in modules:
        modules[name].sort()
    return StdlibTask(labels, splits["train"], splits["validation"], splits["test"], modules)



@dataclass
class StdlibPairs:
    """The stdlib word-reversal task: ``(source, target)`` pairs per split, split by module."""

    train: list[tuple[str, str]]
    validation: list[tuple[str, str]]
    test: list[tuple[str, str]]


def stdlib_seq2seq_task(cache_dir: str | os.PathLike | None = None, min_words: int = 3,
                        max_words: int = 10) -> StdlibPairs:
    """Say a docstring's first line backwards, word by word: the embedded sequence-to-sequence task.

    The source is the first line of a docstring of ``min_words`` to ``max_words`` words (``"Return
    the number of items."``); the target is its words in reverse order (``"items. of number the
    Return"``). It is synthetic on purpose: a small encoder-decoder learns it from scratch in
    minutes, since it takes attention from each output position to the right input position and
    no knowledge of the world, so it checks the whole seq2seq road (data, teacher forcing, decoding,
    BLEU and chrF) end to end. Copying the source scores low BLEU (few of its word pairs survive the
    reversal) and a fair chrF (every character is there): the figures to beat. Splits are by module
    (as in :func:`stdlib_classification_task`); a line that appears twice is kept once, in its
    first split.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"stdlib_seq2seq_task: expected 1 <= min_words <= max_words, got {min_words}, {max_words}")
    records = [r for r in _load_records(cache_dir) if r["package"] != "pydoc_data"]
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    ordered = sorted(records, key=lambda r: hashlib.sha256(r["id"].encode()).hexdigest())
    for k, r in enumerate(ordered):
        for doc in r["docstrings"]:
            words = doc.splitlines()[0].split()
            line = " ".join(words)
            if min_words <= len(words) <= max_words and line not in seen:
                seen.add(line)
                splits[_DEAL[k % len(_DEAL)]].append((line, " ".join(reversed(words))))
    return StdlibPairs(splits["train"], splits["validation"], splits["test"])
