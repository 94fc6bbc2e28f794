"""One round's machinery on pools of 10K, 100K and 1M rows: each stage's wall time, the driver's peak memory, the
object store's peak and spill, and how they grow with the pool.

The pool: row k's instruction is made as bench_dedup.py makes a pool row (the head of one of the 4175 real Alpaca
and Self-Instruct instructions followed by spans of words from real responses: instruction-shaped and mostly
distinct over a million rows, so ids and the near-duplicate filter behave as on real data); its input and
reference output are those of Alpaca row k mod 4000 (real lengths for the tokenizer).

The stages are the pipeline's own functions, in a round's order, on a run directory of their own: pool import
(pool.import_pool), score (scoring.score: one checkpointed Ray Data job), plan (planning.plan), expand
(expansion.expand, with its near-duplicate filter against the whole pool), respond (responding.respond), the
training set (planning.write_training_set) and the SFT data preparation (training/sft_data.prepare: the real
SmolLM2 tokenizer, then packing). What stands in, because model compute is not what is measured and cannot run
at this size on 2 cores, is named in the results as such:
- STAND-IN classifier: a hash of the row's id picks its task (the real MiniLM classifier runs ~43 rows/s per
  actor here, docs/benchmarks.md "Classify-stage throughput"; the extrapolation is in the results);
- STAND-IN student and judge: the student's answer is the reference output's first 30 words, and the judge's
  MFD a hash of the id in [-3, 5) (the real ones are vLLM engines and two judge calls per row);
- the teacher is the loopback API (pipeline/llm/emulated_api.py) at limits no stage reaches (10M requests a
  minute), through the real client and the run's limits actor; in scoring, the pool's reference outputs are kept
  (the default: no call); expand and respond call it. Its expansion replies are pool-like rows (fresh text, a few
  near-duplicates by chance, as a teacher's) and its answers Alpaca outputs.

Round sizes: rows_per_round = pool / 20 (50K at 1M), expansion_per_round = 1000 at every size (so the
near-duplicate filter's cost shows how the pool's size weighs), scoring.batch_size 256.

Each size runs in a process of its own (its own Ray), which samples every 0.5 s its own RSS and Ray's object store
(plasma in use, spilled). --resume-at ROWS also kills that size's scoring job with SIGKILL once about half its rows
are written, runs the same stages again, and reports how long the resumed command took to write its first new
file of scored rows and its peak memory (driver and the Ray processes together).

    nice -n 19 .venv/bin/python benchmarks/bench_scale.py --sizes 10000 100000 1000000 --resume-at 1000000 \
        --out benchmarks/results/scale.json
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_dedup import Sources, make_row  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
KEY_ENV = "TAPIR_BENCH_SCALE_KEY"
STAGES = ("import", "score", "plan", "expand", "respond", "train_set", "sft_prep")
EXPANSION = 1000


# --- the pool ------------------------------------------------------------------------------------------------

def write_pool(path: Path, rows: int, seed: int = 0) -> None:
    sources = Sources(DATA)
    alpaca = [json.loads(line) for line in (DATA / "alpaca_dev_4000.jsonl").open()]
    with path.open("w") as out:
        for start in range(0, rows, 10_000):
            rng = random.Random(f"{seed}-pool-{start}")
            out.write("".join(json.dumps({"instruction": make_row(rng, sources),
                                          "input": alpaca[k % len(alpaca)]["input"],
                                          "output": alpaca[k % len(alpaca)]["output"]}) + "\n"
                              for k in range(start, min(rows, start + 10_000))))


def emulated_reply(sources: Sources, outputs: list[str]):
    """The loopback teacher's replies: an expansion request gets a pool-like row, a new one each time (a seed is
    expanded more than once, and a sampling teacher writes a different row each time); anything else an Alpaca
    output."""
    sampled = itertools.count()

    def reply(body: dict) -> str:
        if body.get("temperature", 0) > 0:          # expansion requests are the only ones sampled (temperature 0.7)
            return make_row(random.Random(f"expansion-{next(sampled)}"), sources)
        return outputs[zlib.crc32(json.dumps(body.get("messages", []), sort_keys=True).encode()) % len(outputs)]
    return reply


# --- stand-ins for model compute --------------------------------------------------------------------------------

def _hash_unit(ids: pa.ChunkedArray | pa.Array) -> list[float]:
    return [zlib.crc32(i.encode()) / 2 ** 32 for i in ids.to_pylist()]


def standin_classified(dataset, config, model, teacher):
    """STAND-IN for the classify stage: task from a hash of the id, over the configured categories."""
    tasks = sorted(config.curriculum.task_targets)

    def label(batch: pa.Table) -> pa.Table:
        units = _hash_unit(batch.column("id"))
        return (batch.append_column("task", pa.array([tasks[int(u * len(tasks))] for u in units], pa.string()))
                .append_column("task_confidence", pa.array([0.5 + u / 2 for u in units], pa.float32())))
    return dataset.map_batches(label, batch_format="pyarrow", batch_size=config.classifier.batch_size)


def standin_generate(dataset, model, config, *args, **kwargs):
    """STAND-IN for the student's vLLM engines: the reference output's first 30 words."""
    def answer(batch: pa.Table) -> pa.Table:
        texts = [" ".join((o or "").split()[:30]) for o in batch.column("output").to_pylist()]
        return (batch.append_column("student_response", pa.array(texts, pa.string()))
                .append_column("student_status", pa.array(["ok"] * len(texts), pa.string())))
    return dataset.map_batches(answer, batch_format="pyarrow", batch_size=256)


def standin_judged(dataset, *args, **kwargs):
    """STAND-IN for the judge stage (two calls per row): MFD from a hash of the id, in [-3, 5)."""
    def judge(batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        columns = {"status": pa.array(["ok"] * n, pa.string()), "error": pa.nulls(n, pa.string()),
                   "mfd": pa.array([8 * u - 3 for u in _hash_unit(batch.column("id"))], pa.float64()),
                   "student_tokens": pa.array([30] * n, pa.int32()),
                   "judge_prompt_tokens": pa.array([0] * n, pa.int32()),
                   "judge_completion_tokens": pa.array([0] * n, pa.int32())}
        for name, values in columns.items():
            batch = batch.append_column(name, values)
        return batch
    return dataset.map_batches(judge, batch_format="pyarrow", batch_size=256)


def install_standins() -> None:
    from pipeline import expansion, scoring
    from pipeline.stages import judge, student

    scoring.ensure_classifier = lambda *args, **kwargs: "stand-in"
    scoring.classified = expansion.classified = standin_classified
    expansion.classifier_model = lambda config: "stand-in"
    student.generate = standin_generate
    judge.judged = standin_judged


# --- sampling memory ------------------------------------------------------------------------------------------

class Sampler:
    """Every `period` s: this process's RSS, the RSS of its Ray (every process of the session), and the object
    store's use and spill; peaks kept per stage."""

    def __init__(self, period: float = 0.5):
        self.period, self.peaks, self.stage = period, {}, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def begin(self, stage: str) -> None:
        self.stage = stage
        self.peaks[stage] = {"driver_rss_mb": 0.0, "ray_rss_mb": 0.0, "store_used_mb": 0.0, "spilled_mb": 0.0}

    def _run(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(self.period):
            if self.stage is None:
                continue
            sample = {"driver_rss_mb": me.memory_info().rss / 2 ** 20, **ray_memory()}
            for key, value in sample.items():
                peak = self.peaks[self.stage]
                peak[key] = round(max(peak.get(key, 0.0), value), 1)


@functools.lru_cache(maxsize=1)
def _ray_state():
    import ray
    from ray._private.internal_api import get_state_from_address

    # this process's Ray by its address: other agents' Ray sessions may run on the machine too
    return get_state_from_address(ray.get_runtime_context().gcs_address)


def ray_memory() -> dict:
    """RSS of this process's Ray (its GCS, raylet and workers: all descendants of this process; other agents' Ray
    sessions on the machine are not), and the object store's use and spill (MB)."""
    import ray

    if not ray.is_initialized():
        return {}
    rss = 0
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            rss += process.memory_info().rss
    out = {"ray_rss_mb": rss / 2 ** 20}
    with contextlib.suppress(Exception):         # Ray has no public form of these; the numbers are for the report
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(_ray_state(), timeout_seconds=5).store_stats
        out["store_used_mb"] = stats.object_store_bytes_used / 2 ** 20
        out["spilled_mb"] = stats.spilled_bytes_total / 2 ** 20
    return out


# --- one size, in a process of its own ------------------------------------------------------------------------

def write_config(work: Path, rows: int, api) -> Path:
    endpoint = {"kind": "remote", "base_url": api.base_url, "model": "loopback-teacher", "api_key_env": KEY_ENV,
                "requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000, "max_concurrency": 64}
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump({
        "pool": {"source": str(work / "pool.jsonl")}, "storage": {"run_dir": str(work / "run")},
        "ray": {"num_cpus": 4}, "teacher": endpoint, "scoring": {"batch_size": 256},
        "curriculum": {"rows_per_round": rows // 20, "expansion_per_round": EXPANSION}}))
    return path


def child(work: Path, rows: int) -> None:
    from pipeline import expansion, planning, responding, scoring
    from pipeline.config import load_config
    from pipeline.llm.emulated_api import EmulatedAPI
    from pipeline.llm.endpoint import RunEndpoints
    from pipeline.pool import MANIFEST, import_pool, pool_location
    from training import sft_data

    install_standins()
    sources = Sources(DATA)
    outputs = [json.loads(line)["output"] for line in (DATA / "alpaca_dev_4000.jsonl").open()]
    api = EmulatedAPI(requests_per_minute=10_000_000, tokens_per_minute=10_000_000_000,
                      reply=emulated_reply(sources, outputs))
    os.environ[KEY_ENV] = api.api_key
    results_path = work / "stages.jsonl"
    sampler = Sampler()
    with api.serving_in_thread(), contextlib.ExitStack() as stack:
        config = load_config(write_config(work, rows, api))
        endpoints = RunEndpoints(config.teacher, config.judge, config.storage.cache_dir, stack)
        new_rows = None

        def step(name: str, work_fn) -> None:
            sampler.begin(name)
            started = time.perf_counter()
            summary = work_fn()
            wall = time.perf_counter() - started
            time.sleep(2 * sampler.period)
            record = {"stage": name, "wall_s": round(wall, 2), **sampler.peaks[name],
                      "skipped": bool(isinstance(summary, dict) and summary.get("skipped")),
                      "operators": summary.get("stages") if isinstance(summary, dict) else None}
            with results_path.open("a") as out:
                out.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items() if k != "operators"}), flush=True)

        pool_dir = pool_location(config)
        if not pool_dir.child(MANIFEST).exists():         # a resumed command finds the pool imported
            step("import", lambda: import_pool([config.pool.source], pool_dir, config.pool, overwrite=True,
                                               progress=False).as_dict())
        step("score", lambda: scoring.score(config, 0, progress=False, endpoints=endpoints))
        step("plan", lambda: planning.plan(config, 0))
        step("expand", lambda: expansion.expand(config, 0, endpoints))
        new_rows = expansion.read_new_rows(config, 0)
        step("respond", lambda: responding.respond(config, 0, new_rows, endpoints))
        step("train_set", lambda: planning.write_training_set(config, 0, new_rows,
                                                              responding.read_answers(config, 0)))
        step("sft_prep", lambda: sft_data.prepare(config, 0, scoring.student_model(config, 0)))
    sampler.stop.set()


# --- the driver of the benchmark --------------------------------------------------------------------------------

def run_size(work: Path, rows: int, resume: bool) -> dict:
    shutil.rmtree(work, ignore_errors=True)        # a fresh run: one left from an earlier call would be skipped
    work.mkdir(parents=True)
    started = time.perf_counter()
    write_pool(work / "pool.jsonl", rows)
    result = {"rows": rows, "pool_file_s": round(time.perf_counter() - started, 1),
              "pool_file_mb": round((work / "pool.jsonl").stat().st_size / 2 ** 20, 1)}
    command = [sys.executable, __file__, "--child", str(work), "--rows", str(rows)]
    log = (work / "child.log").open("a")
    if resume:
        result["resume"] = kill_and_resume(work, rows, command, log)
    else:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    result["stages"] = [json.loads(line) for line in (work / "stages.jsonl").open()]
    return result


def scored_files(work: Path) -> set[str]:
    return {p.name for p in (work / "run" / "round_0" / "score").glob("*.parquet")}


def scored_rows(work: Path, files: set[str]) -> int:
    """Rows in the scored files whose footer is written; a file still being written is counted at the next look."""
    rows = 0
    for name in files:
        with contextlib.suppress(pa.ArrowInvalid, FileNotFoundError):
            rows += pq.read_metadata(work / "run" / "round_0" / "score" / name).num_rows
    return rows


def kill_and_resume(work: Path, rows: int, command: list[str], log) -> dict:
    """SIGKILL of the command in the middle of its scoring job (about half the pool's rows written), then the same
    command again: seconds until its first new file of scored rows, and the peak memory of the resumed command."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    expected_files = None
    while process.poll() is None:
        time.sleep(1)
        files = scored_files(work)
        written = scored_rows(work, files)
        if written >= rows // 2:
            expected_files = len(files)
            break
    if expected_files is None:
        raise RuntimeError(f"{work}: the command ended before half the pool was scored")
    os.killpg(process.pid, signal.SIGKILL)         # the driver and the Ray it started, as a lost machine would
    process.wait()
    time.sleep(3)
    before = scored_files(work)
    rows_before = scored_rows(work, before)
    (work / "stages.jsonl").unlink(missing_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    first_new, peak_tree = None, 0
    while process.poll() is None:
        time.sleep(0.5)
        with contextlib.suppress(psutil.Error):
            tree = [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True)
            peak_tree = max(peak_tree, sum(p.memory_info().rss for p in tree if p.is_running()))
        if first_new is None and scored_files(work) - before:
            first_new = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{work}: the resumed command failed ({process.returncode}); see {work / 'child.log'}")
    return {"rows_written_before_kill": rows_before, "files_before_kill": len(before),
            "first_new_file_s": round(first_new, 1) if first_new is not None else None,
            "resumed_command_s": round(time.perf_counter() - started, 1),
            "resumed_peak_rss_all_processes_mb": round(peak_tree / 2 ** 20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--resume-at", type=int, help="kill -9 and resume the scoring job at this size")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tapir-bench-scale"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rows)
        return
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB", "load_before": os.getloadavg(),
               "sizes": []}
    for rows in args.sizes:
        results["sizes"].append(run_size(args.work / str(rows), rows, rows == args.resume_at))
        results["load_after"] = os.getloadavg()
        print(json.dumps(results["sizes"][-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
