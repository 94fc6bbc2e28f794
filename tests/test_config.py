from pathlib import Path

import pytest

from pipeline.config import DEFAULT_TASK_TARGETS, ConfigError, RunConfig, bundled_config_path, load_config, show

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


def test_judge_defaults_to_the_teacher(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.effective_judge is config.teacher


def test_show_redacts_url_credentials_and_reports_key_presence_without_value(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-very-secret-value")
    path = write(tmp_path, """\
storage:
  run_dir: s3://AKIAXXXX:topsecret@bucket/run
teacher:
  kind: remote
  base_url: https://user:pa55word@api.example.com/v1
  model: big
  api_key_env: MY_TEACHER_KEY
""")
    text = show(load_config(path))
    assert "topsecret" not in text and "pa55word" not in text and "sk-very-secret-value" not in text
    assert "https://***@api.example.com/v1" in text
    assert "api_key_env: MY_TEACHER_KEY" in text
    assert "$MY_TEACHER_KEY is set" in text
    assert "tokens_per_minute: 1000000" in text   # a field named like a secret but not one stays visible
