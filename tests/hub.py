"""A loopback HTTP server, and the routes with which it stands in for the Hugging Face hub (HF_ENDPOINT) serving
a checkpoint a test wrote: no network. huggingface_hub reads HF_ENDPOINT when it is imported, so what uses
the stand-in hub runs in a subprocess with `hub_env`."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO, COMMIT = "tiny-org/tiny-llama", "0123456789abcdef0123456789abcdef01234567"
Routes = dict[str, tuple[int, dict, bytes]]


class Server:
    """A loopback HTTP server answering `routes` (path -> (status, headers, body)); HEAD as GET without body."""

    def __init__(self, routes: Routes):
        self.routes, self.requests = routes, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                outer.requests.append((self.command, path))
                status, headers, content = outer.routes.get(path, (404, {}, b"not found"))
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(content))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if body:
                    self.wfile.write(content)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._answer(True)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_routes(model: Path, repo: str = REPO, revisions: tuple[str, ...] = ("main",)) -> Routes:
    """The endpoints huggingface_hub's snapshot_download uses for `repo` at commit COMMIT, which each of
    `revisions` (branches, tags) names: the revision, its file tree, each file. Besides the checkpoint's
    files the repository holds a model card and weights in another format, which a fetch must skip."""
    files = sorted(p.name for p in model.iterdir() if p.is_file())
    bodies = {name: (model / name).read_bytes() for name in files}
    bodies |= {"README.md": b"# a model card", "model.bin": b"weights in another format"}
    as_json = {"Content-Type": "application/json"}
    info = json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in bodies]}).encode()
    tree = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for n, b in bodies.items()]
    routes = {f"/api/models/{repo}/revision/{revision}": (200, as_json, info) for revision in revisions}
    routes[f"/api/models/{repo}/tree/{COMMIT}"] = (200, as_json, json.dumps(tree).encode())
    for name, body in bodies.items():
        headers = {"ETag": f'"{hashlib.sha256(body).hexdigest()}"', "X-Repo-Commit": COMMIT}
        for revision in (COMMIT, *revisions):
            routes[f"/{repo}/resolve/{revision}/{name}"] = (200, headers, body)
    return routes


def hub_env(endpoint: str, hf_home: Path, offline: bool = False) -> dict[str, str]:
    """The environment of a subprocess that uses the hub at `endpoint` with its cache under `hf_home`."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    return env | ({"HF_HUB_OFFLINE": "1"} if offline else {"HF_HUB_OFFLINE": "0"})
