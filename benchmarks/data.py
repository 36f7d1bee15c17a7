"""Benchmark: prepare throughput (raw text MB/s and tokens/s) on the embedded default corpus.

    python benchmarks/data.py                      # workers 1 and 2, vocab 8000 BPE
    python benchmarks/data.py --workers 2 --json out.json

What is timed: ``minillm.data.prepare.prepare`` end to end (hash the inputs, tokenise with
the process pool, split by document, write shards + manifest), from documents in memory,
into a fresh directory each repeat so nothing is skipped. Throughput:

    MB/s     = UTF-8 bytes of all documents / 1e6 / seconds
    tokens/s = tokens written (train + val, one EOS per document included) / seconds

The machine may be shared, so the load average is printed, and each run also reports the CPU
seconds it used (parent + pool workers, from ``getrusage``): a wall time far above CPU s / cores
means other processes were competing for the cores, and the figure should be measured again.

For reference it also times sentencepiece alone on whole documents in one thread (what prepare
would do without its per-word cache). Building the corpus and training the tokenizer are timed
separately and not part of the throughput. Target: >= 5 MB/s of raw text on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from minillm.data.default_corpus import build_default_corpus, default_corpus_documents
from minillm.data.prepare import prepare
from minillm.tokenizer import Tokenizer


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per worker count (best is reported)")
    parser.add_argument("--cache-dir", default=None, help="default-corpus cache (default: ~/.cache/minillm)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores ({cpu_name()}), Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")

    start = time.perf_counter()
    path = build_default_corpus(args.cache_dir)
    built = time.perf_counter() - start
    docs = default_corpus_documents(args.cache_dir)
    text_bytes = sum(len(d.text.encode()) for d in docs)
    print(f"default corpus: {len(docs)} documents, {text_bytes / 1e6:.2f} MB of text ({path}; "
          f"{built:.1f}s including the build if it was not cached)")

    results: dict = {"text_mb": text_bytes / 1e6, "documents": len(docs), "cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tok = Tokenizer.train(docs, Path(tmp) / "bench", args.vocab_size, args.model_type)
        print(f"tokenizer: {args.model_type} vocab {tok.vocab_size} trained in {time.perf_counter() - start:.1f}s")

        start = time.perf_counter()
        n_tokens = sum(len(ids) for ids in tok.sp.encode([d.text for d in docs], num_threads=1))
        seconds = time.perf_counter() - start
        print(f"sentencepiece alone, whole documents, 1 thread: {text_bytes / 1e6 / seconds:6.2f} MB/s  "
              f"{n_tokens / seconds / 1e6:5.2f} M tokens/s")

        print(f"{'workers':>7} {'seconds':>8} {'MB/s':>7} {'M tokens/s':>10} {'CPU s':>7}")
        for workers in [int(w) for w in args.workers.split(",")]:
            best = None
            for repeat in range(args.repeats):
                out = Path(tmp) / f"out-{workers}-{repeat}"
                self_before = resource.getrusage(resource.RUSAGE_SELF)
                children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                result = prepare(docs, tok, out, num_workers=workers, progress=False)
                self_after = resource.getrusage(resource.RUSAGE_SELF)
                children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                assert not result.skipped
                parent = (self_after.ru_utime + self_after.ru_stime) - (self_before.ru_utime + self_before.ru_stime)
                child = (children_after.ru_utime + children_after.ru_stime) - (
                    children_before.ru_utime + children_before.ru_stime)
                run = {"workers": workers, "seconds": result.seconds, "cpu_seconds": parent + child,
                       "manifest": result.manifest}
                if best is None or run["seconds"] < best["seconds"]:
                    best = run
            tokens = sum(s["tokens"] for s in best.pop("manifest")["splits"].values())
            mbps = text_bytes / 1e6 / best["seconds"]
            print(f"{workers:>7} {best['seconds']:8.3f} {mbps:7.2f} {tokens / best['seconds'] / 1e6:10.2f} "
                  f"{best['cpu_seconds']:7.2f}")
            results["runs"].append({**best, "mb_per_s": mbps, "tokens_per_s": tokens / best["seconds"],
                                    "tokens": tokens})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
