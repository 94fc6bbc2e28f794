"""A run submitted with `tapir submit` to a two-node Ray cluster on this machine, its run directory on s3://, as a
real cluster's is, survives losing a node.

A head and a second node are started with `ray start` on loopback, token authentication on, the teacher's key
and the S3 credentials in the nodes' environment only. The run directory is a bucket of a real S3 API on
loopback (moto's server). `tapir submit` sends a one-round `tapir run`; while the scoring stage has actors on
the second node, every process of that node is SIGKILLed. The job must finish on the head alone (Ray restarts
the lost actors and retries the lost tasks) with every pool row scored, planned and trained on exactly once,
trained with ZeRO-3 on two workers (the layout that shards the weights: the model exported to the bucket must
hold every tensor whole). Every file the round writes must be in the bucket and none on local disk but the
model cache; the same command run again sends nothing, and round 1 scores with the round-0 student copied from
the bucket. The run's failure timeline is printed (docs/benchmarks.md quotes it).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from processes import with_environment
from s3_server import CREDENTIALS, S3Server, moto_s3
from test_run import BATCH, EXPANDED, KEY_ENV, PLANNED, ROWS, teacher_reply, write_config, write_pool

from pipeline.llm.emulated_api import EmulatedAPI

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_CPUS, SECOND_NODE_CPUS = 8, 4      # logical: the head alone can hold every actor of the job
MARKER_ENV = "TAPIR_TEST_NODE"          # set in each node's `ray start`; every process of the node inherits it
BUCKET = "tapir-runs"
RUN = f"{BUCKET}/cluster/run"
SCORING_STAGES = tuple(f"MapWorker(MapBatches({name}))" for name in ("StudentGenerator", "TeacherAnswer", "PairJudge"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """Ray nodes started with `ray start` on this machine, each process of a node findable by its marker."""

    def __init__(self, env: dict):
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}   # `python` in the job's entrypoint: this venv's
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.markers: list[str] = []
        self.second_temp_dir = tempfile.mkdtemp(prefix="tapir-ray2-")    # short: Ray's socket paths live in it

    def _start(self, marker: str, args: list) -> None:
        started = subprocess.run([str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1",
                                  "--object-store-memory", str(400 * 2**20), "--disable-usage-stats",
                                  "--dashboard-agent-listen-port", str(free_port()),
                                  "--dashboard-agent-grpc-port", str(free_port()),
                                  "--runtime-env-agent-port", str(free_port()),
                                  "--metrics-export-port", str(free_port()), *args],
                                 env={**self.env, MARKER_ENV: marker}, capture_output=True, text=True, timeout=180)
        self.markers.append(marker)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]

    def start(self) -> None:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", str(HEAD_CPUS),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(free_port())])
        # a temp dir of its own, as on another machine: both nodes' runtime-env agents would otherwise manage
        # one directory of unpacked working dirs, and the second deletes the one the head's job runs in
        self._start("second", ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(SECOND_NODE_CPUS),
                               "--node-manager-port", str(free_port()), "--temp-dir", self.second_temp_dir])

    def processes(self, marker: str) -> list[psutil.Process]:
        return with_environment(MARKER_ENV, marker)

    def kill(self, marker: str) -> int:
        """SIGKILLs every process of a node at once (raylet, object store, workers, agents): a lost machine."""
        victims = self.processes(marker)
        for process in victims:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return len(victims)

    def state(self, kind: str) -> list[dict]:
        """Ray's state API (nodes, actors, tasks) over HTTP with the cluster's token."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{kind}?limit=10000&detail=1",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["data"]["result"]["result"]

    def shutdown(self) -> None:
        from ray._common.utils import get_ray_address_file

        for marker in reversed(self.markers):
            self.kill(marker)
        # `ray start` leaves the head's address here, and a later ray.init() with no address would join it
        address_file = Path(get_ray_address_file(None))
        if address_file.exists() and address_file.read_text().strip().endswith(f":{self.gcs_port}"):
            address_file.unlink()
        shutil.rmtree(self.second_temp_dir, ignore_errors=True)


def tapir(*args, env, timeout=120, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tapir"), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def read_json(s3: S3Server, path: str):
    """An object of the bucket as JSON, or None while it is not there."""
    try:
        return json.loads(s3.read(path))
    except FileNotFoundError:
        return None


def rows(s3: S3Server, path: str) -> list[dict]:
    return pq.read_table(f"{RUN}/{path}", filesystem=s3.filesystem()).to_pylist()


@dataclass
class SubmittedRun:
    cluster: LoopbackCluster
    api: EmulatedAPI
    s3: S3Server
    tmp_path: Path
    config: Path
    env: dict               # a machine beside the cluster: the cluster's token, the teacher's key, S3 credentials
    job_id: str
    submit_log: Path
    second_node: str
    killed_on_second: list[dict]    # the scoring actors alive on the second node when it was lost
    killed_at_epoch: float
    timeline: dict
    calls: Counter          # the prompts the API answered during the run
    cache: Path             # storage.cache_dir
    student: Path           # the prepared bundled student the round started from


@pytest.fixture(scope="module")
def submitted_run(tmp_path_factory, shared_data, prepared_student):
    tmp_path = tmp_path_factory.mktemp("cluster-run")
    api = EmulatedAPI(latency_s=0.05, reply=teacher_reply)
    with moto_s3() as s3, api.serving_in_thread():
        s3.create_bucket(BUCKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in CREDENTIALS}
        # the keys: on the nodes, as a Secret would be; the submitting machine has neither the teacher's nor S3's
        cluster = LoopbackCluster({**env, KEY_ENV: api.api_key, **CREDENTIALS})
        try:
            cluster.start()
            yield submit_and_lose_a_node(cluster, api, s3, tmp_path, env, shared_data, prepared_student)
        finally:
            cluster.shutdown()


def submit_and_lose_a_node(cluster: LoopbackCluster, api: EmulatedAPI, s3: S3Server, tmp_path: Path, env: dict,
                           shared_data: Path, prepared_student: Path) -> SubmittedRun:
    cache = prepared_student.parent.parent
    config = write_config(
        tmp_path, write_pool(tmp_path, shared_data), api, cache, ray={"address": "auto"},
        storage={"run_dir": f"s3://{RUN}", "s3_endpoint_url": s3.endpoint_url, "cache_dir": str(cache)},
        student={"batch_size": BATCH, "sampling": {"max_tokens": 64}, "num_actors": 2},    # long enough to kill
        curriculum={"rounds": 1, "rows_per_round": PLANNED, "expansion_per_round": EXPANDED, "mfd_threshold": 0.0,
                    "keep_reference_outputs": False},
        # ZeRO-3 on two workers, on the head after the loss: the fewest steps (the killed run tests their resume)
        training={"epochs": 1, "effective_batch_size": 4, "micro_batch_size": 2, "max_len": 256, "eval_fraction": 0.0,
                  "gradient_checkpointing": False, "zero_stage": 3, "num_workers": 2})
    submitter = {**env, "RAY_AUTH_TOKEN": cluster.token}

    # without the token the cluster refuses, and says what to do
    refused = tapir("submit", str(config), "--address", cluster.dashboard, "--no-wait", env=env)
    assert refused.returncode == 2 and "RAY_AUTH_TOKEN" in refused.stderr, refused.stderr[-2000:]

    log = tmp_path / "submit.log"
    started = time.monotonic()
    with open(log, "w") as output:
        submit = subprocess.Popen([str(BIN / "tapir"), "submit", str(config), "--address", cluster.dashboard],
                                  stdout=output, stderr=subprocess.STDOUT, cwd=REPO, env=submitter)
    job_id = wait_for(lambda: re.search(r"submitted job (\S+):", log.read_text()), 120, "the job id").group(1)
    second_node = next(n["node_id"] for n in cluster.state("nodes") if not n["is_head_node"])

    def scoring_actors_on_second_node():
        """Once the student's engines are up (the scoring job is generating): its actors on the second node."""
        state = read_json(s3, f"{RUN}/state.json")
        if not state or state["stage"] != "score":
            return None
        alive = [a for a in cluster.state("actors")
                 if a["state"] == "ALIVE" and a["class_name"].startswith(SCORING_STAGES)]
        generating = any(a["class_name"] == SCORING_STAGES[0] for a in alive)
        return generating and [a for a in alive if a["node_id"] == second_node] or None

    on_second = wait_for(scoring_actors_on_second_node, 900, "scoring actors on the second node", interval_s=0.5)
    assert submit.poll() is None, log.read_text()[-3000:]
    killed_at, killed_at_epoch = time.monotonic(), time.time()
    assert cluster.kill("second") > 0
    scored_files_at_kill = sum(p.endswith(".parquet") for p in s3.files(f"{RUN}/round_0/score"))

    assert submit.wait(timeout=1500) == 0, log.read_text()[-5000:]
    finished_at = time.monotonic()
    score_manifest = s3.filesystem().get_file_info(f"{RUN}/round_0/score/_manifest.json")
    timeline = {"job": job_id, "kill_after_submit_s": round(killed_at - started, 1),
                "score_files_written_at_kill": scored_files_at_kill,
                "score_finished_after_kill_s": round(score_manifest.mtime.timestamp() - killed_at_epoch, 1),
                "job_finished_after_kill_s": round(finished_at - killed_at, 1)}
    return SubmittedRun(cluster, api, s3, tmp_path, config, {**submitter, KEY_ENV: api.api_key, **CREDENTIALS},
                        job_id, log, second_node, on_second, killed_at_epoch, timeline,
                        Counter(api.stats.answered_prompts), cache, prepared_student)


@pytest.mark.timeout(1800)     # the module's run: a node lost, a round on s3, ZeRO-3 on two workers
def test_a_submitted_run_finishes_after_losing_a_node_mid_stage_with_every_row_once(submitted_run):
    run, cluster, api, s3 = submitted_run, submitted_run.cluster, submitted_run.api, submitted_run.s3
    job_id, submitter = run.job_id, run.env

    # the job: done, its status and logs readable, no key in anything the cluster shows of it
    status = tapir("status", job_id, "--address", cluster.dashboard, env=submitter)
    assert status.returncode == 0 and f"job {job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    assert f"keys read on the cluster from: {KEY_ENV}" in status.stdout
    unknown = tapir("logs", "no-such-job", "--address", cluster.dashboard, env=submitter)
    assert unknown.returncode == 2 and "no job no-such-job on this cluster" in unknown.stderr, unknown.stderr
    logs = tapir("logs", job_id, "--address", cluster.dashboard, env=submitter)
    assert logs.returncode == 0 and "run finished: 1 round(s)" in logs.stdout, logs.stdout[-3000:]
    assert f"report: s3://{RUN}/report/report.html" in logs.stdout
    request = urllib.request.Request(f"{cluster.dashboard}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        job_info = response.read().decode()
    secrets = [api.api_key, CREDENTIALS["AWS_SECRET_ACCESS_KEY"]]
    assert not [s for s in secrets if s in job_info or s in logs.stdout or s in run.submit_log.read_text()]

    # Ray recovered: what ran on the lost node was restarted (actors) or retried (tasks) on the head
    actors, tasks = cluster.state("actors"), cluster.state("tasks")
    killed = {a["actor_id"] for a in run.killed_on_second}
    killed_classes = {a["class_name"] for a in run.killed_on_second}
    assert not [a for a in actors if a["node_id"] == run.second_node and a["state"] == "ALIVE"]
    created_after_kill = {t["actor_id"]: t for t in tasks if t["type"] == "ACTOR_CREATION_TASK"
                          and (t.get("start_time_ms") or t.get("creation_time_ms") or 0) / 1000 > run.killed_at_epoch}
    restarted = [a for a in actors if a["class_name"] in killed_classes and a["node_id"] != run.second_node
                 and (a["actor_id"] in created_after_kill or (a["actor_id"] in killed and int(a["num_restarts"])))]
    retried = [t for t in tasks if t.get("attempt_number", 0) > 0]
    limits = [a for a in actors if a["class_name"] == "LimitsActor"]

    # every row exactly once, in every stage's output
    instructions = [json.loads(line)["instruction"] for line in (run.tmp_path / "pool.jsonl").read_text().splitlines()]
    scored = pads.dataset(f"{RUN}/round_0/score", format="parquet", filesystem=s3.filesystem()).to_table().to_pylist()
    assert len(scored) == ROWS == len(instructions)
    assert Counter(r["id"] for r in scored).most_common(1)[0][1] == 1
    assert sorted(r["instruction"] for r in scored) == sorted(instructions)
    assert all(r["student_response"] is not None for r in scored)
    # the plan draws hard rows with repeats by design: the training set holds each planned row as often as
    # the plan does, and each kept new instruction once
    plan = {r["id"]: r["copies"] for r in rows(s3, "round_0/plan/plan.parquet")}
    train, new_rows = rows(s3, "round_0/train/part-0.parquet"), rows(s3, "round_0/expand/new_rows.parquet")
    assert sum(plan.values()) == PLANNED and Counter(r["id"] for r in train if r["origin"] == "pool") == plan
    assert sorted(r["id"] for r in train if r["origin"] == "expansion") == sorted(
        r["id"] for r in new_rows if r["status"] == "ok")
    state = json.loads(s3.read(f"{RUN}/state.json"))
    assert state["status"] == "finished" and state["spent_usd"] > 0
    assert state["rounds"]["0"]["finished"] == ["score", "plan", "expand", "respond", "train_set", "train"]

    # paid calls sent more than once: the batches in flight on the lost node (and blocks it held) asked again
    repeated = {prompt: n for prompt, n in api.stats.answered_prompts.items() if n > 1}

    def started_after_kill(actor) -> float:
        creation = created_after_kill[actor["actor_id"]]
        return round((creation.get("start_time_ms") or creation["creation_time_ms"]) / 1000 - run.killed_at_epoch, 1)

    print(json.dumps({
        **run.timeline, "killed_actors": sorted(killed_classes),
        "restarted_actors_started_after_kill_s": sorted(
            (a["class_name"], started_after_kill(a)) for a in restarted if a["actor_id"] in created_after_kill),
        "retried_tasks": sorted(Counter(t["name"] for t in retried).items()),
        "paid_calls": sum(run.calls.values()), "paid_calls_repeated": sum(n - 1 for n in repeated.values()),
        "stage_s": dict(re.findall(r"round 0: (\w+) done in ([\d.]+) s", logs.stdout)),
    }, indent=1))
    assert restarted or retried, [(a["class_name"], a["state"], a["num_restarts"]) for a in actors]
    # the run's spend and rate windows lived on the driver's node and were not lost with the other one
    assert [(a["node_id"] != run.second_node, a["num_restarts"]) for a in limits] == [(True, "0")]
    # fewer than one pass of scoring's three calls a row: no stage started over
    assert sum(n - 1 for n in repeated.values()) < 2 * ROWS, repeated


@pytest.mark.timeout(600)
def test_the_round_writes_every_stage_manifest_model_and_report_to_the_bucket(submitted_run):
    s3, run = submitted_run.s3, submitted_run
    names = {path.removeprefix(RUN + "/") for path in s3.files(RUN)}
    manifests = {stage: json.loads(s3.read(f"{RUN}/round_0/{stage}/_manifest.json"))
                 for stage in ("score", "plan", "expand", "respond", "train", "sft")}
    assert manifests["score"]["complete"] and manifests["score"]["rows_out"] == ROWS
    assert manifests["plan"]["rows_planned"] == PLANNED
    assert manifests["sft"]["complete"] and manifests["sft"]["model"] == f"s3://{RUN}/round_0/model"
    assert manifests["sft"]["smoke"][0]["status"] == "ok"         # vLLM answered from the model in the bucket

    expected = {"pool/_manifest.json", "pool/part-00000.parquet", "pool/part-00001.parquet",
                "classifier/labels/_manifest.json", "classifier/model/config.json",
                "classifier/model/model.safetensors", "classifier/model/metrics.json",
                "classifier/model/confusion.png",
                "round_0/plan/plan.parquet", "round_0/expand/new_rows.parquet", "round_0/expand/seeds/seeds.parquet",
                "round_0/train/part-0.parquet", "round_0/train/_manifest.json",
                "round_0/sft/metrics.jsonl", "round_0/sft/loss.png", "round_0/sft/data/_manifest.json",
                "round_0/model/config.json", "round_0/model/model.safetensors", "round_0/model/tokenizer.json",
                "round_0/summary.json", "round_0/summary.txt", "state.json",
                "report/report.html", "report/report.md"}
    assert expected <= names, sorted(expected - names)
    for stage in ("score", "expand/generated", "respond/answers", "sft/data/tokenized", "sft/data/packed/train"):
        assert any(n.startswith(f"round_0/{stage}/") and n.endswith(".parquet") for n in names), stage
    assert any(n.startswith("round_0/sft/tensorboard/") for n in names)
    assert sum(n.startswith("report/plots/") and n.endswith(".png") for n in names) >= 4
    # the stages' resume checkpoints and Ray Train's are deleted once their stage is done
    assert not [n for n in names if n.startswith("round_0/checkpoint/")], sorted(names)

    steps = [json.loads(line) for line in s3.read(f"{RUN}/round_0/sft/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == list(range(1, manifests["sft"]["steps"]
                                                                             ["total_steps"] + 1))
    assert json.loads(s3.read(f"{RUN}/round_0/model/config.json"))["model_type"] == "llama"
    # ZeRO-3 on two workers: each worker's micro-batch counts, and the export gathered whole tensors
    plan = manifests["sft"]["steps"]
    assert plan["effective_batch_size"] == 4 and plan["accumulation_steps"] == 1
    trained = safetensors.torch.load(s3.read(f"{RUN}/round_0/model/model.safetensors"))
    base = safetensors.torch.load_file(run.student / "model.safetensors")
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.timeout(600)
def test_nothing_of_the_run_lands_on_local_disk_and_no_secret_in_the_bucket(submitted_run):
    s3, run = submitted_run.s3, submitted_run
    # beside the config the job was given: only what the test wrote (the pool, the submission's output)
    assert {p.name for p in run.tmp_path.iterdir()} == {"config.yaml", "pool.jsonl", "submit.log"}
    # the only local files: the model cache (the prepared student, and copies of models from the bucket)
    stored = run.cache / "models" / "stored"
    assert {p.name.rsplit("-", 1)[0] for p in stored.iterdir() if p.is_dir()} >= {"round_0-model", "classifier-model"}
    secrets = [run.api.api_key, CREDENTIALS["AWS_SECRET_ACCESS_KEY"], CREDENTIALS["AWS_ACCESS_KEY_ID"]]
    for path in s3.files(RUN):
        data = s3.read(path)
        assert not [secret for secret in secrets if secret.encode() in data], path


@pytest.mark.timeout(600)
def test_the_run_run_again_from_another_machine_is_finished_and_sends_nothing(submitted_run, tmp_path):
    # `tapir run` where the submitter is, joining the cluster: a relative local path would land in its cwd
    again = tapir("run", str(submitted_run.config), env=submitted_run.env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "run finished: 1 round(s)" in again.stdout
    assert Counter(submitted_run.api.stats.answered_prompts) == submitted_run.calls
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(900)
def test_round_1_scores_with_the_round_0_student_copied_from_the_bucket(submitted_run, tmp_path):
    s3 = submitted_run.s3
    scored = tapir("score", str(submitted_run.config), "--round", "1", env=submitted_run.env, cwd=tmp_path,
                   timeout=600)
    assert scored.returncode == 0, scored.stdout[-2000:] + scored.stderr[-3000:]
    manifest = json.loads(s3.read(f"{RUN}/round_1/score/_manifest.json"))
    assert manifest["complete"] and manifest["rows_out"] == ROWS
    scored_rows = [row for path in s3.files(f"{RUN}/round_1/score") if path.endswith(".parquet")
                   for row in pq.read_table(path, filesystem=s3.filesystem()).to_pylist()]
    assert {row["teacher_source"] for row in scored_rows} == {"earlier_round"}      # no teacher call paid again
    assert all(row["student_status"] in ("ok", "too_long") for row in scored_rows)
    assert list(tmp_path.iterdir()) == []
