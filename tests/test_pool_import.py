import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.config import DEFAULT_TASK_TARGETS, PoolConfig
from pipeline.pool import MANIFEST, QUARANTINE, PoolImportError, import_pool, read_pool
from pipeline.schema import POOL_SCHEMA, row_id


def run_import(sources, out: Path, **pool_fields):
    location = store.locate(str(out))
    summary = import_pool([str(s) for s in sources], location, PoolConfig(**pool_fields), progress=False)
    return summary, read_pool(location)


def quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / QUARANTINE).read_text().splitlines()]


def test_alpaca_dev_4000_imports_every_row_in_shards_of_the_chosen_size(shared_data, tmp_path):
    summary, pool = run_import([shared_data / "alpaca_dev_4000.jsonl"], tmp_path / "pool", rows_per_shard=1500)
    assert (summary.rows_in, summary.rows_out, sum(summary.quarantined.values())) == (4000, 4000, 0)
    assert pool.schema.equals(POOL_SCHEMA)
    sizes = [pq.read_metadata(tmp_path / "pool" / name).num_rows for name in summary.shards]
    assert sizes == [1500, 1500, 1000]
    assert len(set(pool.column("id").to_pylist())) == 4000
    first = json.loads((shared_data / "alpaca_dev_4000.jsonl").open().readline())
    row = pool.slice(0, 1).to_pylist()[0]
    assert row["instruction"] == first["instruction"] and row["output"] == first["output"]
    assert row["id"] == row_id(first["instruction"], first["input"])
    assert row["source"].endswith("alpaca_dev_4000.jsonl:1")
    manifest = json.loads((tmp_path / "pool" / MANIFEST).read_text())
    assert manifest["rows_out"] == 4000 and manifest["failed"] == 0


def test_ids_are_stable_across_imports(shared_data, tmp_path):
    _, first = run_import([shared_data / "alpaca_dev_4000.jsonl"], tmp_path / "a")
    _, second = run_import([shared_data / "alpaca_dev_4000.jsonl"], tmp_path / "b", rows_per_shard=999)
    assert first.column("id").to_pylist() == second.column("id").to_pylist()


def test_a_sample_fraction_keeps_the_same_rows_whatever_their_order_and_counts_the_rest(shared_data, tmp_path):
    lines = (shared_data / "alpaca_dev_4000.jsonl").read_text().splitlines()
    reversed_file = tmp_path / "reversed.jsonl"
    reversed_file.write_text("\n".join(reversed(lines)) + "\n")
    summary, sample = run_import([shared_data / "alpaca_dev_4000.jsonl"], tmp_path / "a", sample_fraction=0.25)
    _, same = run_import([reversed_file], tmp_path / "b", sample_fraction=0.25)
    assert 900 < summary.rows_out < 1100 and summary.rows_out + summary.not_sampled == 4000
    assert set(sample.column("id").to_pylist()) == set(same.column("id").to_pylist())
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["not_sampled"] == summary.not_sampled
    assert "not in the sample" in summary.text()


def test_selfinstruct_seed_tasks_import_with_their_own_ids_and_metadata(shared_data, tmp_path):
    summary, pool = run_import([shared_data / "selfinstruct_seed_tasks.jsonl"], tmp_path / "pool")
    assert (summary.rows_in, summary.rows_out) == (175, 175)
    rows = {row["id"]: row for row in pool.to_pylist()}
    assert "seed_task_0" in rows and "seed_task_174" in rows
    meta = json.loads(rows["seed_task_1"]["meta"])
    assert meta == {"is_classification": False, "name": "antonym_relation"}
    assert rows["seed_task_1"]["input"] == "Night : Day :: Right : Left"


def test_the_bundled_sample_pool_covers_every_task_category(tmp_path):
    summary, pool = run_import(["bundled:sample"], tmp_path / "pool")
    assert summary.rows_out == summary.rows_in >= 300
    categories = Counter(json.loads(m)["category"] for m in pool.column("meta").to_pylist())
    assert set(categories) == set(DEFAULT_TASK_TARGETS)
    assert categories.most_common(1)[0][0] in ("Math", "Reasoning")


def test_chat_jsonl_takes_the_first_user_turn_and_keeps_the_system_prompt(tmp_path):
    source = tmp_path / "chat.jsonl"
    lines = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define entropy."},
                      {"role": "assistant", "content": "A measure of disorder."}]},
        {"messages": [{"role": "user", "content": "List three prime numbers."}]},
        {"messages": [{"role": "user", "content": "Hi there friend"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "And again?"}]},
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, pool = run_import([source], tmp_path / "pool")
    rows = pool.to_pylist()
    assert [r["instruction"] for r in rows] == ["Define entropy.", "List three prime numbers."]
    assert rows[0]["output"] == "A measure of disorder." and rows[1]["output"] is None
    assert json.loads(rows[0]["meta"]) == {"system": "Be brief."}
    assert summary.quarantined == Counter({"multi_turn": 1})
    assert quarantine(tmp_path / "pool")[0]["where"].endswith("chat.jsonl:3")


def test_parquet_and_alpaca_json_array_sources(tmp_path):
    table = pa.table({"instruction": ["Sort these numbers.", "Name a color."], "input": ["3 1 2", None],
                      "output": ["1 2 3", "Blue"], "uid": ["u1", "u2"], "difficulty": [3, 1]})
    pq.write_table(table, tmp_path / "pool.parquet")
    summary, pool = run_import([tmp_path / "pool.parquet"], tmp_path / "out1", id_column="uid")
    assert pool.column("id").to_pylist() == ["u1", "u2"]
    assert pool.column("input").to_pylist() == ["3 1 2", ""]
    assert json.loads(pool.column("meta")[0].as_py()) == {"difficulty": 3}

    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps([{"instruction": "Name a color.", "input": "", "output": "Red"}] * 2, indent=2))
    summary, pool = run_import([array], tmp_path / "out2")
    assert (summary.rows_out, summary.quarantined) == (1, Counter({"duplicate_id": 1}))


def test_hf_datasets_directory(tmp_path):
    import datasets as hf  # a dev dependency: the real library writes the directories read here

    rows = {"instruction": ["Explain gravity briefly.", "Translate 'cat' to French."], "input": ["", ""],
            "output": ["Mass attracts mass.", "chat"]}
    hf.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    hf.DatasetDict({"train": hf.Dataset.from_dict(rows), "test": hf.Dataset.from_dict(
        {k: [v[0] + " Again."] for k, v in rows.items()})}).save_to_disk(str(tmp_path / "dict"))
    summary, pool = run_import([tmp_path / "single"], tmp_path / "out1")
    assert pool.column("instruction").to_pylist() == rows["instruction"]
    summary, pool = run_import([tmp_path / "dict"], tmp_path / "out2")
    assert summary.rows_out == 3


def test_broken_rows_are_quarantined_with_line_field_and_reason(tmp_path):
    good = {"instruction": "Summarise the water cycle.", "input": "", "output": "Evaporation, rain, repeat."}
    source = tmp_path / "broken.jsonl"
    lines = [
        json.dumps(good).encode(),                                                        # 1 ok
        json.dumps({"input": "x", "output": "y"}).encode(),                               # 2 missing
        json.dumps({"instruction": "   ", "output": "y"}).encode(),                       # 3 empty
        json.dumps({"instruction": ["a", "list"], "output": "y"}).encode(),               # 4 wrong type
        json.dumps({"instruction": "Fine words here.", "input": 7}).encode(),             # 5 wrong type
        b'{"instruction": "Caf\xe9 latte recipe please", "output": "x"}',                 # 6 latin-1 byte
        b'{"instruction": "A lone \\ud800 surrogate inside", "output": "x"}',             # 7 unpaired surrogate
        json.dumps({"instruction": "Write a long essay now.", "output": "z" * 5000}).encode(),  # 8 too long
        json.dumps(good).encode(),                                                        # 9 duplicate
        b'{"instruction": "truncated row',                                                # 10 not JSON
        b"[1, 2, 3]",                                                                     # 11 not an object
        b"",                                                                              # blank: skipped
        json.dumps({"instruction": "Last good one, with more words."}).encode(),          # 13 ok
    ]
    source.write_bytes(b"\n".join(lines) + b"\n")
    summary, pool = run_import([source], tmp_path / "pool", max_row_chars=2000)
    assert summary.rows_in == 12 and summary.rows_out == 2
    assert summary.quarantined == Counter({"missing_field": 1, "empty_instruction": 1, "wrong_type": 2,
                                           "invalid_utf8": 2, "too_long": 1, "duplicate_id": 1,
                                           "not_json": 1, "not_an_object": 1})
    by_line = {int(q["where"].rsplit(":", 1)[1]): q for q in quarantine(tmp_path / "pool")}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert by_line[2]["field"] == "instruction" and by_line[5]["field"] == "input"
    assert by_line[6]["reason"] == "invalid_utf8" and "Caf\\xe9" in by_line[6]["raw"]
    assert by_line[10]["raw"] == '{"instruction": "truncated row'   # kept whole, to be fixed and re-imported
    assert by_line[8]["detail"].startswith("5023 characters")
    assert summary.rows_in == summary.rows_out + sum(summary.quarantined.values())   # nothing dropped silently


def test_bad_files_stop_the_import_naming_file_and_line(tmp_path):
    array = tmp_path / "cut.json"
    array.write_text('[\n  {"instruction": "one two three four"},\n  {"instruction": "five\n')
    with pytest.raises(PoolImportError, match=rf"{array}:3: not valid JSON"):
        run_import([array], tmp_path / "out1")
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(PoolImportError, match=rf"{not_parquet}: not a readable Parquet file"):
        run_import([not_parquet], tmp_path / "out2")
    pq.write_table(pa.table({"prompt": ["hi"]}), tmp_path / "nocol.parquet")
    with pytest.raises(PoolImportError, match=r"nocol.parquet: no 'instruction' column \(columns: prompt\)"):
        run_import([tmp_path / "nocol.parquet"], tmp_path / "out3")
    with pytest.raises(PoolImportError, match="no such file"):
        run_import([tmp_path / "absent.jsonl"], tmp_path / "out4")


def test_an_all_bad_pool_is_an_error_that_points_at_the_quarantine(tmp_path):
    source = tmp_path / "empty.jsonl"
    source.write_text('{"output": "no instruction"}\n')
    with pytest.raises(PoolImportError, match="no valid rows to import .1 read.; see .*quarantine.jsonl"):
        run_import([source], tmp_path / "pool")
    assert quarantine(tmp_path / "pool")[0]["reason"] == "missing_field"


def test_importing_into_a_used_directory_needs_overwrite(shared_data, tmp_path):
    source = shared_data / "selfinstruct_seed_tasks.jsonl"
    run_import([source], tmp_path / "pool", rows_per_shard=50)
    with pytest.raises(PoolImportError, match="not empty; pass --overwrite"):
        run_import([source], tmp_path / "pool")
    location = store.locate(str(tmp_path / "pool"))
    summary = import_pool([str(source)], location, PoolConfig(rows_per_shard=100), overwrite=True, progress=False)
    assert summary.shards == ["part-00000.parquet", "part-00001.parquet"]
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == [MANIFEST, *summary.shards]


def test_dates_times_and_decimals_in_parquet_and_hf_columns_are_kept_as_json_text(tmp_path):
    import datetime
    import decimal

    import datasets as hf

    when = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
    pq.write_table(pa.table({"instruction": ["Name a planet."], "created": pa.array([when], pa.timestamp("us", "UTC")),
                             "day": [datetime.date(2024, 5, 1)], "price": [decimal.Decimal("1.25")],
                             "took": pa.array([datetime.timedelta(seconds=90)], pa.duration("s"))}),
                   tmp_path / "typed.parquet")
    _, pool = run_import([tmp_path / "typed.parquet"], tmp_path / "out1")
    assert json.loads(pool.column("meta")[0].as_py()) == {
        "created": "2024-05-01T12:30:00+00:00", "day": "2024-05-01", "price": "1.25", "took": 90.0}
    hf.Dataset.from_dict({"instruction": ["Name a moon."], "seen": [when]}).save_to_disk(str(tmp_path / "hf"))
    _, pool = run_import([tmp_path / "hf"], tmp_path / "out2")
    assert json.loads(pool.column("meta")[0].as_py())["seen"].startswith("2024-05-01T12:30:00")


def test_a_binary_column_stops_the_import_naming_it(tmp_path):
    pq.write_table(pa.table({"instruction": ["Describe the image."], "image": [b"\x89PNG..."],
                             "tags": [[b"a"]]}), tmp_path / "images.parquet")
    with pytest.raises(PoolImportError, match=r"images.parquet: column\(s\) image \(binary\), tags \(list<element: "
                                              r"binary>\) hold binary data"):
        run_import([tmp_path / "images.parquet"], tmp_path / "out")


def test_an_out_that_is_a_file_is_refused_before_any_work(shared_data, tmp_path, capsys):
    from pipeline.cli import main

    taken = tmp_path / "pool.parquet"
    taken.write_text("keep me")
    code = main(["pool", "import", str(shared_data / "selfinstruct_seed_tasks.jsonl"), "--out", str(taken)])
    assert code == 2 and taken.read_text() == "keep me"
    assert f"{taken}: is a file; the output must be a directory" in capsys.readouterr().err


def test_a_directory_import_reads_any_case_and_gzip_and_lists_what_it_skipped(tmp_path):
    import gzip

    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "a.JSONL").write_text(json.dumps({"instruction": "First of all, say hi."}) + "\n")
    with gzip.open(source / "b.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"instruction": "Then, say goodbye."}) + "\n")
    (source / "notes.txt").write_text("not a pool\n")
    summary, pool = run_import([source], tmp_path / "out")
    assert sorted(pool.column("instruction").to_pylist()) == ["First of all, say hi.", "Then, say goodbye."]
    assert summary.skipped == [
        {"path": str(source / "nested"), "why": "a subdirectory: name it as a source of its own"},
        {"path": str(source / "notes.txt"), "why": "not a pool file (.jsonl, .json, .parquet, .jsonl.gz, .json.gz)"}]
    assert "skipped 2 entries of source directories" in summary.text() and "notes.txt" in summary.text()
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["skipped"] == summary.skipped


def test_a_broken_gzip_file_stops_the_import_naming_it(tmp_path):
    import gzip

    whole = gzip.compress(b"".join(json.dumps({"instruction": f"Row {i} here."}).encode() + b"\n" for i in range(500)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PoolImportError, match=r"cut.jsonl.gz: not a readable gzip file"):
        run_import([tmp_path / "cut.jsonl.gz"], tmp_path / "out1")
    (tmp_path / "plain.jsonl.gz").write_text('{"instruction": "not gzipped"}\n')
    with pytest.raises(PoolImportError, match=r"plain.jsonl.gz: not a readable gzip file"):
        run_import([tmp_path / "plain.jsonl.gz"], tmp_path / "out2")


def test_a_utf8_bom_costs_no_row(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + json.dumps({"instruction": "Count to three."}).encode() + b"\n")
    (tmp_path / "bom.json").write_bytes(bom + json.dumps([{"instruction": "Count to four."}]).encode())
    summary, pool = run_import([tmp_path / "bom.jsonl", tmp_path / "bom.json"], tmp_path / "out")
    assert (summary.rows_out, summary.quarantined) == (2, Counter())


def test_ids_must_be_non_empty_strings(tmp_path):
    source = tmp_path / "ids.jsonl"
    rows = [{"id": True, "instruction": "One."}, {"id": "", "instruction": "Two."},
            {"id": "  ", "instruction": "Three."}, {"id": 7, "instruction": "Four."},
            {"id": "x", "instruction": "Five."}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary, pool = run_import([source], tmp_path / "out")
    assert pool.column("id").to_pylist() == ["7", "x"]
    assert summary.quarantined == Counter({"wrong_type": 1, "empty_id": 2})
    assert quarantine(tmp_path / "out")[0]["detail"].startswith("'id' must be a non-empty string (or an integer), "
                                                                "got bool")


def test_auto_format_is_decided_per_record_and_a_problem_says_how_the_record_was_read(tmp_path):
    source = tmp_path / "mixed.jsonl"
    lines = [{"messages": [{"role": "user", "content": "Chat first."}]},
             {"instruction": "Alpaca after it.", "output": "ok"},
             {"messages": "not a list"}]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, pool = run_import([source], tmp_path / "out")
    assert pool.column("instruction").to_pylist() == ["Chat first.", "Alpaca after it."]
    rejected = quarantine(tmp_path / "out")[0]
    assert rejected["read_as"] == "chat (decided for this record: format auto)" and rejected["field"] == "messages"
    run_import([source], tmp_path / "forced", format="alpaca")
    assert {q["read_as"] for q in quarantine(tmp_path / "forced")} == {"alpaca (the import's format)"}
