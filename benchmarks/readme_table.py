"""The README's GPU performance table, generated from the committed GPU suite results.

    python benchmarks/readme_table.py              # print the markdown
    python benchmarks/readme_table.py --write      # replace the block between the README's markers

Reads the files minillm/measured.py reads (docs/measured/gpu_suite_*/gpu_suite.json and
docs/measured/gpu_suite_*.json, GPU runs only: a --dry result is never a GPU figure). Per file:
the GPU, its ceilings, then minillm against the baseline `auto` would otherwise use, forward +
backward: attention TFLOP/s against torch's SDPA, norms GB/s against eager torch, and training
tokens/s and MFU for each backend pair. With no GPU file the block says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minillm import measured
from minillm.files import write_atomic

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- gpu-table:start (benchmarks/readme_table.py --write) -->", "<!-- gpu-table:end -->"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _file_table(path: Path, result: dict) -> list[str]:
    env, ceilings = result["environment"], result["ceilings"]
    lines = [f"**{env['device']}** (compute capability {env['capability']}, torch {env['torch']}, triton "
             f"{env['triton']}; {result['date']}; `{result['command']}`; `{path.as_posix()}`): copy "
             f"{ceilings['copy_gb_per_s']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s.", "",
             "| what | shape | minillm | baseline | minillm / baseline |", "| --- | --- | --- | --- | --- |"]
    rows = [r for r in result.get("attention", {}).get("rows", []) if r["mode"] == "fwd+bwd"]
    speed = {(r["provider"], r["head_dim"], r["causal"], r["seq"]): r["tflops"] for r in rows}
    for (provider, head_dim, causal, seq), ours in sorted(speed.items(), key=lambda kv: kv[0][1:]):
        if provider != measured.OURS_ATTENTION:
            continue
        base = speed.get((measured.BASELINE_ATTENTION, head_dim, causal, seq))
        ratio = None if ours is None or not base else ours / base
        lines.append(f"| attention fwd+bwd, TFLOP/s vs SDPA | D={head_dim} {'causal' if causal else 'full'} "
                     f"seq={seq} | {_fmt(ours, '.1f')} | {_fmt(base, '.1f')} | {_fmt(ratio, '.2f')} |")
    rows = [r for r in result.get("norms", {}).get("rows", []) if r["mode"] == "fwd+bwd"]
    speed = {(r["provider"], r["op"], r["hidden"]): r["gb_per_s"] for r in rows}
    for (provider, op, hidden), ours in sorted(speed.items(), key=lambda kv: kv[0][1:]):
        if provider != measured.OURS_NORM:
            continue
        base = speed.get((measured.BASELINE_NORM, op, hidden))
        ratio = None if ours is None or not base else ours / base
        lines.append(f"| {op} fwd+bwd, GB/s vs torch | N={hidden} | {_fmt(ours, '.0f')} | {_fmt(base, '.0f')} | "
                     f"{_fmt(ratio, '.2f')} |")
    for run in result.get("training", {}).get("runs", []):
        if run["status"] == "ok":
            lines.append(f"| training {result['training']['model']}, tokens/s (MFU) | attn {run['attn_backend']}, "
                         f"norm {run['norm_backend']} | {run['tokens_per_s']:,.0f} ({100 * run['mfu']:.1f}%) | | |")
    return lines


def table(paths=None) -> str:
    """The markdown block for the README."""
    lines = []
    for path in measured.result_files() if paths is None else paths:
        result = json.loads(Path(path).read_text())
        if result.get("dry", True) or result.get("device_type") != "cuda":
            continue
        shown = Path(path).resolve()
        root = README.parent
        lines += _file_table(shown.relative_to(root) if shown.is_relative_to(root) else shown, result) + [""]
    if not lines:
        return ("No GPU measurement yet: no GPU has run `benchmarks/gpu_suite.py`, so there is no GPU figure "
                "here, and `auto` uses SDPA and torch's norms everywhere.")
    return "\n".join(lines).rstrip()


def readme_with_table(text: str, block: str) -> str:
    """README text with the block between the markers replaced."""
    if START not in text or END not in text:
        raise ValueError(f"README.md: the markers {START!r} and {END!r} are missing")
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    block = table()
    if args.write:
        write_atomic(README, readme_with_table(README.read_text(), block))
        print(f"wrote the GPU table into {README}")
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
