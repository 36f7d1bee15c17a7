"""Prepare: tokenise a corpus once into memory-mapped token shards.

Output layout of ``out_dir``::

    train.bin        flat token ids of the training documents (uint16, or uint32 when the
                     vocabulary has more than 65536 pieces), each document followed by EOS
    train.idx.npy    int64 document offsets, length n_documents + 1: document i is
                     train.bin[offsets[i]:offsets[i + 1]] (its EOS included)
    val.bin          the same for the validation documents
    val.idx.npy
    tokenizer.model  a copy of the tokenizer, so the shards can always be decoded
    manifest.json    written last: hashes of the inputs and the tokenizer, the settings, the
                     duplicates dropped, and size + SHA-256 of every file above

Read them back with :class:`minillm.data.shards.TokenShards`.

Rules:

* **Skip on rerun.** If ``manifest.json`` records the same input hash, tokenizer hash and
  settings, and every file has its recorded size, nothing is done.
* **Atomic.** Everything is written to hidden temporary files first. Only when all are
  complete is the old manifest removed, the files moved into place with ``os.replace``, and
  the new manifest written last. A directory without a valid manifest is never read as
  complete (``TokenShards`` refuses it), so an interrupted prepare is simply redone, and the
  result is byte-identical to an uninterrupted run. Failures remove their temporary files.
* **Each text once.** The corpus drops a file reached twice and a document repeating an earlier
  document's text (:class:`~minillm.data.corpus.Corpus`), so no text can be in both splits.
  ``PrepareResult.duplicates`` and ``manifest["duplicates"]`` count them (``{"files": ...,
  "documents": ...}``); with ``progress=True`` prepare prints the counts when any were dropped.
* **Split by document.** A document goes to validation when a hash of ``(seed, id)`` ranks it
  among the smallest ``val_fraction`` of all documents (at least one when ``val_fraction > 0``),
  so train and validation never share a document and the split does not depend on worker timing.
* **Both cores.** Documents are sent in ~256 KB chunks to a process pool (``num_workers``,
  default all cores, at most 2 chunks in flight per worker); a tqdm bar shows MB/s of raw text.

One prepare per output directory at a time: a new run deletes temporary files it finds there.

Testing hook: ``MINILLM_PREPARE_CRASH_AT=chunk:N`` kills the process (SIGKILL) after N chunks
are tokenised, ``MINILLM_PREPARE_CRASH_AT=publish`` after the first file is moved into place
but before the manifest is written. The tests use it to check that an interrupted prepare
leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from minillm.data.corpus import Corpus, Document, describe_duplicates
from minillm.data.word_cache import WordCache
from minillm.hf_tokenizer import load_tokenizer
from minillm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from minillm.data.config import DataConfig

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_CHUNK_BYTES = 256 * 1024


@dataclass
class PrepareResult:
    """What :func:`prepare` did: ``skipped`` is True when the manifest already matched."""

    out_dir: Path
    skipped: bool
    manifest: dict
    seconds: float
    duplicates: dict[str, int]
    """``{"files": n, "documents": m}``: input files reached twice and documents repeating an
    earlier document's text, left out of the shards; print it with
    :func:`minillm.data.corpus.describe_duplicates`."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- worker side

# Each worker process holds the tokenizer and, when Tokenizer.splits_on_spaces holds, a
# WordCache (minillm.data.word_cache): each distinct word is encoded once, which gives exactly
# sentencepiece's ids several times faster. Otherwise whole documents go to sentencepiece.
_worker_sp = None
_worker_dtype = None
_worker_eos = None
_worker_cache: WordCache | None = None


def tokenizer_files(tok) -> dict[str, bytes]:
    """The files a tokenizer is read from: a sentencepiece model, or a Hugging Face folder's files."""
    return {"tokenizer.model": tok.model_proto} if isinstance(tok, Tokenizer) else dict(tok.files)


def _init_worker(tokenizer, dtype: str, eos: int | None, splits_on_spaces: bool, space: list[int]) -> None:
    """`tokenizer`: a sentencepiece model_proto (bytes; each worker builds its own processor, which
    is cheap to send), or a Hugging Face tokenizer object, which encodes in-process on its own
    threads."""
    global _worker_sp, _worker_dtype, _worker_eos, _worker_cache

    _worker_sp = spm.SentencePieceProcessor(model_proto=tokenizer) if isinstance(tokenizer, bytes) else tokenizer
    _worker_dtype = np.dtype(dtype)
    _worker_eos = eos
    _worker_cache = WordCache(_worker_sp, space) if splits_on_spaces else None


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of a chunk of documents (flat, EOS after each when set) and per-document lengths."""
    if _worker_cache is not None:
        ids, lengths = _worker_cache.encode(texts)
    else:
        threads = 1 if isinstance(_worker_sp, spm.SentencePieceProcessor) else -1
        encoded = _worker_sp.encode(texts, num_threads=threads) if threads == 1 else _worker_sp.encode_batch(texts)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
    if _worker_eos is not None:
        ids = np.insert(ids, np.cumsum(lengths), _worker_eos)  # one EOS after each document
        lengths = lengths + 1
    return ids.astype(_worker_dtype), lengths


def _ordered_map(pool, fn, items: Iterator, in_flight: int) -> Iterator:
    """Like ``pool.imap`` but never reads more than ``in_flight`` items ahead (bounded memory)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------- helpers


def _crash_point(name: str) -> None:
    if os.environ.get("MINILLM_PREPARE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _say_duplicates(duplicates: dict[str, int], progress: bool) -> None:
    if progress and (duplicates["files"] or duplicates["documents"]):
        print(f"prepare: {describe_duplicates(duplicates)}", file=sys.stderr)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _split_key(seed: int, doc_id: str, repeat: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{doc_id}\0{repeat}".encode("utf-8", "surrogatepass")).digest()


def _manifest_ok(out_dir: Path, expected: dict) -> dict | None:
    """The existing manifest if it matches ``expected`` and all its files are intact in size."""
    path = out_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key, value in expected.items():
        if manifest.get(key) != value:
            return None
    for name, info in manifest.get("files", {}).items():
        file = out_dir / name
        if not file.is_file() or file.stat().st_size != info["bytes"]:
            return None
    return manifest


def _chunks(documents: Iterable[Document], stats: dict, ids: list[str], chunk_bytes: int) -> Iterator[list[str]]:
    """Group document texts into chunks of ~chunk_bytes; record ids and raw byte count on the way."""
    chunk: list[str] = []
    size = 0
    for doc in documents:
        if not doc.text.strip():
            continue  # blank documents are skipped, as the file readers do
        ids.append(doc.id)
        n = len(doc.text.encode("utf-8", "surrogatepass"))
        stats["bytes"] += n
        chunk.append(doc.text)
        size += n
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_array_atomic(target: Path, array: np.ndarray) -> Path:
    """Write ``array`` as .npy to a hidden temp file beside ``target``; return the temp path."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".prepare-{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    return Path(tmp)


# ---------------------------------------------------------------- prepare


def prepare(
    inputs: Corpus | Iterable,
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    append_eos: bool = True,
    num_workers: int | None = None,
    progress: bool = True,
    chunk_bytes: int = _CHUNK_BYTES,
) -> PrepareResult:
    """Tokenise ``inputs`` into ``out_dir`` (see the module docstring for the layout and rules).

    Args:
        inputs: a :class:`Corpus`, or anything ``Corpus(...)`` accepts (paths, globs,
            directories, ``Document`` objects, ``["default"]``).
        tokenizer: a :class:`Tokenizer` or the path of a ``.model`` file.
        out_dir: output directory (created).
        val_fraction: fraction of documents held out for validation, in [0, 1).
        seed: seed of the document split.
        append_eos: put EOS after every document (the separator causal LM packing relies on).
        num_workers: tokenising processes; default ``os.cpu_count()``; 1 runs in-process.
        progress: show a tqdm bar (raw text MB/s).
        chunk_bytes: raw text per work item sent to a worker (output does not depend on it).
    """
    start_time = time.perf_counter()
    corpus = inputs if isinstance(inputs, Corpus) else Corpus(inputs)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"prepare: val_fraction must be in [0, 1), got {val_fraction}")
    if append_eos and tok.eos_id is None:
        raise ValueError(f"prepare: append_eos=True but the tokenizer {tok.path} has no EOS token")
    # A Hugging Face tokenizer encodes on its own threads, in this process.
    workers = 1 if not isinstance(tok, Tokenizer) else num_workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"prepare: num_workers must be >= 1, got {num_workers}")
    if chunk_bytes < 1:
        raise ValueError(f"prepare: chunk_bytes must be >= 1, got {chunk_bytes}")
    out_dir = Path(out_dir)
    dtype = token_dtype(tok.vocab_size)

    expected = {
        "format_version": FORMAT_VERSION,
        "input_hash": corpus.fingerprint(),
        "tokenizer_hash": tok.fingerprint,
        "settings": {"val_fraction": val_fraction, "seed": seed, "append_eos": append_eos},
    }
    existing = _manifest_ok(out_dir, expected)
    if existing is not None:
        # Same fingerprint, same documents: the recorded count of repeated texts holds; the files
        # may have been named twice only this time.
        duplicates = {**existing["duplicates"], "files": corpus.duplicates["files"]}
        _say_duplicates(duplicates, progress)
        return PrepareResult(out_dir, True, existing, time.perf_counter() - start_time, duplicates)

    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".prepare-*.tmp"):  # left by a killed run
        stale.unlink()

    temps: list[Path] = []
    try:
        manifest = _tokenise_and_publish(corpus, tok, out_dir, expected, dtype, val_fraction, seed, append_eos,
                                         workers, progress, chunk_bytes, temps)
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if created_dir and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return PrepareResult(out_dir, False, manifest, time.perf_counter() - start_time, manifest["duplicates"])


def _tokenise_and_publish(
    corpus: Corpus,
    tok: Tokenizer,
    out_dir: Path,
    expected: dict,
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
    append_eos: bool,
    workers: int,
    progress: bool,
    chunk_bytes: int,
    temps: list[Path],
) -> dict:
    # 1. Tokenise every document, in corpus order, into one temporary stream.
    fd, all_name = tempfile.mkstemp(dir=out_dir, prefix=".prepare-all.", suffix=".tmp")
    all_path = Path(all_name)
    temps.append(all_path)
    stats = {"bytes": 0}
    doc_ids: list[str] = []
    lengths: list[np.ndarray] = []
    eos = tok.eos_id if append_eos else None
    total_bytes = None  # the bar counts text bytes; file sizes match them only for plain text
    if corpus.files and all(corpus.format_of(p) == "text" for p in corpus.files):
        total_bytes = sum(p.stat().st_size for p in corpus.files)
    elif corpus.documents is not None:
        total_bytes = sum(len(d.text.encode("utf-8", "surrogatepass")) for d in corpus.documents)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress, smoothing=0.1)
    chunks = _chunks(corpus, stats, doc_ids, chunk_bytes)
    init_args = (tok.model_proto if isinstance(tok, Tokenizer) else tok, dtype.str, eos, tok.splits_on_spaces, tok.space_ids)
    with os.fdopen(fd, "wb") as out:
        if workers == 1:
            _init_worker(*init_args)
            results: Iterator = map(_encode_chunk, chunks)
            pool = None
        else:
            # fork: the workers need only sentencepiece; spawn would re-import torch per worker
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = mp.get_context(method).Pool(workers, _init_worker, init_args)
            results = _ordered_map(pool, _encode_chunk, chunks, in_flight=2 * workers)
        try:
            done = 0
            for k, (flat, chunk_lengths) in enumerate(results, start=1):
                flat.tofile(out)
                lengths.append(chunk_lengths)
                bar.update(stats["bytes"] - done)
                done = stats["bytes"]
                _crash_point(f"chunk:{k}")
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            bar.close()
    duplicates = corpus.duplicates  # complete: the loop above read the corpus through
    _say_duplicates(duplicates, progress)
    if not doc_ids:
        raise ValueError(f"prepare: the corpus is empty: no non-blank document in {corpus.describe()}")

    # 2. Choose the validation documents: smallest split keys, at least one if val_fraction > 0.
    doc_lengths = np.concatenate(lengths)
    offsets = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
    np.cumsum(doc_lengths, out=offsets[1:])
    n_docs = len(doc_ids)
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_docs))
    if n_val >= n_docs:
        raise ValueError(
            f"prepare: val_fraction={val_fraction} leaves no training document ({n_docs} documents in "
            f"{corpus.describe()}, text_split={corpus.text_split!r}); lower val_fraction, add documents or "
            f"choose another data.text_split"
        )
    repeats: dict[str, int] = {}
    keys = []
    for doc_id in doc_ids:
        repeats[doc_id] = repeats.get(doc_id, 0) + 1
        keys.append(_split_key(seed, doc_id, repeats[doc_id]))
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[sorted(range(n_docs), key=keys.__getitem__)[:n_val]] = True

    # 3. Write each split's tokens and offsets to temporary files, copying runs of documents.
    stream = np.memmap(all_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    staged: dict[str, Path] = {}
    split_info: dict[str, dict] = {}
    for split, member in (("train", ~is_val), ("val", is_val)):
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=f".prepare-{split}.bin.", suffix=".tmp")
        tmp = Path(name)
        temps.append(tmp)
        with os.fdopen(fd, "wb") as out:
            chosen = np.flatnonzero(member)
            # consecutive chosen documents form one contiguous run of the stream
            breaks = np.flatnonzero(np.diff(chosen) != 1) + 1
            for run in np.split(chosen, breaks) if len(chosen) else []:
                stream[offsets[run[0]] : offsets[run[-1] + 1]].tofile(out)
            out.flush()
            os.fsync(out.fileno())
        split_lengths = doc_lengths[member]
        split_offsets = np.zeros(len(split_lengths) + 1, dtype=np.int64)
        np.cumsum(split_lengths, out=split_offsets[1:])
        staged[f"{split}.bin"] = tmp
        idx_tmp = _write_array_atomic(out_dir / f"{split}.idx.npy", split_offsets)
        temps.append(idx_tmp)
        staged[f"{split}.idx.npy"] = idx_tmp
        split_info[split] = {"documents": int(member.sum()), "tokens": int(split_offsets[-1])}
    del stream
    for file_name, data in tokenizer_files(tok).items():  # a copy, so the shards can always be decoded
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=f".prepare-{file_name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        temps.append(Path(name))
        staged[file_name] = Path(name)

    files = {name: {"bytes": tmp.stat().st_size, "sha256": _sha256_file(tmp)} for name, tmp in staged.items()}
    manifest = {
        **expected,
        "inputs": corpus.describe(),
        "text_split": corpus.text_split,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eos_id": eos,
        "text_bytes": stats["bytes"],
        "duplicates": duplicates,
        "splits": split_info,
        "files": files,
    }

    # 4. Publish: old manifest out first, files in, new manifest last.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for k, (name, tmp) in enumerate(staged.items()):
        os.replace(tmp, out_dir / name)
        if k == 0:
            _crash_point("publish")
    all_path.unlink()
    fd, name = tempfile.mkstemp(dir=out_dir, prefix=".prepare-manifest.json.", suffix=".tmp")
    temps.append(Path(name))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(name, out_dir / "manifest.json")
    return manifest


def prepare_from_config(config: "DataConfig", progress: bool = True) -> tuple[Tokenizer, PrepareResult]:
    """Tokenizer and prepared shards for a :class:`~minillm.data.config.DataConfig`.

    With ``config.tokenizer`` unset, a tokenizer is trained on the inputs (``vocab_size``,
    ``model_type``) and kept as ``prepared_dir/trained-<hash>.model``, the hash covering the
    inputs and the tokenizer settings, so reruns reuse it instead of training again.
    """
    corpus = Corpus(config.inputs, config.input_format, config.text_field, config.text_split, config.encoding_errors)
    out_dir = Path(config.prepared_dir)
    if config.tokenizer is not None:
        tok = load_tokenizer(config.tokenizer)
    else:
        key = hashlib.sha256(
            json.dumps([corpus.fingerprint(), config.vocab_size, config.model_type, config.seed]).encode()
        ).hexdigest()[:16]
        path = out_dir / f"trained-{key}.model"
        tok = Tokenizer.load(path) if path.is_file() else Tokenizer.train(
            corpus, path, config.vocab_size, config.model_type, seed=config.seed
        )
    result = prepare(corpus, tok, out_dir, val_fraction=config.val_fraction, seed=config.seed,
                     num_workers=config.num_workers or None, progress=progress)
    return tok, result
