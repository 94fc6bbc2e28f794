"""Near-duplicate filtering of teacher-written instructions (`pipeline/dedup.py`) at pool scale.

Data, deterministic for --seed, made from the real rows in ../shared/data (Alpaca 4000 and the Self-Instruct
seed tasks). A pool row is the head of one of the 4175 instructions (its first 30-50% of words: the task's
frame, "Write a story about", "Find the maximum") followed by a span of words from one of the 4939 responses and
inputs, as long as the rest of that instruction (+-2 words): instruction-shaped, of instruction length, and
mostly distinct over a million rows. Row k is the same whatever else is generated, so the pool is streamed in
batches and never held. Of the --new rows, --planted are near-duplicates: word edits (substitute or insert a
word drawn from the same texts, delete a word, swap two neighbours) of a random pool row (70%) or of an earlier
fresh new row (30%), applied one at a time up to a random count while ROUGE-L with the source stays above 0.7,
so they spread over (0.7, 1). The other new rows are fresh rows made like the pool's; a few of them are
near-duplicates of the pool by chance, as a teacher's would be.

1. minhash: CPU time per text of datasketch's ways to sketch texts, on 20K pool rows.
2. exact: every pair of the sample, all --new rows x 50K pool rows (the sources of the planted rows and the
   first pool rows), and the new rows among themselves, by exact ROUGE-L (rapidfuzz `cdist` over token lists,
   all cores): the true pairs, which rows exact filtering drops, and pairs/s, extrapolated to --new x
   --pool-rows.
3. shingles: tagged unigrams, plain unigram set, word bigrams, each at two LSH thresholds: the share of true
   pairs that LSH makes candidates (measured, and expected from the pairs' exact Jaccard similarity and the LSH
   S-curve), and candidates per pool row (the ROUGE-L calls left to make).
4. settings: near_duplicates on the sample with several (num_perm, lsh_threshold): rows it misses and wrongly
   drops against exact filtering (recall, precision), and CPU time.
   sizes: CPU per pool row of near_duplicates and of exact all-pairs with 100, 1000 and 10K new rows.
5. scale: near_duplicates with its defaults, all new rows against pools of 10K, 100K and --pool-rows rows,
   each in a process of its own: wall and CPU time without generating the pool, and peak RSS.

Times are CPU seconds of this process (near_duplicates runs on one thread) beside wall seconds, because the
machine may be shared: the load average is recorded before and after.

    .venv/bin/python benchmarks/bench_dedup.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.dedup import _shingles, near_duplicates, rouge_l, rouge_tokens  # noqa: E402

THRESHOLD = 0.7


# --- data --------------------------------------------------------------------------------------------------

class Sources:
    """Word lists of the instructions (frames) and of the responses and inputs (contents)."""

    def __init__(self, data: Path):
        alpaca = [json.loads(line) for line in (data / "alpaca_dev_4000.jsonl").open()]
        seeds = [json.loads(line) for line in (data / "selfinstruct_seed_tasks.jsonl").open()]
        self.instructions = [row["instruction"].split() for row in alpaca + seeds]
        texts = [row["output"] for row in alpaca] + [row["input"] for row in alpaca]
        texts += [instance["output"] for row in seeds for instance in row["instances"]]
        self.contents = [text.split() for text in texts if len(text.split()) >= 4]
        self.vocab = [word for words in self.instructions + self.contents for word in words]


def make_row(rng: random.Random, sources: Sources) -> str:
    frame = rng.choice(sources.instructions)
    cut = rng.randint(max(1, round(0.3 * len(frame))), max(1, round(0.5 * len(frame))))
    length = max(4, len(frame) - cut + rng.randint(-2, 2))
    spans = []
    for part in (length // 2, length - length // 2):
        content = rng.choice(sources.contents)
        start = rng.randrange(max(1, len(content) - part + 1))
        spans += content[start:start + part]
    return " ".join(frame[:cut] + spans).rstrip(",;:")


def pool_batch(sources: Sources, seed: int, number: int, size: int) -> list[str]:
    rng = random.Random(f"{seed}-pool-{number}")
    return [make_row(rng, sources) for _ in range(size)]


def pool_batches(sources: Sources, seed: int, rows: int, batch_rows: int):
    for number in range(-(-rows // batch_rows)):
        yield pool_batch(sources, seed, number, min(batch_rows, rows - number * batch_rows))


def pool_rows(sources: Sources, seed: int, indices, batch_rows: int) -> dict[int, str]:
    rows = {}
    for number in sorted({k // batch_rows for k in indices}):
        batch = pool_batch(sources, seed, number, batch_rows)
        rows.update({k: batch[k % batch_rows] for k in indices if k // batch_rows == number})
    return rows


def edit_once(rng: random.Random, words: list[str], vocab: list[str]) -> list[str]:
    words = list(words)
    p = rng.randrange(len(words))
    op = rng.choice(("substitute", "insert", "delete", "swap"))
    if op == "substitute":
        words[p] = rng.choice(vocab)
    elif op == "insert":
        words.insert(p, rng.choice(vocab))
    elif op == "delete" and len(words) > 4:
        del words[p]
    elif p + 1 < len(words):
        words[p], words[p + 1] = words[p + 1], words[p]
    return words


def plant(rng: random.Random, source: str, vocab: list[str]):
    """(text, ROUGE-L with source) of a near-duplicate of source, or None when no edit keeps it above 0.7."""
    reference = rouge_tokens(source)
    words, score = source.split(), 1.0
    for _ in range(rng.randint(1, max(1, len(words) // 3))):
        edited = edit_once(rng, words, vocab)
        edited_score = rouge_l(rouge_tokens(" ".join(edited)), reference)
        if edited_score <= THRESHOLD:
            break
        words, score = edited, edited_score
    return (" ".join(words), score) if score < 1.0 else None


def make_new(sources: Sources, seed: int, rows: int, planted: int, pool_size: int, batch_rows: int) -> list[dict]:
    """Rows {text, kind: fresh | pool | new, source, rouge_l}, in order; source is a pool index (kind pool) or
    a position in this list (kind new, always before the row)."""
    rng = random.Random(f"{seed}-new")
    vocab = sources.vocab
    from_new = round(0.3 * planted)
    rows_out = [{"text": make_row(rng, sources), "kind": "fresh"} for _ in range(rows - planted)]
    candidates = rng.sample(range(pool_size), 3 * (planted - from_new))
    texts = pool_rows(sources, seed, candidates, batch_rows)
    from_pool = []
    for k in candidates:
        made = plant(rng, texts[k], vocab)
        if made and len(from_pool) < planted - from_new:
            from_pool.append({"text": made[0], "kind": "pool", "source": k, "rouge_l": made[1]})
    for row in rows_out + from_pool:
        row["key"] = rng.random()
    from_rows = []
    for row in rng.sample(rows_out, 3 * from_new):
        made = plant(rng, row["text"], vocab)
        if made and len(from_rows) < from_new:
            # the key puts it after its source
            from_rows.append({"text": made[0], "kind": "new", "source": row, "rouge_l": made[1],
                              "key": row["key"] + rng.random() * (1 - row["key"])})
    ordered = sorted(rows_out + from_pool + from_rows, key=lambda row: row["key"])
    position = {id(row): i for i, row in enumerate(ordered)}
    for row in ordered:
        del row["key"]
        if row["kind"] == "new":
            row["source"] = position[id(row["source"])]
    if sum(row["kind"] != "fresh" for row in ordered) != planted:
        raise RuntimeError("could not plant enough near-duplicates: try another --seed or fewer --planted")
    return ordered


# --- 1. minhash ----------------------------------------------------------------------------------------------

def minhash_paths(texts: list[str], num_perm: int) -> dict:
    shingles = [_shingles(rouge_tokens(text)) for text in texts]

    def one_each():
        for s in shingles:
            m = MinHash(num_perm=num_perm, seed=0)
            m.update_batch(s)

    ways = {
        "MinHash() per text + update_batch": one_each,
        "MinHash.generator (= MinHash.bulk, lazily)": lambda: list(MinHash.generator(shingles, num_perm=num_perm,
                                                                                      seed=0)),
        "MinHash.generator + LeanMinHash": lambda: [LeanMinHash(m) for m in MinHash.generator(
            shingles, num_perm=num_perm, seed=0)],
        "MinHash.generator, hashfunc zlib.crc32": lambda: list(MinHash.generator(
            shingles, num_perm=num_perm, seed=0, hashfunc=zlib.crc32)),
    }
    result = {}
    for name, run in ways.items():
        started = time.process_time()
        run()
        result[name] = round((time.process_time() - started) / len(texts) * 1e6, 1)
    return {"texts": len(texts), "num_perm": num_perm, "cpu_us_per_text": result}


# --- 2. exact ROUGE-L ---------------------------------------------------------------------------------------

def exact_pairs(queries: list[list[str]], choices: list[list[str]], chunk: int = 2000):
    """(i, j, ROUGE-L) of every pair above the threshold, the LCS in C++ on all cores, `chunk` choices at a time
    to bound memory. Same arithmetic as rouge_l, so the same pairs pass."""
    query_lengths = np.array([len(t) for t in queries], dtype=np.int64)[:, None]
    for start in range(0, len(choices), chunk):
        part = choices[start:start + chunk]
        lcs = process.cdist(queries, part, scorer=LCSseq.similarity, dtype=np.int32, workers=-1)
        total = query_lengths + np.array([len(t) for t in part], dtype=np.int64)[None, :]
        scores = np.where(total > 0, 2.0 * lcs / np.maximum(total, 1), 0.0)
        for i, j in zip(*np.nonzero(scores > THRESHOLD)):
            yield int(i), start + int(j), float(scores[i, j])


def exact_filter(new_tokens, pool_pairs, new_pairs) -> list[bool]:
    """Which new rows exact filtering drops, in near_duplicates' semantics."""
    against_pool = {i for i, _, _ in pool_pairs}
    earlier = defaultdict(set)
    for i, k, _ in new_pairs:
        if k < i:
            earlier[i].add(k)
    dropped, kept = [], set()
    for i in range(len(new_tokens)):
        drop = i in against_pool or bool(earlier[i] & kept)
        dropped.append(drop)
        if not drop:
            kept.add(i)
    return dropped


# --- 3. shingles ---------------------------------------------------------------------------------------------

def plain_unigrams(tokens):
    return [token.encode() for token in set(tokens)]


def word_bigrams(tokens):
    return [f"{a} {b}".encode() for a, b in zip(tokens, tokens[1:])] or [t.encode() for t in tokens]


SHINGLES = {"tagged unigrams (chosen)": (_shingles, (0.3, 0.4)), "plain unigram set": (plain_unigrams, (0.3, 0.4)),
            "word bigrams": (word_bigrams, (0.2, 0.3))}


def true_pair_jaccard(new_sets, pool_sets, true_pairs) -> np.ndarray:
    """Exact Jaccard similarity of the shingle sets of each true pair: LSH proposes a pair of similarity J with
    probability 1 - (1 - J^rows)^bands."""
    return np.array([len(new_sets[i] & other) / len(new_sets[i] | other)
                     for i, source, j in true_pairs for other in [(pool_sets if source == "pool" else new_sets)[j]]])


def shingle_sweep(new_tokens, pool_tokens, true_pairs: set, num_perm: int) -> list[dict]:
    """true_pairs: {(new i, "pool" | "new", j)} with exact ROUGE-L > 0.7, new-new pairs both ways. Bigrams are
    tried at lower LSH thresholds: their Jaccard similarity is lower for the same ROUGE-L."""
    results = []
    for name, (shingle, lsh_thresholds) in SHINGLES.items():
        new_sets = [set(shingle(t)) for t in new_tokens]
        pool_sets = [set(shingle(t)) for t in pool_tokens]
        jaccard = true_pair_jaccard(new_sets, pool_sets, true_pairs)
        sketch = lambda sets: list(MinHash.generator(sets, num_perm=num_perm, seed=0))  # noqa: E731
        new_sketches, pool_sketches = sketch(new_sets), sketch(pool_sets)
        for lsh_threshold in lsh_thresholds:
            index = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
            for i, m in enumerate(new_sketches):
                index.insert(i, m, check_duplication=False)
            found, candidates = set(), 0
            for j, m in enumerate(pool_sketches):
                hits = index.query(m)
                candidates += len(hits)
                found.update((i, "pool", j) for i in hits)
            for j, m in enumerate(new_sketches):
                found.update((i, "new", j) for i in index.query(m) if i != j)
            collide = 1 - (1 - jaccard ** index.r) ** index.b
            results.append({
                "shingles": name, "num_perm": num_perm, "lsh_threshold": lsh_threshold,
                "bands_x_rows": [index.b, index.r], "true_pairs": len(true_pairs),
                "candidate_recall": round(len(true_pairs & found) / len(true_pairs), 5),
                "expected_recall": round(float(collide.mean()), 5),
                "true_pair_jaccard_min": round(float(jaccard.min()), 3),
                "candidates_per_pool_row": round(candidates / len(pool_tokens), 2)})
            print(json.dumps(results[-1]), flush=True)
    return results


# --- 4. settings ---------------------------------------------------------------------------------------------

def settings_sweep(new_texts, pool_batches_, dropped: list[bool], jaccard: np.ndarray, settings) -> list[dict]:
    """jaccard: of the true pairs' tagged-unigram sets, for the expected share LSH proposes."""
    results = []
    for num_perm, lsh_threshold in settings:
        wall, cpu = time.perf_counter(), time.process_time()
        found = near_duplicates(new_texts, pool_batches_, num_perm=num_perm, lsh_threshold=lsh_threshold)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        flagged = [f is not None for f in found]
        hits = sum(f and d for f, d in zip(flagged, dropped))
        index = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
        results.append({
            "num_perm": num_perm, "lsh_threshold": lsh_threshold, "bands_x_rows": [index.b, index.r],
            "exact_drops": sum(dropped), "drops": sum(flagged),
            "missed": sum(d and not f for f, d in zip(flagged, dropped)),
            "wrongly_dropped": sum(f and not d for f, d in zip(flagged, dropped)),
            "recall": round(hits / sum(dropped), 4), "precision": round(hits / max(1, sum(flagged)), 4),
            "expected_pair_recall": round(float((1 - (1 - jaccard ** index.r) ** index.b).mean()), 5),
            "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)})
        print(json.dumps(results[-1]), flush=True)
    return results


def size_sweep(new_texts, new_tokens, pool_batches_, pool_tokens, sizes) -> list[dict]:
    """CPU per pool row of near_duplicates (one thread) and of exact all-pairs (every thread's CPU time
    counted), by the number of new rows: LSH pays a sketch and a query per pool row whatever that number."""
    results = []
    for size in sorted({min(size, len(new_texts)) for size in sizes}):
        cpu = time.process_time()
        near_duplicates(new_texts[:size], pool_batches_)
        lsh = time.process_time() - cpu
        cpu = time.process_time()
        for _ in exact_pairs(new_tokens[:size], pool_tokens):
            pass
        exact = time.process_time() - cpu
        results.append({"new_rows": size, "pool_rows": len(pool_tokens),
                        "lsh_cpu_us_per_pool_row": round(lsh / len(pool_tokens) * 1e6),
                        "exact_cpu_us_per_pool_row": round(exact / len(pool_tokens) * 1e6)})
        print(json.dumps(results[-1]), flush=True)
    return results


# --- 5. scale (child process) ----------------------------------------------------------------------------

def timed(batches, clocks: list):
    """The batches, adding the wall and CPU time spent generating them to clocks."""
    iterator = iter(batches)
    while True:
        wall, cpu = time.perf_counter(), time.process_time()
        batch = next(iterator, None)
        clocks[0] += time.perf_counter() - wall
        clocks[1] += time.process_time() - cpu
        if batch is None:
            return
        yield batch


def memory_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from Linux's /proc. Not getrusage's ru_maxrss: that one
    carries the parent's peak over fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: the memory numbers need Linux")


def measure(args) -> None:
    rows = json.loads(Path(args.new_file).read_text())
    sources = Sources(Path(args.data))
    texts = [row["text"] for row in rows]
    before_kb = memory_kb("VmRSS")
    clocks = [0.0, 0.0]
    wall, cpu = time.perf_counter(), time.process_time()
    found = near_duplicates(texts, timed(pool_batches(sources, args.seed, args.measure, args.batch_rows), clocks))
    wall, cpu = time.perf_counter() - wall - clocks[0], time.process_time() - cpu - clocks[1]
    peak_kb = memory_kb("VmHWM")
    by_kind = {kind: [i for i, row in enumerate(rows) if row["kind"] == kind] for kind in ("fresh", "pool", "new")}
    print(json.dumps({
        "pool_rows": args.measure, "new_rows": len(texts), "batch_rows": args.batch_rows,
        "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "cpu_us_per_pool_row": round(cpu / args.measure * 1e6),
        "pool_generation_wall_s": round(clocks[0], 1),
        "peak_rss_mb": round(peak_kb / 1024), "rss_before_mb": round(before_kb / 1024),
        "drops": {"pool": sum(f is not None and f.source == "pool" for f in found),
                  "new": sum(f is not None and f.source == "new" for f in found)},
        "planted_from_pool_dropped": sum(found[i] is not None for i in by_kind["pool"]),
        "planted_from_new_dropped": sum(found[i] is not None for i in by_kind["new"]),
        # the rule compares a new row with kept new rows only
        "planted_from_new_kept_as_their_source_was_dropped": sum(
            found[i] is None and found[rows[i]["source"]] is not None for i in by_kind["new"]),
        "fresh_dropped": sum(found[i] is not None for i in by_kind["fresh"]),
        "lowest_rouge_l_of_a_drop": round(min((f.rouge_l for f in found if f is not None), default=1.0), 4),
        "load_average_after": [round(x, 1) for x in os.getloadavg()]}))


# --- main ----------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--pool-rows", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--planted", type=int, default=1000)
    parser.add_argument("--sample-pool-rows", type=int, default=50_000)
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/dedup.json")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # child: pool rows to filter against
    parser.add_argument("--new-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)

    started = time.perf_counter()
    sources = Sources(Path(args.data))
    rows = make_new(sources, args.seed, args.new, args.planted, args.pool_rows, args.batch_rows)
    planted_scores = [row["rouge_l"] for row in rows if row["kind"] != "fresh"]
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 1) for x in os.getloadavg()]},
        "command": " ".join(["benchmarks/bench_dedup.py", *sys.argv[1:]]),
        "defaults": dict(zip(("threshold", "num_perm", "lsh_threshold"), near_duplicates.__defaults__[:3])),
        "data": {"instructions": len(sources.instructions), "contents": len(sources.contents),
                 "pool_rows": args.pool_rows, "new_rows": len(rows),
                 "planted": {kind: sum(row["kind"] == kind for row in rows) for kind in ("pool", "new")},
                 "planted_rouge_l": {"min": round(min(planted_scores), 4),
                                     "median": round(statistics.median(planted_scores), 4),
                                     "share_at_most_0.75": round(sum(s <= 0.75 for s in planted_scores)
                                                                 / len(planted_scores), 3)},
                 "mean_words": round(statistics.mean(len(row["text"].split()) for row in rows), 1),
                 "examples": [row["text"] for row in rows[:5]]},
    }
    print(json.dumps(report["data"]), flush=True)
    default_perm = report["defaults"]["num_perm"]
    report["minhash"] = minhash_paths(pool_batch(sources, args.seed, 0, 20_000), default_perm)
    print(json.dumps(report["minhash"]), flush=True)

    planted_sources = {row["source"] for row in rows if row["kind"] == "pool"}
    others = [k for k in range(args.sample_pool_rows) if k not in planted_sources]
    pool_indices = sorted(planted_sources.union(others[:args.sample_pool_rows - len(planted_sources)]))
    texts = pool_rows(sources, args.seed, pool_indices, args.batch_rows)
    sample_pool = [texts[k] for k in pool_indices]
    new_texts = [row["text"] for row in rows]
    new_tokens = [rouge_tokens(t) for t in new_texts]
    pool_tokens = [rouge_tokens(t) for t in sample_pool]
    wall, cpu = time.perf_counter(), time.process_time()
    pool_pairs = list(exact_pairs(new_tokens, pool_tokens))
    exact_s, exact_cpu = time.perf_counter() - wall, time.process_time() - cpu
    new_pairs = [(i, k, score) for i, k, score in exact_pairs(new_tokens, new_tokens) if i != k]
    dropped = exact_filter(new_tokens, pool_pairs, new_pairs)
    pairs = len(new_tokens) * len(pool_tokens)
    pairs_per_s = pairs / exact_s
    report["exact"] = {
        "new_rows": len(new_tokens), "pool_rows": len(pool_tokens), "true_pool_pairs": len(pool_pairs),
        "true_new_pairs": len(new_pairs) // 2, "rows_dropped": sum(dropped),
        "pool_pairs_wall_s": round(exact_s, 1), "pool_pairs_cpu_s": round(exact_cpu, 1),
        "pairs_per_s": round(pairs_per_s),
        f"extrapolated_wall_s_{args.new}x{args.pool_rows}": round(args.new * args.pool_rows / pairs_per_s),
        f"extrapolated_cpu_s_{args.new}x{args.pool_rows}": round(exact_cpu / pairs * args.new * args.pool_rows)}
    print(json.dumps(report["exact"]), flush=True)

    true_pairs = {(i, "pool", j) for i, j, _ in pool_pairs} | {(i, "new", k) for i, k, _ in new_pairs}
    report["shingles"] = shingle_sweep(new_tokens, pool_tokens, true_pairs, default_perm)
    sample_batches = [sample_pool[k:k + args.batch_rows] for k in range(0, len(sample_pool), args.batch_rows)]
    tagged = lambda lists: [set(_shingles(t)) for t in lists]  # noqa: E731
    report["settings"] = settings_sweep(new_texts, sample_batches, dropped,
                                        true_pair_jaccard(tagged(new_tokens), tagged(pool_tokens), true_pairs),
                                        ((128, 0.3), (128, 0.4), (192, 0.35), (256, 0.3), (256, 0.4)))
    report["sizes"] = size_sweep(new_texts, new_tokens, sample_batches, pool_tokens, (100, 1000, 10_000))

    report["scale"] = []
    with tempfile.TemporaryDirectory() as work:
        new_file = Path(work) / "new.json"
        new_file.write_text(json.dumps(rows))
        for pool_size in sorted({10_000, 100_000, args.pool_rows}):
            if pool_size > args.pool_rows:
                continue
            child = subprocess.run([sys.executable, __file__, "--measure", str(pool_size), "--new-file",
                                    str(new_file), "--data", args.data, "--seed", str(args.seed),
                                    "--batch-rows", str(args.batch_rows)], capture_output=True, text=True)
            if child.returncode:
                raise RuntimeError(f"measuring {pool_size} pool rows failed:\n{child.stderr[-3000:]}")
            report["scale"].append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(report["scale"][-1]), flush=True)
    report["machine"]["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - started)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
