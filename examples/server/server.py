"""An example image server: one model compiled once with ``enable_fastcache``, many requests at
once, each with its own cache state (docs/serving.md).

    python examples/server/server.py --model dit --parallel 4          # serves 127.0.0.1:8000
    python examples/server/load.py --requests 16 --concurrency 4       # in another shell

Standard library only (``http.server.ThreadingHTTPServer``: one thread per connection); the
bundled reference models run offline. At most ``--parallel`` generations run at a time (the others
wait); each runs in its own ``fastcache_fx.request()`` scope, which names it in
``fastcache_fx.stats()`` and frees its cache state when it ends. (Without the scope each request
thread is a request of its own anyway, and a diffusers pipeline frees its state when its call
ends; the scope gives the server the request's id.)

Endpoints:
    POST /generate  {"label": 0-9, "seed": int, "steps": int (optional)} ->
        {"id", "label", "seed", "steps", "seconds", "queued_seconds", "block_approx_ratio" (the
        request's cache share), "state_bytes" (cache state it held), "image" ([S][S] floats in
        [-1, 1])}
    GET /stats      {"served", "live_requests", "state_bytes", "evictions", "rss_bytes"}
    GET /health     {"ok": true}
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import fastcache_fx
from fastcache_fx.reference import jobs


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class Generator:
    """The served model: ``job`` (a bundled reference model) compiled once with
    ``enable_fastcache(**options)``; ``generate`` may be called from many threads.

    Pipeline models (``mmdit``, ``wan``) are compiled through ``enable_fastcache(pipe)``; every
    request then builds its own pipeline (and scheduler: schedulers keep per-call state) around
    the shared compiled transformer, as diffusers' examples/server does with ``from_pipe``."""

    def __init__(self, model: str, options: dict, parallel: int, steps: int | None) -> None:
        self.job = jobs.job(model)
        self.steps = steps or self.job.steps
        module = self.job.load()
        if self.job.pipeline:
            self.transformer = self.job.fastcache(module, options).transformer
        else:
            self.transformer = fastcache_fx.enable_fastcache(module, dynamic=False, **options)
        self.slots = threading.Semaphore(parallel)
        self.served = 0
        self._lock = threading.Lock()

    def generate(self, label: int, seed: int, steps: int | None = None) -> dict:
        """One image of class ``label``; raises ValueError for a bad label, seed or step count."""
        steps = int(steps or self.steps)
        t0 = time.perf_counter()
        with self.slots:
            t1 = time.perf_counter()
            with torch.no_grad(), fastcache_fx.request("http") as req:
                image = self.job.sample(self.transformer, [int(label)], steps=steps, seeds=[int(seed)])
            seconds = time.perf_counter() - t1
        info = fastcache_fx.stats(self.transformer)["requests"].get(req.id, {})
        with self._lock:
            self.served += 1
        return {"id": req.id, "label": int(label), "seed": int(seed), "steps": steps, "seconds": seconds,
                "queued_seconds": t1 - t0, "block_approx_ratio": info.get("block_approx_ratio", 0.0),
                "state_bytes": info.get("state_bytes", 0), "image": image[0, 0].tolist()}

    def summary(self) -> dict:
        st = fastcache_fx.stats(self.transformer)
        return {"served": self.served, "live_requests": st["live_requests"], "state_bytes": st["state_bytes"],
                "evictions": st["evictions"], "rss_bytes": rss_bytes()}


def handler_for(gen: Generator):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path == "/health":
                self._send(200, {"ok": True})
            elif self.path == "/stats":
                self._send(200, gen.summary())
            else:
                self._send(404, {"error": f"no such path {self.path}"})

        def do_POST(self):  # noqa: N802
            if self.path != "/generate":
                self._send(404, {"error": f"no such path {self.path}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._send(200, gen.generate(body.get("label", 0), body.get("seed", 0), body.get("steps")))
            except (ValueError, TypeError) as e:
                self._send(400, {"error": str(e)})

        def log_message(self, fmt, *args):  # one line per request is printed by generate's caller
            pass

    return Handler


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dit", choices=jobs.MODELS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--parallel", type=int, default=4, help="generations at a time")
    p.add_argument("--steps", type=int, default=None, help="default denoising steps (the model's own if unset)")
    p.add_argument("--options", default="{}", help="FastCacheConfig options as JSON, e.g. '{\"max_live_requests\": 16}'")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error("--parallel: expected >= 1")
    gen = Generator(a.model, json.loads(a.options), a.parallel, a.steps)
    print(f"compiling {gen.job.title} ...", flush=True)
    gen.generate(0, 0)  # compile before serving
    server = ThreadingHTTPServer((a.host, a.port), handler_for(gen))
    print(f"serving on http://{a.host}:{a.port} ({a.parallel} at a time); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
