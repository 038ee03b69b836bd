#!/usr/bin/env python3
"""Hit and false-hit rates of the semantic cache per threshold, on a labelled set of pairs.

Each pair of tests/eval/cache_pairs.jsonl is a stored prompt `a` and a new prompt `b`, labelled
`same` when an answer to `a` is a right answer to `b` (paraphrases), and not when it is wrong
(near-misses: other numbers, negations, other entities, other constraints, other topics). Both
go through the semantic cache's own code: `semantic_query` (partition and embedded window),
the embedder (LocalEmbedder, all-MiniLM-L6-v2, by default; a text it cannot read whole is
never a semantic hit), and `SemanticCache.best` (the threshold and the guard). A pair "hits" when `b` would be answered from `a`.

    python tests/eval/eval_cache.py                 # prints the table, writes tests/eval/RESULTS.md
    python tests/eval/eval_cache.py --embedder http://127.0.0.1:8001   # an HttpEmbedder
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import sys
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from middleware.cache.semantic import (
    Candidate,
    HttpEmbedder,
    LocalEmbedder,
    SemanticCache,
    TextNotEmbedded,
    semantic_query,
)

HERE = Path(__file__).resolve().parent
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98)
DEFAULT = 0.95


def load_pairs(path: Path) -> list[dict[str, Any]]:
    pairs = [orjson.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for pair in pairs:
        missing = {"id", "a", "b", "same", "kind"} - set(pair)
        if missing:
            raise SystemExit(f"{path}: pair {pair.get('id')} lacks {sorted(missing)}")
    return pairs


def body(prompt: str, system: str | None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    return {"model": "eval", "temperature": 0,
            "messages": [*messages, {"role": "user", "content": prompt}]}


async def similarities(pairs: list[dict[str, Any]], embedder: Any) -> list[dict[str, Any]]:
    await embedder.startup()
    try:
        rows = []
        for pair in pairs:
            qa = semantic_query("project:eval", "eval", "openai.chat",
                                body(pair["a"], pair.get("system")))
            qb = semantic_query("project:eval", "eval", "openai.chat",
                                body(pair["b"], pair.get("system")))
            assert qa is not None and qb is not None, pair["id"]
            try:
                va, vb = await embedder.embed([qa.text, qb.text])
            except TextNotEmbedded:  # (cached exactly only: never a semantic hit)
                similarity = None
            else:
                similarity = sum(x * y for x, y in zip(va, vb, strict=True))
            rows.append({**pair, "similarity": similarity, "qa": qa, "qb": qb,
                         "same_partition": qa.partition == qb.partition})
        return rows
    finally:
        await embedder.shutdown()


def hits(rows: list[dict[str, Any]], threshold: float, guard: bool, embedder: Any) -> list[bool]:
    cache = SemanticCache(embedder, threshold=threshold, guard=guard)
    out = []
    for row in rows:
        if row["similarity"] is None:
            out.append(False)
            continue
        candidate = Candidate(row["similarity"], "a", row["qa"].guard)
        out.append(row["same_partition"] and bool(cache.best(row["qb"], [candidate])))
    return out


def rates(rows: list[dict[str, Any]], hit: list[bool]) -> tuple[float, float, float]:
    same = [h for row, h in zip(rows, hit, strict=True) if row["same"]]
    different = [h for row, h in zip(rows, hit, strict=True) if not row["same"]]
    hit_rate = sum(same) / len(same) if same else 0.0
    false_rate = sum(different) / len(different) if different else 0.0
    served = sum(hit)
    precision = sum(same) / served if served else 1.0
    return hit_rate, false_rate, precision


def report(rows: list[dict[str, Any]], embedder: Any, source: str) -> str:
    same = sum(1 for row in rows if row["same"])
    kinds = collections.Counter(row["kind"] for row in rows)
    near = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()) if k != "paraphrase")
    lines = [
        "# Semantic cache evaluation",
        "",
        (f"Run on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC by "
         "`make eval-cache` (tests/eval/eval_cache.py)."),
        "",
        (f"- Set: {source}, {len(rows)} labelled pairs: {same} paraphrases (an answer to one "
         f"is right for the other) and {len(rows) - same} near-misses ({near})."),
        (f"- Embedder: {embedder.name}. A pair hits when the cache would answer `b` with "
         "`a`'s stored answer."),
        ("- Hit rate: share of paraphrases answered from the cache (higher is better). "
         "False-hit rate: share of near-misses answered from the cache, i.e. wrong answers "
         "(lower is better). Precision: share of semantic hits that were right."),
        "",
        ("| threshold | hit rate | false-hit rate | precision | hit rate, no guard "
         "| false-hit rate, no guard |"),
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for threshold in THRESHOLDS:
        guarded = rates(rows, hits(rows, threshold, True, embedder))
        bare = rates(rows, hits(rows, threshold, False, embedder))
        mark = " (default)" if threshold == DEFAULT else ""
        lines.append(f"| {threshold:.2f}{mark} | {guarded[0]:.1%} | {guarded[1]:.1%} | "
                     f"{guarded[2]:.1%} | {bare[0]:.1%} | {bare[1]:.1%} |")
    lines += ["", f"False hits by kind at the default threshold ({DEFAULT}):", "",
              "| kind | pairs | false hits, guard | false hits, no guard |", "|---|---:|---:|---:|"]
    guarded_hits = hits(rows, DEFAULT, True, embedder)
    bare_hits = hits(rows, DEFAULT, False, embedder)
    for kind in sorted(kinds):
        if kind == "paraphrase":
            continue
        index = [i for i, row in enumerate(rows) if row["kind"] == kind]
        lines.append(f"| {kind} | {len(index)} | {sum(guarded_hits[i] for i in index)} | "
                     f"{sum(bare_hits[i] for i in index)} |")
    wrong = [row for row, h in zip(rows, guarded_hits, strict=True) if h and not row["same"]]
    if wrong:
        lines += ["", "Near-misses that still hit at the default threshold, with the guard:", ""]
        lines += [f"- {row['id']} ({row['kind']}, {row['similarity']:.3f}): "
                  f"{row['a']!r} vs {row['b']!r}" for row in wrong]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=Path, default=HERE / "cache_pairs.jsonl")
    parser.add_argument("--embedder", help="an HTTP embedder's base URL (default: local "
                                           "all-MiniLM-L6-v2)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    pairs = load_pairs(args.pairs)
    embedder = HttpEmbedder(args.embedder) if args.embedder else LocalEmbedder()
    rows = asyncio.run(similarities(pairs, embedder))
    text = report(rows, embedder, args.pairs.name)
    args.output.write_text(text)
    print(text)
    print(f"written: {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
