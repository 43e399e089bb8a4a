"""A headless locust load of single-image requests on one URL; jobs/bench_serve.py runs it.

    python jobs/serve_load.py --url http://127.0.0.1:8000 --endpoint predict --photos DIR \\
        --clients 4 --seconds 45 [--warmup 5] [--max-requests N] [--records FILE]

Each request sends one JPEG of DIR, drawn at random: as a multipart `file` field to /predict
(emotr serve), or base64 in MLflow's dataframe_split to /invocations (both servers). Prints
`timed part begins` once the warm-up is over, then one JSON line: requests, failures, requests/s,
p50/p95/p99 latency of the timed part. --records writes each timed request as [seconds since the
timed part began, at its end; HTTP status; X-Emotr-Version header; latency ms] in the order the
answers arrived.

A process of its own: locust patches the process it is imported in with gevent, and the patch
must come before anything imports ssl or threading, so locust is the first import here.
"""

from locust import FastHttpUser, constant, events, task  # noqa: I001 - first: gevent's patch

import argparse
import base64
import json
import random
import time
from pathlib import Path

import gevent
import numpy as np
from locust.env import Environment

BOUNDARY = "emotr-bench-boundary"
VERSION_HEADER = "X-Emotr-Version"


def multipart_body(name: str, data: bytes) -> bytes:
    """A multipart/form-data body of one `file` field (what `curl -F file=@photo.jpg` sends)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def invocation_body(data: bytes) -> bytes:
    """MLflow's scoring request of one image: {"dataframe_split": {"columns": ["image"], ...}}."""
    row = [base64.b64encode(data).decode()]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [row]}}).encode()


def request_bodies(photos: Path, endpoint: str) -> tuple[list[bytes], str]:
    """Every JPEG of the folder as a request body of the endpoint, and its Content-Type."""
    files = sorted(photos.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no *.jpg in {photos}")
    if endpoint in ("predict", "explain"):  # the same uploads: /explain adds the overlays
        bodies = [multipart_body(f.name, f.read_bytes()) for f in files]
        return bodies, f"multipart/form-data; boundary={BOUNDARY}"
    return [invocation_body(f.read_bytes()) for f in files], "application/json"


class ImageClient(FastHttpUser):
    """One client: a request, its answer, the next request (no think time)."""

    wait_time = constant(0)
    network_timeout = 120.0  # a slow server's latency is a measurement, not an error
    connection_timeout = 30.0
    path = "/predict"
    bodies: list[bytes] = []
    content_type = ""

    @task
    def post_image(self) -> None:
        """POST one random photo."""
        headers = {"Content-Type": self.content_type}
        self.client.post(self.path, data=random.choice(self.bodies), headers=headers)


class Recorder:
    """Every answer's latency, status and version, from locust's request event."""

    def __init__(self):
        self.started = time.monotonic()
        self.rows: list[tuple[float, int, str, float]] = []

    def reset(self) -> None:
        """Forget the warm-up: the timed part begins now."""
        self.started, self.rows = time.monotonic(), []

    def on_request(self, response_time, response=None, exception=None, **_) -> None:
        """locust's `request` event: one answer (or a connection error, status 0)."""
        status = getattr(response, "status_code", 0) or 0
        headers = getattr(response, "headers", None) or {}
        version = headers.get(VERSION_HEADER, "") if status else ""
        self.rows.append((time.monotonic() - self.started, int(status), version, response_time))


def run_load(url: str, clients: int, seconds: float, warmup: float, max_requests: int) -> dict:
    """Run `clients` clients: warm-up, then the timed part; bounded in seconds and requests."""
    recorder = Recorder()
    env = Environment(user_classes=[ImageClient], events=events, host=url)
    env.events.request.add_listener(recorder.on_request)
    runner = env.create_local_runner()
    runner.start(clients, spawn_rate=clients)
    gevent.sleep(warmup)
    recorder.reset()
    print("timed part begins", flush=True)  # the caller's clock for what it does during the load
    while time.monotonic() - recorder.started < seconds and len(recorder.rows) < max_requests:
        gevent.sleep(0.1)
    elapsed = time.monotonic() - recorder.started
    rows = list(recorder.rows)  # requests still in flight at the stop are not counted
    runner.quit()
    latencies = np.array([row[3] for row in rows]) if rows else np.zeros(1)
    return {
        "clients": clients,
        "seconds": elapsed,
        "requests": len(rows),
        "failures": sum(1 for row in rows if row[1] != 200),
        "rps": len(rows) / elapsed,
        "ok_rps": sum(1 for row in rows if row[1] == 200) / elapsed,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "rows": rows,
    }


def main() -> None:
    """Parse the arguments, run the load, print the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT (this machine only)")
    parser.add_argument(
        "--endpoint", choices=["predict", "explain", "invocations"], default="predict"
    )
    parser.add_argument("--photos", type=Path, required=True, help="a folder of *.jpg")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=45.0, help="timed part")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the timed part")
    parser.add_argument("--max-requests", type=int, default=100_000, help="timed requests, at most")
    parser.add_argument("--records", type=Path, help="write each timed request here (JSON)")
    args = parser.parse_args()
    if not args.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit(f"--url {args.url}: this load stays on 127.0.0.1")
    ImageClient.path = f"/{args.endpoint}"
    ImageClient.bodies, ImageClient.content_type = request_bodies(args.photos, args.endpoint)
    summary = run_load(args.url, args.clients, args.seconds, args.warmup, args.max_requests)
    rows = summary.pop("rows")
    if args.records:
        args.records.write_text(json.dumps(rows))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
