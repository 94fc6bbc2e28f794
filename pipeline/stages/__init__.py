"""Ray Data stages: one callable class per file; __init__ loads its model, __call__ maps a batch."""
