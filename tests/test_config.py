from pathlib import Path

import pytest

from pipeline.config import (
    DEFAULT_TASK_TARGETS,
    MAX_YAML_VALUES,
    ConfigError,
    RunConfig,
    bundled_config_path,
    load_config,
    show,
)

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name):
    config = load_config(REPO / "configs" / name)
    assert isinstance(config, RunConfig)


def test_bundled_default_is_the_repo_local_yaml():
    assert bundled_config_path().read_text() == (REPO / "configs" / "local.yaml").read_text()


def test_every_error_is_reported_with_field_path_file_and_line(tmp_path):
    path = write(tmp_path, """\
pool:
  rows_per_shard: -5
student:
  sampling:
    temperature: hot
teacher:
  kind: remote
curriculum:
  rounds: 2
  rouns: 3
""")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: 4 error(s)")
    assert "pool.rows_per_shard (line 2): Input should be greater than 0" in message
    assert "student.sampling.temperature (line 5)" in message
    assert "teacher (line 6): kind 'remote' needs both 'base_url' and 'model'" in message
    assert "curriculum.rouns (line 10): unknown key" in message


def test_a_literal_api_key_is_refused_and_never_echoed(tmp_path):
    path = write(tmp_path, "teacher:\n  kind: remote\n  base_url: https://api.example.com/v1\n"
                           "  model: big\n  api_key: sk-live-abcdef123456\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "name that variable in 'api_key_env'" in str(caught.value)
    assert "sk-live-abcdef123456" not in str(caught.value)


def test_unreadable_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"line 2: not valid YAML"):
        load_config(write(tmp_path, "pool:\n  source: a: b\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_task_targets_default_to_the_32_published_categories_and_are_normalised(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert len(config.curriculum.task_targets) == 32 == len(DEFAULT_TASK_TARGETS)
    assert sum(config.curriculum.task_targets.values()) == pytest.approx(1.0)
    custom = load_config(write(tmp_path, "curriculum:\n  task_targets: {Math: 0.5, Code Generation: 0.5}\n"))
    assert custom.curriculum.task_targets == {"Math": 0.5, "Code Generation": 0.5}
    with pytest.raises(ConfigError, match="sum to 0.700"):
        load_config(write(tmp_path, "curriculum:\n  task_targets: {Math: 0.5, Code: 0.2}\n"))


def test_numbers_in_exponent_form_without_a_dot_are_numbers(tmp_path):
    config = load_config(write(tmp_path, "training:\n  learning_rate: 2e-5\nmax_cost_usd: 5E+1\n"))
    assert (config.training.learning_rate, config.max_cost_usd) == (2e-5, 50.0)


def test_judge_defaults_to_the_teacher(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.effective_judge is config.teacher


def test_show_reports_key_presence_without_value(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-very-secret-value")
    path = write(tmp_path, """\
teacher:
  kind: remote
  base_url: https://api.example.com/v1
  model: big
  api_key_env: MY_TEACHER_KEY
student:
  model: hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789
storage:
  run_dir: runs/20261201T0700-3f9a2b7c1d4e5f60
""")
    text = show(load_config(path))
    assert "sk-very-secret-value" not in text
    assert "api_key_env: MY_TEACHER_KEY" in text
    assert "$MY_TEACHER_KEY is set" in text
    assert "tokens_per_minute: 1000000" in text   # a field named like a secret but not one stays visible
    # a key pasted where a model name belongs is hidden too
    assert "hf_AbCdEf" not in text and "model: '***'" in text
    assert "run_dir: runs/20261201T0700-3f9a2b7c1d4e5f60" in text       # a path with a hash in it stays


def errors_of(tmp_path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return str(caught.value)


@pytest.mark.parametrize("pasted", ["sk-live-abcdef1234567890abcdef", "AKIAIOSFODNN7EXAMPLE",
                                    "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
                                    "ghp_0123456789abcdefABCDEF0123456789abcd"])
def test_a_key_pasted_into_api_key_env_is_refused_and_never_echoed(tmp_path, pasted):
    message = errors_of(tmp_path, f"teacher:\n  api_key_env: {pasted}\n")
    assert "teacher.api_key_env (line 2): this looks like an API key, not the name of a variable" in message
    assert pasted not in message and pasted[4:12] not in message


def test_a_key_pasted_as_a_key_name_is_not_quoted_back(tmp_path):
    message = errors_of(tmp_path, "teacher:\n  sk-proj-AbCdEf0123456789xyz: 1\n")
    assert "teacher.*** (line 2): unknown key" in message and "AbCdEf0123456789" not in message


def test_api_key_env_must_be_a_variable_name(tmp_path):
    message = errors_of(tmp_path, "judge:\n  api_key_env: my key\n")
    assert "judge.api_key_env (line 2): must be the name of an environment variable" in message
    assert load_config(write(tmp_path, "teacher:\n  api_key_env: OPENAI_API_KEY_2\n")).teacher.api_key_env \
        == "OPENAI_API_KEY_2"


def test_credentials_in_urls_are_refused_without_echoing_them(tmp_path):
    message = errors_of(tmp_path, """\
storage:
  run_dir: s3://AKIAXXXX:topsecret@bucket/run
teacher:
  kind: remote
  base_url: https://user:pa55word@api.example.com/v1
  model: big
""")
    assert "storage.run_dir (line 2): holds credentials (s3://***@bucket/run)" in message
    assert "teacher.base_url (line 5): holds credentials (https://***@api.example.com/v1)" in message
    assert "topsecret" not in message and "pa55word" not in message


def test_a_yaml_alias_bomb_fails_fast_naming_the_line(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    lines += ["pool:", "  source: *i"]
    message = errors_of(tmp_path, "\n".join(lines) + "\n")       # 10^9 values once expanded
    assert f"line 4: YAML aliases here expand to more than {MAX_YAML_VALUES} values" in message
    # a few aliases that repeat a section are fine
    config = load_config(write(tmp_path, "teacher: &t\n  requests_per_minute: 50\njudge: *t\n"))
    assert config.judge.requests_per_minute == 50
    assert "refers to the value it is part of" in errors_of(tmp_path, "ray:\n  namespace: &n [*n]\n")


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    message = errors_of(tmp_path, "teacher:\n  model: a\nstudent:\n  num_actors: 1\n  num_actors: 2\n"
                                  "teacher:\n  model: b\n")
    assert "teacher (line 6): duplicate key; it is also written on line 1" in message
    assert "student.num_actors (line 5): duplicate key; it is also written on line 4" in message


@pytest.mark.parametrize("text, field", [
    ("teacher:\n  timeout_s: .inf\n", "teacher.timeout_s (line 2): Input should be a finite number"),
    ("curriculum:\n  mfd_threshold: .nan\n", "curriculum.mfd_threshold (line 2): Input should be a finite number"),
    ("max_cost_usd: -.inf\n", "max_cost_usd (line 1): Input should be a finite number"),
    ("teacher:\n  max_attempts: true\n", "teacher.max_attempts (line 2): expected a number, got the boolean true"),
    ("training:\n  learning_rate: false\n",
     "training.learning_rate (line 2): expected a number, got the boolean false"),
    ("pool:\n  rows_per_shard: '100'\n", "pool.rows_per_shard (line 2): Input should be a valid integer"),
])
def test_non_finite_numbers_and_booleans_where_numbers_belong_are_refused(tmp_path, text, field):
    assert field in errors_of(tmp_path, text)
