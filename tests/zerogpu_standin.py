"""A stand-in for ZeroGPU's device API, the HTTP service the `spaces` package calls on a ZeroGPU Space.

`spaces` reads SPACES_ZERO_GPU=true and SPACES_ZERO_DEVICE_API_URL, reports start-up (POST /startup-report)
and, for every spaces.GPU call, books a GPU (POST /schedule with durationSeconds; the answer names the GPU and
an allow token), lets the forked worker use it (POST /allow) and gives it back (POST /release). This one grants
every booking at once and records the calls; the requests follow spaces/zero/api.py (spaces 0.51).
"""
from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

# Runs app.py with the real `spaces` on a machine without a GPU. Only the worker's two CUDA steps are replaced:
# starting CUDA on the booked GPU (`torch.Tensor([0]).cuda()`) and moving the tensors `spaces` packed at start-up
# onto it. The app packs none (its model stays on the CPU in the main process), which the stand-in checks; the
# worker then computes on the CPU. Booking, forking, pickling arguments and results, and release are real.
LAUNCHER = """\
import runpy, sys
import spaces.zero.torch as zero_torch

def move(callback=None):
    if zero_torch.size():
        raise RuntimeError("the app left tensors on the emulated GPU for spaces to pack and move")

zero_torch.init = lambda nvidia_uuid: None
zero_torch.move = move
sys.argv = ["app.py", *sys.argv[1:]]
runpy.run_path("app.py", run_name="__main__")
"""


class StandIn(ThreadingHTTPServer):
    """The device API on 127.0.0.1 (a free port); `calls` lists (path, query) in arrival order."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def of(self, path: str) -> list[dict]:
        """The query parameters of every call to `path`."""
        with self.lock:
            return [q for p, q in self.calls if p == path]


class _Handler(BaseHTTPRequestHandler):
    def _reply(self, status: int = 200, body: object | None = None) -> None:
        raw = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")  # spaces reads it to tell JSON from a queue stream
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        with self.server.lock:
            self.server.calls.append((url.path, dict(parse_qsl(url.query))))
        if url.path == "/schedule":  # a GPU at once, idle (so a live worker is reused)
            self._reply(200, {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-stand-in",
                              "allowToken": uuid.uuid4().hex})
        elif url.path in ("/startup-report", "/allow", "/release"):
            self._reply(200)
        else:
            self._reply(404, {"detail": "unknown"})

    def do_GET(self) -> None:  # noqa: N802
        self._reply(200, 0) if urlsplit(self.path).path == "/queue-size" else self._reply(404, {"detail": "unknown"})

    def log_message(self, *args) -> None:  # quiet
        pass
