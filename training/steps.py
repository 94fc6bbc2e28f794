"""How many sequences each worker sees, and how they make optimizer steps: the arithmetic of `tapir train`.

Ray Train splits the dataset with `streaming_split(equal=True)`: every worker gets the same number of
sequences (up to `workers - 1` left over), so every worker runs the same number of micro-batches, which
DeepSpeed's collective calls and `ray.train.report` (a barrier) need. Micro-batches continue across
epochs into the same accumulation; the run stops after the last whole step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pipeline.config import TrainingConfig
from training import TrainingDataError


@dataclass(frozen=True)
class StepPlan:
    sequences: int                   # in the training set
    sequences_per_worker: int        # per epoch
    micro_batch_size: int
    micro_batches_per_epoch: int     # per worker
    accumulation_steps: int
    effective_batch_size: int        # sequences per optimizer step, all workers
    total_steps: int
    warmup_steps: int
    micro_batches_not_stepped: int   # at the very end, too few for a whole step

    def as_dict(self) -> dict:
        return asdict(self)

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, micro-batches of that epoch already trained) after `global_step` optimizer steps."""
        return divmod(global_step * self.accumulation_steps, self.micro_batches_per_epoch)


def plan_steps(training: TrainingConfig, sequences: int) -> StepPlan:
    workers = training.num_workers
    per_worker = sequences // workers
    if per_worker == 0:
        raise TrainingDataError(f"{sequences} training sequence(s) cannot feed {workers} workers; "
                                "lower training.num_workers or add rows")
    micro = min(training.micro_batch_size, per_worker)
    micro_per_epoch = math.ceil(per_worker / micro)
    # A step never waits for more than one epoch of micro-batches: on a small set the batch shrinks instead.
    accumulation = min(max(1, round(training.effective_batch_size / (micro * workers))), micro_per_epoch)
    total_micro = training.epochs * micro_per_epoch
    total_steps = total_micro // accumulation
    return StepPlan(sequences=sequences, sequences_per_worker=per_worker, micro_batch_size=micro,
                    micro_batches_per_epoch=micro_per_epoch, accumulation_steps=accumulation,
                    effective_batch_size=micro * accumulation * workers, total_steps=total_steps,
                    warmup_steps=math.ceil(training.warmup_ratio * total_steps),
                    micro_batches_not_stepped=total_micro - total_steps * accumulation)
