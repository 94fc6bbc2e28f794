"""The curriculum math of TAPIR, as pure functions: which scored rows a round trains on.

Difficulty: each scored row comes with a hard/easy verdict (or none, when it could not be scored): by the judge,
hard when its MFD (judged teacher score minus student score) is at least δ, as Lion counts it (a gap of exactly δ
is hard); by IFD, hard when it is among the round's highest (`rank_verdicts`). Round r's set has a hard share
α_r = min(1, α_0 + r·β) (Lion's hard/easy mix, raised each round). Task: each part of the set (hard, easy) is
resampled toward the target task distribution with an exact size: every category gets its largest-remainder
quota of the size; an over-full category is down-sampled without replacement, a thin one keeps all its rows and is repeated evenly, never past
`max_copies` copies of one row; a quota a category cannot fill (no rows, or all at the cap) goes to the others
in proportion to their targets, and what a whole part cannot fill goes to the other part. Rows whose task is not
in the targets count as "Others" when the targets have it, else as one more category with the smallest target.
Everything is deterministic for a seed.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

OTHERS = "Others"
UNLISTED = "(tasks outside task_targets)"


def hard_share(round_index: int, start: float, step: float) -> float:
    """α_r = min(1, α_0 + r·β)."""
    return min(1.0, start + round_index * step)


def is_hard(mfd: Optional[float], threshold: float) -> Optional[bool]:
    """MFD ≥ δ. None for a row without an MFD (its scoring failed): it is neither hard nor easy."""
    return None if mfd is None or math.isnan(mfd) else bool(mfd >= threshold)


def rank_verdicts(values: Sequence[tuple[str, float]], hard_share: float, band_share: float
                  ) -> dict[str, Optional[bool]]:
    """Verdicts by rank: of n (id, value) pairs, the round(hard_share·n) highest values are hard (True), the rest
    easy (False), except the round(band_share·n) nearest that boundary, half on each side: None, for another
    measure to decide. Ties are ranked by id, so the verdicts do not depend on the rows' order."""
    ranked = [row_id for _, row_id in sorted((value, row_id) for row_id, value in values)]
    n = len(ranked)
    boundary = n - round(hard_share * n)
    half = round(band_share * n / 2)
    low, high = max(0, boundary - half), min(n, boundary + half)
    return {row_id: None if low <= rank < high else rank >= boundary for rank, row_id in enumerate(ranked)}


def quotas(targets: dict[str, float], capacity: dict[str, int], size: int) -> dict[str, int]:
    """Rows per category summing to `size` (or to the total capacity, when that is less), none over its
    capacity: largest-remainder shares over the categories with room, the share of a category without rows or
    at its capacity spread over the others in proportion to theirs. A category outside `targets` gets none."""
    room = {name: share for name, share in targets.items() if capacity.get(name, 0) > 0}
    left = min(size, sum(capacity[name] for name in room))
    counts: dict[str, int] = {}
    while room and left > 0:
        total = sum(room.values())
        exact = {name: left * share / total for name, share in room.items()}
        share_of = {name: math.floor(value) for name, value in exact.items()}
        extra = left - sum(share_of.values())
        for name in sorted(exact, key=lambda n: (-(exact[n] - share_of[n]), n))[:extra]:
            share_of[name] += 1
        full = [name for name in room if share_of[name] >= capacity[name]]
        if not full:
            counts.update(share_of)
            break
        for name in full:                # filled to capacity; the rest is shared again among the others
            counts[name] = capacity[name]
            left -= capacity[name]
            del room[name]
    return {name: count for name, count in counts.items() if count}


def spread(count: int, size: int, rng: random.Random) -> Counter:
    """`size` picks among `count` items, as even as can be: without replacement while the items last; beyond
    that every item size // count times and the remainder drawn at random. Returns item index → copies."""
    if count <= 0 or size <= 0:
        return Counter()
    whole, remainder = divmod(size, count)
    copies = Counter({index: whole for index in range(count)} if whole else {})
    copies.update(rng.sample(range(count), remainder))
    return copies


def resample(indices_by_task: dict[str, list[int]], targets: dict[str, float], size: int, max_copies: int,
             rng: random.Random) -> list[int]:
    """Up to `size` row indices whose task mix follows `targets` as closely as the rows allow, no row more than
    `max_copies` times (fewer than `size` only when every row is at the cap)."""
    capacity = {task: len(rows) * max_copies for task, rows in indices_by_task.items()}
    chosen: list[int] = []
    for task, quota in sorted(quotas(targets, capacity, size).items()):
        rows = sorted(indices_by_task[task])
        copies = spread(len(rows), quota, rng)
        chosen.extend(rows[i] for i in sorted(copies) for _ in range(copies[i]))
    return chosen


@dataclass(frozen=True)
class Plan:
    """The rows (as indices into the scored table, repeats allowed) a round trains on, and why."""

    indices: list[int]
    rows_wanted: int
    max_copies: int
    hard_share_target: float
    hard_rows_available: int
    easy_rows_available: int
    unscored_rows: int                                  # no verdict: left out
    rows_outside_targets: int                           # scored rows whose task is not in the targets
    hard_rows_planned: int
    easy_rows_planned: int
    task_mix: dict[str, int] = field(default_factory=dict)

    @property
    def hard_share_planned(self) -> Optional[float]:
        return round(self.hard_rows_planned / len(self.indices), 3) if self.indices else None

    def warnings(self) -> list[str]:
        """What the scored rows could not give this round: fewer rows than wanted, or another hard share."""
        found = []
        cap = f"at most {self.max_copies} copies of a row (curriculum.max_copies_per_row)"
        if len(self.indices) < self.rows_wanted:
            found.append(f"planned {len(self.indices)} of {self.rows_wanted} rows: {_rows(self.hard_rows_available)} "
                         f"scored hard and {_rows(self.easy_rows_available)} easy, {cap}")
        wanted_hard = round(self.hard_share_target * len(self.indices))
        if self.indices and self.hard_rows_planned != wanted_hard:
            side, count = (("hard", self.hard_rows_available) if self.hard_rows_planned < wanted_hard
                           else ("easy", self.easy_rows_available))
            found.append(f"hard share planned {self.hard_share_planned:.3f}, target {self.hard_share_target:.3f}: "
                         f"only {_rows(count)} scored {side}, {cap}")
        return found


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def task_group(task: Optional[str], targets: dict[str, float]) -> str:
    """The target category a row's task is resampled in (see the module's first lines)."""
    if task in targets:
        return task
    return OTHERS if OTHERS in targets else UNLISTED


def plan_round(tasks: Sequence[Optional[str]], hard_verdicts: Sequence[Optional[bool]], round_index: int,
               size: int, start: float, step: float, targets: dict[str, float], seed: int, *,
               max_copies: int) -> Plan:
    """The round's training rows: a hard part of α_r·size rows and an easy part of the rest, each resampled by
    task, no row more than `max_copies` times. What one part cannot fill goes to the other, so the set has
    `size` rows whenever the scored rows allow it at the cap. `hard_verdicts`: per row hard, easy or None
    (not scored: left out)."""
    alpha = hard_share(round_index, start, step)
    hard, easy = defaultdict(list), defaultdict(list)
    unscored = outside = 0
    for index, (task, verdict) in enumerate(zip(tasks, hard_verdicts)):
        if verdict is None:
            unscored += 1
            continue
        outside += task not in targets
        (hard if verdict else easy)[task_group(task, targets)].append(index)
    groups = {**targets, UNLISTED: min(targets.values())} if UNLISTED in hard or UNLISTED in easy else targets
    hard_count, easy_count = sum(map(len, hard.values())), sum(map(len, easy.values()))
    hard_size = min(round(alpha * size), hard_count * max_copies)
    easy_size = min(size - hard_size, easy_count * max_copies)
    hard_size = min(size - easy_size, hard_count * max_copies)
    rng = random.Random(f"{seed}:{round_index}")
    hard_rows = resample(hard, groups, hard_size, max_copies, rng)
    easy_rows = resample(easy, groups, easy_size, max_copies, rng)
    indices = hard_rows + easy_rows
    return Plan(indices=indices, rows_wanted=size, max_copies=max_copies, hard_share_target=alpha,
                hard_rows_available=hard_count, easy_rows_available=easy_count, unscored_rows=unscored,
                rows_outside_targets=outside, hard_rows_planned=len(hard_rows), easy_rows_planned=len(easy_rows),
                task_mix=dict(Counter(tasks[i] for i in indices)))


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
    choice, spread as evenly as can be (`spread`). Returns index → copies."""
    return spread(count, size, random.Random(seed))
