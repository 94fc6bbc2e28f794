"""Packing tokenized rows into training sequences, and turning sequences into model inputs.

Rows are packed best-fit-decreasing into sequences of at most `max_len` tokens. Inside a sequence each
row keeps its own positions (0, 1, … restarting at every row); given those `position_ids`, no attention
mask and no KV cache (`use_cache=False`), transformers builds a block-diagonal causal mask
(`find_packed_sequence_indices`), so no token attends to another row. Padding at the end of a micro-batch is one more block, with labels
ignored. Without packing every row is its own sequence and the same code path applies.
"""
from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa

from training.chat_format import IGNORE_INDEX

PACKED_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("row_lengths", pa.list_(pa.int32())),
])


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: longest first, each into the fullest
    bin it still fits in."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []             # (free space, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"a row of {length} tokens cannot be packed into {capacity}")
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            bins.append([index])
            remaining, target = capacity - length, len(bins) - 1
        else:
            space, target = free.pop(at)
            bins[target].append(index)
            remaining = space - length
        bisect.insort(free, (remaining, target))
    return bins


def pack(batch: pa.Table, max_len: int, packing: bool) -> pa.Table:
    """Ray Data stage: tokenized rows (input_ids, labels) → training sequences (PACKED_SCHEMA)."""
    ids, labels = batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist()
    groups = best_fit_decreasing([len(x) for x in ids], max_len) if packing else [[i] for i in range(len(ids))]
    return pa.Table.from_pylist(
        [{"input_ids": [t for i in group for t in ids[i]], "labels": [t for i in group for t in labels[i]],
          "row_lengths": [len(ids[i]) for i in group]} for group in groups], schema=PACKED_SCHEMA)


def position_ids(row_lengths: list[int], padded_length: int) -> list[int]:
    positions = [p for length in row_lengths for p in range(length)]
    return positions + list(range(padded_length - len(positions)))


def collate(batch: dict[str, np.ndarray], pad_token_id: int) -> dict:
    """A micro-batch of sequences → padded `input_ids`, `labels`, `position_ids` tensors, plus the counts
    `real_tokens` (not padding) and `label_tokens` (carrying loss), which are not model inputs."""
    import torch

    sequences = [list(s) for s in batch["input_ids"]]
    width = max(len(s) for s in sequences)
    input_ids = [s + [pad_token_id] * (width - len(s)) for s in sequences]
    labels = [list(l) + [IGNORE_INDEX] * (width - len(l)) for l in batch["labels"]]
    positions = [position_ids(list(r), width) for r in batch["row_lengths"]]
    label_tensor = torch.tensor(labels, dtype=torch.long)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": label_tensor,
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "real_tokens": torch.tensor(sum(len(s) for s in sequences)),
            # the model shifts labels by one: the first position of each sequence predicts nothing
            "label_tokens": (label_tensor[:, 1:] != IGNORE_INDEX).sum()}
