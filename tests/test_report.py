"""`tapir report RUN_DIR`: the page, its Markdown twin and its plots, from a small run directory written here in
the shapes the pipeline writes (the round summary by the pipeline's own function), and the page as headless
Chromium shows it."""
import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import images_of

from pipeline.cli import main
from pipeline.config import bundled_config_path, load_config
from pipeline.difficulty import distribution
from pipeline.report import NO_EVALUATION, ReportError, write_report
from pipeline.round_summary import round_summary
from pipeline.rounds import STAGES

RUN_PLOTS = 5           # MFD, task mix, hard share, loss, tokens/cost/time
EVAL_PLOTS = 2          # win rate, per-category scores


CLASSIFIER = {"labels": "bundled:sample", "train_rows": 305, "held_out_rows": 34, "accuracy": 0.62, "macro_f1": 0.51}
CALIBRATION = {"pairs": 6, "judged": 6, "discrimination": 0.5, "bar": 0.75, "trusted": False, "failed": {},
               "warning": "the judge cannot be trusted to tell a good answer from a bad one: it preferred the intact "
                          "answer in 50% of 6 known-quality pairs (0.5 is chance), under the bar of 75%",
               "by_damage": {d: {"discrimination": 0.5, "intact_wins": 0, "ties": 2, "judged": 2}
                             for d in ("first_third", "other_answer", "refusal")}}


def _stage_summaries(r: int) -> dict[str, dict]:
    """The stage summaries `tapir run` keeps in state.json, cut to what the report and round summary read."""
    ifd = [0.15, 0.35, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0 - 0.1 * r]     # configs/local.yaml measures IFD
    tokens = {"prompt": 100 + r, "completion": 50}
    return {
        "score": {"rows_in": 8, "rows_ok": 8, "failed": {}, "cost_usd": {"total": 0.02}, "wall_s": 50.0,
                  "judge_requests_per_row": 2.0,
                  "tokens": {"student_completion": 300, "teacher": tokens, "judge": tokens},
                  **({"classifier": CLASSIFIER, "judge_calibration": CALIBRATION} if r == 0 else {})},
        "plan": {"complete": True, "rows_planned": 6, "distinct_rows": 5, "hard_share_target": 0.5 + 0.25 * r,
                 "hard_share_planned": 0.5 + 0.25 * r, "hard_rows_available": 4,
                 "difficulty": distribution(ifd, "ifd"),
                 "task_mix_scored": {"History": 5, "Math": 2, "Sport": 1},
                 "task_mix_planned": {"Math": 3, "History": 2, "Sport": 1},
                 "task_tv_scored": 0.9, "task_tv_planned": 0.7,
                 "warnings": ["hard share planned 0.500, target 0.750: only 1 row scored hard"] if r else []},
        "expand": {"requests": 4, "rows_kept": 2, "dropped": {"too_short": 2}, "cost_usd": 0.002, "tokens": tokens,
                   "wall_s": 10.0},
        "respond": {"rows_ok": 4, "failed": {}, "cut_off": 0, "cost_usd": 0.005, "tokens": tokens, "wall_s": 5.0},
        "train_set": {"complete": True, "rows": 8, "hard_share": 0.45 + 0.25 * r, "task_mix": {"Math": 5, "History": 3},
                      "task_tv": 0.7},
        "train": {"data": {"rows_trainable": {"train": 8}}, "model": f"run/round_{r}/model", "wall_s": 120.0,
                  "training": {"tokens_trained": 2000, "first_loss": 2.0, "final_loss": 1.6}},
    }


def _write_run(root: Path, finished_rounds: int = 2, partial_round: bool = False) -> Path:
    """A run directory: `finished_rounds` whole rounds, then (partial_round) one stopped after its plan."""
    config = load_config(bundled_config_path())
    state = {"status": "finished", "rounds_planned": finished_rounds, "spent_usd": 0.054, "rounds": {},
             "last_started": "2026-11-21T15:00:00+00:00", "updated": "2026-11-21T16:00:00+00:00",
             "stopped_because": None, "round": finished_rounds - 1, "stage": "train"}
    for r in range(finished_rounds + partial_round):
        stages = _stage_summaries(r)
        directory = root / f"round_{r}"
        (directory / "plan").mkdir(parents=True)
        (directory / "plan" / "_manifest.json").write_text(json.dumps(stages["plan"], sort_keys=True))
        if r == finished_rounds:    # the partial round
            state["rounds"][str(r)] = {"finished": ["score", "plan"], "summaries": {}}
            state.update(status="stopped", round=r, stage="expand", stopped_because="stop requested (tapir stop)",
                         rounds_planned=finished_rounds + 1)
            continue
        (directory / "train").mkdir()
        (directory / "train" / "_manifest.json").write_text(json.dumps(stages["train_set"]))
        (directory / "sft").mkdir()
        steps = [{"kind": "step", "step": s, "loss": 2.0 - 0.1 * s - 0.2 * r, "lr": 1e-5} for s in range(1, 6)]
        steps.append({**steps[2], "loss": 1.65 - 0.2 * r})     # step 3 logged again after a resume: the last counts
        steps.append({"kind": "eval", "step": 5, "loss": 1.9})
        (directory / "sft" / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps)
                                                         + '{"kind": "step", "st')     # killed mid-write
        (directory / "summary.json").write_text(json.dumps(round_summary(config, r, stages), sort_keys=True))
        state["rounds"][str(r)] = {"finished": list(STAGES), "summaries": stages, "summary": True}
    (root / "state.json").write_text(json.dumps(state))
    return root


def _write_evaluation(root: Path, win_rate_scale: float = 1.0) -> None:
    (root / "eval").mkdir()
    pq.write_table(pa.table({
        "model": ["round_1", "baseline", "round_0"], "round": pa.array([1, None, 0], pa.int64()),
        "win_rate": [0.62 * win_rate_scale, 0.5 * win_rate_scale, 0.55 * win_rate_scale],
        "standard_error": [0.03, 0.0, 0.035], "lc_win_rate": [0.6, None, 0.52]}), root / "eval" / "compare.parquet")
    pq.write_table(pa.table({
        "model": ["baseline", "round_0", "round_1"] * 2, "category": ["Math"] * 3 + ["Writing"] * 3,
        "score": [5.0, 5.5, 6.1, 7.0, 7.2, 7.4]}), root / "eval" / "categories.parquet")


def _checked_report(root: Path, plots: int) -> tuple[str, str]:
    """Builds the report; checks what every report must hold, and returns (page, markdown)."""
    written = write_report(str(root))
    report = root / "report"
    assert written[:2] == [str(report / "report.html"), str(report / "report.md")]
    assert all(Path(path).is_file() for path in written) and len(written) == 2 + plots
    page, markdown = (report / "report.html").read_text(), (report / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(linked) == plots and all((report / link).is_file() for link in linked), linked
    assert sorted(str(report / link) for link in linked) == sorted(written[2:])
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == plots and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r"(src|href)=\"?https?://", page) and "<script" not in page
    return page, markdown


def test_a_finished_run_gets_a_page_and_markdown_with_every_plot(tmp_path):
    page, markdown = _checked_report(_write_run(tmp_path), RUN_PLOTS)
    for text in (page, markdown):
        assert "status: finished" in text and "rounds finished: 2 of 2" in text and "spent: $0.0540" in text
        assert "== round 0 ==" in text and "== round 1 ==" in text
        assert "pool 8 → scored 8 → planned 6" in text       # format_round_summary's lines
        # what the task labels and the judge are worth, and the difficulty's distribution
        assert "judge calibration: discrimination 0.50 over 6 of 6" in text and "WARNING: the judge cannot" in text
        assert "labelled by bundled:sample; on 34 held-out rows accuracy 0.62, macro-F1 0.51" in text
        assert "IFD over 8 rows" in text and "hard share (IFD in the top 50% of the round): target 0.50" in text
        assert text.count("warning: hard share planned 0.500, target 0.750: only 1 row scored hard") == 1
        assert NO_EVALUATION in text
    assert "tapir eval compare CONFIG" in markdown


def test_the_evaluation_is_plotted_when_its_files_exist(tmp_path):
    root = _write_run(tmp_path)
    _write_evaluation(root)
    page, markdown = _checked_report(root, RUN_PLOTS + EVAL_PLOTS)
    assert "No evaluation was run" not in page and "win_rate.png" in markdown and "category_scores.png" in markdown
    assert "reference_loss.png" not in markdown            # a compare.parquet from before the reference loss


def test_the_reference_loss_is_plotted_beside_the_win_rate_when_compare_parquet_has_it(tmp_path):
    root = _write_run(tmp_path)
    _write_evaluation(root)
    compare = pq.read_table(root / "eval" / "compare.parquet")
    for name, values in (("reference_loss", [1.21, 1.25, 1.23]), ("reference_loss_standard_error", [0.04] * 3),
                         ("loss_difference_to_baseline", [-0.04, None, -0.02]),
                         ("loss_difference_standard_error", [0.0006, None, 0.0007])):
        compare = compare.append_column(name, pa.array(values, pa.float64()))
    pq.write_table(compare, root / "eval" / "compare.parquet")
    page, markdown = _checked_report(root, RUN_PLOTS + EVAL_PLOTS + 1)
    assert "reference_loss.png" in markdown and "Reference loss: each round against the baseline" in page


def test_the_runs_held_out_check_is_on_the_page_as_the_console_said_it(tmp_path):
    root = _write_run(tmp_path)
    state = json.loads((root / "state.json").read_text())
    state["heldout_loss"] = {
        "rows": 60, "eval_file": "bundled:sample", "rows_overlapping_pool": 45, "rows_location": "run/heldout_loss/input",
        "models": [{"name": "start", "round": None, "reference_loss": 2.399, "standard_error": 0.098, "rows_scored": 60,
                    "rows_failed": {}},
                   {"name": "round_1", "round": 1, "reference_loss": 2.1931, "standard_error": 0.0908,
                    "rows_scored": 60, "rows_failed": {}}],
        "difference": -0.206, "standard_error": 0.0184, "rows_paired": 60}
    (root / "state.json").write_text(json.dumps(state))
    page, markdown = _checked_report(root, RUN_PLOTS)
    for text in (page, markdown):
        assert "held-out reference loss: 60 rows of bundled:sample (45 overlapping the pool dropped)" in text
        assert "-0.2060 ± 0.0184 over 60 rows: lower: the student moved toward the references" in text


def test_an_unfinished_round_is_reported_with_the_stages_it_finished(tmp_path):
    page, markdown = _checked_report(_write_run(tmp_path, finished_rounds=1, partial_round=True), RUN_PLOTS)
    assert "status: stopped" in markdown and "stopped because: stop requested (tapir stop)" in markdown
    assert "last stage: round 1, expand" in markdown
    assert "== round 1 ==\n  not finished; stages done: score, plan" in markdown


@pytest.mark.slow          # needs Chromium, which `make test` installs and `make test-fast` does not
def test_the_page_opens_in_headless_chromium_and_every_image_loads(tmp_path):
    root = _write_run(tmp_path)
    _write_evaluation(root)
    write_report(str(root))
    started = time.perf_counter()
    page = images_of(root / "report" / "report.html")
    print(f"chromium check: {time.perf_counter() - started:.1f} s")
    assert page.ready_state == "complete" and page.title.startswith("TAPIR run report")
    assert len(page.images) == RUN_PLOTS + EVAL_PLOTS
    assert all(loaded for _, loaded in page.images), page.images


@pytest.mark.slow
def test_the_chromium_check_sees_an_image_that_does_not_load(tmp_path):
    (tmp_path / "broken.html").write_text('<!DOCTYPE html><title>t</title><img src="missing.png">')
    page = images_of(tmp_path / "broken.html")
    assert page.ready_state == "complete"
    assert len(page.images) == 1 and page.images[0][0].startswith("file://") and page.images[0][1] is False


def test_tapir_report_prints_the_paths_it_wrote(tmp_path, capsys):
    root = _write_run(tmp_path)
    assert main(["report", str(root)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(root / "report" / "report.html"), str(root / "report" / "report.md")]
    assert len(printed) == 2 + RUN_PLOTS


def test_tapir_report_names_the_missing_state_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'state.json'}: not found" in error and "Traceback" not in error


def test_an_evaluation_file_in_the_wrong_shape_is_named(tmp_path):
    root = _write_run(tmp_path)
    _write_evaluation(root, win_rate_scale=100.0)
    with pytest.raises(ReportError, match=r"compare\.parquet: win_rate .* in \[0, 1\]; not so for round_1"):
        write_report(str(root))
    pq.write_table(pa.table({"model": ["baseline"], "score": [1.0]}), root / "eval" / "categories.parquet")
    (root / "eval" / "compare.parquet").unlink()
    with pytest.raises(ReportError, match=r"categories\.parquet: missing column\(s\) category"):
        write_report(str(root))
