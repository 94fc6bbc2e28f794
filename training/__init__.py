"""Fine-tuning: the task classifier, and (next) the student SFT with Ray Train and DeepSpeed."""


class TrainingDataError(ValueError):
    """The training data cannot train a model (missing, empty, too few rows); raised before any work starts."""
