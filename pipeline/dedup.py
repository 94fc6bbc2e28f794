"""Filtering of teacher-written instructions in the expansion step (DESIGN.md, "Expansion").

Lion's generator drops a new instruction that was cut off, mentions "instruction", has three words or fewer
(`rejection`), or whose ROUGE-L F-measure against the pool or an earlier kept new instruction exceeds 0.7
(`near_duplicates`). Against a pool of millions, ROUGE-L of every pair is too slow to run every round, so MinHash
LSH (datasketch) proposes candidate pairs and exact ROUGE-L (LCS in C++ from rapidfuzz) decides on those only.
The new instructions are the index and the pool streams past it, so memory does not grow with the pool.
Pure functions: no Ray, no I/O.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from datasketch import MinHash, MinHashLSH
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_TOKEN = re.compile(r"[a-z0-9]+")
_INSTRUCTION = re.compile(r"\binstructions?\b", re.IGNORECASE)


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming (lowercase, runs of [a-z0-9]; everything else separates),
    so that 0.7 means what it means in Self-Instruct and Lion, which filter with rouge_score."""
    return _TOKEN.findall(text.lower())


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists: with l their longest common subsequence, precision l/len(a) and recall
    l/len(b) make F1 = 2l / (len(a) + len(b)), symmetric in a and b. 0.0 if either is empty."""
    if not a or not b:
        return 0.0
    return 2.0 * LCSseq.similarity(a, b) / (len(a) + len(b))


def rejection(text: Optional[str], finish_reason: Optional[str], min_words: int = 4) -> Optional[str]:
    """Why a generated instruction is unusable on its own, or None when it is acceptable.

    "empty": no text; "cut_off": the teacher hit its token limit (finish_reason "length"), so the text is
    truncated; "mentions_instruction": it says "instruction(s)", i.e. it talks about the task instead of being
    one; "too_short": fewer than `min_words` whitespace-separated words (Lion drops three words or fewer).
    """
    if text is None or not text.strip():
        return "empty"
    if finish_reason == "length":
        return "cut_off"
    if _INSTRUCTION.search(text):
        return "mentions_instruction"
    if len(text.split()) < min_words:
        return "too_short"
    return None


@dataclass(frozen=True)
class Duplicate:
    """The best match that made a new text a near-duplicate."""

    source: str  # "pool": a reference text; "new": an earlier kept new text
    index: int  # into the concatenated reference stream ("pool"), or into new_texts ("new")
    rouge_l: float


def _rouge_l_against(tokens: Sequence[str], others: list[list[str]]) -> np.ndarray:
    """rouge_l of tokens against each of others (all non-empty) in one C++ call, which takes half the time of a
    Python call per pair at 100 candidates."""
    lcs = process.cdist([tokens], others, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
    return 2.0 * lcs / (len(tokens) + np.fromiter(map(len, others), dtype=np.int64, count=len(others)))


def _shingles(tokens: Sequence[str]) -> list[bytes]:
    """Each token tagged with how often it occurred before ("the", "the 1", ...), so the shingle set is the
    token multiset. Its Jaccard similarity J then bounds ROUGE-L F from above: the LCS is at most the multiset
    overlap, so F <= 2J/(1+J), i.e. F > 0.7 implies J > 0.538, a floor the LSH threshold is set against (an
    untagged set has no floor: its true pairs went down to J 0.44 on the benchmark). Word bigrams were measured
    too and lose: one edit in a short text breaks two of its few bigrams, and at most 95.5% of the true pairs
    became candidates, against 100% here (benchmarks/bench_dedup.py)."""
    seen: dict[str, int] = {}
    shingles = []
    for token in tokens:
        count = seen.get(token, 0)
        seen[token] = count + 1
        shingles.append(f"{token} {count}".encode() if count else token.encode())
    return shingles


def _sketches(token_lists: Sequence[list[str]], num_perm: int, seed: int) -> Iterator[tuple[int, MinHash]]:
    """(position, MinHash) of each non-empty token list, lazily: MinHash.generator copies one initialised
    sketch instead of drawing the permutations again for every text (5x faster per text, measured in
    benchmarks/bench_dedup.py). A text without tokens has ROUGE-L 0 with everything and gets no sketch."""
    positions = [i for i, tokens in enumerate(token_lists) if tokens]
    sketches = MinHash.generator((_shingles(token_lists[i]) for i in positions), num_perm=num_perm, seed=seed)
    return zip(positions, sketches)


def near_duplicates(new_texts: list[str], reference_batches: Iterable[list[str]], threshold: float = 0.7,
                    num_perm: int = 256, lsh_threshold: float = 0.3, seed: int = 0) -> list[Optional[Duplicate]]:
    """For each new text, None when it is kept, else the best match that drops it: ROUGE-L above `threshold`
    against a reference text, or else against an earlier kept new text (new texts are taken in order, as if
    each kept one joined the pool). `reference_batches` is read once, in order.

    Pairs are proposed by MinHash LSH and confirmed by exact ROUGE-L, so every Duplicate is real, and a pair LSH
    does not propose is missed. The defaults make that rare at threshold 0.7: 256 permutations and
    `lsh_threshold` 0.3 give 64 bands of 4 rows, which propose a pair at the J = 0.538 floor (see `_shingles`)
    with probability 0.996 and at J = 0.6 with 0.9999. On the benchmark (10K new x 50K pool rows, against exact
    all-pairs ROUGE-L) they missed none of 1067 drops; 128 permutations missed 1 at `lsh_threshold` 0.3 (37x3,
    as much CPU) and 7 at 0.4 (32x4, half the CPU). A lower `threshold` lowers the floor, J > t / (2 - t), and
    needs a lower `lsh_threshold`.

    Memory is O(len(new_texts)) plus one reference batch: the new texts are indexed (about 25 KB each, mostly
    datasketch's band tables), and each reference text is sketched, queried and dropped.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    new_tokens = [rouge_tokens(text) for text in new_texts]
    found: list[Optional[Duplicate]] = [None] * len(new_texts)

    new_sketches = list(_sketches(new_tokens, num_perm, seed))
    index = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    for i, sketch in new_sketches:
        index.insert(i, sketch, check_duplication=False)
    offset = 0
    for batch in reference_batches:
        batch_tokens = [rouge_tokens(text) for text in batch]
        for j, sketch in _sketches(batch_tokens, num_perm, seed):
            candidates = index.query(sketch)
            if not candidates:
                continue
            scores = _rouge_l_against(batch_tokens[j], [new_tokens[i] for i in candidates])
            for c in np.flatnonzero(scores > threshold):
                i, score = candidates[c], float(scores[c])
                # strictly better only: of equal matches the earliest in the stream stays
                if found[i] is None or score > found[i].rouge_l:
                    found[i] = Duplicate("pool", offset + j, score)
        offset += len(batch)
    del index  # the band tables are most of the memory: free them before the second index fills

    kept = MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)
    for i, sketch in new_sketches:
        if found[i] is not None:
            continue
        candidates = sorted(kept.query(sketch))
        if candidates:
            scores = _rouge_l_against(new_tokens[i], [new_tokens[k] for k in candidates])
            best = int(np.argmax(scores))  # the earliest of equal matches
            if scores[best] > threshold:
                found[i] = Duplicate("new", candidates[best], float(scores[best]))
        if found[i] is None:
            kept.insert(i, sketch, check_duplication=False)
    return found
