"""Files of a run on a local path or on object storage (s3://), through pyarrow.fs.

Writes are atomic: a reader (or a resumed run) never sees half a file. On a local file system a file is
written under a temporary name and renamed; on S3, where an object appears whole when its upload completes
and a rename is a copy, the file is serialised in memory first and uploaded in one go, so a write that fails
half-way uploads nothing (store writes small files: manifests, plans, labels; stages' Parquet goes through
Ray Data).

Credentials for s3:// always come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or whatever
else the AWS SDK's default chain finds); an S3-compatible endpoint (MinIO, moto) comes from the config's
`storage.s3_endpoint_url`, else from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL as for the AWS CLI.
"""
from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# A stage directory's summary. Names starting with "_" are skipped by Parquet dataset readers (pyarrow,
# Ray Data), so it can sit beside the part-*.parquet files.
MANIFEST = "_manifest.json"
# Files read at once by read_table: enough to hide an object store's latency per file.
_READERS = 8


@dataclass(frozen=True)
class Location:
    """A directory on some file system: `fs` plus the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def child(self, *parts: str) -> "Location":
        joined = "/".join([self.path.rstrip("/"), *parts])
        return Location(self.fs, joined, "/".join([self.uri.rstrip("/"), *parts]))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_empty_dir(self) -> bool:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def list_files(self, suffix: str = "") -> list[str]:
        """Paths (inside `fs`) of the files directly in this directory, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def canonical_uri(uri: str) -> str:
    """One spelling per directory, without touching storage: a local path made absolute, a URI without its
    trailing slash."""
    return uri.rstrip("/") if "://" in uri else str(Path(uri).expanduser().resolve())


def locate(uri: str, s3_endpoint_url: Optional[str] = None) -> Location:
    """Resolves a local path or a URI (s3://bucket/prefix) to a Location; credentials come from the env."""
    if "://" not in uri:
        path = canonical_uri(uri)
        return Location(pafs.LocalFileSystem(), path, path)
    endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if uri.startswith("s3://") and endpoint:
        # the file system pickles with its endpoint but without credentials that came from the environment:
        # a Ray worker that receives it reads its own environment's
        fs = pafs.S3FileSystem(endpoint_override=endpoint)
        return Location(fs, uri.removeprefix("s3://").rstrip("/"), uri.rstrip("/"))
    fs, path = pafs.FileSystem.from_uri(uri)
    return Location(fs, path, uri)


def _commit(location: Location, name: str, write: Callable[[pa.NativeFile], None]) -> str:
    """Runs `write(stream)` so that `name` appears in `location` (created if needed) whole or not at all."""
    final = f"{location.path.rstrip('/')}/{name}"
    location.makedirs()
    if not location.is_local:
        # Closing an S3 stream completes its upload, even when the writer failed half-way: so nothing is
        # opened until the whole file is in memory.
        buffer = pa.BufferOutputStream()
        write(buffer)
        data = buffer.getvalue()
        with location.fs.open_output_stream(final) as out:
            out.write(data)
        return final
    temp = f"{location.path.rstrip('/')}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with location.fs.open_output_stream(temp) as out:
            write(out)
        location.fs.move(temp, final)
    except BaseException:
        if location.fs.get_file_info(temp).type != pafs.FileType.NotFound:
            location.fs.delete_file(temp)
        raise
    return final


def write_parquet(location: Location, name: str, table: pa.Table) -> str:
    return _commit(location, name, lambda out: pq.write_table(table, out))


def write_bytes(location: Location, name: str, data: bytes) -> str:
    return _commit(location, name, lambda out: out.write(data))


def write_text(location: Location, name: str, text: str) -> str:
    return write_bytes(location, name, text.encode("utf-8"))


def write_json(location: Location, name: str, data: Any) -> str:
    return write_text(location, name, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(location: Location, name: str) -> Optional[Any]:
    """A JSON file of the directory, or None when it is not there."""
    path = f"{location.path.rstrip('/')}/{name}"
    if location.fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with location.fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def publish_dir(local_dir: str, location: Location, last: str = "config.json") -> None:
    """Copies a local directory to `location` so that a reader never takes a half-copied one for whole:
    on a local file system it appears by one rename (replacing what was there); on object storage the
    file `last` (what readers check for) is written after every other."""
    local = pafs.LocalFileSystem()
    if location.is_local:
        staging = f"{location.path.rstrip('/')}.{uuid.uuid4().hex}.tmp"
        location.fs.create_dir(staging, recursive=True)
        pafs.copy_files(local_dir, staging, source_filesystem=local, destination_filesystem=location.fs)
        if location.exists():
            location.fs.delete_dir(location.path)
        location.fs.move(staging, location.path)
        return
    location.fs.delete_dir_contents(location.path, missing_dir_ok=True)
    names = sorted(p.name for p in Path(local_dir).iterdir() if p.is_file())
    for name in sorted(names, key=lambda n: n == last):
        pafs.copy_files(f"{local_dir}/{name}", f"{location.path.rstrip('/')}/{name}",
                        source_filesystem=local, destination_filesystem=location.fs)


def copy_dir(local_dir: str, location: Location) -> None:
    """Copies (overwriting) a local directory's files into `location`: logs written on a worker."""
    location.makedirs()
    pafs.copy_files(local_dir, location.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=location.fs)


def read_table(location: Location, columns: Optional[list[str]] = None) -> Optional[pa.Table]:
    """Every Parquet file directly in the directory as one table, in the files' order; None when there is none.

    File by file, a few at once: one dataset over the thousands of files of a large round keeps every file's
    footer until it is done (318 MB to read the 34 MB of ids and tasks of a 1M-row round's 3,811 scored files,
    against 101 MB so, in the same time; docs/benchmarks.md)."""
    files = location.list_files(".parquet")
    if not files:
        return None
    with ThreadPoolExecutor(_READERS) as readers:
        tables = list(readers.map(lambda path: pq.read_table(path, columns=columns, filesystem=location.fs), files))
    # a column all null in one file is typed null there
    return pa.concat_tables(tables, promote_options="default")


def read_rows(location: Location, columns: list[str], positions: pa.Array) -> pa.Table:
    """The rows at these `positions` (ascending) of read_table(location)'s order: each file is read for the rows
    it holds, and only they are kept. A filter by id would build its set of ids once per file: 57 s for 50K of
    a 1M-row round's 3,811 files."""
    files = location.list_files(".parquet")
    with ThreadPoolExecutor(_READERS) as readers:
        counts = list(readers.map(lambda path: pq.ParquetFile(path, filesystem=location.fs).metadata.num_rows, files))
        starts = np.cumsum([0] + counts)
        wanted = np.asarray(positions, dtype=np.int64)
        bounds = np.searchsorted(wanted, starts)

        def read(k: int) -> Optional[pa.Table]:
            local = wanted[bounds[k]:bounds[k + 1]] - starts[k]
            if not len(local):
                return None
            return pq.read_table(files[k], columns=columns, filesystem=location.fs).take(local)
        tables = [table for table in readers.map(read, range(len(files))) if table is not None]
    if not tables:
        return pa.table({name: [] for name in columns})
    return pa.concat_tables(tables, promote_options="default")


def read_parquet_file(location: Location, name: str) -> Optional[pa.Table]:
    """One Parquet file of the directory; None when it is absent."""
    file = location.child(name)
    if not file.exists():
        return None
    return pq.read_table(file.path, filesystem=file.fs)
