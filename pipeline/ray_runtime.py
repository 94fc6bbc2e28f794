"""Starting a local Ray, or joining a cluster, as the run config says."""
from __future__ import annotations

import logging

from pipeline.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(config: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.address:
        ray.init(address=config.address, namespace=config.namespace)
    else:
        ray.init(num_cpus=config.num_cpus, namespace=config.namespace, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = True
