"""Evaluation of a trained student against a reference model: win rates and MT-Bench grading."""
