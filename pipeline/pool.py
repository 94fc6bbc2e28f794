"""`tapir pool import`: turns instruction files of several formats into Parquet shards of the pool schema.

Formats: Alpaca JSON or JSONL (instruction, input, output), chat JSONL (messages), Self-Instruct seed
tasks (instruction + instances), Parquet, and a directory saved by HF `datasets` (Arrow files, read
with pyarrow so `datasets` is not needed). Rows that cannot enter the pool go to `_quarantine.jsonl`
with the file, line, field and reason; a file that cannot be read at all stops the import with an
error naming the file and line.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import store
from pipeline.config import PoolConfig, RunConfig
from pipeline.errors import UserError
from pipeline.schema import POOL_COLUMNS, POOL_SCHEMA, RowProblem, check_record

log = logging.getLogger(__name__)

BUNDLED_SAMPLE = "bundled:sample"
MANIFEST = store.MANIFEST
QUARANTINE = "_quarantine.jsonl"
_RAW_KEPT_CHARS = 100_000   # a quarantined row keeps this much of its raw text, so it can be fixed
_ARROW_BATCH_ROWS = 10_000


class PoolImportError(UserError, ValueError):
    """A source that cannot be imported at all; the message names the file (and line)."""


@dataclass
class Record:
    """One row read from a source, before validation."""

    where: str              # "file:line" or "file#row", for people
    fields: Any             # the mapped pool fields (a dict) or the raw value that failed to map
    raw: str                # the source text, kept in the quarantine if the row is rejected
    problem: Optional[RowProblem] = None
    read_as: Optional[str] = None   # the format the record was mapped with; None when it could not be read


@dataclass
class ImportSummary:
    sources: list[str]
    out: str
    rows_in: int = 0
    rows_out: int = 0
    not_sampled: int = 0                # valid rows left out by pool.sample_fraction
    quarantined: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)   # entries of source directories not read: {path, why}
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "stage": "pool_import", "sources": self.sources, "out": self.out,
            "rows_in": self.rows_in, "rows_out": self.rows_out, "not_sampled": self.not_sampled,
            "failed": sum(self.quarantined.values()), "failed_by_reason": dict(self.quarantined),
            "skipped": self.skipped,
            "shards": self.shards, "wall_s": round(self.seconds, 3),
            "rows_per_s": round(self.rows_in / self.seconds, 1) if self.seconds else None,
        }

    def text(self) -> str:
        lines = [f"imported {self.rows_out} of {self.rows_in} rows into {len(self.shards)} shard(s) "
                 f"in {self.out} ({self.seconds:.1f} s)"]
        if self.not_sampled:
            lines.append(f"left out {self.not_sampled} valid rows not in the sample (pool.sample_fraction)")
        if self.skipped:
            listed = "; ".join(f"{entry['path']} ({entry['why']})" for entry in self.skipped[:10])
            more = f"; and {len(self.skipped) - 10} more (see {MANIFEST})" if len(self.skipped) > 10 else ""
            lines.append(f"skipped {len(self.skipped)} entries of source directories: {listed}{more}")
        if self.quarantined:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in self.quarantined.most_common())
            lines.append(f"quarantined {sum(self.quarantined.values())} rows ({reasons}); "
                         f"see {self.out.rstrip('/')}/{QUARANTINE}")
        return "\n".join(lines)


def bundled_sample_path() -> Path:
    return Path(str(importlib.resources.files("pipeline") / "data" / "sample_pool.jsonl"))


# ---------------------------------------------------------------- mapping source records to pool fields

def _alpaca_fields(record: dict, id_column: Optional[str]) -> Any:
    if not isinstance(record, dict):
        return record
    mapped = {"instruction": record.get("instruction"), "input": record.get("input"),
              "output": record.get("output")}
    id_key = id_column or "id"
    if id_column and record.get(id_column) is None:
        return RowProblem("missing_field", id_column, f"id column '{id_column}' is missing")
    if record.get(id_key) is not None:
        mapped["id"] = record[id_key]
    mapped["meta"] = {k: v for k, v in record.items() if k not in ("instruction", "input", "output", id_key)}
    return mapped


def _chat_fields(record: dict, id_column: Optional[str]) -> Any:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return RowProblem("wrong_type", "messages", "'messages' must be a list of {role, content} objects")
    system = [m.get("content") for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    if not turns or turns[0].get("role") != "user":
        return RowProblem("missing_field", "messages", "no user message to take the instruction from")
    if sum(1 for m in turns if m.get("role") == "user") > 1:
        return RowProblem("multi_turn", "messages", "multi-turn conversations are not single instructions")
    unknown = {m.get("role") for m in turns} - {"user", "assistant"}
    if unknown:
        return RowProblem("wrong_type", "messages", f"unknown role(s): {sorted(map(str, unknown))}")
    mapped = {"instruction": turns[0].get("content"), "input": "",
              "output": turns[1].get("content") if len(turns) > 1 else None}
    meta = {k: v for k, v in record.items() if k not in ("messages", id_column or "id")}
    if system:
        meta["system"] = system[0] if len(system) == 1 else system
    mapped["meta"] = meta
    if record.get(id_column or "id") is not None:
        mapped["id"] = record[id_column or "id"]
    return mapped


def _selfinstruct_fields(record: dict, id_column: Optional[str]) -> list[Any]:
    """A seed task has one instruction and a list of instances: one pool row per instance."""
    instances = record.get("instances") if isinstance(record, dict) else None
    if not isinstance(instances, list) or not instances:
        return [RowProblem("missing_field", "instances", "'instances' must be a non-empty list")]
    task_id = record.get(id_column or "id")
    meta = {k: v for k, v in record.items() if k not in ("instruction", "instances", id_column or "id")}
    rows = []
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            rows.append(RowProblem("wrong_type", f"instances.{index}", "an instance must be an object"))
            continue
        mapped = {"instruction": record.get("instruction"), "input": instance.get("input"),
                  "output": instance.get("output"), "meta": meta}
        if task_id is not None:
            mapped["id"] = f"{task_id}" if len(instances) == 1 else f"{task_id}#{index}"
        rows.append(mapped)
    return rows


_MAPPERS = {"alpaca": _alpaca_fields, "chat": _chat_fields, "parquet": _alpaca_fields, "hf": _alpaca_fields}


def _map(fmt: str, value: Any, id_column: Optional[str]) -> list[Any]:
    if fmt == "selfinstruct":
        return _selfinstruct_fields(value, id_column)
    return [_MAPPERS[fmt](value, id_column)]


# ---------------------------------------------------------------- reading sources

def _json_format(record: Any) -> str:
    if isinstance(record, dict) and "messages" in record:
        return "chat"
    if isinstance(record, dict) and "instances" in record and "instruction" in record:
        return "selfinstruct"
    return "alpaca"


def _mapped(fmt: str, value: Any, id_column: Optional[str]) -> tuple[str, list[Any]]:
    """(how the record was read, its pool fields). With format 'auto' the format is decided for this record
    alone, so a chat line among Alpaca lines is read as chat and the Alpaca lines as Alpaca."""
    if fmt != "auto":
        return f"{fmt} (the import's format)", _map(fmt, value, id_column)
    decided = _json_format(value)
    return f"{decided} (decided for this record: format auto)", _map(decided, value, id_column)


_BOM = b"\xef\xbb\xbf"


def _open(path: Path):
    """The file's bytes, gunzipped for a .gz name."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_jsonl(path: Path, fmt: str, id_column: Optional[str]) -> Iterator[Record]:
    with _open(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            raw_bytes = line.rstrip(b"\r\n")
            if line_no == 1:
                raw_bytes = raw_bytes.removeprefix(_BOM)        # a BOM is not part of the first record
            if not raw_bytes.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                text = raw_bytes.decode("utf-8", errors="backslashreplace")
                yield Record(where, None, text, RowProblem("invalid_utf8", None, f"not valid UTF-8 at byte {err.start}"))
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as err:
                yield Record(where, None, raw, RowProblem("not_json", None, f"not valid JSON: {err.msg} at column {err.colno}"))
                continue
            read_as, rows = _mapped(fmt, value, id_column)
            for mapped in rows:
                yield Record(where, mapped, raw, read_as=read_as)


def _read_json_array(path: Path, fmt: str, id_column: Optional[str]) -> Iterator[Record]:
    try:
        with _open(path) as handle:
            text = handle.read().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PoolImportError(f"{path}: not valid UTF-8 at byte {err.start}; fix the file or use JSONL, "
                              "where bad lines are quarantined one by one") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise PoolImportError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(items, list):
        raise PoolImportError(f"{path}: expected a JSON list of records, got a {type(items).__name__}")
    for index, value in enumerate(items):
        raw = json.dumps(value, ensure_ascii=False)
        read_as, rows = _mapped(fmt, value, id_column)
        for mapped in rows:
            yield Record(f"{path}#{index}", mapped, raw, read_as=read_as)


def _holds_binary(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind) \
            or pa.types.is_binary_view(kind):
        return True
    return any(_holds_binary(kind.field(i).type) for i in range(kind.num_fields))     # lists, structs, maps


def _read_arrow_batches(path: Path, batches: Iterator[pa.RecordBatch], id_column: Optional[str]) -> Iterator[Record]:
    row = 0
    for batch in batches:
        if "instruction" not in batch.schema.names:
            raise PoolImportError(f"{path}: no 'instruction' column (columns: {', '.join(batch.schema.names)})")
        binary = [f"{column.name} ({column.type})" for column in batch.schema if _holds_binary(column.type)]
        if binary:
            # bytes have no JSON form for meta, and a pool is text: guessing an encoding would corrupt it
            raise PoolImportError(f"{path}: column(s) {', '.join(binary)} hold binary data, which a pool row "
                                  "cannot keep; drop them or convert them to text first (dates, times and "
                                  "decimals are converted)")
        for value in batch.to_pylist():
            yield Record(f"{path}#{row}", _alpaca_fields(value, id_column), "", read_as="columns")
            row += 1


def _read_parquet(path: Path, id_column: Optional[str]) -> Iterator[Record]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise PoolImportError(f"{path}: not a readable Parquet file ({err})") from None
    yield from _read_arrow_batches(path, parquet.iter_batches(batch_size=_ARROW_BATCH_ROWS), id_column)


def _hf_arrow_files(directory: Path) -> list[Path]:
    """The Arrow files of a directory written by `datasets.Dataset(Dict).save_to_disk`, in order."""
    if (directory / "dataset_dict.json").exists():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in _hf_arrow_files(directory / split)]
    state = json.loads((directory / "state.json").read_text())
    return [directory / entry["filename"] for entry in state["_data_files"]]


def _read_hf(directory: Path, id_column: Optional[str]) -> Iterator[Record]:
    for arrow_file in _hf_arrow_files(directory):
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(arrow_file)))
        except (pa.ArrowInvalid, OSError) as err:
            raise PoolImportError(f"{arrow_file}: not a readable Arrow file ({err})") from None
        yield from _read_arrow_batches(arrow_file, iter(reader), id_column)


def _is_hf_dir(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


POOL_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def source_files(source: str, fmt: str, skipped: Optional[list[dict]] = None) -> list[tuple[Path, str]]:
    """Expands one source into (file, format) pairs; formats still 'auto' are decided while reading. A directory
    gives its files whose names end in a POOL_SUFFIXES entry (in any case); what else it holds is appended to
    `skipped` as {path, why}."""
    path = bundled_sample_path() if source == BUNDLED_SAMPLE else Path(source).expanduser()
    if not path.exists():
        raise PoolImportError(f"{source}: no such file or directory")
    if path.is_dir():
        if fmt == "hf" or (fmt == "auto" and _is_hf_dir(path)):
            return [(path, "hf")]
        files, passed_over = [], []
        for entry in sorted(path.iterdir()):
            if entry.is_dir():
                passed_over.append({"path": str(entry), "why": "a subdirectory: name it as a source of its own"})
            elif entry.name.lower().endswith(POOL_SUFFIXES):
                files.append(entry)
            else:
                passed_over.append({"path": str(entry), "why": "not a pool file (" + ", ".join(POOL_SUFFIXES) + ")"})
        if skipped is not None:
            skipped.extend(passed_over)
        if not files:
            raise PoolImportError(f"{source}: directory holds no pool file ({', '.join(POOL_SUFFIXES)}, in any "
                                  f"case); it holds {len(passed_over)} other entries")
        return [pair for f in files for pair in source_files(str(f), fmt)]
    if fmt == "auto" and path.name.lower().endswith(".parquet"):
        fmt = "parquet"
    return [(path, fmt)]


def _reader(path: Path, fmt: str, id_column: Optional[str]) -> Iterator[Record]:
    if fmt == "hf":
        return _read_hf(path, id_column)
    if fmt == "parquet":
        return _read_parquet(path, id_column)
    with _open(path) as handle:
        head = handle.read(4096).removeprefix(_BOM).lstrip()
    if head.startswith(b"["):
        return _read_json_array(path, fmt, id_column)
    return _read_jsonl(path, fmt, id_column)


def _records(path: Path, fmt: str, id_column: Optional[str]) -> Iterator[Record]:
    try:
        yield from _reader(path, fmt, id_column)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:     # only gzip's reader raises these here
        raise PoolImportError(f"{path}: not a readable gzip file ({err or type(err).__name__})") from None


# ---------------------------------------------------------------- writing the pool

class _ShardWriter:
    def __init__(self, out: store.Location, rows_per_shard: int):
        self.out, self.rows_per_shard = out, rows_per_shard
        self.columns: dict[str, list] = {name: [] for name in POOL_COLUMNS}
        self.shards: list[str] = []

    def add(self, row: dict) -> None:
        for name in POOL_COLUMNS:
            self.columns[name].append(row[name])
        if len(self.columns["id"]) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.columns["id"]:
            return
        table = pa.Table.from_pydict(self.columns, schema=POOL_SCHEMA)
        name = f"part-{len(self.shards):05d}.parquet"
        store.write_parquet(self.out, name, table)
        self.shards.append(name)
        self.columns = {name: [] for name in POOL_COLUMNS}


def _clear_previous_import(out: store.Location) -> None:
    for path in out.list_files():
        name = path.rsplit("/", 1)[-1]
        if name.startswith("part-") or name in (MANIFEST, QUARANTINE):
            out.fs.delete_file(path)


def in_sample(row_id: str, fraction: float) -> bool:
    """Whether a row is in a `fraction` sample: decided by its id alone, so every import keeps the same rows."""
    digest = hashlib.blake2b(row_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2 ** 64


def import_pool(sources: list[str], out: store.Location, pool: PoolConfig,
                overwrite: bool = False, progress: bool = True) -> ImportSummary:
    """Imports `sources` into Parquet shards under `out`; returns counts. Raises PoolImportError."""
    started = time.perf_counter()
    if out.fs.get_file_info(out.path).type == pafs.FileType.File:
        raise PoolImportError(f"{out.uri}: is a file; the output must be a directory (new, or a previous import's "
                              "with --overwrite)")
    skipped: list[dict] = []
    files = [pair for source in sources for pair in source_files(source, pool.format, skipped)]
    if not out.is_empty_dir():
        if not overwrite:
            raise PoolImportError(f"{out.uri}: output directory is not empty; pass --overwrite to replace "
                                  "a previous import")
        _clear_previous_import(out)
    out.makedirs()
    summary = ImportSummary(sources=[str(p) for p, _ in files], out=out.uri, skipped=skipped)
    writer = _ShardWriter(out, pool.rows_per_shard)
    quarantine: list[str] = []
    seen_ids: set[str] = set()
    bar = tqdm(unit=" rows", desc="import", disable=not progress, mininterval=1.0)

    def reject(record: Record, problem: RowProblem) -> None:
        summary.quarantined[problem.reason] += 1
        quarantine.append(json.dumps({"where": record.where, "reason": problem.reason, "field": problem.field,
                                      "detail": problem.detail, "read_as": record.read_as,
                                      "raw": record.raw[:_RAW_KEPT_CHARS]}, ensure_ascii=False))

    for path, fmt in files:
        for record in _records(path, fmt, pool.id_column):
            summary.rows_in += 1
            bar.update()
            problem = record.problem or (record.fields if isinstance(record.fields, RowProblem) else None)
            if problem is None:
                row, problem = check_record(record.fields, pool.max_row_chars)
            if problem is None and row["id"] in seen_ids:
                problem = RowProblem("duplicate_id", "id", f"id {row['id']} was already taken by an earlier row "
                                     "(same instruction and input, or the same id in the id column)")
            if problem is not None:
                if not record.raw:
                    record.raw = json.dumps(record.fields, ensure_ascii=False, default=str) \
                        if not isinstance(record.fields, RowProblem) else ""
                reject(record, problem)
                continue
            seen_ids.add(row["id"])
            if pool.sample_fraction is not None and not in_sample(row["id"], pool.sample_fraction):
                summary.not_sampled += 1
                continue
            row["source"] = record.where
            writer.add(row)
            summary.rows_out += 1
    writer.flush()
    bar.close()
    summary.shards = writer.shards
    if quarantine:
        store.write_text(out, QUARANTINE, "\n".join(quarantine) + "\n")
    summary.seconds = time.perf_counter() - started
    if summary.rows_out == 0:
        hint = f"; see {out.uri.rstrip('/')}/{QUARANTINE} for why" if quarantine else ""
        raise PoolImportError(f"{', '.join(sources)}: no valid rows to import ({summary.rows_in} read){hint}")
    store.write_json(out, MANIFEST, summary.as_dict())
    return summary


def pool_shards(location: store.Location) -> list[str]:
    files = [p for p in location.list_files(".parquet") if p.rsplit("/", 1)[-1].startswith("part-")]
    if not files:
        raise PoolImportError(f"{location.uri}: no pool shards (part-*.parquet); run `tapir pool import` first")
    return files


def read_pool(location: store.Location) -> pa.Table:
    """Reads an imported pool back (small pools and tests; stages stream it with Ray Data)."""
    return pa.concat_tables(pq.read_table(p, filesystem=location.fs) for p in pool_shards(location))


def check_shards(location: store.Location, required: tuple[str, ...] = POOL_COLUMNS) -> int:
    """Rows in the pool, after checking every shard's footer: an unreadable shard, a shard without a
    required column or a pool without rows stops here, naming the shard, before any work is started."""
    return check_parquet_files(pool_shards(location), location, required, "pool", PoolImportError)


def check_parquet_files(files: list[str], location: store.Location, required: tuple[str, ...], what: str,
                        error: type[Exception]) -> int:
    """Rows in `files` (of `location`'s file system), reading only their footers; `error` names the file
    that is unreadable or lacks a required column, or says that `what` has no rows."""
    rows = 0
    for path in files:
        try:
            metadata = pq.read_metadata(path, filesystem=location.fs)
        except (OSError, pa.ArrowException) as err:
            raise error(f"{path}: unreadable {what} file ({err})") from None
        missing = [c for c in required if c not in metadata.schema.names]
        if missing:
            raise error(f"{path}: {what} file lacks column(s) {', '.join(missing)}")
        rows += metadata.num_rows
    if rows == 0:
        raise error(f"{location.uri}: the {what} is empty (its files hold no rows)")
    return rows


def pool_location(config: RunConfig) -> store.Location:
    """The run's imported pool: RUN_DIR/pool, finished once its manifest is written."""
    return store.locate(config.storage.run_dir, config.storage.s3_endpoint_url).child("pool")


def ensure_pool(config: RunConfig) -> tuple[store.Location, Optional[ImportSummary]]:
    """The run's pool directory, importing `pool.source` into it first if no import has finished there."""
    pool_dir = pool_location(config)
    if pool_dir.child(MANIFEST).exists():
        return pool_dir, None
    # No manifest means no import finished: whatever an interrupted one left is replaced.
    return pool_dir, import_pool([config.pool.source], pool_dir, config.pool, overwrite=True, progress=False)
