"""Benchmark online serving (issue 28): `emotr serve` against `mlflow models serve` and the bare
scorer, and `emotr serve` through a promotion and a killed replica.

    python jobs/bench_serve.py --photos DIR [--work DIR] [--seconds 45] [--docs]
        [--parts emotr,mlflow,bare,faults,explain]

One registered version (the demo set, hed-bsds500 VGG16 at 224x224, gap5 + the tutorial's head;
`emotr run` registers it in --work, with every store there) is served in turns on this machine: (a)
`emotr serve` (--replicas of --cpus-per-replica CPUs, 1 of 2 by default; batches of --batch), (b)
`mlflow models serve --env-manager local` (its default workers: one per CPU). jobs/serve_load.py
puts a locust load of single-image requests (the JPEGs of --photos, 127.0.0.1 only) on each at 1, 4
and 16 clients: requests/s, p50/p95/p99, failures. (c) The bare scorer: that version's VGG and head
in this process on batches of decoded images, its images/s the limit. Then (d) with 2 replicas of 1
CPU, 4 clients for --fault-seconds: `emotr promote --version 2` at --act-at s (failed requests,
changes of the answering version in arrival order), and (e) one replica SIGKILLed at --act-at s
(share answered 200; /healthz 200 and 2 replicas alive again at the end). `--parts explain`: (f)
/explain against /predict of one emotr serve at 4 clients, in turns twice (issue 29).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
import yaml
from benchlib import add_output_arguments, publish, section_heading

BIN = Path(sys.executable).parent  # `emotr`, and the uvicorn `mlflow models serve` starts
MODEL = "emotr-bench"
REPLICA_TITLE = "ServeReplica:emotr:EmotrServer"  # the title Ray gives a replica's process
LOAD_SCRIPT = Path(__file__).with_name("serve_load.py")


def work_config(work: Path) -> Path:
    """The job's YAML: every store under `work`, the demo set, the real input size, one trial."""
    config = {
        "data": {
            "root": str(work / "data"),
            "classes": ["negative", "positive"],
            "generate_demo": True,
            "demo_n": 200,
        },
        "backbone": {"weights": "hed-bsds500", "input_size": [224, 224]},
        "extract": {"taps": ["gap5"]},
        "cache": {"root": str(work / "cache")},
        # The tutorial's recipe alone: the benchmark times serving, not the search.
        "tune": {
            "n_trials": 1,
            "cv_folds": 0,
            "peer": False,
            "ensemble_size": 0,
            "search_space": {},
            "storage": f"sqlite:///{work / 'optuna.db'}",
        },
        "mlflow": {
            "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
            "artifact_location": str(work / "artifacts"),
        },
        "registry": {"model_name": MODEL},
        "ray": {"num_cpus": 2},
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def emotr(config: Path, *args: str) -> None:
    """An `emotr` command as a user types it (it must succeed)."""
    subprocess.run([str(BIN / "emotr"), *args, "-c", str(config)], check=True, cwd=config.parent)


def register_versions(config: Path) -> None:
    """Versions 1 (the champion) and 2 (another split's head) of MODEL, unless registered."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{config.parent / 'mlflow.db'}")
    known = {str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")}
    if "1" not in known:
        emotr(config, "run", "tune.study_name=bench-serve-1")
    if "2" not in known:
        # Another split gives another head: the promotion's switch shows in the answers.
        overrides = ["tune.study_name=bench-serve-2", "data.seed=1", "registry.auto_promote=false"]
        emotr(config, "run", *overrides)
    emotr(config, "promote", "--version", "1")


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A server this job started in its own session, and where it answers."""

    process: subprocess.Popen
    url: str
    port: int

    def stop(self) -> None:
        """Ctrl-C (emotr serve deletes its application and stops its Ray), then SIGTERM and
        SIGKILL to whatever of the server lives on; return once its port is free."""
        family = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGINT)
        for group_signal in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.process.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, group_signal)
        self.process.wait(timeout=30)
        for process in family:  # uvicorn's workers, Ray's actors: outside the group or orphaned
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(family, timeout=30)
        for process in alive:
            process.kill()
        deadline = time.monotonic() + 60
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.5)


def port_is_free(port: int) -> bool:
    """True when nothing accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _default_sigint() -> None:
    # A shell's background job ignores SIGINT, and Python then never turns it into the
    # KeyboardInterrupt on which `emotr serve` stops cleanly: give the server the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(command: list[str], port: int, ready: str, log: Path, env=None) -> Server:
    """Start a server (its own session, its output to `log`) and wait for `ready` to answer."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_default_sigint,
        )  # fmt: skip
    server = Server(process, f"http://127.0.0.1:{port}", port)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[0]} ended with {process.returncode}: see {log}")
        try:
            if requests.get(f"{server.url}{ready}", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(1)
    server.stop()
    raise SystemExit(f"{server.url}{ready} did not answer 200 in 300 s: see {log}")


def start_emotr_serve(
    config: Path, replicas: int, cpus: int, batch: int, wait: float | None = None
) -> Server:
    """`emotr serve` of the champion: `replicas` replicas of `cpus` CPUs, batches of `batch`
    (waiting `wait` s for company; None: serve.batch_wait_s's default)."""
    port = free_port()
    command = [str(BIN / "emotr"), "serve", "-c", str(config), f"serve.port={port}"]
    command += [f"serve.replicas={replicas}", f"serve.cpus_per_replica={cpus}"]
    command += [f"serve.max_batch_size={batch}"]
    if wait is not None:
        command += [f"serve.batch_wait_s={wait}"]
    return start_server(command, port, "/healthz", config.parent / f"serve-{replicas}.log")


def start_mlflow_serve(config: Path) -> Server:
    """`mlflow models serve` of version 1, as the README runs it (.venv/bin first on PATH)."""
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/1"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{config.parent / 'mlflow.db'}"
    return start_server(command, port, "/ping", config.parent / "mlflow-serve.log", env)


def start_load(url: str, endpoint: str, clients: int, args, records: Path | None = None):
    """jobs/serve_load.py on `url`, started; returns once its timed part began."""
    command = [sys.executable, str(LOAD_SCRIPT), "--url", url, "--endpoint", endpoint]
    command += ["--photos", str(args.photos), "--clients", str(clients)]
    seconds = args.fault_seconds if records else args.seconds
    command += ["--seconds", str(seconds), "--warmup", str(args.warmup)]
    if records:
        command += ["--records", str(records)]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = load.stdout.readline()
    if "timed part begins" not in line:
        raise SystemExit(f"the load did not start: {line!r}")
    return load


def finish_load(load: subprocess.Popen) -> dict:
    """The load's summary, once it ended."""
    output, _ = load.communicate(timeout=600)
    if load.returncode:
        raise SystemExit(f"the load failed ({load.returncode})")
    return json.loads(output.strip().splitlines()[-1])


def measure(server: Server, endpoint: str, clients: int, args) -> dict:
    """One point: `clients` clients on the endpoint; the summary with the load average."""
    summary = finish_load(start_load(server.url, endpoint, clients, args))
    summary["load"] = os.getloadavg()[0]
    print(f"{endpoint} {clients} clients: {summary}", flush=True)
    return summary


def bare_scorer(config: Path, photos: Path, batch: int, seconds: float) -> float:
    """Images/s of version 1's VGG + head in this process on batches of decoded photos."""
    import mlflow
    import numpy as np

    from emotr.deploy.registry import scorer_of

    mlflow.set_tracking_uri(f"sqlite:///{config.parent / 'mlflow.db'}")
    scorer = scorer_of(mlflow.pyfunc.load_model(f"models:/{MODEL}/1"))
    scorer.extractor.batch_size = batch  # as a replica sets it: one pass per batch
    pixels = np.stack([scorer.decode(p.read_bytes()) for p in sorted(photos.glob("*.jpg"))])
    batches = [pixels[i : i + batch] for i in range(0, len(pixels) - batch + 1, batch)]
    scorer.score_features(scorer.extractor(batches[0]))  # trace the graph before timing
    n_images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for chunk in batches:
            scorer.score_features(scorer.extractor(chunk))
            n_images += len(chunk)
    return n_images / (time.perf_counter() - started)


def replica_titles(server: Server) -> list[str]:
    """Process titles of `emotr serve`'s replicas (descendants of its process): Ray titles a
    replica `ray::ServeReplica:APP:DEPLOYMENT`, with `.method` appended while its actor runs a
    call such as its start-up."""
    titles = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            title = " ".join(" ".join(process.cmdline()).split())  # Ray pads it with spaces
        except psutil.NoSuchProcess:
            continue
        if REPLICA_TITLE in title:
            titles.append(f"{process.pid} {title}")
    return titles


def version_changes(rows: list) -> int:
    """How often the answering version changes, answers in arrival order (errors skipped)."""
    versions = [version for _, status, version, _ in rows if status == 200]
    return sum(1 for before, after in itertools.pairwise(versions) if before != after)


def promotion_under_load(server: Server, config: Path, args) -> dict:
    """(d) 4 clients; `emotr promote --version 2` at --act-at s: failures, version changes."""
    records = config.parent / "promotion.json"
    load = start_load(server.url, "predict", 4, args, records)
    timed_start = time.monotonic()
    time.sleep(args.act_at)
    emotr(config, "promote", "--version", "2")
    promoted_at = time.monotonic() - timed_start  # when the command returned
    summary = finish_load(load)
    rows = json.loads(records.read_text())
    switched = [row[0] for row in rows if row[1] == 200 and row[2] == "2"]
    summary.update(
        changes=version_changes(rows),
        promoted_at=promoted_at,
        first_v2_at=min(switched) if switched else None,
        load=os.getloadavg()[0],
    )
    print(f"promotion: {summary}", flush=True)
    return summary


def kill_under_load(server: Server, config: Path, args) -> dict:
    """(e) 4 clients; one replica SIGKILLed at --act-at s: answered share; /healthz and the
    replica count until Serve has started a new replica (its title without a running call)."""
    records = config.parent / "kill.json"
    before = replica_titles(server)
    load = start_load(server.url, "predict", 4, args, records)
    time.sleep(args.act_at)
    os.kill(int(before[0].split()[0]), signal.SIGKILL)
    killed_at = time.monotonic()
    recovered_s, titles, healthy = None, [], False
    while time.monotonic() - killed_at < 150:
        time.sleep(1)
        titles = replica_titles(server)
        ready = [t for t in titles if t.endswith(REPLICA_TITLE)]
        healthy = requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
        if healthy and len(ready) == 2 and recovered_s is None:
            recovered_s = time.monotonic() - killed_at
        if recovered_s is not None and load.poll() is not None:
            break
    summary = finish_load(load)
    rows = json.loads(records.read_text())
    summary.update(
        replicas_before=before,
        replicas_after=titles,
        answered=sum(1 for row in rows if row[1] == 200) / max(1, len(rows)),
        statuses=dict(Counter(str(row[1]) for row in rows)),
        healthy=healthy,
        recovered_s=recovered_s,
        load=os.getloadavg()[0],
    )
    print(f"kill: {summary}", flush=True)
    return summary


def throughput_rows(points: list[tuple[str, str, dict]]) -> str:
    """The table of the load points: server, endpoint, clients, req/s, latencies, failures."""
    lines = [
        "| server | endpoint | clients | requests/s | p50 ms | p95 ms | p99 ms | failed | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for server, endpoint, point in points:
        lines.append(
            f"| {server} | /{endpoint} | {point['clients']} | {point['rps']:.1f} | "
            f"{point['p50_ms']:.0f} | {point['p95_ms']:.0f} | {point['p99_ms']:.0f} | "
            f"{point['failures']} of {point['requests']} | {point['load']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def target_rows(results: dict) -> list[str]:
    """One row per issue-28 target that this run measured: measured value, met or not."""
    rows = []
    emotr_pts, mlflow_pts = results.get("emotr", {}), results.get("mlflow", {})
    bare = results.get("bare")
    if 16 in emotr_pts and bare:
        ratio = emotr_pts[16]["rps"] / bare
        rows.append(
            f"| 16 clients: emotr serve >= 0.8x the bare scorer's images/s | "
            f"{emotr_pts[16]['rps']:.1f} vs {bare:.1f}: **{ratio:.2f}x** | {_met(ratio >= 0.8)} |"
        )
    if 16 in emotr_pts and 16 in mlflow_pts:
        ratio = emotr_pts[16]["rps"] / mlflow_pts[16]["rps"]
        rows.append(
            f"| 16 clients: emotr serve >= 3x the requests/s of mlflow models serve | "
            f"{emotr_pts[16]['rps']:.1f} vs {mlflow_pts[16]['rps']:.1f}: **{ratio:.2f}x** | "
            f"{_met(ratio >= 3)} |"
        )
    if 1 in emotr_pts and 1 in mlflow_pts:
        ratio = emotr_pts[1]["p50_ms"] / mlflow_pts[1]["p50_ms"]
        rows.append(
            f"| 1 client: emotr serve's p50 <= 1.2x mlflow's | {emotr_pts[1]['p50_ms']:.0f} vs "
            f"{mlflow_pts[1]['p50_ms']:.0f} ms: **{ratio:.2f}x** | {_met(ratio <= 1.2)} |"
        )
    if explain := results.get("explain"):
        low = min(explain["ratios"])
        shown = " and ".join(
            f"{r['explain']['rps']:.2f} vs {r['predict']['rps']:.2f}" for r in explain["rounds"]
        )
        rows.append(
            f"| /explain requests/s >= 0.8x /predict's at {explain['clients']} clients (issue 29) "
            f"| {shown} requests/s: **{', '.join(f'{x:.2f}x' for x in explain['ratios'])}** | "
            f"{_met(low >= 0.8)} |"
        )
    if promotion := results.get("promotion"):
        met = promotion["failures"] == 0 and promotion["changes"] == 1
        rows.append(
            f"| promotion under 4 clients, 2 replicas: 0 failed, the version switches once | "
            f"{promotion['failures']} failed of {promotion['requests']}, "
            f"{promotion['changes']} switch(es) | {_met(met)} |"
        )
    if kill := results.get("kill"):
        met = kill["answered"] >= 0.99 and kill["healthy"] and kill["recovered_s"] is not None
        rows.append(
            f"| a replica SIGKILLed under 4 clients: >= 99 % answered, healthy again | "
            f"{100 * kill['answered']:.1f} % of {kill['requests']}; healthy, 2 replicas after "
            f"{kill['recovered_s'] or float('nan'):.0f} s | {_met(met)} |"
        )
    return rows


def _met(value: bool) -> str:
    return "yes" if value else "**no**"


def fault_text(results: dict, args) -> str:
    """The fault scenarios in words: when the version switched, what the kill cost."""
    text = ""
    if promotion := results.get("promotion"):
        text += (
            f"\n(d) promotion: `emotr promote --version 2` started {args.act_at:.0f} s and "
            f"returned {promotion['promoted_at']:.1f} s into "
            f"{promotion['seconds']:.0f} s of 4 clients; first answer of version 2 at "
            f"{promotion['first_v2_at'] or float('nan'):.1f} s; {promotion['rps']:.1f} requests/s, "
            f"p50/p95/p99 {promotion['p50_ms']:.0f}/{promotion['p95_ms']:.0f}/"
            f"{promotion['p99_ms']:.0f} ms, load {promotion['load']:.1f}.\n"
        )
    if kill := results.get("kill"):
        text += (
            f"\n(e) SIGKILL of one replica {kill['killed_at']:.0f} s into {kill['seconds']:.0f} s "
            f"of 4 clients: HTTP statuses {kill['statuses']}; {kill['rps']:.1f} requests/s, "
            f"p50/p95/p99 {kill['p50_ms']:.0f}/{kill['p95_ms']:.0f}/{kill['p99_ms']:.0f} ms; "
            f"replicas before `{'; '.join(kill['replicas_before'])}`, at the end "
            f"`{'; '.join(kill['replicas_after'])}`; load {kill['load']:.1f}.\n"
        )
    return text


def explain_against_predict(config: Path, args, clients: int = 4) -> dict:
    """/explain and /predict of one emotr serve at `clients`, in turns twice (issue 29)."""
    server = start_emotr_serve(config, replicas=1, cpus=2, batch=args.batch)
    try:
        rounds = [
            {
                endpoint: measure(server, endpoint, clients, args)
                for endpoint in ("predict", "explain")
            }
            for _ in range(2)
        ]
    finally:
        server.stop()
    ratios = [r["explain"]["rps"] / r["predict"]["rps"] for r in rounds]
    print(f"/explain vs /predict at {clients} clients: {ratios}", flush=True)
    return {"clients": clients, "rounds": rounds, "ratios": ratios}


def run_parts(args, config: Path) -> dict:
    """The parts asked for, in turns: emotr serve, mlflow models serve, the bare scorer, faults."""
    results: dict = {"points": []}
    if "emotr" in args.parts:
        server = start_emotr_serve(
            config, args.replicas, args.cpus_per_replica, args.batch, args.batch_wait
        )
        try:
            results["emotr"] = {n: measure(server, "predict", n, args) for n in args.clients}
            results["points"] += [("emotr serve", "predict", p) for p in results["emotr"].values()]
            same = measure(server, "invocations", max(args.clients), args)
            results["points"].append(("emotr serve", "invocations", same))
        finally:
            server.stop()
    if "mlflow" in args.parts:
        server = start_mlflow_serve(config)
        try:
            results["mlflow"] = {n: measure(server, "invocations", n, args) for n in args.clients}
            results["points"] += [("mlflow models serve", "invocations", p)
                                  for p in results["mlflow"].values()]  # fmt: skip
        finally:
            server.stop()
    if "bare" in args.parts:
        results["bare"] = bare_scorer(config, args.photos, args.batch, args.bare_seconds)
        results["bare_load"] = os.getloadavg()[0]
        print(f"bare scorer: {results['bare']:.1f} images/s", flush=True)
    if "explain" in args.parts:
        results["explain"] = explain_against_predict(config, args)
        results["points"] += [
            ("emotr serve", endpoint, point)
            for turn in results["explain"]["rounds"]
            for endpoint, point in turn.items()
        ]
    if "faults" in args.parts:
        server = start_emotr_serve(config, replicas=2, cpus=1, batch=args.batch)
        try:
            results["promotion"] = promotion_under_load(server, config, args)
            results["kill"] = kill_under_load(server, config, args)
            results["kill"]["killed_at"] = args.act_at
        finally:
            server.stop()
            emotr(config, "promote", "--version", "1")  # the champion of a next run's start
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="a folder of real *.jpg")
    parser.add_argument("--source", default="", help="where the photos came from (repo@commit)")
    parser.add_argument("--work", type=Path, help="stores and logs (default: a new /tmp folder)")
    parser.add_argument("--clients", type=lambda t: [int(n) for n in t.split(",")],
                        default=[1, 4, 16], help="concurrent clients, e.g. 1,4,16")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=45.0, help="timed seconds per point")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before each")
    parser.add_argument("--batch", type=int, default=8, help="serve.max_batch_size, bare batch")
    parser.add_argument("--batch-wait", type=float, help="serve.batch_wait_s")
    parser.add_argument("--replicas", type=int, default=1, help="(a)'s serve.replicas")
    parser.add_argument("--cpus-per-replica", type=int, default=2, help="(a)'s replica CPUs")
    parser.add_argument("--bare-seconds", type=float, default=30.0)
    parser.add_argument("--fault-seconds", type=float, default=60.0, help="each fault load")
    parser.add_argument("--act-at", type=float, default=20.0, help="promote / kill after this")
    parser.add_argument("--parts", type=lambda t: t.split(","),
                        default=["emotr", "mlflow", "bare", "faults"])  # fmt: skip
    add_output_arguments(parser)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    config = work_config(work.resolve())
    register_versions(config)
    load_before, started = os.getloadavg(), time.perf_counter()
    results = run_parts(args, config)
    minutes, load_after = (time.perf_counter() - started) / 60, os.getloadavg()
    bare = results.get("bare")
    section = (
        section_heading(
            "Online serving: emotr serve, mlflow models serve, the bare scorer (issue 28)"
        )
        + f", no GPU, load average (1 min) {load_before[0]:.1f} before and {load_after[0]:.1f} "
        f"after ({minutes:.0f} min). {len(list(args.photos.glob('*.jpg')))} real JPEGs "
        f"({args.source or args.photos}), one per request; version 1 of a demo-set model "
        "(hed-bsds500 VGG16, 224x224, gap5 + the tutorial's head); emotr serve: "
        f"{args.replicas} replica(s) of {args.cpus_per_replica} CPU(s), batches of {args.batch}; "
        "mlflow models serve --env-manager local, its default workers; locust "
        f"(jobs/serve_load.py), {args.warmup:.0f} s warm-up then {args.seconds:.0f} s per point, "
        "no think time.\n\n"
        + throughput_rows(results["points"])
        + (
            f"\nBare scorer (VGG + head of version 1, this process, batches of {args.batch} "
            f"decoded images): **{bare:.1f} images/s** (load {results['bare_load']:.1f}).\n"
            if bare
            else ""
        )
        + fault_text(results, args)
        + "\n| target | measured | met? |\n| --- | --- | --- |\n"
        + "\n".join(target_rows(results))
        + "\n"
    )
    publish(args, section)


if __name__ == "__main__":
    main()
