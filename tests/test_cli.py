"""The `tapir` commands as a user types them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))


def tapir(*args, env=None, timeout=600):
    return subprocess.run([TAPIR, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_config_validate_reports_errors_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher:\n  requests_per_minute: 0\n  colour: blue\n")
    done = tapir("config", "validate", str(bad))
    assert done.returncode == 2
    assert f"{bad}: 2 error(s)" in done.stderr
    assert "teacher.requests_per_minute (line 2)" in done.stderr and "teacher.colour (line 3)" in done.stderr
    assert "Traceback" not in done.stderr
    good = tapir("config", "validate", "configs/cluster-gpu.yaml")
    assert good.returncode == 0 and "valid" in good.stdout


def test_config_show_prints_the_resolved_config(tmp_path):
    done = tapir("config", "show", "configs/local.yaml")
    assert done.returncode == 0
    assert "mfd_threshold: 1.0" in done.stdout and "Paraphrase:" in done.stdout


def test_pool_import_command(shared_data, tmp_path):
    done = tapir("pool", "import", str(shared_data / "alpaca_dev_4000.jsonl"), "--out", str(tmp_path / "pool"),
                 "--rows-per-shard", "1000")
    assert done.returncode == 0, done.stderr
    assert "imported 4000 of 4000 rows into 4 shard(s)" in done.stdout
    again = tapir("pool", "import", str(shared_data / "alpaca_dev_4000.jsonl"), "--out", str(tmp_path / "pool"))
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    zero = tapir("pool", "import", "x.jsonl", "--out", str(tmp_path / "p2"), "--rows-per-shard", "0")
    assert zero.returncode == 2 and "--rows-per-shard: must be a positive whole number" in zero.stderr


@pytest.mark.slow
def test_check_runs_the_local_end_to_end_path(tmp_path, model_cache):
    config = tmp_path / "local.yaml"
    text = (REPO / "configs" / "local.yaml").read_text()
    text = text.replace("run_dir: runs/local", f"run_dir: {tmp_path / 'run'}")
    config.write_text(text.replace("storage:\n", f"storage:\n  cache_dir: {model_cache}\n", 1))
    done = tapir("check", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "local teacher ready" in done.stderr and "local teacher stopped" in done.stderr
    assert "imported" in done.stdout and "tokens:" in done.stdout and "completion;" in done.stdout
    manifest = json.loads((tmp_path / "run" / "pool" / "_manifest.json").read_text())
    # the whole bundled pool is read; the demo config keeps its slice (pool.sample_fraction) and counts the rest
    assert manifest["rows_in"] >= 300 and manifest["failed"] == 0
    assert manifest["rows_out"] + manifest["not_sampled"] == manifest["rows_in"] and manifest["not_sampled"] > 0


@pytest.mark.slow
def test_serve_teacher_prints_base_url_serves_and_stops_on_ctrl_c(tmp_path, model_cache):
    import signal
    import urllib.request

    config = tmp_path / "local.yaml"
    config.write_text(f"storage:\n  cache_dir: {model_cache}\n")
    process = subprocess.Popen([TAPIR, "serve-teacher", str(config), "--print-key"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        printed = {}
        for line in process.stdout:
            if line.startswith(("base_url", "api_key")):
                name, value = line.split()
                printed[name] = value
            if line.startswith("serving"):
                break
        request = urllib.request.Request(printed["base_url"] + "/models",
                                         headers={"Authorization": f"Bearer {printed['api_key']}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["data"][0]["id"] == "tapir-teacher"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert "local teacher stopped" in process.stderr.read()
        with pytest.raises(OSError):
            urllib.request.urlopen(request, timeout=5)
    finally:
        process.kill()


def test_the_cli_starts_without_importing_any_heavy_library():
    """`tapir --help`, `tapir config validate` answer in a second: ray, torch, vllm, transformers and deepspeed
    are imported by the commands that use them, never by `import pipeline.cli`."""
    heavy = ("ray", "torch", "vllm", "transformers", "deepspeed")
    loaded = subprocess.run([sys.executable, "-c", "import sys, pipeline.cli; "
                             f"print(sorted(m for m in {heavy!r} if m in sys.modules))"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_a_users_error_is_one_line_with_status_2_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Every error class the pipeline raises for its user shares one base, which the CLI catches; nothing else."""
    from pipeline import cli
    from pipeline.errors import UserError
    from pipeline.planning import PlanError
    from training import TrainingDataError

    assert issubclass(TrainingDataError, ValueError) and issubclass(PlanError, UserError)

    def failing(error):
        def run(args):
            raise error
        monkeypatch.setattr(cli, "cmd_report", run)

    failing(PlanError("runs/x/round_0/score: no row scored ok"))
    assert cli.main(["report", "runs/x"]) == 2
    assert capsys.readouterr().err.strip() == "tapir: error: runs/x/round_0/score: no row scored ok"
    failing(KeyError("a bug"))
    with pytest.raises(KeyError):
        cli.main(["report", "runs/x"])
