"""The `tapir` command line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from pipeline import classification, console, store
from pipeline.config import ConfigError, PoolConfig, RunConfig, bundled_config_path, load_config, show
from pipeline.errors import UserError
from pipeline.evaluation.eval_dir import model_name
from pipeline.llm.client import ChatClient, ChatRequest
from pipeline.llm.endpoint import open_endpoint
from pipeline.llm.shared_limits import local_limits
from pipeline.llm.spend import spend_record
from pipeline.models import bundled_encoder_dir, prepare_bundled_student
from pipeline.pool import ensure_pool, import_pool, read_pool

log = logging.getLogger("tapir")

# Errors a user can act on (pipeline/errors.py, and a file named on the command line that is not there): printed
# as one message, exit status 2, no traceback; any other exception is a bug and keeps its traceback.
_USER_ERRORS = (UserError, FileNotFoundError)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _config(path: Optional[str]) -> RunConfig:
    return load_config(path or bundled_config_path())


def cmd_config_validate(args: argparse.Namespace) -> int:
    load_config(args.file)
    print(f"{args.file}: valid")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(show(load_config(args.file)), end="")
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    config = _config(args.config)
    started = time.perf_counter()
    student = prepare_bundled_student(config.storage.cache_dir, verify=args.verify)
    print(f"student  {student}  ({time.perf_counter() - started:.1f} s)")
    print(f"encoder  {bundled_encoder_dir()}")
    return 0


def cmd_pool_import(args: argparse.Namespace) -> int:
    config = _config(args.config)
    overrides = {name: value for name, value in (
        ("format", args.format), ("id_column", args.id_column), ("rows_per_shard", args.rows_per_shard),
        ("max_row_chars", args.max_row_chars), ("sample_fraction", args.sample_fraction)) if value is not None}
    # without --config the defaults are PoolConfig's, not the demo config's (which imports a slice of its pool)
    defaults = config.pool.model_dump() if args.config else {}
    pool = PoolConfig.model_validate({**defaults, **overrides})
    out = store.locate(args.out, config.storage.s3_endpoint_url)
    summary = import_pool(args.sources, out, pool, overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(summary.text())
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    config = _config(args.config)
    teacher = config.teacher
    if teacher.kind != "local":
        raise ConfigError(str(args.config or bundled_config_path()), ["teacher.kind is 'remote': there is no local teacher to serve"])
    if args.port is not None:
        local = teacher.local.model_copy(update={"port": args.port})
        teacher = teacher.model_copy(update={"local": local})
    # SIGTERM (kill, a supervisor) stops the server as cleanly as Ctrl-C does; and Ctrl-C (SIGINT) does so even
    # when this process was started with SIGINT ignored, as a shell's background job (`cmd &`) is
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with open_endpoint(teacher, config.storage.cache_dir) as endpoint:
        try:
            print(f"base_url  {endpoint.base_url}\nmodel     {endpoint.model}")
            if args.print_key:
                print(f"api_key   {endpoint.api_key.reveal()}")
            else:
                print(f"api_key   ${teacher.api_key_env} if it was set, else a random one (--print-key shows it)")
            print("serving; Ctrl-C stops", flush=True)
            while True:
                endpoint.server.check_alive()
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


async def _one_completion(config: RunConfig, endpoint, instruction: str):
    limits = local_limits([config.teacher], config.max_cost_usd, spend_record(config))    # paid: the run's cap
    async with ChatClient(config.teacher, endpoint.base_url, endpoint.api_key, limits, endpoint.model) as client:
        return await client.complete(ChatRequest([{"role": "user", "content": instruction}],
                                                 max_tokens=config.student.sampling.max_tokens, stage="check"))


def cmd_check(args: argparse.Namespace) -> int:
    """The current end-to-end path: models, the pool, the teacher, one chat completion; `check judge`: the judge's
    calibration alone."""
    what = list(args.what)
    if what[:1] == ["judge"]:
        return _check_judge(what[1:])
    if len(what) > 1:
        raise ConfigError(" ".join(what), ["`tapir check` takes one config file (or `judge` and one config file)"])
    config = _config(what[0] if what else None)
    timings = {}
    started = time.perf_counter()
    prepare_bundled_student(config.storage.cache_dir)
    timings["models"] = time.perf_counter() - started

    run_dir = store.locate(config.storage.run_dir, config.storage.s3_endpoint_url)
    started = time.perf_counter()
    pool_dir, imported = ensure_pool(config)
    print(f"pool     {imported.text() if imported else 'reusing ' + pool_dir.uri}")
    pool = read_pool(pool_dir)
    timings["pool"] = time.perf_counter() - started
    instruction = pool.column("instruction")[0].as_py()

    started = time.perf_counter()
    log_path = Path(run_dir.path) / "logs" / "teacher.log" if run_dir.is_local else None
    with open_endpoint(config.teacher, config.storage.cache_dir, log_path=log_path) as endpoint:
        timings["teacher start"] = time.perf_counter() - started
        print(f"teacher  {endpoint.base_url} ({endpoint.model})")
        started = time.perf_counter()
        result = asyncio.run(_one_completion(config, endpoint, instruction))
        timings["completion"] = time.perf_counter() - started
        started = time.perf_counter()
    timings["teacher stop"] = time.perf_counter() - started
    print(f"\n> {instruction}\n\n{result.content.strip()}\n")
    print(f"rows in pool: {pool.num_rows}; tokens: {result.prompt_tokens} prompt + {result.completion_tokens} "
          f"completion; finish: {result.finish_reason}")
    print("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    return 0


def _check_judge(paths: list[str]) -> int:
    """Known-quality pairs from the pool, judged as scoring judges them, paid under the run's budget and kept in the
    run directory (a run on it does not pay for them again); exit status 1 when the judge cannot be trusted."""
    from pipeline.judge_calibration import calibrate, format_calibration

    if len(paths) > 1:
        raise ConfigError(" ".join(paths), ["`tapir check judge` takes one config file"])
    config = _config(paths[0] if paths else None)
    pool_dir, _ = ensure_pool(config)
    run_dir = store.locate(config.storage.run_dir, config.storage.s3_endpoint_url)
    log_path = Path(run_dir.path) / "logs" / "judge.log" if run_dir.is_local else None
    with open_endpoint(config.effective_judge, config.storage.cache_dir, log_path=log_path) as endpoint:
        limits = local_limits([config.effective_judge], config.max_cost_usd, spend_record(config))
        calibration = calibrate(config, endpoint, limits, pool_dir)
    print(format_calibration(calibration))
    return 0 if calibration["trusted"] else 1


def cmd_classifier_label(args: argparse.Namespace) -> int:
    print(classification.label(_config(args.config), progress=sys.stderr.isatty()).text())
    return 0


def cmd_classifier_train(args: argparse.Namespace) -> int:
    metrics = classification.train(_config(args.config))
    print(f"classifier trained on {metrics['train_rows']} rows in {metrics['train_s']} s; held-out agreement with "
          f"the labels ({metrics['labels']}) on {metrics['held_out_rows']} rows: accuracy {metrics['accuracy']:.3f}, "
          f"macro-F1 {metrics['macro_f1']:.3f}")
    print(f"saved to {classification.classifier_location(_config(args.config)).uri} (metrics.json, confusion.png)")
    return 0


def cmd_classifier_apply(args: argparse.Namespace) -> int:
    summary = classification.apply(_config(args.config), args.round)
    top = ", ".join(f"{task} {n}" for task, n in list(summary["task_counts"].items())[:8])
    print(f"classified {summary['rows_out']} of {summary['rows_in']} rows in {summary['wall_s']} s; "
          f"mean confidence {summary['mean_confidence']:.2f}, {summary['below_threshold']} under the threshold")
    print(f"most common: {top}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline import scoring

    config = _config(args.config)
    summary = scoring.score(config, args.round, progress=sys.stderr.isatty())
    print(scoring.format_summary(summary, scoring.score_location(config, args.round).uri))
    return 0 if summary["complete"] else 1


def cmd_train(args: argparse.Namespace) -> int:
    from training import sft, sft_data

    config = _config(args.config)
    if args.data:
        sft_data.import_training_set(config, args.round, args.data, progress=sys.stderr.isatty())
    summary = sft.train(config, args.round)
    print(sft.format_summary(summary))
    return 0 if summary["complete"] else 1


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline import report, rounds

    config = _config(args.config)
    location = rounds.run_dir(config)
    # A run that starts its own Ray on a local run directory keeps its console to what a person reads; on a
    # cluster (ray.address, RAY_ADDRESS) the driver's output is the job's log, which `tapir logs` shows.
    if not args.verbose and location.is_local and not (config.ray.address or os.environ.get("RAY_ADDRESS")):
        console.route_to_log(Path(location.path) / "logs" / console.LOG_NAME, f"tapir run {args.config or ''}")
        console.say(f"run directory {location.uri}; the full output of Ray, vLLM, DeepSpeed and transformers "
                    f"goes to {console.log_path()} (`tapir -v run` shows it here)")
    state = rounds.run(config, progress=sys.stderr.isatty())
    state_uri = location.child(rounds.STATE_FILE).uri
    try:
        console.say(f"report: {report.write_report(config.storage.run_dir, config.storage.s3_endpoint_url)[0]}")
    except Exception as err:    # the run's own outcome still gets said below; the report can be written again
        log.error("the run report could not be written (%s: %s); `tapir report %s` tries again",
                  type(err).__name__, err, config.storage.run_dir)
    if state["status"] == "finished":
        console.say(f"run finished: {config.curriculum.rounds} round(s); spent ${state['spent_usd']:.4f}; "
                    f"state in {state_uri}")
        return 0
    console.say(f"run {state['status']} in round {state.get('round')} at stage {state.get('stage')}: "
                f"{state['stopped_because']}\neverything written so far is kept; run the same command to continue "
                f"(state in {state_uri})")
    return 3 if state["status"] == "stopped" else 1


def cmd_eval_winrate(args: argparse.Namespace) -> int:
    from pipeline.evaluation import winrate_run

    summary = winrate_run.winrate(_config(args.config), args.model, eval_file=args.eval, out=args.out,
                                  num_rows=args.rows, name=args.name, round_index=model_name(args.model)[1])
    print(winrate_run.format_summary(summary, summary["location"]))
    return 0 if summary["complete"] and summary["rows_judged"] else 1


def cmd_eval_mtbench(args: argparse.Namespace) -> int:
    from pipeline.evaluation import mtbench_run

    summary = mtbench_run.mtbench(_config(args.config), args.model, questions_file=args.questions,
                                  references_file=args.references, out=args.out, name=args.name)
    print(mtbench_run.format_summary(summary, summary["location"]))
    return 0 if summary["complete"] and summary["turns_judged"] else 1


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from pipeline import report
    from pipeline.evaluation import compare

    config = _config(args.config)
    table = compare.compare(config, eval_file=args.eval, num_rows=args.rows)
    print(compare.format_compare(table))
    print(f"report: {report.write_report(config.storage.run_dir, config.storage.s3_endpoint_url)[0]}")
    return 0 if all(row["rows_judged"] for row in table.to_pylist()) else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from pipeline import rounds

    print(f"wrote {rounds.request_stop(_config(args.config))}: the run stops before its next stage")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline import submission

    config = load_config(args.config)
    request = submission.job_request(config, Path(args.config), args.working_dir and Path(args.working_dir))
    if "://" not in config.storage.run_dir:
        log.warning("storage.run_dir is the local path %s: on a cluster of several machines, every node must "
                    "see it (a shared mount), or use s3://", config.storage.run_dir)
    client = submission.job_client(args.address)
    job_id = submission.submit(client, request)
    print(f"submitted job {job_id}: {request.entrypoint}\n"
          f"keys are read on the cluster from: {request.metadata['tapir_secret_env'] or '(none needed)'}\n"
          f"follow it with `tapir status {job_id}` and `tapir logs {job_id} --follow`")
    if args.no_wait:
        return 0
    try:
        status = submission.follow(client, job_id, sys.stdout)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} goes on (`ray job stop {job_id}` stops it)")
        return 130
    print(submission.describe(job_id, submission.asking(client, job_id, "get_job_info")))
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline import submission

    client = submission.job_client(args.address)
    print(submission.describe(args.job_id, submission.asking(client, args.job_id, "get_job_info")))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from pipeline import submission

    client = submission.job_client(args.address)
    if not args.follow:
        sys.stdout.write(submission.asking(client, args.job_id, "get_job_logs"))
        return 0
    return 0 if submission.follow(client, args.job_id, sys.stdout) == "SUCCEEDED" else 1


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline import report

    print("\n".join(report.write_report(args.run_dir)))
    return 0


def _eval_parser(evaluation, name: str, help_text: str, default_out: str) -> argparse.ArgumentParser:
    """A `tapir eval` command with the arguments every evaluation takes: config, --model, --out, --name."""
    parser = evaluation.add_parser(name, help=help_text)
    parser.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
    parser.add_argument("--model", required=True, help="model to evaluate: an HF model directory (e.g. "
                                                       "RUN_DIR/round_1/model), a hub id, or bundled:NAME")
    parser.add_argument("--out", help=f"output directory (default: {default_out})")
    parser.add_argument("--name", help="the model's name in the results (default: from --model, e.g. round_1)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapir", description="TAPIR curriculum distillation on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help=(
        "debug logging; `tapir -v run` also keeps Ray's, vLLM's, DeepSpeed's and transformers' output on the "
        "console instead of RUN_DIR/logs/run.log"))
    commands = parser.add_subparsers(dest="command", required=True)

    config_cmd = commands.add_parser("config", help="check or print a run config").add_subparsers(
        dest="action", required=True)
    validate = config_cmd.add_parser("validate", help="report every error of a config file")
    validate.add_argument("file")
    validate.set_defaults(run=cmd_config_validate)
    show_cmd = config_cmd.add_parser("show", help="print the resolved config, secrets redacted")
    show_cmd.add_argument("file")
    show_cmd.set_defaults(run=cmd_config_show)

    models = commands.add_parser("models", help="bundled models").add_subparsers(dest="action", required=True)
    prepare = models.add_parser("prepare", help="prepare the bundled student and locate the encoder")
    prepare.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
    prepare.add_argument("--verify", action="store_true", help="re-hash a prepared model's files")
    prepare.set_defaults(run=cmd_models_prepare)

    pool = commands.add_parser("pool", help="instruction pools").add_subparsers(dest="action", required=True)
    importer = pool.add_parser("import", help="import instructions into Parquet shards")
    importer.add_argument("sources", nargs="+", help="files or directories ('bundled:sample' for the shipped pool)")
    importer.add_argument("--out", required=True, help="output directory (local path or s3://…)")
    importer.add_argument("--config", help="run config whose pool section gives the defaults")
    importer.add_argument("--format", choices=["auto", "alpaca", "chat", "selfinstruct", "parquet", "hf"])
    importer.add_argument("--id-column")
    importer.add_argument("--rows-per-shard", type=_positive_int)
    importer.add_argument("--max-row-chars", type=_positive_int)
    importer.add_argument("--sample-fraction", type=float, help="import only about this share of the rows, "
                                                                  "chosen by id hash (pool.sample_fraction)")
    importer.add_argument("--overwrite", action="store_true", help="replace a previous import in --out")
    importer.set_defaults(run=cmd_pool_import)

    serve = commands.add_parser("serve-teacher", help="serve the local teacher with vLLM until Ctrl-C")
    serve.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
    serve.add_argument("--port", type=int, help="port (default: teacher.local.port; 0 picks a free one)")
    serve.add_argument("--print-key", action="store_true", help="print the API key clients must send")
    serve.set_defaults(run=cmd_serve_teacher)

    classifier = commands.add_parser("classifier", help="the task classifier").add_subparsers(
        dest="action", required=True)
    for name, run, text in (("label", cmd_classifier_label, "the teacher labels a sample of the pool"),
                            ("train", cmd_classifier_train, "fine-tune the classifier on the teacher's labels (or on "
                                                              "classifier.labels_path)"),
                            ("apply", cmd_classifier_apply, "label the whole pool with the classifier (Ray Data)")):
        command = classifier.add_parser(name, help=text)
        command.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
        command.set_defaults(run=run)
        if name == "apply":
            command.add_argument("--round", type=int, default=0, help="round whose classify/ to write")

    score = commands.add_parser("score", help="score the pool for a round: classify, student, teacher, judge → MFD")
    score.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
    score.add_argument("--round", type=_non_negative_int, default=0, help="round to score (default 0)")
    score.set_defaults(run=cmd_score)

    train = commands.add_parser("train", help="fine-tune the student on a round's training set (Ray Train, DeepSpeed)")
    train.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
    train.add_argument("--round", type=_non_negative_int, default=0, help="round to train (default 0)")
    train.add_argument("--data", help="import this file or directory (any `tapir pool import` format, answers in "
                                      "'output') as the round's training set first")
    train.set_defaults(run=cmd_train)

    run_cmd = commands.add_parser("run", help="all of TAPIR, every round: score, plan, expand, respond, train")
    run_cmd.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
    run_cmd.set_defaults(run=cmd_run)

    evaluation = commands.add_parser("eval", help="evaluate a model on held-out instructions").add_subparsers(
        dest="action", required=True)
    winrate = _eval_parser(evaluation, "winrate", "win rate against reference answers (the file's, else the "
                                                  "teacher's), judged in both orders: raw, length-controlled, per "
                                                  "category", "RUN_DIR/eval/NAME")
    winrate.add_argument("--eval", help="held-out instructions (JSONL/JSON/Parquet: instruction, optional input, "
                                        "output = reference answer, task; default: eval.held_out_path)")
    winrate.add_argument("--rows", type=_positive_int, help="evaluate the file's first N rows (default: "
                                                            "eval.num_rows)")
    winrate.set_defaults(run=cmd_eval_winrate)
    mtbench = _eval_parser(evaluation, "mtbench", "MT-Bench: the model answers multi-turn questions turn after "
                                                  "turn; the judge rates each answer 1-10 (with a reference answer "
                                                  "for math, reasoning, coding); per-category means",
                           "RUN_DIR/eval/NAME-mtbench")
    mtbench.add_argument("--questions", help="questions in MT-Bench's format (JSONL: question_id, category, turns; "
                                             "default: eval.mtbench_questions)")
    mtbench.add_argument("--references", help="reference answers in MT-Bench's format (JSONL: question_id, "
                                              "choices[0].turns; default: eval.mtbench_references)")
    mtbench.set_defaults(run=cmd_eval_mtbench)
    compare = evaluation.add_parser("compare", help="each round's student, the student it started from and a "
                                                    "plain-distillation baseline (trained here: as many random "
                                                    "pool rows, plain teacher answers, the same training) on the "
                                                    "same held-out rows; writes RUN_DIR/eval/compare.parquet and "
                                                    "the report")
    compare.add_argument("config", nargs="?", help="the run's config (default: the bundled local.yaml)")
    compare.add_argument("--eval", help="held-out instructions, as for `tapir eval winrate` (default: "
                                        "eval.held_out_path)")
    compare.add_argument("--rows", type=_positive_int, help="evaluate the file's first N rows (default: "
                                                            "eval.num_rows)")
    compare.set_defaults(run=cmd_eval_compare)

    stop = commands.add_parser("stop", help="ask a running `tapir run` to stop cleanly before its next stage")
    stop.add_argument("config", nargs="?", help="run config (default: the bundled local.yaml)")
    stop.set_defaults(run=cmd_stop)

    report_cmd = commands.add_parser("report", help="write a run's report (HTML page, Markdown and plots) to "
                                                    "RUN_DIR/report/ and print the paths")
    report_cmd.add_argument("run_dir", help="the run directory (storage.run_dir of the run's config)")
    report_cmd.set_defaults(run=cmd_report)

    address_help = "the cluster's job server, http://HEAD:8265 (default: $RAY_ADDRESS); token from $RAY_AUTH_TOKEN"
    submit_cmd = commands.add_parser("submit", help="run `tapir run CONFIG` as a Ray job on a cluster (Ray's job "
                                                    "SDK) and follow its logs; keys stay on the cluster")
    submit_cmd.add_argument("config", help="run config, inside the working dir")
    submit_cmd.add_argument("--address", help=address_help)
    submit_cmd.add_argument("--working-dir", help="uploaded as the job's working dir, where the run starts "
                                                  "(default: the config's directory)")
    submit_cmd.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit_cmd.set_defaults(run=cmd_submit)
    status_cmd = commands.add_parser("status", help="a submitted job's state, times, run directory and error")
    status_cmd.add_argument("job_id")
    status_cmd.add_argument("--address", help=address_help)
    status_cmd.set_defaults(run=cmd_status)
    logs_cmd = commands.add_parser("logs", help="a submitted job's logs")
    logs_cmd.add_argument("job_id")
    logs_cmd.add_argument("--address", help=address_help)
    logs_cmd.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    logs_cmd.set_defaults(run=cmd_logs)

    check = commands.add_parser("check", usage="tapir check [-h] [judge] [CONFIG]", help=(
        "models, pool, local teacher and one chat completion, end to end; `check judge`: only the judge's "
        "calibration (known-quality pairs from the pool; exit status 1 when it cannot tell)"))
    check.add_argument("what", nargs="*", metavar="[judge] [CONFIG]", help=(
        "`judge` to calibrate the judge alone; the run config (default: the bundled local.yaml)"))
    check.set_defaults(run=cmd_check)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except _USER_ERRORS as err:
        if console.log_path():
            traceback.print_exc()       # into the log, beside the output that led to it
        console.error(str(err))
        return 2
    except KeyboardInterrupt:
        print("tapir: interrupted", file=console.terminal(err=True))
        return 130
    except Exception as err:
        if not console.log_path():
            raise
        # the traceback (with a Ray job's remote one) goes to the log; its last line names the error
        traceback.print_exc()
        console.error(f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
