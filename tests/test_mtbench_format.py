"""MT-Bench files in FastChat's format: reading questions and references, the grading prompt, the rating."""
import json

import pytest

from pipeline.evaluation.mtbench import (
    REFERENCE_CATEGORIES,
    Question,
    grading_request_text,
    parse_rating,
    read_questions,
    read_references,
)

QUESTIONS = [
    {"question_id": 81, "category": "writing",
     "turns": ["Write a haiku about autumn.", "Now rewrite it so every line starts with the letter A."]},
    {"question_id": 111, "category": "math",
     "turns": ["What is 17 * 23?", "And what is that number divided by 17?"]},
    {"question_id": "custom-1", "category": "coding", "turns": ["Write a Python function that reverses a list."]},
]
REFERENCES = [
    {"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["391", "23"]}]},
    {"question_id": "custom-1", "choices": [{"index": 0, "turns": ["def reverse(xs):\n    return xs[::-1]"]}]},
]


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def questions_file(tmp_path):
    return write_lines(tmp_path / "questions.jsonl", [QUESTIONS[0], "", QUESTIONS[1], QUESTIONS[2]])


@pytest.fixture
def questions(questions_file):
    return read_questions(questions_file)


def test_questions_are_read_in_file_order_past_blank_lines(questions):
    assert [q.question_id for q in questions] == [81, 111, "custom-1"]
    assert questions[1] == Question(111, "math", ("What is 17 * 23?", "And what is that number divided by 17?"))


def test_references_are_one_answer_per_turn_by_question_id(tmp_path, questions):
    references = read_references(write_lines(tmp_path / "reference.jsonl", REFERENCES), questions)
    assert references == {111: ["391", "23"], "custom-1": ["def reverse(xs):\n    return xs[::-1]"]}


@pytest.mark.parametrize("bad_line, message", [
    ('{"question_id": 5, "category": "math", "turns": []}', "'turns' must be a non-empty list of strings"),
    ('{"question_id": 5, "category": "math", "turns": ["a", 2]}', "'turns' must be a non-empty list of strings"),
    ('{"question_id": 5, "turns": ["a"]}', "'category' must be a non-empty string"),
    ('{"category": "math", "turns": ["a"]}', "'question_id' must be an integer or a non-empty string"),
    ('{"question_id": 1.5, "category": "math", "turns": ["a"]}', "'question_id'"),
    ('{"question_id": 5, "category": "math", "turns": ["a"]', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
])
def test_a_bad_question_names_the_file_the_line_and_the_field(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "questions.jsonl", [QUESTIONS[0], "", bad_line])
    with pytest.raises(ValueError) as caught:
        read_questions(path)
    assert f"questions.jsonl line 3: {message}" in str(caught.value)


def test_a_repeated_question_id_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "questions.jsonl", [QUESTIONS[0], QUESTIONS[1], dict(QUESTIONS[1], turns=["x"])])
    with pytest.raises(ValueError, match=r"questions.jsonl line 3: question_id 111 repeats line 2"):
        read_questions(path)


def test_an_empty_question_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no questions"):
        read_questions(write_lines(tmp_path / "questions.jsonl", [""]))


@pytest.mark.parametrize("bad_record, message", [
    ({"question_id": 999, "choices": [{"turns": ["x"]}]},
     "question_id 999 is not a question of the question file"),
    ({"question_id": 111, "choices": []}, "'choices' must be a non-empty list of objects"),
    ({"question_id": 111, "choices": [{"turns": "391"}]}, "'choices[0].turns' must be a non-empty list of strings"),
    ({"question_id": 111, "choices": [{"turns": ["391"]}]},
     "'choices[0].turns' has 1 answer(s) but question 111 has 2 turns"),
])
def test_a_bad_reference_names_the_file_the_line_and_the_problem(tmp_path, questions, bad_record, message):
    path = write_lines(tmp_path / "reference.jsonl", [REFERENCES[1], bad_record])
    with pytest.raises(ValueError) as caught:
        read_references(path, questions)
    assert f"reference.jsonl line 2: {message}" in str(caught.value)


def test_a_repeated_reference_names_both_lines(tmp_path, questions):
    path = write_lines(tmp_path / "reference.jsonl", [REFERENCES[0], REFERENCES[1], REFERENCES[0]])
    with pytest.raises(ValueError, match="reference.jsonl line 3: question_id 111 repeats line 1"):
        read_references(path, questions)


def test_the_reference_answer_is_shown_only_for_math_reasoning_and_coding(questions):
    assert REFERENCE_CATEGORIES == {"math", "reasoning", "coding"}
    writing, math_question, coding = questions
    shown = grading_request_text(math_question, ["391", "23"], 1, ["391", "23"])
    assert "[The start of the reference answer" in shown and "\n23\n" in shown
    assert "[The start of the reference answer" in grading_request_text(coding, ["def f(xs): ..."], 0, ["ref"])
    hidden = grading_request_text(writing, ["a haiku", "A haiku"], 1, ["SECRET REFERENCE", "SECRET REFERENCE"])
    assert "reference answer" not in hidden and "SECRET REFERENCE" not in hidden
    # a reference file is optional: without one, a math turn is graded without a reference
    assert "reference answer" not in grading_request_text(math_question, ["391", "23"], 1)


def test_the_grading_prompt_shows_the_conversation_up_to_the_graded_turn(questions):
    math_question = questions[1]
    first = grading_request_text(math_question, ["It is 391.", "It is 23."], 0)
    assert "What is 17 * 23?" in first and "It is 391." in first
    assert "divided by 17" not in first and "It is 23." not in first
    second = grading_request_text(math_question, ["It is 391.", "It is 23."], 1)
    assert second.index("What is 17 * 23?") < second.index("It is 391.") < second.index("divided by 17") \
        < second.index("It is 23.")
    assert second.rstrip().endswith("Rating: [[5]]")                  # the verdict format the parser reads
    with pytest.raises(ValueError, match="needs 2 answers"):
        grading_request_text(math_question, ["It is 391."], 1)
    with pytest.raises(ValueError, match="no turn 2"):
        grading_request_text(math_question, ["a", "b", "c"], 2)
    with pytest.raises(ValueError, match="no reference answer for turn 1"):
        grading_request_text(math_question, ["a", "b"], 1, ["391"])


def test_answers_with_dollar_signs_reach_the_judge_unchanged(questions):
    text = grading_request_text(questions[2], ["It costs $5 and ${x} stays."], 0)
    assert "It costs $5 and ${x} stays." in text


@pytest.mark.parametrize("text, expected", [
    ("The answer is correct and clear.\nRating: [[8]]", 8.0),
    ("Mostly right. [[7.5]]", 7.5),
    ("Asked to write 'Rating: [[5]]'; my verdict: [[9]]", 9.0),          # the last verdict counts
    ("Rating: 6", 6.0),
    ("rating = 4.5/10", 4.5),
    ('{"rating": 7}', 7.0),
    ('Here you go: {"explanation": "fine", "rating": 10}', 10.0),
])
def test_ratings_are_read_from_brackets_a_label_or_json(text, expected):
    assert parse_rating(text) == expected


@pytest.mark.parametrize("text", ["I would rather not rate this.", "Rating: [[0]]", "[[11]]", '{"rating": "high"}',
                                  ""])
def test_a_missing_or_out_of_range_rating_is_an_error(text):
    with pytest.raises(ValueError):
        parse_rating(text)
