#!/usr/bin/env python
"""The offline models compared on adjudication: accuracy vs the top candidate, s per call.

The queries are the ambiguous ones of the development sets (/work/shared/data): a seeded
sample of each set's queries is matched with the LLM off (real MiniLM retrieval, default
routing) and the first ``--per-set`` that come back ``review`` (what routing would send to
the LLM) are kept. Every model x runtime x prompt variant answers the same queries, one
call at a time; a decision is right when it names the gold entity, or "none" when the
gold is null. The baseline is taking the top candidate.

Each answer also goes through the model's guard (``nem_llm/_llm/local_guard.py``): the
table shows how many answers it accepts and how accurate they are against the top
candidate on the same queries.

Variants (prompt format x decoding):
  chat       the model's chat template; constrained: the next token restricted to the
             candidate numbers and "none" (one forward pass)
  chat+few   the same after three worked examples
  json       the chat template, the answer as JSON: '{"choice": "' then the constrained token
             (what a JSON-schema grammar forces)
  plain      one text, no chat template, constrained
  plain+few  the same after three worked examples
  free       the chat (instruct) or plain (base) prompt, up to 8 tokens generated without
             constraint, the first number or "none" parsed ("invalid": neither)

Runtimes: transformers on the installed torch (GGUF read by ``gguf``), and
onnxruntime-genai when it is importable with its model builder (``onnx_ir``): the
converted checkpoint is exported to int4 ONNX once. llama.cpp has no wheel on PyPI for
this platform (an sdist only, a 5-30 minute build): it is not measured here.

    python benchmarks/bench_local_models.py --per-set 75 --save
    python benchmarks/bench_local_models.py --per-set 10 --save-as local-models-variants \
        --variants "smollm2-135m=chat,json,free,chat+few;gemma3-270m=plain+few,plain,free"
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_common import DEFAULT_DATA, RESULTS, Report, loadavg, log

SETS = ("languages", "restaurants", "febrl4", "dblp_acm")
DEFAULT_VARIANTS = {"smollm2-135m": "chat", "gemma3-270m": "plain+few"}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


async def ambiguous(data: Path, per_set: int) -> list[dict[str, Any]]:
    """The first ``per_set`` LLM-routed queries of a seeded sample of each set."""
    from nem_llm import Matcher
    from nem_llm._text import validate_query

    items: list[dict[str, Any]] = []
    for name in SETS:
        catalog = _rows(data / f"{name}_catalog.jsonl")
        queries = _rows(data / f"{name}_queries.jsonl")
        random.Random(0).shuffle(queries)
        queries = queries[: per_set * 8]
        async with Matcher(catalog, llm=False) as matcher:
            await matcher.fit_async()
            results = await matcher.match_batch_async([q["query"] for q in queries])
            picked = 0
            for q, r in zip(queries, results, strict=True):
                if r.status != "review" or not r.candidates or picked >= per_set:
                    continue
                items.append(
                    {
                        "set": name,
                        "query": q["query"],
                        "gold": q["gold_id"],
                        "candidates": [c.model_dump() for c in r.candidates],
                        "messages": matcher.decider.messages(
                            validate_query(q["query"]), r.candidates
                        ),
                    }
                )
                picked += 1
        log(f"{name}: {picked} ambiguous queries")
    return items


def _options(item: dict[str, Any]) -> list[str]:
    return [str(i) for i in range(1, len(item["candidates"]) + 1)] + ["none"]


def _answer(item: dict[str, Any], label: str | None) -> str | None:
    """The entity id an answer label names (None for "none" or an invalid answer)."""
    if label is None or label == "none":
        return None
    return str(item["candidates"][int(label) - 1]["entity_id"])


class TransformersRuntime:
    """The runtime nem_llm ships: :class:`nem_llm._llm.local_runtime.ChoiceScorer`."""

    name = "transformers (torch CPU, fp32)"

    def __init__(self, key: str, threads: int) -> None:
        from nem_llm._llm.local_models import MODELS
        from nem_llm._llm.local_runtime import timed_load

        self.spec = MODELS[key]
        self.scorer, self.load_s = timed_load(self.spec, threads=threads)

    def text(self, item: dict[str, Any], variant: str) -> str:
        from nem_llm._llm.local_runtime import build_prompt

        style, _, few = variant.partition("+")
        if variant in ("json", "free"):
            style = "chat" if self.spec.instruction_tuned else "plain"
        spec = dataclasses.replace(self.spec, prompt_style=style, few_shot=bool(few))  # type: ignore[arg-type]
        text = build_prompt(spec, item["messages"], self.scorer.tokenizer)
        return text + '{"choice": "' if variant == "json" else text

    def logits(self, text: str) -> Any:
        import torch

        ids = self.scorer.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            return self.scorer.lm(ids.input_ids, logits_to_keep=1).logits[0, -1].float().numpy()

    def generate(self, text: str, tokens: int) -> str:
        import torch

        ids = self.scorer.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = self.scorer.lm.generate(
                ids.input_ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0
            )
        return str(self.scorer.tokenizer.decode(out[0, ids.input_ids.shape[1] :]))

    def option_tokens(self, options: Sequence[str]) -> list[int]:
        return self.scorer.option_tokens(options)


class OrtGenaiRuntime(TransformersRuntime):
    """onnxruntime-genai on an int4 ONNX export of the same checkpoint (built once)."""

    name = "onnxruntime-genai (int4)"

    def __init__(self, key: str, threads: int) -> None:
        import subprocess

        import onnxruntime_genai as og

        from nem_llm._llm.local_models import MODELS
        from nem_llm._llm.local_runtime import checkpoint_dir, timed_load

        self.spec = MODELS[key]
        self.scorer, _ = timed_load(self.spec, threads=threads)  # tokenizer + checkpoint
        src = checkpoint_dir(self.spec)
        onnx_dir = src.with_name(src.name + "-onnx-int4")
        if not (onnx_dir / "genai_config.json").is_file():
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(src),
                    "-o",
                    str(onnx_dir),
                    "-p",
                    "int4",
                    "-e",
                    "cpu",
                ],
                check=True,
                capture_output=True,
            )
            log(f"{key}: ONNX int4 export {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        config = og.Config(str(onnx_dir))
        config.clear_providers()
        self.og = og
        self.model = og.Model(config)
        self.load_s = time.perf_counter() - started

    def logits(self, text: str) -> Any:
        import numpy as np

        ids = self.scorer.tokenizer(text, add_special_tokens=False).input_ids
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + 1)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        return gen.get_logits()[0, -1]

    def generate(self, text: str, tokens: int) -> str:
        raise NotImplementedError("free generation is measured on transformers only")


def _row(title: str, runtime: str, got: dict[str, Any]) -> list[Any]:
    acc, top_acc = got["accuracy_accepted"], got["top_accuracy_accepted"]
    return [
        title,
        runtime,
        got["variant"],
        f"{got['s_per_call']:.2f}",
        f"{got['accuracy']:.2f}",
        f"{got['top_accuracy']:.2f}",
        got["invalid"],
        f"{got['accepted']:.0%}",
        "-" if acc is None else f"{acc:.2f} vs {top_acc:.2f}",
    ]


def variants_for(spec: str, key: str) -> list[str]:
    """``chat,json`` (every model) or ``smollm2-135m=chat,json;gemma3-270m=plain`` (each
    its own); empty: the model's own variant."""
    if not spec:
        return [DEFAULT_VARIANTS[key]]
    if "=" not in spec:
        return spec.split(",")
    per_model = dict(part.split("=", 1) for part in spec.split(";"))
    return per_model[key].split(",") if key in per_model else []


def run_variant(rt: Any, items: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    """Answers of one runtime/model/variant on every item, with timing."""
    import numpy as np

    answers: list[dict[str, Any]] = []
    started = time.perf_counter()
    for item in items:
        options = _options(item)
        text = rt.text(item, variant)
        if variant == "free":
            said = rt.generate(text, 8).strip().lower()
            found = re.match(r"\[?\s*(\d+|none)", said)
            label = found.group(1) if found and found.group(1) in options else None
            answers.append({"label": label, "p": None, "valid": label is not None})
            continue
        logits = rt.logits(text)[rt.option_tokens(options)]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(np.argmax(probs))
        answers.append({"label": options[best], "p": float(probs[best]), "valid": True})
    seconds = (time.perf_counter() - started) / len(items)
    return {"answers": answers, "s_per_call": seconds}


def score(items: list[dict[str, Any]], run: dict[str, Any], policy: Any) -> dict[str, Any]:
    """Accuracy of the answers, of the top candidate, and of what the guard accepts."""
    from nem_llm._llm.local_guard import judge
    from nem_llm.models import Candidate

    right = top = accepted = acc_right = acc_top = invalid = 0
    per_set: dict[str, list[int]] = {}
    for item, ans in zip(items, run["answers"], strict=True):
        gold = item["gold"]
        said = _answer(item, ans["label"])
        ok = ans["valid"] and said == gold
        top_ok = item["candidates"][0]["entity_id"] == gold
        right += ok
        top += top_ok
        invalid += not ans["valid"]
        per_set.setdefault(item["set"], [0, 0])
        per_set[item["set"]][0] += ok
        per_set[item["set"]][1] += 1
        if ans["p"] is not None:
            cands = [Candidate(**c) for c in item["candidates"]]
            if judge(cands, said, ans["p"], policy).accept:
                accepted += 1
                acc_right += ok
                acc_top += top_ok
    n = len(items)
    return {
        "n": n,
        "accuracy": right / n,
        "top_accuracy": top / n,
        "invalid": invalid,
        "accepted": accepted / n,
        "accuracy_accepted": acc_right / accepted if accepted else None,
        "top_accuracy_accepted": acc_top / accepted if accepted else None,
        "per_set": {k: v[0] / v[1] for k, v in per_set.items()},
        "s_per_call": run["s_per_call"],
    }


def report(
    rep: Report,
    args: argparse.Namespace,
    items: list[dict[str, Any]],
    before: str,
    rows: list[list[Any]],
    figures: list[dict[str, Any]],
    head: int,
) -> None:
    """Print the tables (again) and save them: called after every variant."""
    del rep.lines[head:]
    nulls = sum(1 for it in items if it["gold"] is None)
    counts = {s: sum(1 for it in items if it["set"] == s) for s in SETS}
    rep.out(
        f"{len(items)} ambiguous queries ({', '.join(f'{s} {n}' for s, n in counts.items())};"
        f" {nulls} with a null gold), one call at a time, {args.threads} CPU thread(s); load "
        f"average {before} before, {loadavg()} after. accuracy: the model's answer; top: "
        "always taking the top retrieval candidate; guard: the share of answers the model's "
        "guard accepts, and their accuracy vs the top candidate's on the same queries."
    )
    rep.out()
    rep.table(
        [
            "model",
            "runtime",
            "variant",
            "s per call",
            "accuracy",
            "top",
            "invalid",
            "guard accepts",
            "accepted: model vs top",
        ],
        rows,
    )
    per_set_rows = [
        [f["model"], f["variant"], *(f"{f['per_set'].get(s, 0):.2f}" for s in SETS)]
        for f in figures
    ]
    rep.out("Accuracy per set:")
    rep.out()
    rep.table(["model", "variant", *SETS], per_set_rows)
    name = args.save_as or ("local-models" if args.save else None)
    if name:
        (RESULTS / f"{name}.md").write_text(rep.text(), encoding="utf-8")
        (RESULTS / f"{name}.json").write_text(
            json.dumps({"items": len(items), "figures": figures}, indent=2), encoding="utf-8"
        )
        print(f"saved {RESULTS / name}.md/.json", file=sys.stderr)


def fit_guard(
    items: list[dict[str, Any]], answers: list[dict[str, Any]], precision: float
) -> list[str]:
    """Search guard policies on the even-numbered queries, check them on the odd ones.

    A policy qualifies when, on the even half, the answers it accepts are at least as
    accurate as the top candidate on the same queries and right at least ``precision`` of
    the time (an accepted answer is final: no one looks at it again); the qualifying
    policies that accept the most are shown with their figures on the odd half (held out).
    """
    import itertools

    from nem_llm._llm.local_guard import GuardPolicy, judge
    from nem_llm.models import Candidate

    def counts(half: range, policy: GuardPolicy) -> tuple[int, int, int]:
        accepted = right = top = 0
        for i in half:
            item, ans = items[i], answers[i]
            said = _answer(item, ans["label"])
            cands = [Candidate(**c) for c in item["candidates"]]
            if ans["p"] is not None and judge(cands, said, ans["p"], policy).accept:
                accepted += 1
                right += said == item["gold"]
                top += item["candidates"][0]["entity_id"] == item["gold"]
        return accepted, right, top

    even, odd = range(0, len(items), 2), range(1, len(items), 2)
    found = []
    for mc, close, floor, none_below in itertools.product(
        (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), (0.0, 0.02, 0.05, 0.1), (0.0, 0.3, 0.4, 0.5, 0.6),
        (0.3, 0.4, 0.5, 0.6, 0.7, 1.0),
    ):  # fmt: skip
        policy = GuardPolicy(min_confidence=mc, close=close, min_score=floor, none_below=none_below)
        accepted, right, top = counts(even, policy)
        if accepted and right >= top and right >= precision * accepted:
            found.append((accepted, right - top, policy))
    # most accepted first; among equals the most cautious policy (it generalises safest)
    found.sort(
        key=lambda f: (
            f[0],
            f[1],
            f[2].min_confidence,
            f[2].min_score,
            -f[2].close,
            -f[2].none_below,
        ),
        reverse=True,
    )
    lines, seen = [], set()
    for accepted, gain, policy in found:
        a2, r2, t2 = counts(odd, policy)
        if (accepted, gain, a2, r2, t2) in seen:
            continue
        seen.add((accepted, gain, a2, r2, t2))
        if len(lines) == 8:
            break
        lines.append(
            f"| {policy} | {accepted}/{len(even)}, +{gain} | {a2}/{len(odd)}: {r2} right vs "
            f"top {t2} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--per-set", type=int, default=75, help="ambiguous queries per set")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument(
        "--variants", default="", help="a,b or model=a,b;model=c (default: each model's own)"
    )
    ap.add_argument("--runtimes", default="transformers,onnxruntime-genai")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per model")
    ap.add_argument("--items", type=Path, default=None, help="cache the sampled queries here")
    ap.add_argument(
        "--rescore",
        type=Path,
        default=None,
        help="a saved results JSON: score its answers again with the current guards "
        "(no model calls; needs --items)",
    )
    ap.add_argument("--fit-guard", action="store_true", help="with --rescore: search guards")
    ap.add_argument("--guard-precision", type=float, default=0.9, help="for --fit-guard")
    ap.add_argument("--save", action="store_true", help="write results/local-models.{md,json}")
    ap.add_argument("--save-as", default=None, help="results/<name>.{md,json} instead")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    rep = Report()
    rep.out("# Local models on adjudication (ambiguous development-set queries)")
    rep.out()
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    rep.out(f"`python benchmarks/bench_local_models.py {shown}`")
    rep.out()
    head = len(rep.lines)
    before = loadavg()
    if args.items is not None and args.items.is_file():
        items = json.loads(args.items.read_text(encoding="utf-8"))
    else:
        items = asyncio.run(ambiguous(args.data, args.per_set))
        if args.items is not None:
            args.items.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    from nem_llm._llm.local_models import MODELS

    runtimes = {"transformers": TransformersRuntime, "onnxruntime-genai": OrtGenaiRuntime}
    rows: list[list[Any]] = []
    figures: list[dict[str, Any]] = []
    if args.rescore is not None:
        saved = json.loads(args.rescore.read_text(encoding="utf-8"))["figures"]
        for old in saved:
            spec = MODELS[old["model"]]
            got = score(items, {"answers": old["answers"], "s_per_call": old["s_per_call"]},
                        spec.guard)  # fmt: skip
            got.update({k: old[k] for k in ("model", "runtime", "variant", "load_s", "answers")})
            figures.append(got)
            rows.append(_row(spec.title, old["runtime"], got))
        report(rep, args, items, before, rows, figures, head)
        if args.fit_guard:
            rep.out(
                "Guard policies searched on the even-numbered queries (the answers a policy "
                "accepts at least as accurate as the top candidate there, and right at least "
                f"{args.guard_precision:.0%} of the time), with the held-out odd half:"
            )
            rep.out()
            rep.out("| policy | even: accepted, right - top | odd: accepted, right vs top |")
            rep.out("|---|---|---|")
            for line in fit_guard(items, figures[0]["answers"], args.guard_precision):
                rep.out(line)
            name = args.save_as or ("local-models" if args.save else None)
            if name:
                (RESULTS / f"{name}.md").write_text(rep.text(), encoding="utf-8")
        return 0
    for key in args.models.split(","):
        spec = MODELS[key]
        for rt_name in args.runtimes.split(","):
            try:
                rt = runtimes[rt_name](key, args.threads)
            except Exception as exc:  # a runtime or model that is not installed: say so
                log(f"{key} on {rt_name}: not measured ({type(exc).__name__}: {exc})")
                rows.append([spec.title, rt_name, "-", "-", "-", "-", "-", "-", str(exc)[:60]])
                continue
            variants = variants_for(args.variants, key)
            if rt_name != "transformers":  # another runtime: the model's own variant only
                variants = [DEFAULT_VARIANTS[key]]
            for variant in variants:
                if variant.startswith("chat") or variant == "json":
                    if not spec.instruction_tuned:
                        continue  # a base model has no chat template
                log(f"{key} {rt_name} {variant}: {len(items)} calls (load {loadavg()})")
                run = run_variant(rt, items, variant)
                got = score(items, run, spec.guard)
                got.update(model=key, runtime=rt_name, variant=variant, load_s=rt.load_s)
                got["answers"] = run["answers"]
                figures.append(got)
                rows.append(_row(spec.title, rt.name, got))
                report(rep, args, items, before, rows, figures, head)
            del rt
    report(rep, args, items, before, rows, figures, head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
