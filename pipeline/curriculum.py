"""The curriculum math of TAPIR, as pure functions: which scored rows a round trains on.

Difficulty: a row is hard when its MFD (judged teacher score minus student score) exceeds δ; round r's set
has a hard share α_r = min(1, α_0 + r·β) (Lion's hard/easy mix, raised each round). Task: each part of the
set (hard, easy) is resampled toward the target task distribution with an exact size: every category gets
its largest-remainder quota of the size; an over-full category is down-sampled without replacement, a thin
one keeps all its rows and is topped up by repetition; the quota of a category with no rows at all goes to
the others in proportion to their targets. Everything is deterministic for a seed.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence


def hard_share(round_index: int, start: float, step: float) -> float:
    """α_r = min(1, α_0 + r·β)."""
    return min(1.0, start + round_index * step)


def is_hard(mfd: Optional[float], threshold: float) -> Optional[bool]:
    """None for a row without an MFD (its scoring failed): it is neither hard nor easy."""
    return None if mfd is None or math.isnan(mfd) else mfd > threshold


def quotas(targets: dict[str, float], available: dict[str, int], size: int) -> dict[str, int]:
    """Rows per category summing exactly to `size` (largest remainder), over the categories that have rows;
    the target share of an empty category is spread over the others in proportion to theirs."""
    present = {name: share for name, share in targets.items() if available.get(name, 0) > 0}
    # rows whose task is outside the targets are a category of their own, with no target share
    if not present:
        present = {name: 1.0 for name, count in available.items() if count > 0}
    if not present or size <= 0:
        return {}
    total = sum(present.values())
    exact = {name: size * share / total for name, share in present.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    left = size - sum(counts.values())
    for name in sorted(exact, key=lambda n: (-(exact[n] - counts[n]), n))[:left]:
        counts[name] += 1
    return {name: count for name, count in counts.items() if count}


def resample(indices_by_task: dict[str, list[int]], targets: dict[str, float], size: int,
             rng: random.Random) -> list[int]:
    """`size` row indices whose task mix follows `targets` as closely as the available rows allow."""
    available = {task: len(rows) for task, rows in indices_by_task.items()}
    chosen: list[int] = []
    for task, quota in sorted(quotas(targets, available, size).items()):
        rows = sorted(indices_by_task[task])
        if quota <= len(rows):
            chosen.extend(rng.sample(rows, quota))
        else:
            chosen.extend(rows)
            chosen.extend(rng.choices(rows, k=quota - len(rows)))
    return chosen


@dataclass(frozen=True)
class Plan:
    """The rows (as indices into the scored table, repeats allowed) a round trains on, and why."""

    indices: list[int]
    hard_share_target: float
    hard_rows_available: int
    easy_rows_available: int
    unscored_rows: int                                  # no MFD: left out
    hard_rows_planned: int
    easy_rows_planned: int
    task_mix: dict[str, int] = field(default_factory=dict)


def plan_round(tasks: Sequence[str], mfd: Sequence[Optional[float]], round_index: int, size: int,
               threshold: float, start: float, step: float, targets: dict[str, float], seed: int) -> Plan:
    """The round's training rows: a hard part of α_r·size rows and an easy part of the rest, each resampled
    by task. A part with no rows gives its size to the other, so the set always has `size` rows when any row
    was scored."""
    alpha = hard_share(round_index, start, step)
    hard, easy = defaultdict(list), defaultdict(list)
    unscored = 0
    for index, (task, value) in enumerate(zip(tasks, mfd)):
        verdict = is_hard(value, threshold)
        if verdict is None:
            unscored += 1
        else:
            (hard if verdict else easy)[task].append(index)
    hard_count, easy_count = sum(map(len, hard.values())), sum(map(len, easy.values()))
    hard_size = round(alpha * size) if easy_count else size
    if not hard_count:
        hard_size = 0
    rng = random.Random(f"{seed}:{round_index}")
    indices = resample(hard, targets, hard_size, rng) + resample(easy, targets, size - hard_size, rng)
    return Plan(indices=indices, hard_share_target=alpha, hard_rows_available=hard_count,
                easy_rows_available=easy_count, unscored_rows=unscored, hard_rows_planned=hard_size,
                easy_rows_planned=len(indices) - hard_size, task_mix=dict(Counter(tasks[i] for i in indices)))


def total_variation(mix: dict[str, int], targets: dict[str, float]) -> float:
    """Half the L1 distance between a task mix (counts) and the target shares: 0 is exact, 1 disjoint."""
    total = sum(mix.values())
    if not total:
        return 1.0
    names = set(mix) | set(targets)
    return 0.5 * sum(abs(mix.get(n, 0) / total - targets.get(n, 0.0)) for n in names)


def expansion_seeds(hard_ids: Sequence[str], easy_ids: Sequence[str], count: int, alpha: float, round_index: int,
                    seed: int) -> list[tuple[str, str]]:
    """`count` (seed id, "hard"|"easy") pairs, one per expansion request: a share α of them from hard seeds (all
    of them when there is no easy seed, none when there is no hard one). Each side goes through its seeds in a
    seeded order, and round again when it needs more requests than it has seeds."""
    if not hard_ids and not easy_ids:
        return []
    hard_count = round(alpha * count) if easy_ids else count
    hard_count = hard_count if hard_ids else 0
    rng = random.Random(f"{seed}:{round_index}:expand")
    chosen = []
    for difficulty, ids, wanted in (("hard", hard_ids, hard_count), ("easy", easy_ids, count - hard_count)):
        order = sorted(set(ids))
        rng.shuffle(order)
        chosen.extend((order[i % len(order)], difficulty) for i in range(wanted))
    return chosen


def baseline_copies(count: int, size: int, seed: int) -> Counter:
    """Plain distillation's rows: `size` of `count` rows drawn at random, no difficulty and no task in the
    choice. Without replacement while the rows last; beyond that every row is taken size // count times and
    the remainder drawn at random, so no row is repeated more than once over another. Returns index → copies."""
    if count <= 0 or size <= 0:
        return Counter()
    rng = random.Random(seed)
    whole, remainder = divmod(size, count)
    copies = Counter({index: whole for index in range(count)} if whole else {})
    copies.update(rng.sample(range(count), remainder))
    return copies
