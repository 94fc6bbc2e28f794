"""The curriculum math without Ray: hard share per round, task quotas, exact sizes, determinism."""
import json
import random
from collections import Counter

import numpy as np

from pipeline.config import DEFAULT_TASK_TARGETS, CurriculumConfig
from pipeline.curriculum import baseline_copies, hard_share, is_hard, plan_round, quotas, resample, total_variation


def test_the_hard_share_rises_by_beta_each_round_up_to_one():
    assert [hard_share(r, 0.5, 0.25) for r in range(4)] == [0.5, 0.75, 1.0, 1.0]
    assert is_hard(1.5, 1.0) and is_hard(1.0, 1.0) is False and is_hard(None, 1.0) is None
    assert is_hard(float("nan"), 1.0) is None
    assert is_hard(np.float32("nan"), 1.0) is None and is_hard(np.float32(2.0), 1.0)       # as numpy gives it


def test_quotas_sum_exactly_and_give_an_empty_categorys_share_to_the_others():
    targets = {"Math": 0.5, "Code": 0.3, "Art": 0.2}
    assert quotas(targets, {"Math": 10, "Code": 10, "Art": 10}, 10) == {"Math": 5, "Code": 3, "Art": 2}
    assert sum(quotas(targets, {"Math": 1, "Code": 1, "Art": 1}, 7).values()) == 7
    # no Art rows: its 0.2 goes to Math and Code in proportion 5:3
    assert quotas(targets, {"Math": 10, "Code": 10}, 8) == {"Math": 5, "Code": 3}
    # tasks outside the targets only: spread evenly rather than lost
    assert sum(quotas(targets, {"Unknown": 4}, 6).values()) == 6


def test_resampling_down_samples_full_categories_and_repeats_thin_ones():
    by_task = {"Math": [0, 1], "Code": list(range(2, 102))}
    chosen = resample(by_task, {"Math": 0.5, "Code": 0.5}, 20, random.Random(0))
    mix = Counter("Math" if i < 2 else "Code" for i in chosen)
    assert mix == {"Math": 10, "Code": 10}
    assert {i for i in chosen if i < 2} == {0, 1}                  # every thin row kept, then repeated
    code = [i for i in chosen if i >= 2]
    assert len(set(code)) == len(code)                            # down-sampled without replacement


def test_a_round_plan_mixes_hard_and_easy_at_alpha_with_the_exact_size():
    rng = random.Random(3)
    tasks = [rng.choice(["Math", "Reasoning", "Writing"]) for _ in range(300)]
    mfd = [rng.uniform(-2, 4) if i % 10 else None for i in range(300)]
    targets = {"Math": 0.5, "Reasoning": 0.3, "Writing": 0.2}
    plan = plan_round(tasks, mfd, 1, 100, 1.0, 0.5, 0.25, targets, seed=7)
    assert len(plan.indices) == 100 and plan.hard_share_target == 0.75
    assert (plan.hard_rows_planned, plan.easy_rows_planned) == (75, 25)
    assert plan.unscored_rows == 30
    assert all(mfd[i] is not None for i in plan.indices)
    assert sum(mfd[i] > 1.0 for i in plan.indices) == 75
    assert plan == plan_round(tasks, mfd, 1, 100, 1.0, 0.5, 0.25, targets, seed=7)        # deterministic
    assert plan.indices != plan_round(tasks, mfd, 1, 100, 1.0, 0.5, 0.25, targets, seed=8).indices
    assert total_variation(plan.task_mix, targets) < 0.02


def test_without_hard_rows_the_easy_part_fills_the_round():
    plan = plan_round(["Math"] * 5, [0.0] * 5, 0, 8, 1.0, 0.5, 0.25, {"Math": 1.0}, seed=0)
    assert len(plan.indices) == 8 and plan.hard_rows_planned == 0 and plan.easy_rows_planned == 8


def test_task_resampling_on_the_alpaca_pool_moves_the_mix_toward_the_target(shared_data):
    # Alpaca has no task labels; a keyword labelling stands in, so the test is about resampling, not labels
    rows = [json.loads(line) for line in (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()]
    words = {"Math": ("calculate", "number", "sum"), "Code Generation": ("code", "program", "function"),
             "Writing": ("write", "story", "poem"), "Paraphrase": ("rewrite", "paraphrase")}
    tasks = [next((t for t, keys in words.items() if any(k in r["instruction"].lower() for k in keys)), "Others")
             for r in rows]
    targets = CurriculumConfig().task_targets
    before = total_variation(Counter(tasks), targets)
    plan = plan_round(tasks, [2.0] * len(tasks), 0, 1000, 1.0, 1.0, 0.0, targets, seed=0)
    # the categories with rows share the whole target between them, in proportion
    present = {t: s for t, s in DEFAULT_TASK_TARGETS.items() if t in set(tasks)}
    reachable = {t: s / sum(present.values()) for t, s in present.items()}
    assert len(plan.indices) == 1000
    assert total_variation(plan.task_mix, reachable) < 0.005 < 0.1 < total_variation(Counter(tasks), reachable)
    assert before > 0.5


def test_expansion_seeds_split_by_the_hard_share_and_cycle_through_every_seed():
    from pipeline.curriculum import expansion_seeds

    hard, easy = ["h1", "h2", "h3"], [f"e{i}" for i in range(10)]
    seeds = expansion_seeds(hard, easy, 10, 0.75, round_index=1, seed=0)
    assert Counter(d for _, d in seeds) == {"hard": 8, "easy": 2}
    hard_seeds = Counter(s for s, d in seeds if d == "hard")
    assert set(hard_seeds) == set(hard) and max(hard_seeds.values()) - min(hard_seeds.values()) <= 1
    assert seeds == expansion_seeds(hard, easy, 10, 0.75, round_index=1, seed=0)        # deterministic
    assert seeds != expansion_seeds(hard, easy, 10, 0.75, round_index=1, seed=1)
    # a side with no seeds gives its requests to the other; nothing at all without seeds
    assert Counter(d for _, d in expansion_seeds([], easy, 5, 0.75, 0, 0)) == {"easy": 5}
    assert Counter(d for _, d in expansion_seeds(hard, [], 5, 0.25, 0, 0)) == {"hard": 5}
    assert expansion_seeds([], [], 5, 0.5, 0, 0) == []


def test_the_baseline_draws_its_rows_at_random_without_repeats_until_the_pool_runs_out():
    few = baseline_copies(count=100, size=30, seed=3)
    assert sum(few.values()) == 30 and set(few.values()) == {1} and all(0 <= i < 100 for i in few)
    assert few == baseline_copies(count=100, size=30, seed=3) != baseline_copies(count=100, size=30, seed=4)
    # not the first rows, nor any order the pool happens to have
    assert sorted(few) != list(range(30))
    more = baseline_copies(count=10, size=25, seed=3)
    assert sum(more.values()) == 25 and set(more) == set(range(10)) and sorted(Counter(more.values())) == [2, 3]
    assert Counter(more.values()) == {2: 5, 3: 5}
    assert baseline_copies(count=0, size=5, seed=1) == Counter() == baseline_copies(count=5, size=0, seed=1)
