"""Filtering of teacher-written instructions: the rejection reasons, ROUGE-L, and near-duplicate search against a
streamed pool, checked against exact all-pairs ROUGE-L on real Alpaca instructions."""
from __future__ import annotations

import json
import random

import pytest

from pipeline.dedup import Duplicate, near_duplicates, rejection, rouge_l, rouge_tokens


def words(count: int, start: int = 0) -> list[str]:
    return [f"word{i}" for i in range(start, start + count)]


def test_rouge_tokens_are_lowercase_alphanumeric_runs():
    assert rouge_tokens("Hello, World! It's 2024 -- café") == ["hello", "world", "it", "s", "2024", "caf"]
    assert rouge_tokens("?!") == []


def test_rouge_l_matches_hand_computed_values():
    cat = "the cat sat on the mat".split()
    assert rouge_l(cat, cat) == 1.0
    assert rouge_l(cat, "a dog ran away".split()) == 0.0
    # LCS "the cat on mat" = 4 of 6 and 5 tokens: precision 4/6, recall 4/5, F1 = 2*4/(6+5)
    other = "the cat on a mat".split()
    assert rouge_l(cat, other) == pytest.approx(8 / 11)
    assert rouge_l(other, cat) == rouge_l(cat, other)
    # order matters: the LCS of a reversal of distinct words is one word
    assert rouge_l(["a", "b", "c"], ["c", "b", "a"]) == pytest.approx(2 / 6)
    assert rouge_l([], cat) == 0.0 and rouge_l(cat, []) == 0.0


@pytest.mark.parametrize("text, finish_reason, reason", [
    (None, "stop", "empty"),
    ("   \n", "stop", "empty"),
    ("Write a poem about the sea and its", "length", "cut_off"),
    ("Follow these Instructions to bake a cake", "stop", "mentions_instruction"),
    ("Rewrite the INSTRUCTION below in plain words", None, "mentions_instruction"),
    ("Name a fruit.", "stop", "too_short"),
    ("Name three red fruits.", "stop", None),
    ("Write an instructional video script about knots.", "stop", None),  # a different word
])
def test_rejection_gives_each_reason(text, finish_reason, reason):
    assert rejection(text, finish_reason) == reason


def test_rejection_minimum_words_is_configurable():
    assert rejection("Name three red fruits.", "stop", min_words=5) == "too_short"
    assert rejection("Name fruit.", "stop", min_words=2) is None


def test_planted_paraphrase_is_found_in_a_pool_streamed_over_batches():
    pool = [" ".join(words(8, 10 * k)) for k in range(30)]
    target = pool[25].split()
    paraphrase = " ".join(target[:5] + ["changed"] + target[6:])  # LCS 7 of 8: 0.875
    batches = (pool[k:k + 10] for k in range(0, 30, 10))  # a generator: read once, never held whole
    found = near_duplicates(["an unrelated text of five words", paraphrase], batches)
    assert found == [None, Duplicate("pool", 25, 0.875)]


def test_of_two_similar_new_texts_only_the_later_is_dropped():
    first = words(10)
    second = first[:9] + ["other"]
    found = near_duplicates([" ".join(first), " ".join(words(6, 50)), " ".join(second)], [])
    assert found == [None, None, Duplicate("new", 0, 0.9)]


def test_rouge_l_at_the_threshold_is_kept_and_above_it_dropped():
    pool = [" ".join(words(10))]
    at = words(7) + words(3, 100)  # LCS 7 of 10: exactly 0.7, which is not above it
    above = words(8) + words(2, 200)  # 0.8
    found = near_duplicates([" ".join(at), " ".join(above)], [pool])
    assert found[0] is None
    assert found[1] == Duplicate("pool", 0, 0.8)


def test_a_new_text_is_compared_with_kept_new_texts_only():
    pool = [" ".join(words(10))]
    dropped = words(9) + ["x1"]  # 0.9 against the pool
    near_dropped_only = words(7) + ["y1", "y2", "x1"]  # 0.8 against `dropped`, 0.7 against the pool
    found = near_duplicates([" ".join(dropped), " ".join(near_dropped_only)], [pool])
    assert found == [Duplicate("pool", 0, 0.9), None]


def test_texts_without_tokens_are_kept():
    assert near_duplicates(["?!", "...", "   "], [["?!", "hello there friend"]]) == [None, None, None]


def test_threshold_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(["a b c d"], [], threshold=0.0)


def exact_near_duplicates(new: list[str], pool: list[str], threshold: float = 0.7) -> list:
    """Every pair, by definition: the best pool match above threshold, else the best earlier kept new text;
    the earliest of equal matches."""
    new_tokens, pool_tokens = [rouge_tokens(t) for t in new], [rouge_tokens(t) for t in pool]
    found, kept = [], []
    for tokens in new_tokens:
        match = None
        for source, indices, others in (("pool", range(len(pool)), pool_tokens), ("new", kept, new_tokens)):
            scores = [(rouge_l(tokens, others[k]), -k) for k in indices]
            best = max(scores, default=(0.0, 0))
            if best[0] > threshold:
                match = Duplicate(source, -best[1], best[0])
                break
        if match is None:
            kept.append(len(found))
        found.append(match)
    return found


def edited(rng: random.Random, text: str, vocabulary: list[str]) -> str:
    """text with one or two words substituted, inserted or deleted."""
    tokens = text.split()
    for _ in range(rng.randint(1, 2)):
        position = rng.randrange(len(tokens))
        operation = rng.choice(("substitute", "insert", "delete"))
        if operation == "substitute":
            tokens[position] = rng.choice(vocabulary)
        elif operation == "insert":
            tokens.insert(position, rng.choice(vocabulary))
        elif len(tokens) > 5:
            del tokens[position]
    return " ".join(tokens)


def test_results_agree_with_exact_all_pairs_rouge_l_on_real_instructions(shared_data):
    lines = (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()
    instructions = [json.loads(line)["instruction"] for line in lines[:500]]
    pool, new = instructions[:300], instructions[300:500]
    rng = random.Random(0)
    vocabulary = " ".join(instructions).split()
    long_enough = [text for text in pool if len(text.split()) >= 8]
    new += [edited(rng, text, vocabulary) for text in rng.sample(long_enough, 40)]
    new += [edited(rng, text, vocabulary) for text in rng.sample(new[:200], 20)]
    rng.shuffle(new)

    expected = exact_near_duplicates(new, pool)
    found = near_duplicates(new, [pool[k:k + 64] for k in range(0, len(pool), 64)])

    sources = [match.source for match in expected if match is not None]
    assert sources.count("pool") >= 30 and sources.count("new") >= 5  # the planted pairs are mostly real ones
    assert found == expected
