"""Starting a local Ray, or joining a cluster, as the run config says."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

from pipeline import store
from pipeline.config import RayConfig, RunConfig

log = logging.getLogger(__name__)


def init_ray(config: RayConfig, min_cpus: int = 1) -> None:
    """`min_cpus`: logical CPUs the job cannot run with less of. Ray Data actors hold their CPU for the whole
    job, and a read or write task that finds none left waits forever; a local Ray is given at least this many
    (logical CPUs are scheduling slots: a laptop's cores are shared anyway)."""
    import ray

    if ray.is_initialized():
        return
    # A driver that joins a running cluster (a submitted job, ray.address: auto) and imports torch afterwards
    # dies in libtorch_cpu's MKL start-up ("Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"); imported
    # first, it loads. Workers are unaffected. Seen with ray 2.60 and torch 2.13.0+cpu.
    import torch  # noqa: F401
    # RAY_ADDRESS: Ray's own way to name a cluster, and how a job submitted to one (`tapir submit`) finds it
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=config.namespace)
    else:
        num_cpus = max(config.num_cpus or os.cpu_count() or 1, min_cpus)
        if config.num_cpus and num_cpus > config.num_cpus:
            log.info("local Ray gets %d logical CPUs, not ray.num_cpus=%d: the job's actors hold %d and its "
                     "read and write tasks need more", num_cpus, config.num_cpus, min_cpus - 2)
        _start_local_ray(num_cpus, config.namespace)
    ray.data.DataContext.get_current().enable_progress_bars = True
    # Ray Data 2.60's default Parquet reader (datasource V2) spends a constant 7-12 s listing even one local file:
    # its ListFiles task waits with next to no CPU. V1, still Ray's documented alternative, read the same in
    # 0.6 s (benchmarks/bench_parquet_read.py). Every stage's job starts with a read, as do Ray Train's datasets.
    ray.data.DataContext.get_current().use_datasource_v2 = False


def _start_local_ray(num_cpus: int, namespace: str) -> None:
    """A local Ray whose own processes know its address. Ray's helpers that find "the" cluster by themselves
    (Ray Train's placement-group cleaner asks the state API with no address) fail with "Found multiple active
    Ray instances" beside another run or a test's Ray, and could ask another instance's dashboard about this
    run's actors. So the GCS gets a port chosen here, every worker gets it in RAY_ADDRESS, and the dashboard
    address the cluster records is a free port of its own (no dashboard runs: the state API then answers
    "unavailable", which the cleaner waits out). `address="local"`: with no address Ray joins the cluster a
    `ray start` on this machine left in its address file, and refuses the num_cpus given here."""
    import ray

    gcs_port, dashboard_port = _free_port(), _free_port()
    address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    previous = os.environ.get(_GCS_PORT_VARIABLE)
    os.environ[_GCS_PORT_VARIABLE] = str(gcs_port)
    try:
        ray.init(address="local", num_cpus=num_cpus, namespace=namespace, include_dashboard=False,
                 dashboard_port=dashboard_port, runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    finally:
        if previous is None:
            os.environ.pop(_GCS_PORT_VARIABLE)
        else:
            os.environ[_GCS_PORT_VARIABLE] = previous


_GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"      # read by Ray when it starts a head node


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def run_limits(config: RunConfig):
    """The run's cluster-wide rate limits and budget (a named actor), with the teacher and judge registered.

    The actor is created by the first call of a command and found by name afterwards. Its budget starts from
    what every earlier command on the run directory spent (RUN_DIR/spend.json), and it records there what it
    spends as it goes."""
    from pipeline.llm.shared_limits import shared_limits
    from pipeline.llm.spend import spend_record

    return shared_limits(limits_key(config), [config.teacher, config.effective_judge], config.max_cost_usd,
                         config.ray.namespace, spend_record(config))


def limits_key(config: RunConfig) -> str:
    """What the run's limits actor is named by: its run directory's full URI (hashed), so two runs whose
    directories share their last component (a/local, b/local) never share an actor, a budget or its end; the
    last component stays readable in `ray list actors`."""
    uri = store.canonical_uri(config.storage.run_dir)
    return f"{Path(uri).name}-{hashlib.blake2b(uri.encode(), digest_size=6).hexdigest()}"
