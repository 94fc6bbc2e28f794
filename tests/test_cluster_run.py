"""A run submitted with `tapir submit` to a two-node Ray cluster on this machine survives losing a node.

A head and a second node are started with `ray start` on loopback, token authentication on, the teacher's key
in the nodes' environment only. `tapir submit` sends a one-round `tapir run`; while the scoring stage has
actors on the second node, every process of that node is SIGKILLed. The job must finish on the head alone
(Ray restarts the lost actors and retries the lost tasks) with every pool row scored, planned and trained on
exactly once. The test prints the failure's timeline (docs/benchmarks.md quotes it).
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
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from processes import with_environment
from test_run import BATCH, EXPANDED, KEY_ENV, PLANNED, ROWS, teacher_reply, write_config, write_pool

from pipeline.llm.emulated_api import EmulatedAPI

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_CPUS, SECOND_NODE_CPUS = 8, 4      # logical: the head alone can hold every actor of the job
MARKER_ENV = "TAPIR_TEST_NODE"          # set in each node's `ray start`; every process of the node inherits it
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


@pytest.fixture
def cluster(tmp_path):
    api = EmulatedAPI(latency_s=0.05, reply=teacher_reply)
    with api.serving_in_thread():
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        cluster = LoopbackCluster({**env, KEY_ENV: api.api_key})      # the key: on the nodes, as a Secret would be
        try:
            cluster.start()
            yield cluster, api, env
        finally:
            cluster.shutdown()


def tapir(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tapir"), *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.mark.timeout(1800)
def test_a_submitted_run_finishes_after_losing_a_node_mid_stage_with_every_row_once(
        cluster, tmp_path, shared_data, prepared_student):
    cluster, api, env = cluster
    config = write_config(
        tmp_path, write_pool(tmp_path, shared_data), api, prepared_student.parent.parent, ray={"address": "auto"},
        student={"batch_size": BATCH, "sampling": {"max_tokens": 64}, "num_actors": 2},    # long enough to kill
        curriculum={"rounds": 1, "rows_per_round": PLANNED, "expansion_per_round": EXPANDED, "mfd_threshold": 0.0,
                    "keep_reference_outputs": False},
        # one round's training on the head after the loss: the fewest steps (the killed run tests their resume)
        training={"epochs": 1, "effective_batch_size": 4, "micro_batch_size": 2, "max_len": 256, "eval_fraction": 0.0,
                  "gradient_checkpointing": False})
    run = tmp_path / "run"
    submitter = {**env, "RAY_AUTH_TOKEN": cluster.token}         # the submitting machine has no teacher key

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
        if not (run / "state.json").exists() or json.loads((run / "state.json").read_text())["stage"] != "score":
            return None
        alive = [a for a in cluster.state("actors")
                 if a["state"] == "ALIVE" and a["class_name"].startswith(SCORING_STAGES)]
        generating = any(a["class_name"] == SCORING_STAGES[0] for a in alive)
        return generating and [a for a in alive if a["node_id"] == second_node] or None

    on_second = wait_for(scoring_actors_on_second_node, 900, "scoring actors on the second node", interval_s=0.5)
    assert submit.poll() is None, log.read_text()[-3000:]
    killed_at, killed_at_epoch = time.monotonic(), time.time()
    assert cluster.kill("second") > 0
    scored_files_at_kill = len(list((run / "round_0" / "score").glob("*.parquet")))

    assert submit.wait(timeout=1500) == 0, log.read_text()[-5000:]
    finished_at = time.monotonic()

    # the job: done, its status and logs readable, no key in anything the cluster shows of it
    status = tapir("status", job_id, "--address", cluster.dashboard, env=submitter)
    assert status.returncode == 0 and f"job {job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    assert f"keys read on the cluster from: {KEY_ENV}" in status.stdout
    unknown = tapir("logs", "no-such-job", "--address", cluster.dashboard, env=submitter)
    assert unknown.returncode == 2 and "no job no-such-job on this cluster" in unknown.stderr, unknown.stderr
    logs = tapir("logs", job_id, "--address", cluster.dashboard, env=submitter)
    assert logs.returncode == 0 and "run finished: 1 round(s)" in logs.stdout, logs.stdout[-3000:]
    request = urllib.request.Request(f"{cluster.dashboard}/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        job_info = response.read().decode()
    assert api.api_key not in job_info and api.api_key not in logs.stdout and api.api_key not in log.read_text()

    # Ray recovered: what ran on the lost node was restarted (actors) or retried (tasks) on the head
    actors, tasks = cluster.state("actors"), cluster.state("tasks")
    killed = {a["actor_id"] for a in on_second}
    killed_classes = {a["class_name"] for a in on_second}
    assert not [a for a in actors if a["node_id"] == second_node and a["state"] == "ALIVE"]
    created_after_kill = {t["actor_id"]: t for t in tasks if t["type"] == "ACTOR_CREATION_TASK"
                          and (t.get("start_time_ms") or t.get("creation_time_ms") or 0) / 1000 > killed_at_epoch}
    restarted = [a for a in actors if a["class_name"] in killed_classes and a["node_id"] != second_node
                 and (a["actor_id"] in created_after_kill or (a["actor_id"] in killed and int(a["num_restarts"])))]
    retried = [t for t in tasks if t.get("attempt_number", 0) > 0]
    limits = [a for a in actors if a["class_name"] == "LimitsActor"]

    # every row exactly once, in every stage's output
    instructions = [json.loads(line)["instruction"] for line in (tmp_path / "pool.jsonl").read_text().splitlines()]
    scored = pads.dataset(run / "round_0" / "score", format="parquet").to_table().to_pylist()
    assert len(scored) == ROWS == len(instructions)
    assert Counter(r["id"] for r in scored).most_common(1)[0][1] == 1
    assert sorted(r["instruction"] for r in scored) == sorted(instructions)
    assert all(r["student_response"] is not None for r in scored)
    # the plan draws hard rows with repeats by design: the training set holds each planned row as often as
    # the plan does, and each kept new instruction once
    plan = {r["id"]: r["copies"] for r in pq.read_table(run / "round_0" / "plan" / "plan.parquet").to_pylist()}
    train = pq.read_table(run / "round_0" / "train" / "part-0.parquet").to_pylist()
    new_rows = pq.read_table(run / "round_0" / "expand" / "new_rows.parquet").to_pylist()
    assert sum(plan.values()) == PLANNED and Counter(r["id"] for r in train if r["origin"] == "pool") == plan
    assert sorted(r["id"] for r in train if r["origin"] == "expansion") == sorted(
        r["id"] for r in new_rows if r["status"] == "ok")
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "finished" and (run / "round_0" / "model" / "config.json").exists()

    # paid calls sent more than once: the batches in flight on the lost node (and blocks it held) asked again
    repeated = {prompt: n for prompt, n in api.stats.answered_prompts.items() if n > 1}

    def started_after_kill(actor) -> float:
        creation = created_after_kill[actor["actor_id"]]
        return round((creation.get("start_time_ms") or creation["creation_time_ms"]) / 1000 - killed_at_epoch, 1)

    print(json.dumps({
        "job": job_id, "kill_after_submit_s": round(killed_at - started, 1),
        "killed_actors": sorted(killed_classes), "score_files_written_at_kill": scored_files_at_kill,
        "restarted_actors_started_after_kill_s": sorted(
            (a["class_name"], started_after_kill(a)) for a in restarted if a["actor_id"] in created_after_kill),
        "score_finished_after_kill_s": round(
            (run / "round_0" / "score" / "_manifest.json").stat().st_mtime - killed_at_epoch, 1),
        "retried_tasks": sorted(Counter(t["name"] for t in retried).items()),
        "job_finished_after_kill_s": round(finished_at - killed_at, 1),
        "paid_calls": sum(api.stats.answered_prompts.values()),
        "paid_calls_repeated": sum(n - 1 for n in repeated.values()),
        "stage_s": dict(re.findall(r"round 0: (\w+) done in ([\d.]+) s", logs.stdout)),
    }, indent=1))
    assert restarted or retried, [(a["class_name"], a["state"], a["num_restarts"]) for a in actors]
    # the run's spend and rate windows lived on the driver's node and were not lost with the other one
    assert [(a["node_id"] != second_node, a["num_restarts"]) for a in limits] == [(True, "0")]
    # fewer than one pass of scoring's three calls a row: no stage started over
    assert sum(n - 1 for n in repeated.values()) < 2 * ROWS, repeated
