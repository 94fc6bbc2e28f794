"""Column checks and updates shared by every stage: stages add columns, they never drop a row."""
from __future__ import annotations

import pyarrow as pa


def check_columns(batch: pa.Table, required: tuple[str, ...], stage: str) -> None:
    missing = [c for c in required if c not in batch.column_names]
    if missing:
        raise ValueError(f"stage '{stage}' needs column(s) {', '.join(missing)}; the batch has "
                         f"{', '.join(batch.column_names)}")


def with_columns(batch: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """The batch with these columns added, replacing any of the same name (a stage run again on its output)."""
    batch = batch.drop_columns([name for name in columns if name in batch.column_names])
    for name, values in columns.items():
        batch = batch.append_column(name, values)
    return batch
