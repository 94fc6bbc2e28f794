"""Fine-tuning: the task classifier, and the student SFT with Ray Train and DeepSpeed."""
from pipeline.errors import UserError


class TrainingDataError(UserError, ValueError):
    """The training data cannot train a model (missing, empty, too few rows); raised before any work starts."""


class CheckpointMismatch(UserError, ValueError):
    """A training checkpoint left by a run with other settings or data; resuming from it would mix the two."""
