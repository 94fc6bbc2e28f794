"""A real S3 API on loopback for tests: moto's HTTP server (`moto_server`, from the dev extra) in a subprocess.

The pipeline reaches it the way it reaches any S3-compatible store: `storage.s3_endpoint_url` in the config, and
credentials from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION). While the
server runs they are set in this process's environment too, so the in-process checks find them as a user's
shell would; `env` holds them for subprocesses.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))
# Test-only credentials: moto accepts any. The secret is distinctive so a test can search every object for it.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tapir-test-access-key",
               "AWS_SECRET_ACCESS_KEY": "tapir-test-secret-0d6f3c9a",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str           # http://127.0.0.1:PORT: storage.s3_endpoint_url
    env: dict                   # os.environ with the credentials, for subprocesses
    log: Path                   # the server's output: one line per request it answered

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=self.endpoint_url)

    def create_bucket(self, name: str) -> str:
        """Creates an empty bucket and returns its URI (s3://NAME)."""
        pafs.S3FileSystem(endpoint_override=self.endpoint_url, allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def files(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix` (bucket/key, no s3://) with its size."""
        infos = self.filesystem().get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return {i.path: i.size for i in infos if i.type == pafs.FileType.File}

    def read(self, path: str) -> bytes:
        # one GET for the whole object: a stream reads in small ranged GETs, each of which moto answers from a
        # copy of the object (365 s for 270 MB)
        with self.filesystem().open_input_file(path) as file:
            return file.read()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3(start_timeout_s: float = 60.0) -> Iterator[S3Server]:
    """Starts `moto_server` on a free loopback port, waits until it answers, and stops it on exit; the
    credentials are in os.environ meanwhile (restored afterwards)."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # its request log goes to a file: a pipe nobody reads would fill up and stall the server
    log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)
    process = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {process.returncode}: "
                                   f"{Path(log.name).read_text(errors='replace')[-2000:]}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint} within {start_timeout_s} s")
                time.sleep(0.2)
        os.environ.update(CREDENTIALS)
        yield S3Server(endpoint, {**os.environ, **CREDENTIALS}, Path(log.name))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)
