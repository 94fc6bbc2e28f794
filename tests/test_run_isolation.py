"""Two runs never share state through Ray: the limits actor (rate windows, spend, budget) is named by the run
directory's full URI, not by its last component."""
import os

from pipeline.config import RunConfig
from pipeline.ray_runtime import limits_key


def config(run_dir: str) -> RunConfig:
    return RunConfig.model_validate({"storage": {"run_dir": run_dir}})


def test_runs_whose_directories_share_their_last_component_get_their_own_limits_actor(tmp_path, monkeypatch):
    first, second = limits_key(config(str(tmp_path / "a" / "local"))), limits_key(config(str(tmp_path / "b" / "local")))
    assert first != second and first.startswith("local-") and second.startswith("local-")
    assert limits_key(config("s3://bucket-1/runs/local")) != limits_key(config("s3://bucket-2/runs/local"))
    assert limits_key(config("s3://bucket-1/runs/local/")) == limits_key(config("s3://bucket-1/runs/local"))
    # the same directory, however it is written, is the same run
    monkeypatch.chdir(tmp_path)
    assert limits_key(config(os.path.join("a", "local"))) == first
