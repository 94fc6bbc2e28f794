"""TAPIR curriculum distillation on Ray: the pipeline from an instruction pool to a training set."""
