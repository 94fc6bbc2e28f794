"""The run directory's files (pipeline/store.py) behave the same on a local path and on s3://, the latter
against a real S3 API on loopback (moto's server; tests/s3_server.py)."""
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from s3_server import CREDENTIALS, moto_s3

from pipeline import store
from pipeline.models import StoredModel, local_model, run_model


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        server.create_bucket("tapir-store")
        yield server


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> store.Location:
    """An empty directory: under tmp_path, or a fresh prefix of the moto bucket."""
    if request.param == "local":
        return store.locate(str(tmp_path / "run"))
    server = request.getfixturevalue("s3")
    return store.locate(f"s3://tapir-store/{uuid.uuid4().hex[:8]}/run", server.endpoint_url)


def names(location: store.Location, suffix: str = "") -> list[str]:
    return [path.rsplit("/", 1)[-1] for path in location.list_files(suffix)]


def test_s3_uris_resolve_to_the_configured_endpoint_with_credentials_from_the_environment(s3):
    location = store.locate("s3://tapir-store/some/run/", s3.endpoint_url)
    assert not location.is_local and location.path == "tapir-store/some/run"
    assert location.uri == "s3://tapir-store/some/run"
    assert location.child("round_0", "score").uri == "s3://tapir-store/some/run/round_0/score"
    # without one in the config, the endpoint comes from the environment as for the AWS CLI
    os.environ["AWS_ENDPOINT_URL"] = s3.endpoint_url
    try:
        store.write_text(store.locate("s3://tapir-store/from-env"), "a.txt", "x")
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    assert s3.read("tapir-store/from-env/a.txt") == b"x"


def test_a_fresh_directory_is_empty_and_absent_until_written(root):
    assert not root.exists() and root.is_empty_dir() and root.list_files() == []
    assert store.read_json(root, store.MANIFEST) is None and store.read_table(root) is None
    assert store.read_parquet_file(root, "plan.parquet") is None
    store.write_text(root.child("round_0"), "summary.txt", "done\n")
    assert root.exists() and not root.is_empty_dir()
    assert root.child("round_0").exists() and not root.child("round_1").exists()


def test_manifests_and_json_files_read_back_as_written(root):
    manifest = {"stage": "score", "rows_in": 3, "complete": True, "note": "naïve ✓"}
    store.write_json(root.child("round_0", "score"), store.MANIFEST, manifest)
    assert store.read_json(root.child("round_0", "score"), store.MANIFEST) == manifest
    store.write_json(root.child("round_0", "score"), store.MANIFEST, {**manifest, "rows_in": 4})   # replaced
    assert store.read_json(root.child("round_0", "score"), store.MANIFEST)["rows_in"] == 4


def test_parquet_parts_read_back_as_one_table_and_the_manifest_is_not_a_part(root):
    stage = root.child("round_0", "score")
    store.write_parquet(stage, "part-1.parquet", pa.table({"id": ["c"], "mfd": [0.5]}))
    store.write_parquet(stage, "part-0.parquet", pa.table({"id": ["a", "b"], "mfd": [1.0, None]}))
    store.write_json(stage, store.MANIFEST, {"complete": True})
    assert names(stage) == [store.MANIFEST, "part-0.parquet", "part-1.parquet"]
    assert names(stage, ".parquet") == ["part-0.parquet", "part-1.parquet"]
    assert sorted(store.read_table(stage).column("id").to_pylist()) == ["a", "b", "c"]
    assert store.read_table(stage, columns=["id"]).column_names == ["id"]
    assert store.read_parquet_file(stage, "part-1.parquet").to_pylist() == [{"id": "c", "mfd": 0.5}]


def test_rows_read_by_position_come_from_the_files_that_hold_them_in_the_tables_order(root):
    stage = root.child("round_0", "score")
    store.write_parquet(stage, "part-0.parquet", pa.table({"id": ["a", "b"], "mfd": [1.0, None]}))
    store.write_parquet(stage, "part-1.parquet", pa.table({"id": pa.array([], pa.string()),
                                                           "mfd": pa.array([], pa.float64())}))
    store.write_parquet(stage, "part-2.parquet", pa.table({"id": ["c", "d", "e"], "mfd": [0.5, None, 2.0]}))
    whole = store.read_table(stage)
    assert whole.column("id").to_pylist() == ["a", "b", "c", "d", "e"]        # the files' order, kept
    assert store.read_rows(stage, ["id"], pa.array([1, 2, 4])).column("id").to_pylist() == ["b", "c", "e"]
    assert store.read_rows(stage, ["id", "mfd"], pa.array([], pa.int64())).num_rows == 0


def test_a_write_that_fails_half_way_leaves_no_file(root):
    def half_then_fail(out):
        out.write(b"PAR1 half a file")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        store._commit(root, "part-0.parquet", half_then_fail)
    assert names(root) == []                # no partial object, no temporary file
    store.write_bytes(root, "part-0.parquet", b"whole")
    assert names(root) == ["part-0.parquet"]


def test_a_published_model_directory_replaces_the_old_one_and_copies_back_to_a_local_cache(root, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for directory, files in ((old, {"config.json": "{}", "stale.bin": "x"}),
                             (new, {"config.json": '{"dtype": "float32"}', "model.safetensors": "weights"})):
        directory.mkdir()
        for name, text in files.items():
            (directory / name).write_text(text)
    model = root.child("round_0", "model")
    store.publish_dir(str(old), model)
    store.publish_dir(str(new), model)
    assert names(model) == ["config.json", "model.safetensors"]

    # what a loader gets: the directory itself on a local run, else a copy in the node's cache
    cache = tmp_path / "cache"
    loadable = Path(local_model(run_model(model, cache)))
    assert isinstance(run_model(model, cache), str) == model.is_local
    assert sorted(p.name for p in loadable.iterdir()) == ["config.json", "model.safetensors"]
    assert (loadable / "model.safetensors").read_text() == "weights"
    if not model.is_local:
        assert loadable.is_relative_to(cache)
        assert local_model(run_model(model, cache)) == str(loadable)          # copied once
        store.publish_dir(str(old), model)                                    # trained again: copied again
        again = Path(local_model(StoredModel(model, str(cache))))
        assert again != loadable and (again / "stale.bin").exists()


def test_copy_dir_uploads_a_local_folder_with_its_subfolders(root, tmp_path):
    logs = tmp_path / "logs"
    (logs / "tensorboard").mkdir(parents=True)
    (logs / "metrics.jsonl").write_text('{"step": 1}\n')
    (logs / "tensorboard" / "events.out").write_bytes(b"\x00\x01")
    store.copy_dir(str(logs), root.child("sft"))
    assert names(root.child("sft")) == ["metrics.jsonl"]
    assert names(root.child("sft", "tensorboard")) == ["events.out"]


def test_s3_file_systems_travel_to_workers_without_the_credentials(s3):
    import pickle

    location = store.locate("s3://tapir-store/pickled", s3.endpoint_url)
    data = pickle.dumps(StoredModel(location, "/tmp/cache"))
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"].encode() not in data
    assert CREDENTIALS["AWS_ACCESS_KEY_ID"].encode() not in data
    assert s3.endpoint_url.encode() in data
    store.write_json(pickle.loads(data).location, "state.json", {"ok": True})
    assert json.loads(s3.read("tapir-store/pickled/state.json")) == {"ok": True}
