"""Load test of the web app: concurrent gradio_client users on loopback while a fine-tune runs.

    python -m tools.loadtest                      # starts app.py on a free 127.0.0.1 port
    python -m tools.loadtest --users 8 --requests 10 --json
    python -m tools.loadtest --url http://127.0.0.1:7860/   # an app you started (loopback only)

Phase 1 (load): one client starts a fine-tune (CIFAR-10 subset when the app has a data source, else
synthetic uploads for two classes; 1 epoch), then N users each send R requests back to back, mixing
/predict, /feature_maps and /attribute (Saliency / Grad-CAM, one Integrated Gradients in all), on
synthetic images made here (never CIFAR-10 images). A user is a gradio_client Client; its predictions go over
the REST API in the same session (`rest_predict`), as a browser tab's do. Reports p50/p95 latency, count and errors per
endpoint and the throughput.
Fast lane (--lane SECONDS): 8 clients loop on /predict beside 6 looping on Integrated Gradients and feature maps;
the prediction clients speak Gradio's REST API with a session each (`rest_predict`), which costs the machine a
twentieth of a gradio_client call, so on two shared cores the figure is the server's rather than the clients'.
Phase 2 (overload): two long fine-tunes occupy the fine-tune pool, then more jobs than the queue holds
(serving.QUEUE_MAX) are submitted at once: data-less fine-tunes by default (they wait behind the holders,
then the app refuses each in milliseconds), or predictions with --flood predict (those only wait when
they share a pool with fine-tunes; with a pool of their own the refusals depend on how fast the queue
drains). Reports how many the queue refused and the exact message the clients got, stops the
fine-tunes, and checks that the server still answers.

Everything is bounded: request counts are fixed, every wait has a timeout, and a server this command
started is always stopped. Only loopback addresses are accepted.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from resnext_demo import data, finetune
from resnext_demo.launch import app_server, wait_ready

ROOT = data.PROJECT_ROOT
STARTUP_TIMEOUT = 180.0
QUEUE_MAX = 32  # mirrors serving.QUEUE_MAX; read from there when gradio is importable (see _queue_max)
HEAVY_LIMIT = 2


# ---------------------------------------------------------------- the server

def check_loopback(url: str) -> str:
    """The URL normalised with a trailing slash; ValueError unless its host is a loopback address."""
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"refusing to load-test {url!r}: only loopback hosts (127.0.0.1, localhost, ::1) are allowed")
    return url if url.endswith("/") else url + "/"


def default_checkpoint(tmp: Path) -> Path:
    """The shipped checkpoint, or (none yet) a randomly initialised one of the same size in `tmp`.

    Accuracy does not matter for a load test; compute per request does."""
    from resnext_demo import weights
    if weights.DEFAULT_WEIGHTS.is_file():
        return weights.DEFAULT_WEIGHTS
    import torch
    from resnext_demo.zoo import build_model
    torch.manual_seed(0)
    return weights.save_checkpoint(tmp / "random-micro.safetensors", build_model("resnext29_8x4d_micro").eval(),
                                   {"accuracy": None})


# ---------------------------------------------------------------- inputs

def synthetic_image(path: Path, seed: int, size: tuple[int, int] = (96, 72)) -> str:
    """A random picture (gradient + a few coloured rectangles + noise) saved as PNG."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    a = c0[None, None] * (1 - xx[..., None]) + c1[None, None] * xx[..., None] * (0.5 + 0.5 * yy[..., None])
    for _ in range(3):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        a[y0:y0 + rng.integers(8, h // 2), x0:x0 + rng.integers(8, w // 2)] = rng.integers(0, 256, 3)
    a = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return str(path)


def _queue_max() -> int:
    """The app's queue size (serving.QUEUE_MAX), or the documented default where gradio is missing."""
    return _serving("QUEUE_MAX", QUEUE_MAX)


def _serving(name: str, default: int) -> int:
    """An int setting of the app's serving module, or `default` when it cannot be imported."""
    try:
        from resnext_demo.ui import serving
        return int(getattr(serving, name))
    except Exception:  # gradio missing or serving broken: the documented default
        return default


# ---------------------------------------------------------------- measurements

@dataclass
class Sample:
    endpoint: str
    seconds: float
    ok: bool
    error: str = ""
    first: bool = False  # the user's first request: Gradio creates its session state then (~15-40 ms of the GIL)


@dataclass
class EndpointStats:
    count: int
    errors: int
    p50_s: float | None
    p95_s: float | None
    max_s: float | None
    error_messages: list[str] = field(default_factory=list)


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not xs:
        return None
    return float(np.percentile(np.asarray(xs), q))


def summarize(samples: list[Sample]) -> dict[str, EndpointStats]:
    by = defaultdict(list)
    for s in samples:
        by[s.endpoint].append(s)
    out = {}
    for ep, ss in sorted(by.items()):
        ok = [s.seconds for s in ss if s.ok]
        errs = sorted({s.error for s in ss if not s.ok})
        out[ep] = EndpointStats(len(ss), sum(not s.ok for s in ss), percentile(ok, 50), percentile(ok, 95),
                                max(ok) if ok else None, errs[:5])
    return out


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:300]


# ---------------------------------------------------------------- phase 1: load

def _finetune_args(mode: str, images: list[str], per_class: int, epochs: int, batch: int) -> list:
    """Positional arguments of /finetune: cifar_per_class, layers, epochs, lr, batch, 10 zones, names, new zones."""
    from gradio_client import handle_file
    zones: list = [None] * len(data.CLASSES)
    if mode == "uploads":
        half = len(images) // 2
        zones[data.CLASSES.index("cat")] = [handle_file(p) for p in images[:half]]
        zones[data.CLASSES.index("ship")] = [handle_file(p) for p in images[half:]]
    n_new = finetune.MAX_NEW_CLASSES
    return [per_class if mode == "cifar" else 0, "head", epochs, 0.01, batch, *zones, *([""] * n_new),
            *([None] * n_new)]


def _has_data_source(client) -> bool:
    """Whether the app can do CIFAR-10 subsets: /random_sample works only with a data source."""
    try:
        client.predict(api_name="/random_sample")
        return True
    except Exception:
        return False


def _user(c, user: int, requests: int, images: list[str], ig_slot: tuple[int, int] | None,
          deadline: float) -> list[Sample]:
    """One simulated user (a connected gradio_client Client): R requests back to back, cycling predict ->
    feature maps -> attribution."""
    import httpx
    from gradio_client import handle_file
    out, http = [], httpx.Client(timeout=120)
    for i in range(requests):
        if time.monotonic() > deadline:
            out.append(Sample("(not sent: deadline)", 0.0, False, "load phase deadline passed"))
            continue
        img = handle_file(images[(user * requests + i) % len(images)])
        kind = (user + i) % 3
        if kind == 0:
            ep, args = "/predict", (img, 3)
        elif kind == 1:
            ep, args = "/feature_maps", (img,)
        else:
            method = "Integrated Gradients" if ig_slot == (user, i) else ("Saliency", "Grad-CAM")[(user + i // 3) % 2]
            ep, args = "/attribute", (img, method)
            ep_label = f"/attribute ({method})"
        t0 = time.monotonic()
        try:
            if kind == 0:  # over REST in the user's own session: gradio_client's CPU would be measured too
                rest_predict(http, c.src, images[(user * requests + i) % len(images)], c.session_hash)
            else:
                c.submit(*args, api_name=ep).result(timeout=max(1.0, deadline - time.monotonic()))
            out.append(Sample(ep_label if kind == 2 else ep, time.monotonic() - t0, True, first=i == 0))
        except Exception as e:  # every failure is counted and reported, never raised
            out.append(Sample(ep_label if kind == 2 else ep, time.monotonic() - t0, False, _error_text(e), i == 0))
    c.close()
    return out


def load_phase(url: str, users: int, requests: int, tmp: Path, finetune_epochs: int = 1,
               cifar_per_class: int = 10, timeout: float = 300.0) -> dict:
    """N users x R requests while one fine-tune runs; per-endpoint latency and error statistics."""
    from gradio_client import Client
    images = [synthetic_image(tmp / f"synthetic-{i}.png", 1000 + i) for i in range(max(4, users * 2))]
    ft_images = [synthetic_image(tmp / f"train-{i}.png", 2000 + i, (40, 40)) for i in range(12)]
    deadline = time.monotonic() + timeout
    ft_client = Client(url, verbose=False, httpx_kwargs={"timeout": timeout})
    mode = "cifar" if _has_data_source(ft_client) else "uploads"
    ft_args = _finetune_args(mode, ft_images, cifar_per_class, finetune_epochs, 32)
    t_ft = time.monotonic()
    ft_job = ft_client.submit(*ft_args, api_name="/finetune")
    # the fine-tune is queued first: give it a moment to start so the users really overlap with it
    t_wait = time.monotonic()
    while time.monotonic() - t_wait < 10 and ft_job.status().code.value not in ("PROCESSING", "ITERATING", "FINISHED"):
        time.sleep(0.1)
    ig_slot = (0, 2) if requests > 2 else None  # user 0's first attribution is the one Integrated Gradients
    with ThreadPoolExecutor(users) as ex:
        # every user connects first (a Client reads the app's config and API description: seconds of CPU on both
        # sides when 16 arrive at once); the clock starts when they all send their requests
        clients = list(ex.map(lambda _: Client(url, verbose=False, httpx_kwargs={"timeout": timeout}), range(users)))
        t0 = time.monotonic()
        futures = [ex.submit(_user, clients[u], u, requests, images, ig_slot, deadline) for u in range(users)]
        samples = [s for f in futures for s in f.result()]
    wall = time.monotonic() - t0
    ft_sample = None
    try:
        result = ft_job.result(timeout=max(1.0, deadline - time.monotonic()))
        status_text = str(result[0]) if isinstance(result, (list, tuple)) else str(result)
        ft_sample = Sample("/finetune", time.monotonic() - t_ft, "Done" in status_text, "" if "Done" in status_text
                           else status_text[:200])
    except Exception as e:
        ft_sample = Sample("/finetune", time.monotonic() - t_ft, False, _error_text(e))
    ft_client.close()
    stats = summarize(samples + [ft_sample])
    n_ok = sum(s.ok for s in samples)
    later = [s.seconds for s in samples if s.ok and s.endpoint == "/predict" and not s.first]
    return {"users": users, "requests_per_user": requests, "finetune_mode": mode,
            "finetune": f"{'CIFAR-10 subset ' + str(cifar_per_class) + '/class' if mode == 'cifar' else '12 synthetic uploads, 2 classes'}, "
                        f"{finetune_epochs} epoch(s), head only",
            "wall_s": wall, "requests": len(samples), "failed": sum(not s.ok for s in samples) + (not ft_sample.ok),
            "throughput_rps": n_ok / wall if wall > 0 else None,
            "endpoints": {k: asdict(v) for k, v in stats.items()},
            # the 16 users' first requests arrive in the same instant, each also creating its session
            "predict_after_first": {"count": len(later), "p50_s": percentile(later, 50), "p95_s": percentile(later, 95)}}


# ---------------------------------------------------------------- the fast lane

def rest_predict(http, url: str, image: str, session: str, k: int = 3) -> dict:
    """One /predict through Gradio's documented REST API (what `curl` users send): upload the file, start the
    call in the client's `session` (as a browser tab or gradio_client does: without one, every call makes a new
    session, whose state Gradio builds from every component's config, ~40 ms of the GIL here), read its
    server-sent events to the end. A twentieth of gradio_client's CPU per request, so a crowd of these measures
    the server rather than the clients beside it on the same cores."""
    with open(image, "rb") as f:
        path = http.post(url + "gradio_api/upload", files={"files": (Path(image).name, f, "image/png")}).json()[0]
    body = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, k], "session_hash": session}
    event = http.post(url + "gradio_api/call/predict", json=body).json()["event_id"]
    kind = None
    with http.stream("GET", f"{url}gradio_api/call/predict/{event}") as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: ") and kind in ("complete", "error"):
                if kind == "error":
                    raise RuntimeError(line[6:].strip() or "error")
                return json.loads(line[6:])[0]
    raise RuntimeError(f"/predict ended without a result (last event: {kind})")


def _rest_looper(url: str, image: str, deadline: float, timeout: float) -> list[Sample]:
    """A prediction client looping on rest_predict until `deadline`."""
    import secrets

    import httpx
    out, session = [], secrets.token_hex(6)
    with httpx.Client(timeout=timeout) as http:
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                rest_predict(http, url, image, session)
                out.append(Sample("/predict", time.monotonic() - t0, True))
            except Exception as e:
                out.append(Sample("/predict", time.monotonic() - t0, False, _error_text(e)))
    return out


def _looper(url: str, kind: str, image: str, deadline: float, timeout: float) -> list[Sample]:
    """One client looping until `deadline`: 'predict' sends /predict over REST; 'heavy' (gradio_client)
    alternates Integrated Gradients and feature maps (what fills the heavy pool)."""
    if kind == "predict":
        return _rest_looper(url, image, deadline, timeout)
    from gradio_client import Client, handle_file
    c = Client(url, verbose=False, httpx_kwargs={"timeout": timeout})
    out, i = [], 0
    while time.monotonic() < deadline:
        img = handle_file(image)
        if i % 2 == 0:
            label, ep, args = "heavy: /attribute (Integrated Gradients)", "/attribute", (img, "Integrated Gradients")
        else:
            label, ep, args = "heavy: /feature_maps", "/feature_maps", (img,)
        t0 = time.monotonic()
        try:
            c.submit(*args, api_name=ep).result(timeout=timeout)
            out.append(Sample(label, time.monotonic() - t0, True))
        except Exception as e:
            out.append(Sample(label, time.monotonic() - t0, False, _error_text(e)))
        i += 1
    c.close()
    return out


def lane_phase(url: str, tmp: Path, predictors: int = 8, heavy: int = 6, seconds: float = 40.0,
               timeout: float = 120.0) -> dict:
    """`predictors` clients loop on /predict beside `heavy` clients looping on Integrated Gradients and feature
    maps for `seconds`; /predict p50/p95 against the heavy requests' p50, as a ratio from the same run."""
    images = [synthetic_image(tmp / f"lane-{i}.png", 3000 + i) for i in range(predictors + heavy)]
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(predictors + heavy) as ex:
        futures = [ex.submit(_looper, url, "predict" if i < predictors else "heavy", images[i], deadline, timeout)
                   for i in range(predictors + heavy)]
        samples = [s for f in futures for s in f.result()]
    pred = [s.seconds for s in samples if s.ok and s.endpoint == "/predict"]
    heavy_ok = [s.seconds for s in samples if s.ok and s.endpoint.startswith("heavy")]
    p95, heavy_p50 = percentile(pred, 95), percentile(heavy_ok, 50)
    return {"predict_clients": predictors, "heavy_clients": heavy, "seconds": seconds,
            "failed": sum(not s.ok for s in samples),
            "endpoints": {k: asdict(v) for k, v in summarize(samples).items()},
            "predict_p50_s": percentile(pred, 50), "predict_p95_s": p95, "heavy_p50_s": heavy_p50,
            "predict_p95_over_heavy_p50": p95 / heavy_p50 if p95 is not None and heavy_p50 else None}


# ---------------------------------------------------------------- phase 2: overload

def _direct_stop(url: str, session_hash: str) -> str:
    """POST /gradio_api/run/stop for a session: the unqueued route the browser uses for queue=False events."""
    req = urllib.request.Request(url + "gradio_api/run/stop", method="POST",
                                 data=json.dumps({"data": [None], "session_hash": session_hash}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return "ok" if r.status == 200 else f"HTTP {r.status}"
    except OSError as e:
        return _error_text(e)


NO_IMAGES = "No training images"  # the app's answer to a fine-tune without data: an instant, expected refusal


def overload_phase(url: str, tmp: Path, extra: int = 8, timeout: float = 240.0, flood: str = "finetune") -> dict:
    """Fill the queue past max_size while the pool is busy; count refusals and record the message.

    flood="predict": predictions wait behind the fine-tunes only while both share one pool.
    flood="finetune": fine-tunes without data, which wait behind the holders in any pool layout and are
    refused by the app in milliseconds once they run (counted as completed)."""
    if flood not in ("predict", "finetune"):
        raise ValueError("flood must be 'predict' or 'finetune'")
    from gradio_client import Client, handle_file
    qmax = _queue_max()
    deadline = time.monotonic() + timeout
    img = synthetic_image(tmp / "overload.png", 3000)
    ft_images = [synthetic_image(tmp / f"hold-{i}.png", 4000 + i, (40, 40)) for i in range(40)]
    # 1. occupy the fine-tune pool with long fine-tunes (stopped below)
    holders = [Client(url, verbose=False, httpx_kwargs={"timeout": timeout}) for _ in range(HEAVY_LIMIT)]
    hold_args = _finetune_args("uploads", ft_images, 0, finetune.MAX_EPOCHS, 1)
    hold_args[1] = "all"  # train every layer, batch 1: the slowest fine-tune the caps allow
    hold_jobs = [h.submit(*hold_args, api_name="/finetune") for h in holders]
    # fine-tunes run in a pool of their own (serving.TRAIN_LIMIT at once): the others wait in the queue
    can_run = min(len(hold_jobs), _serving("TRAIN_LIMIT", 1))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        running = sum(j.status().code.value in ("PROCESSING", "ITERATING") for j in hold_jobs)
        # as many running as the pool allows; or some, after 30 s
        if running >= can_run or (running and time.monotonic() - t0 > 30) or any(j.done() for j in hold_jobs):
            break
        time.sleep(0.2)
    running = sum(j.status().code.value in ("PROCESSING", "ITERATING") for j in hold_jobs)
    timings = {"holders_started_after_s": time.monotonic() - t0}
    # 2. submit more predictions than the queue holds, all at once
    n = qmax + extra
    flood_client = Client(url, verbose=False, max_workers=n, httpx_kwargs={"timeout": timeout})
    f = handle_file(img)
    t_sub = time.monotonic()
    if flood == "predict":
        jobs = [flood_client.submit(f, 3, api_name="/predict") for _ in range(n)]
    else:
        empty = _finetune_args("uploads", [], 0, 1, 32)
        jobs = [flood_client.submit(*empty, api_name="/finetune") for _ in range(n)]
    rejected, accepted, other, messages = 0, 0, 0, defaultdict(int)
    # 3. refusals come back at once; then release the pool so the accepted ones run
    time.sleep(min(5.0, 0.1 * n))
    stop_via_client, stop_direct = [], []
    for h in holders:
        try:  # gradio_client sends even queue=False events through the queue: refused while it is full
            h.predict(api_name="/stop")
            stop_via_client.append("ok")
        except Exception as e:
            stop_via_client.append(_error_text(e))
        stop_direct.append(_direct_stop(url, h.session_hash))  # what the browser's Stop button does: a direct, unqueued call
    for j in hold_jobs:  # a holder still waiting in the queue would clear its stop flag when it starts
        if j.status().code.value not in ("PROCESSING", "ITERATING", "FINISHED"):
            j.cancel()
    for j in jobs:
        try:
            j.result(timeout=max(1.0, deadline - time.monotonic()))
            accepted += 1
        except Exception as e:
            msg = _error_text(e)
            messages[msg if NO_IMAGES not in msg else f"(expected, job ran) {msg}"] += 1
            if flood == "finetune" and NO_IMAGES in msg:
                accepted += 1
            elif "queue" in msg.lower() and "full" in msg.lower():
                rejected += 1
            else:
                other += 1
    submit_s = time.monotonic() - t_sub
    t_hold = time.monotonic()
    for j in hold_jobs:
        try:
            j.result(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            pass
    timings["holders_stopped_after_s"] = time.monotonic() - t_hold
    # 4. the server still answers normally afterwards
    alive = False
    try:
        out = flood_client.predict(f, 3, api_name="/predict")
        alive = isinstance(out, dict) and "label" in out
    except Exception as e:
        messages[f"(after overload) {_error_text(e)}"] += 1
    for c in [*holders, flood_client]:
        c.close()
    return {"flood": flood, "queue_max_size": qmax, "holders_running_when_flooded": f"{running}/{len(hold_jobs)}", "submitted": n, "completed": accepted,
            "rejected_queue_full": rejected, "other_errors": other, "seconds": submit_s,
            "messages": dict(messages), "server_alive_after": alive,
            "stop_via_gradio_client_while_full": stop_via_client, "stop_via_direct_route": stop_direct, **timings}


# ---------------------------------------------------------------- CLI

def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _endpoint_rows(endpoints: dict, width: int, with_max: bool = False) -> list[str]:
    """One line per endpoint: count, errors, p50, p95 (and max), then its error messages."""
    rows = []
    for ep, st in endpoints.items():
        rows.append(f"  {ep:{width}s} {st['count']:5d} {st['errors']:6d} {_fmt(st['p50_s']):>7s} {_fmt(st['p95_s']):>7s}"
                    + (f" {_fmt(st['max_s']):>7s}" if with_max else ""))
        rows += [f"      error: {m}" for m in st.get("error_messages", [])]
    return rows


def _lane_line(ln: dict) -> str:
    """The fast-lane phase in one line: clients, failures, /predict p50/p95 against the heavy p50."""
    return (f"fast lane: {ln['predict_clients']} clients looping on /predict beside {ln['heavy_clients']} on "
            f"Integrated Gradients + feature maps for {ln['seconds']:.0f} s; {ln['failed']} failed; /predict p50 "
            f"{_fmt(ln['predict_p50_s'])} s, p95 {_fmt(ln['predict_p95_s'])} s; heavy p50 {_fmt(ln['heavy_p50_s'])} s; "
            f"/predict p95 / heavy p50 = {_fmt(ln['predict_p95_over_heavy_p50'])}")


def report_text(r: dict) -> str:
    lines = []
    if "load" in r:
        ld = r["load"]
        lines.append(f"load: {ld['users']} users x {ld['requests_per_user']} requests while a fine-tune runs "
                     f"({ld['finetune']}); {ld['requests']} requests in {ld['wall_s']:.1f} s, "
                     f"{ld['throughput_rps']:.2f} req/s, {ld['failed']} failed")
        lines.append(f"  {'endpoint':34s} {'count':>5s} {'errors':>6s} {'p50 s':>7s} {'p95 s':>7s} {'max s':>7s}")
        lines += _endpoint_rows(ld["endpoints"], 34, with_max=True)
        pl = ld.get("predict_after_first") or {}
        if pl.get("count"):
            lines.append(f"  /predict after each user's first request (its session exists): {pl['count']} requests, "
                         f"p50 {_fmt(pl['p50_s'])} s, p95 {_fmt(pl['p95_s'])} s")
    if "lane" in r:
        lines += [_lane_line(r["lane"]), *_endpoint_rows(r["lane"]["endpoints"], 42)]
    if "overload" in r:
        o = r["overload"]
        lines.append(f"overload: {o['submitted']} {o['flood']} jobs at once, {o['holders_running_when_flooded']} pool-holding fine-tunes running "
                     f"(queue max_size {o['queue_max_size']}): {o['rejected_queue_full']} refused as queue full, "
                     f"{o['completed']} completed, {o['other_errors']} other errors; server alive after: "
                     f"{o['server_alive_after']}")
        for m, k in o["messages"].items():
            lines.append(f"  {k} x {m!r}")
    lines.append(f"server: {r['server']}; machine: {r['machine']}")
    return "\n".join(lines)


def run(users: int = 4, requests: int = 6, url: str | None = None, weights_path: str | None = None,
        data_source: str | None = None, overload: bool = True, overload_extra: int = 8,
        timeout: float = 600.0, log: str | Path | None = None, flood: str = "finetune", lane_seconds: float = 0.0) -> dict:
    """The whole load test; returns the report as a dict (what --json prints)."""
    if users < 1 or requests < 1:
        raise ValueError("--users and --requests must be at least 1")
    if users > 64 or requests > 200:
        raise ValueError("refusing more than 64 users or 200 requests per user: this is a bounded test")
    tmp = Path(tempfile.mkdtemp(prefix="resnext-loadtest-"))
    machine = f"{os.cpu_count()} CPU cores, {sys.platform}"
    t_end = time.monotonic() + timeout

    def phases(u: str) -> dict:
        t = time.monotonic()
        out = {"load": load_phase(u, users, requests, tmp, timeout=max(30.0, 0.6 * (t_end - time.monotonic())))}
        out["load"]["phase_s"] = time.monotonic() - t
        if lane_seconds:
            t = time.monotonic()
            out["lane"] = lane_phase(u, tmp, seconds=lane_seconds)
            out["lane"]["phase_s"] = time.monotonic() - t
        if overload:
            t = time.monotonic()
            out["overload"] = overload_phase(u, tmp, overload_extra, timeout=max(30.0, t_end - time.monotonic()),
                                             flood=flood)
            out["overload"]["phase_s"] = time.monotonic() - t
        return out

    if url:
        url = check_loopback(url)
        wait_ready(url, None, 30)
        rep = phases(url)
        rep["server"] = url
    else:
        ckpt = Path(weights_path) if weights_path else default_checkpoint(tmp)
        args = ["--weights", str(ckpt)]
        src = data_source if data_source is not None else data.default_source()
        if src:
            args += ["--data", src]
        with app_server(args, log or tmp / "app.log", timeout=STARTUP_TIMEOUT) as (u, _):
            rep = phases(u)
        rep["server"] = f"app.py --weights {ckpt.name}" + (f" --data {Path(src).name}" if src else "")
    rep["machine"] = machine
    return rep


def api_accuracy(url: str, n: int, source: str | None = None, workers: int = 4) -> dict:
    """Top-1 of the served model through the real `/predict` endpoint on the first n test images, each
    sent as a 32x32 PNG file upload (what a user's file goes through: upload, decode, predict, JSON)."""
    from gradio_client import Client, handle_file
    x, y = data.load_split(source, "test")
    x, y = x[:n], y[:n]
    tmp = Path(tempfile.mkdtemp(prefix="resnext-api-acc-"))

    def one(i: int) -> bool:
        p = tmp / f"{i}.png"
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(p)
        c = clients[i % workers]
        out = c.predict(handle_file(str(p)), 1, api_name="/predict")
        p.unlink()
        return out["label"] == data.CLASSES[int(y[i])]
    clients = [Client(url, verbose=False) for _ in range(workers)]
    t = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        hits = list(pool.map(one, range(len(y))))
    for c in clients:
        c.close()
    return {"images": len(y), "top1": sum(hits) / len(hits), "seconds": time.monotonic() - t}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=4, help="concurrent gradio_client users (default 4)")
    ap.add_argument("--requests", type=int, default=6, help="requests per user (default 6)")
    ap.add_argument("--url", help="test an app already running on a loopback address instead of starting one")
    ap.add_argument("--weights", help="checkpoint for the started app (default: the shipped one, else a random "
                                      "resnext29_8x4d_micro)")
    ap.add_argument("--data", help="CIFAR-10 source for the started app (default: the app's default)")
    ap.add_argument("--no-overload", action="store_true", help="skip the queue-overflow phase")
    ap.add_argument("--lane", type=float, default=0.0, metavar="SECONDS",
                    help="also run the fast-lane phase for this long: 8 /predict clients beside 6 heavy ones")
    ap.add_argument("--overload-extra", type=int, default=8, help="requests beyond the queue's max_size (default 8)")
    ap.add_argument("--flood", choices=("predict", "finetune"), default="finetune",
                    help="overload with data-less fine-tunes (default: they queue behind the holders whatever "
                         "the pool layout) or with predictions")
    ap.add_argument("--timeout", type=float, default=600.0, help="overall time limit in seconds (default 600)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--accuracy", type=int, metavar="N", default=None,
                    help="instead of the load test: top-1 through /predict on the first N test images")
    a = ap.parse_args(argv)
    if a.accuracy:
        src = a.data or data.default_source()
        ckpt = a.weights or str(default_checkpoint(Path(tempfile.mkdtemp())))
        with app_server(["--weights", ckpt, "--data", src], Path(tempfile.mkdtemp()) / "app.log",
                        timeout=STARTUP_TIMEOUT) as (u, _):
            rep = api_accuracy(u, a.accuracy, src)
        print(json.dumps(rep) if a.json else
              f"/predict top-1 {rep['top1']:.4f} on {rep['images']} test images ({rep['seconds']:.0f} s) [{ckpt}]")
        return 0
    try:
        rep = run(a.users, a.requests, a.url, a.weights, a.data, not a.no_overload, a.overload_extra, a.timeout,
                  flood=a.flood, lane_seconds=a.lane)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if a.json else report_text(rep))
    failed = rep["load"]["failed"] + rep.get("lane", {}).get("failed", 0)
    o = rep.get("overload")
    return 1 if failed or (o and (not o["server_alive_after"] or o["other_errors"])) else 0


if __name__ == "__main__":
    sys.exit(main())
