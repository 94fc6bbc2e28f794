"""The data of `tapir train`: a round's training rows → tokenized rows → packed sequences, before any worker starts.

Two Ray Data jobs write Parquet under `run/round_R/sft/data/`: `tokenized/` (one row per training row, with
its status: ok, truncated, over_max_len or invalid, and why) and `packed/{train,eval}/` (the sequences the
workers read with `get_dataset_shard`). Tokenizing up front is what lets a bad training set (empty, every
row too long, missing columns) stop the command before a worker starts, fixes the number of steps the
learning-rate schedule needs, and gives a resumed run exactly the same sequences. A finished preparation
is reused while its inputs (training files, tokenizer, length and packing settings) are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import store
from pipeline.classification import round_location
from pipeline.config import RunConfig
from pipeline.models import Model, model_key
from pipeline.pool import check_parquet_files, import_pool, source_files
from training import TrainingDataError
from training.chat_format import REQUIRED_COLUMNS, ChatTokenizer
from training.packing import pack

log = logging.getLogger(__name__)

TOKENIZE_BATCH_ROWS = 512
PACK_WINDOW_ROWS = 4096      # rows packed together; larger windows pack tighter (measured in docs/benchmarks.md)
TRAINABLE = ("ok", "truncated")
LISTED_IDS = 20              # ids of dropped rows kept in the summary (the tokenized rows hold all of them)


def training_set_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child("train")


def sft_location(config: RunConfig, round_index: int) -> store.Location:
    return round_location(config, round_index).child("sft")


def import_training_set(config: RunConfig, round_index: int, source: str, progress: bool = True) -> None:
    """`tapir train --data SOURCE`: any pool format becomes the round's training set (answers in `output`).
    Run again with the same source it is a no-op, so a killed command can be repeated as it was."""
    target = training_set_location(config, round_index)
    imported = store.read_json(target, store.MANIFEST)
    if imported and imported.get("sources") == [str(path) for path, _ in source_files(source, config.pool.format)]:
        return
    if not target.is_empty_dir():
        raise TrainingDataError(f"{target.uri}: round {round_index} already has a training set; remove it to "
                                f"train on {source} instead")
    import_pool([source], target, config.pool.model_copy(update={"source": source}), progress=progress)


def check_training_set(location: store.Location) -> tuple[list[str], int]:
    """The training set's Parquet files and its row count, from their footers only."""
    files = location.list_files(".parquet")
    if not files:
        raise TrainingDataError(f"{location.uri}: no training set (*.parquet); write one there, or pass "
                                "--data FILE to import instructions with answers (any `tapir pool import` format)")
    return files, check_parquet_files(files, location, REQUIRED_COLUMNS, "training set", TrainingDataError)


def data_key(config: RunConfig, model: Model, files: list[str], location: store.Location) -> str:
    """What the prepared sequences depend on; a change means they are prepared again."""
    training = config.training
    inputs = {"files": [(p, location.fs.get_file_info(p).size) for p in files], "model": model_key(model),
              "settings": [training.max_len, training.truncation, training.packing, training.system_prompt,
                           training.eval_fraction, training.eval_max_rows]}
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True).encode(), digest_size=8).hexdigest()


def prepare(config: RunConfig, round_index: int, model: Model) -> dict:
    """Tokenizes and packs the round's training set; returns (and writes) the data summary."""
    import ray.data

    train_set = training_set_location(config, round_index)
    files, rows = check_training_set(train_set)
    out = sft_location(config, round_index).child("data")
    key = data_key(config, model, files, train_set)
    done = store.read_json(out, store.MANIFEST)
    if done and done.get("key") == key:
        return done
    out.fs.delete_dir_contents(out.path, missing_dir_ok=True)
    training = config.training
    eval_fraction = min(training.eval_fraction, training.eval_max_rows / rows)
    tokenized = out.child("tokenized")
    (ray.data.read_parquet(train_set.path, filesystem=train_set.fs, file_extensions=["parquet"])
     .map_batches(ChatTokenizer, fn_constructor_kwargs={
         "model_dir": model, "max_len": training.max_len, "truncation": training.truncation,
         "system_prompt": training.system_prompt, "eval_fraction": eval_fraction},
         batch_size=TOKENIZE_BATCH_ROWS, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
     .write_parquet(tokenized.path, filesystem=tokenized.fs))
    summary = {"key": key, "rows_in": rows, **_row_counts(tokenized, training.max_len)}
    if summary["rows_trainable"]["train"] == 0:
        raise TrainingDataError(_nothing_to_train(train_set.uri, summary, training.max_len))
    for split in ("train", "eval"):
        sequences = out.child("packed", split)
        (ray.data.read_parquet(tokenized.path, filesystem=tokenized.fs, file_extensions=["parquet"])
         .map_batches(_trainable, fn_kwargs={"split": split}, batch_format="pyarrow")
         .map_batches(pack, fn_kwargs={"max_len": training.max_len, "packing": training.packing},
                      batch_size=PACK_WINDOW_ROWS, batch_format="pyarrow")
         .write_parquet(sequences.path, filesystem=sequences.fs))
        summary[f"{split}_sequences"] = _sequence_counts(sequences, training.max_len)
    store.write_json(out, store.MANIFEST, summary)
    return summary


def packed_location(config: RunConfig, round_index: int, split: str) -> store.Location:
    return sft_location(config, round_index).child("data", "packed", split)


def _trainable(batch: pa.Table, split: str) -> pa.Table:
    keep = pc.and_(pc.equal(batch.column("split"), split), pc.is_in(batch.column("status"), pa.array(TRAINABLE)))
    return batch.filter(keep).select(["input_ids", "labels"])


def _row_counts(tokenized: store.Location, max_len: int) -> dict:
    table = pads.dataset(tokenized.list_files(".parquet"), filesystem=tokenized.fs, format="parquet").to_table(
        columns=["id", "split", "status", "error", "num_tokens"])
    statuses = Counter(table.column("status").to_pylist())
    trainable = pc.is_in(table.column("status"), pa.array(TRAINABLE))
    by_split = {s: int(pc.sum(pc.and_(trainable, pc.equal(table.column("split"), s))).as_py() or 0)
                for s in ("train", "eval")}
    over = table.filter(pc.equal(table.column("status"), "over_max_len"))
    invalid = table.filter(pc.equal(table.column("status"), "invalid"))
    return {
        "rows_ok": statuses.get("ok", 0), "rows_truncated": statuses.get("truncated", 0),
        "rows_over_max_len": statuses.get("over_max_len", 0), "rows_invalid": statuses.get("invalid", 0),
        "rows_trainable": by_split,
        "over_max_len_ids": over.column("id").to_pylist()[:LISTED_IDS],
        "invalid": [f"{i}: {e}" for i, e in zip(invalid.column("id").to_pylist()[:LISTED_IDS],
                                               invalid.column("error").to_pylist())],
        "longest_row_tokens": int(pc.max(table.column("num_tokens")).as_py() or 0),
        "max_len": max_len,
    }


def _sequence_counts(location: store.Location, max_len: int) -> dict:
    files = location.list_files(".parquet")
    if not files:
        return {"sequences": 0, "tokens": 0, "fill": None}
    lengths = pc.list_value_length(pads.dataset(files, filesystem=location.fs, format="parquet")
                                   .to_table(columns=["input_ids"]).column("input_ids"))
    tokens, sequences = int(pc.sum(lengths).as_py() or 0), len(lengths)
    # share of max_len the sequences fill: the non-pad share when every micro-batch is padded to max_len
    return {"sequences": sequences, "tokens": tokens, "fill": round(tokens / (sequences * max_len), 4)}


def _nothing_to_train(uri: str, summary: dict, max_len: int) -> str:
    if summary["rows_over_max_len"] and not summary["rows_ok"]:
        return (f"{uri}: all {summary['rows_over_max_len']} rows are longer than training.max_len={max_len} "
                f"(the longest has {summary['longest_row_tokens']} tokens); raise max_len or set "
                "training.truncation: truncate")
    return (f"{uri}: no row of {summary['rows_in']} can be trained on: {summary['rows_invalid']} invalid "
            f"(e.g. {'; '.join(summary['invalid'][:3])}), {summary['rows_over_max_len']} over max_len, "
            f"{summary['rows_trainable']['eval']} held out for evaluation")

