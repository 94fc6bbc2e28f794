"""Running one checkpointed Ray Data job of a round: from Parquet in to Parquet out, resumable under kill -9.

Resume is Ray Data's row-level checkpointing, both for a run started again and for a job run again at once
after its cluster lost a node: before a data file is written its ids go to a pending
checkpoint, after it they are committed; a re-run deletes data files whose checkpoint is still pending and
skips every committed id. Rows in flight when the job died are done again, and their paid calls sent again:
at most the batches in flight then. Ray is told not to delete the checkpoint on success: the caller deletes
it (`finish`) after its manifest is written, so a kill between the two cannot make a re-run start over and
write every row twice.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional

from pipeline import store
from pipeline.config import RunConfig
from pipeline.llm.client import EndpointError
from pipeline.llm.limits import BudgetExceeded
from pipeline.llm.secret import MissingSecretError

log = logging.getLogger(__name__)

# Errors raised inside a stage that the user must act on; they reach the driver wrapped by Ray.
STOPPING_ERRORS = (BudgetExceeded, EndpointError, MissingSecretError)
# Ray restarts actors and retries tasks of a lost node, but some of Ray Data's own helpers (the Parquet
# footer readers behind a read) are not restarted, and the job fails. A job whose cluster lost a node while
# it ran is run again this many times: its checkpoint skips every row already written.
NODE_LOSS_RETRIES = 2
# Operators that only move rows between stages; their spans say nothing about where the time goes.
_PLUMBING = ("StreamingRepartition", "ListFiles")


def read_parquet(location: store.Location):
    import ray.data

    return ray.data.read_parquet(location.path, filesystem=location.fs, file_extensions=["parquet"])


def write_checkpointed(build: Callable[[], object], out: store.Location, checkpoint: store.Location,
                       limits=None) -> list[dict]:
    """Builds the dataset with checkpointing on (keyed by the `id` column), writes it to `out`, and returns
    the time of each stage. A stopping error inside a stage (budget, refused key) is raised as itself;
    `limits`: the run's limits, asked whether a failure came from the budget, and whether it refused rows
    the job left for the next command (raised as BudgetExceeded once the rest is written)."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    context = ray.data.DataContext.get_current()
    context.checkpoint_config = CheckpointConfig(
        id_column="id", checkpoint_path=checkpoint.path, override_filesystem=checkpoint.fs,
        delete_checkpoint_on_success=False)
    try:
        for attempt in range(NODE_LOSS_RETRIES + 1):
            nodes_lost_before = lost_nodes()
            try:
                dataset = build()
                dataset.write_parquet(out.path, filesystem=out.fs)
                break
            except Exception as err:
                refusal = limits.budget_refusal() if limits is not None else None
                if refusal and not stopping_cause(err):
                    raise BudgetExceeded(refusal) from err
                if stopping_cause(err) or attempt == NODE_LOSS_RETRIES or lost_nodes() == nodes_lost_before:
                    raise stopping_cause(err) or err
                log.warning("a node of the cluster was lost during the job (%s: %s); running it again from its "
                            "checkpoint (%d of %d)", type(err).__name__, str(err).splitlines()[0][:200],
                            attempt + 1, NODE_LOSS_RETRIES)
    finally:
        context.checkpoint_config = None
    # the stages wrote the rows they paid for and left out those the budget refused (stages/endpoint_stage.py)
    refusal = limits.budget_refusal() if limits is not None else None
    if refusal:
        raise BudgetExceeded(refusal)
    return stage_times(dataset)


def lost_nodes() -> int:
    """Nodes the cluster has lost so far (dead in Ray's node table)."""
    import ray

    return sum(not node["Alive"] for node in ray.nodes())


def finish(checkpoint: store.Location) -> None:
    """Deletes a finished job's checkpoint (after its manifest is written)."""
    checkpoint.fs.delete_dir_contents(checkpoint.path, missing_dir_ok=True)


def stopping_cause(err: BaseException) -> Optional[BaseException]:
    """The user-facing error inside Ray's wrapping of a stage failure (budget reached, key refused), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, STOPPING_ERRORS):
            return err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def stage_times(dataset) -> list[dict]:
    """Per operator: the span it was running (first task start to last task end) and its summed task time."""
    try:
        # Ray Data has no public structured form of ds.stats(); a write's stats live on the dataset it ran
        summary = dataset._write_ds._get_stats_summary()
    except Exception:                    # stats are for the report; the scored rows do not depend on them
        log.warning("Ray Data stats unavailable; the manifest has no per-stage times", exc_info=True)
        return []
    operators, pending = [], [summary]
    while pending:
        node = pending.pop()
        operators.extend(node.operators_stats)
        pending.extend(node.parents)
    return [{"stage": op.operator_name, "active_s": round(op.latest_end_time - op.earliest_start_time, 2),
             "task_s": round(op.wall_time.sum, 2) if op.wall_time else None}
            for op in sorted(operators, key=lambda o: o.earliest_start_time or 0)
            if op.earliest_start_time is not None and op.latest_end_time is not None
            and not op.operator_name.startswith(_PLUMBING)]


def job_cpus(config: RunConfig, endpoint_stages: int, model_actors: int = 0) -> int:
    """Logical CPUs a streaming job needs: its model actors (the student's, plus `model_actors` more), Ray's
    checkpoint filter actor, the endpoint stages' shares, and two for the read, repartition and write tasks."""
    from pipeline.stages.endpoint_stage import ENDPOINT_ACTOR_CPUS

    endpoint_actors = endpoint_stages * config.scoring.actors_per_stage * ENDPOINT_ACTOR_CPUS
    return config.student.num_actors + model_actors + 1 + math.ceil(endpoint_actors) + 2
