"""Starting a local Ray, or joining a cluster, as the run config says."""
from __future__ import annotations

import hashlib
import logging
import os
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
        ray.init(num_cpus=num_cpus, namespace=config.namespace, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = True


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
