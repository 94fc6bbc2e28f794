"""Judge calibration: known-quality pairs from the pool's own answers, judged as scoring judges, paid under the run's
budget once, and a verdict on whether the judge can tell (against the loopback API, no Ray, no model)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline import store
from pipeline.config import RunConfig
from pipeline.judge_calibration import (
    CALIBRATION_FILE,
    DAMAGES,
    REFUSAL,
    build_pairs,
    calibrate,
    first_shard,
    first_third,
    format_calibration,
    trusted,
)
from pipeline.llm.emulated_api import EmulatedAPI, judge_by_length
from pipeline.llm.endpoint import OpenEndpoint
from pipeline.llm.limits import BudgetExceeded
from pipeline.llm.secret import Secret
from pipeline.llm.shared_limits import local_limits
from pipeline.llm.spend import SPEND_FILE, spend_record
from pipeline.pool import import_pool

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
KEY = "calibration-test-key"
PRICE = {"input_per_million_usd": 100.0, "output_per_million_usd": 100.0}


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> store.Location:
    location = store.locate(str(tmp_path_factory.mktemp("pool")))
    import_pool(["bundled:sample"], location, RunConfig().pool, progress=False)
    return location


def run_config(tmp_path: Path, api: EmulatedAPI, **calibration) -> RunConfig:
    return RunConfig.model_validate({
        "storage": {"run_dir": str(tmp_path / "run")},
        "teacher": {"kind": "remote", "base_url": api.base_url, "model": "judge", "price": PRICE},
        "judge_calibration": {"enabled": True, **calibration}})


def calibrated(config: RunConfig, api: EmulatedAPI, pool_dir: store.Location) -> dict:
    limits = local_limits([config.effective_judge], config.max_cost_usd, spend_record(config))
    return calibrate(config, OpenEndpoint(api.base_url, "judge", Secret(KEY)), limits, pool_dir)


def test_pairs_put_each_answer_against_its_first_third_another_rows_answer_and_a_refusal(pool_dir):
    pairs = build_pairs(first_shard(pool_dir), 8, seed=0)
    assert len(pairs) == 8 * 3 and [p.damage for p in pairs[:3]] == list(DAMAGES)
    rows = {p.row_id: p.intact for p in pairs}
    assert len(rows) == 8
    for pair in pairs:
        if pair.damage == "first_third":
            assert pair.intact.startswith(pair.damaged) and len(pair.damaged) <= len(pair.intact) / 3
        elif pair.damage == "other_answer":
            assert pair.damaged in rows.values() and pair.damaged != pair.intact
        else:
            assert pair.damaged == REFUSAL
    assert first_third("one two three four five six seven eight nine") == "one two"
    rows = first_shard(pool_dir)
    without = rows.set_column(rows.schema.get_field_index("output"), "output", pa.nulls(rows.num_rows, pa.string()))
    assert build_pairs(without, 8, 0) == []          # no reference answers: nothing to calibrate on


def test_a_judge_answering_at_random_is_flagged_and_one_that_can_tell_passes(pool_dir, tmp_path):
    with EmulatedAPI(api_key=KEY).serving_in_thread() as api:      # default replies: scores at random
        random_judge = calibrated(run_config(tmp_path / "random", api), api, pool_dir)
    assert api.stats.answered == 8 * 3 * 2                          # each pair in both orders
    assert 0.2 <= random_judge["discrimination"] <= 0.8 and not random_judge["trusted"]
    assert "cannot be trusted" in random_judge["warning"] and "under the bar of 75%" in random_judge["warning"]

    with EmulatedAPI(api_key=KEY, reply=judge_by_length).serving_in_thread() as api:
        config = run_config(tmp_path / "length", api)
        able = calibrated(config, api, pool_dir)
        assert able["trusted"] and able["warning"] is None and able["discrimination"] >= 0.75
        assert able["by_damage"]["first_third"]["discrimination"] == able["by_damage"]["refusal"]["discrimination"] == 1
        assert able["judged"] == able["pairs"] == 24 and able["calls"] == 48 and able["failed"] == {}
        # the calls were paid under the run's one budget, and are not paid again
        spent = json.loads((tmp_path / "length" / "run" / SPEND_FILE).read_text())["spent_usd"]
        assert spent == pytest.approx(api.stats.billed_usd(100.0, 100.0)) and able["usage"]["cost_usd"] == pytest.approx(spent)
        answered = api.stats.answered
        assert calibrated(config, api, pool_dir)["discrimination"] == able["discrimination"]
        assert api.stats.answered == answered
    text = format_calibration(able)
    assert "first_third 1.00" in text and "the judge can be trusted" in text
    # the verdict is the configured bar's: the lead's `auto` difficulty reads it through trusted()
    assert trusted(able, 0.75) and not trusted(able, 1.01) and not trusted(None, 0.5)


def test_the_budget_stops_calibration_before_it_passes_the_cap_and_nothing_is_kept_as_measured(pool_dir, tmp_path):
    with EmulatedAPI(api_key=KEY, reply=judge_by_length).serving_in_thread() as api:
        config = run_config(tmp_path, api).model_copy(update={"max_cost_usd": 0.05})
        with pytest.raises(BudgetExceeded):
            calibrated(config, api, pool_dir)
    assert api.stats.billed_usd(100.0, 100.0) <= 0.05
    assert not (tmp_path / "run" / CALIBRATION_FILE).exists()


def test_tapir_check_judge_prints_the_calibration_alone_and_exits_1_for_a_judge_that_cannot_tell(
        pool_dir, tmp_path):
    with EmulatedAPI(api_key=KEY).serving_in_thread() as api:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "pool": {"source": "bundled:sample"}, "storage": {"run_dir": str(tmp_path / "run")},
            "teacher": {"kind": "remote", "base_url": api.base_url, "model": "judge", "api_key_env": "TAPIR_CAL_KEY"},
            "judge_calibration": {"enabled": True, "rows": 4}}))
        done = subprocess.run([TAPIR, "check", "judge", str(config)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "TAPIR_CAL_KEY": KEY}, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stdout.startswith("judge calibration: discrimination") and "over 12 of 12" in done.stdout
    assert "WARNING: the judge cannot be trusted" in done.stdout and api.stats.answered == 24
    assert json.loads((tmp_path / "run" / CALIBRATION_FILE).read_text())["calls"] == 24


def test_auto_difficulty_uses_the_judge_only_when_its_calibration_reached_the_bar(pool_dir, tmp_path):
    from pipeline.difficulty import method
    from pipeline.round_summary import hard_rule

    for reply, expected in ((None, "ifd"), (judge_by_length, "judge")):
        with EmulatedAPI(api_key=KEY, **({"reply": reply} if reply else {})).serving_in_thread() as api:
            config = run_config(tmp_path / expected, api)
            config = RunConfig.model_validate({**config.model_dump(), "curriculum": {"difficulty": "auto"}})
            assert method(config) == "ifd"            # not calibrated yet: not known to be trustworthy
            calibrated(config, api, pool_dir)
        assert method(config) == expected and "chosen by the judge's calibration (auto)" in hard_rule(config)
        # a later command of the same run (a resumed round, `tapir plan`) decides alike from the stored result
        assert method(RunConfig.model_validate(config.model_dump())) == expected
