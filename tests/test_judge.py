"""Pairwise judging in both orders (→ MFD) and task labelling, parsed tolerantly."""
import asyncio
import json

import pytest

from pipeline.config import DEFAULT_TASK_TARGETS, EndpointConfig
from pipeline.llm.client import ChatClient, RequestFailed
from pipeline.llm.emulated_api import EmulatedAPI
from pipeline.llm.judge import judge_pair, label_task, parse_label, parse_scores
from pipeline.llm.secret import Secret
from pipeline.llm.shared_limits import local_limits

CATEGORIES = list(DEFAULT_TASK_TARGETS)


@pytest.mark.parametrize("text, expected", [
    ('{"score_1": 8, "score_2": 3}', (8.0, 3.0)),
    ('Sure! Here is my verdict:\n```json\n{"score_1": 7, "score_2": 9}\n```', (7.0, 9.0)),
    ("Score 1: 6/10\nScore 2: 4/10", (6.0, 4.0)),
    ("Answer 1 gets 9.5 and answer 2 gets 2", (9.5, 2.0)),
    ("8 6\nAnswer 1 is more accurate.", (8.0, 6.0)),                    # Lion's first-line format
])
def test_scores_are_read_from_json_labels_or_lions_first_line(text, expected):
    assert parse_scores(text) == expected


@pytest.mark.parametrize("text", ["I cannot judge this.", '{"score_1": 0, "score_2": 11}', "7", ""])
def test_unreadable_or_out_of_range_scores_are_an_error(text):
    with pytest.raises(ValueError):
        parse_scores(text)


def test_labels_come_from_the_list_or_not_at_all():
    assert parse_label('{"task": "Code Debug"}', CATEGORIES) == "Code Debug"
    assert parse_label('{"task": "code debug"}', CATEGORIES) == "Code Debug"
    assert parse_label("This is clearly a Math problem.", CATEGORIES) == "Math"
    assert parse_label("Either Math or Physics.", CATEGORIES) is None            # ambiguous: not guessed
    assert parse_label('{"task": "Cooking"}', CATEGORIES) is None
    assert parse_label("Computer Science", CATEGORIES) == "Computer Science"     # not also 'Science'


def scripted_judge(body: dict) -> str:
    """A judge that prefers the teacher's answer (8 vs 4) but adds +1 to whatever comes first."""
    prompt = body["messages"][0]["content"]
    teacher_first = prompt.index("TEACHER") < prompt.index("STUDENT")
    first, second = (8 + 1, 4) if teacher_first else (4 + 1, 8)
    return json.dumps({"score_1": first, "score_2": second})


async def with_client(api: EmulatedAPI, work):
    config = EndpointConfig(kind="remote", base_url=api.base_url, model="judge")
    async with ChatClient(config, api.base_url, Secret(api.api_key), local_limits([config], None)) as client:
        return await work(client)


def test_judging_both_orders_cancels_position_bias_and_gives_mfd():
    async def scenario():
        async with EmulatedAPI(reply=scripted_judge) as api:
            return await with_client(api, lambda c: judge_pair(c, "Explain tides.", "", "TEACHER says", "STUDENT says"))

    scores = asyncio.run(scenario())
    assert (scores.teacher_score, scores.student_score, scores.mfd) == (8.5, 4.5, 4.0)
    assert scores.prompt_tokens > 0 and scores.completion_tokens > 0     # both calls' usage, for cost


def test_an_unreadable_judgement_marks_the_row_and_keeps_the_text():
    async def scenario():
        async with EmulatedAPI(reply=lambda body: "I refuse to grade.") as api:
            return await with_client(api, lambda c: judge_pair(c, "Q", "", "a", "b"))

    failed = asyncio.run(scenario())
    assert isinstance(failed, RequestFailed) and failed.reason == "unparseable"
    assert "I refuse to grade." in failed.detail


def test_labelling_uses_a_constrained_choice_and_marks_rows_it_cannot_label():
    async def scenario(reply):
        async with EmulatedAPI(reply=reply) as api:
            return await with_client(api, lambda c: label_task(c, "Fix this loop.", "for i in range(10) print(i)",
                                                               CATEGORIES))

    def enum_reply(body):
        schema = body["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["task"]["enum"] == CATEGORIES
        return '{"task": "Code Debug"}'

    assert asyncio.run(scenario(enum_reply)) == "Code Debug"
    unlabelled = asyncio.run(scenario(lambda body: "Hmm, hard to say."))
    assert isinstance(unlabelled, RequestFailed) and unlabelled.reason == "unlabelled"
