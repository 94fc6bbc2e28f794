"""One round of the demo (configs/local.yaml) with its run directory on a local path, then on s3:// (moto's S3
server on loopback): wall time per stage and the ratio s3/local.

Both runs use the demo's own teacher (`vllm serve` of the bundled model on loopback) and the same settings but
`curriculum.rounds: 1` and whatever --set gives; each starts from an empty run directory (a fresh prefix of
the bucket), so round 0 labels the pool and trains the classifier in both. Stage times are the driver's
("round 0: STAGE done in S s"), with the score and train manifests' own split. With --pairs N the two runs are
repeated N times in alternating order (local first, then s3 first) and the table shows each stage's median,
so that load from other work on the machine weighs on both sides alike. moto keeps objects in memory
and answers on loopback: this measures what going through the S3 API costs the pipeline (requests, copies,
uploads of checkpoints and models, copies back into the model cache), not a real network's latency or
bandwidth.

    .venv/bin/python benchmarks/bench_s3.py --out benchmarks/results/s3.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import moto_s3  # noqa: E402  (the tests' moto server)

REPO = Path(__file__).resolve().parents[1]
TAPIR = str(Path(sys.executable).with_name("tapir"))
BUCKET = "tapir-bench"
STAGES = ("score", "plan", "expand", "respond", "train_set", "train")


def demo_config(run_dir: str, settings: dict, s3_endpoint_url: str | None) -> dict:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["curriculum"]["rounds"] = 1
    for dotted, value in settings.items():
        section, key = dotted.split(".", 1)
        config.setdefault(section, {})[key] = value
    config["storage"] = {**config.get("storage", {}), "run_dir": run_dir}
    if s3_endpoint_url:
        config["storage"]["s3_endpoint_url"] = s3_endpoint_url
    return config


def run_once(name: str, config: dict, work: Path, env: dict) -> dict:
    """`tapir run` of one config from an empty working directory; its wall time and each stage's."""
    directory = work / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = directory / "tapir.log"
    load_before = os.getloadavg()[1]
    started = time.perf_counter()
    with open(log, "w") as output:
        done = subprocess.run([TAPIR, "run", str(path)], stdout=output, stderr=subprocess.STDOUT, cwd=directory,
                              env=env)
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{name}: tapir run exited {done.returncode}; see {log}:\n{text[-3000:]}")
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"^round 0: (\w+) done in ([\d.]+) s$", text, re.M)}
    print(f"{name}: {wall:.1f} s; " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)
    # the 5-minute load average before and after: other work on the machine skews one run against the other
    return {"wall_s": round(wall, 1), "stages_s": stages, "log": str(log),
            "load_avg_5min": [round(load_before, 2), round(os.getloadavg()[1], 2)]}


def local_details(run: Path) -> dict:
    files = [p for p in run.rglob("*") if p.is_file()]
    return {"objects": len(files), "bytes": sum(p.stat().st_size for p in files),
            "score": json.loads((run / "round_0" / "score" / "_manifest.json").read_text()),
            "train": json.loads((run / "round_0" / "sft" / "_manifest.json").read_text())}


def s3_details(s3, prefix: str) -> dict:
    files = s3.files(prefix)
    return {"objects": len(files), "bytes": sum(files.values()),
            "score": json.loads(s3.read(f"{prefix}/round_0/score/_manifest.json")),
            "train": json.loads(s3.read(f"{prefix}/round_0/sft/_manifest.json"))}


# a request line of moto's server log: 127.0.0.1 - - [22/Nov/2026 01:55:08] "POST /bucket/key?uploadId=… HTTP/1.1" 200 -
_REQUEST = re.compile(r'"(?:\x1b\[[\d;]*m)*(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+(?:\x1b\[0m)*" (\d{3})')


def s3_requests(lines: list[str]) -> dict:
    """The S3 calls in moto's log lines, by kind: a multipart upload's parts, starts and completions apart."""
    kinds: dict[str, int] = {}
    for line in lines:
        found = _REQUEST.search(line)
        if not found:
            continue
        method, target, status = found.groups()
        query = target.partition("?")[2]
        if method == "PUT" and "partNumber=" in query:
            kind = "PUT (multipart part)"
        elif method == "POST":
            kind = "POST (multipart start)" if query.startswith("uploads") else "POST (multipart complete)"
        elif method == "GET" and target.partition("?")[0].count("/") == 1:
            kind = "GET (list)"
        else:
            kind = method
        if not status.startswith("2"):
            kind += f" → {status}"
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda item: -item[1]))


def split(details: dict) -> dict:
    score, train = details["score"], details["train"]
    return {"objects": details["objects"], "bytes": details["bytes"],
            "score_setup_s": score["setup_s"], "score_job_s": score["job_s"],
            "train_prepare_s": train["prepare_s"], "train_fit_s": train["fit_s"], "train_smoke_s": train["smoke_s"]}


def table(results: dict) -> str:
    local, s3 = results["local"], results["s3"]
    rows = ["| | local | s3 (moto) | s3/local |", "|---|---|---|---|"]

    def row(name, a, b, unit="s"):
        ratio = f"{b / a:.2f}" if a else "–"
        rows.append(f"| {name} | {a:.1f} {unit} | {b:.1f} {unit} | {ratio} |")

    for stage in STAGES:
        row(stage, local["stages_s"][stage], s3["stages_s"][stage])
    for key, label in (("score_setup_s", "  score: classifier label + train"),
                       ("score_job_s", "  score: streaming job"),
                       ("train_prepare_s", "  train: data"), ("train_fit_s", "  train: fit (Ray Train)"),
                       ("train_smoke_s", "  train: vLLM smoke test")):
        row(label, local["split"][key], s3["split"][key])
    row("**command wall time**", local["wall_s"], s3["wall_s"])
    rows.append(f"| run directory | {local['split']['objects']} files, {local['split']['bytes'] / 1e6:.0f} MB | "
                f"{s3['split']['objects']} objects, {s3['split']['bytes'] / 1e6:.0f} MB | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/tapir-bench-s3")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "s3.json"))
    parser.add_argument("--pairs", type=int, default=1, help="local and s3 runs, alternating which goes first")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override (YAML value), e.g. pool.sample_fraction=0.15")
    args = parser.parse_args()
    settings = {key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in args.set)}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
               "config": {"file": "configs/local.yaml", "curriculum.rounds": 1, **settings}, "runs": []}
    with moto_s3() as s3:
        s3.create_bucket(BUCKET)
        for pair in range(args.pairs):
            for kind in (("local", "s3") if pair % 2 == 0 else ("s3", "local")):
                name = f"{kind}-{pair}"
                if kind == "local":
                    run = work / name / "run"
                    result = run_once(name, demo_config(str(run), settings, None), work, s3.env)
                    result["split"] = split(local_details(run))
                else:
                    prefix = f"{BUCKET}/{name}/run"
                    logged = len(s3.log.read_text(errors="replace").splitlines())
                    result = run_once(name, demo_config(f"s3://{prefix}", settings, s3.endpoint_url), work, s3.env)
                    result["split"] = split(s3_details(s3, prefix))
                    requests = s3_requests(s3.log.read_text(errors="replace").splitlines()[logged:])
                    result["s3_requests"] = {"total": sum(requests.values()), **requests}
                results["runs"].append({"name": name, "kind": kind, **result})
    for kind in ("local", "s3"):
        results[kind] = median_run([r for r in results["runs"] if r["kind"] == kind])
    results["ratio_s3_local"] = {stage: round(results["s3"]["stages_s"][stage] / results["local"]["stages_s"][stage], 3)
                                 for stage in STAGES if results["local"]["stages_s"][stage]}
    results["ratio_s3_local"]["wall"] = round(results["s3"]["wall_s"] / results["local"]["wall_s"], 3)
    results["table"] = table(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])
    print(f"written to {args.out}")


def median_run(runs: list[dict]) -> dict:
    """Each number's median over the runs of one kind."""
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "stages_s": {s: statistics.median(r["stages_s"][s] for r in runs) for s in STAGES},
            "split": {k: statistics.median(r["split"][k] for r in runs) for k in runs[0]["split"]}}


if __name__ == "__main__":
    main()
