"""A Hugging Face Hub stand-in on loopback, for download tests: serves folders as model repositories.

It answers the requests ``huggingface_hub.snapshot_download`` makes (what ``python -m monai.bundle download
--source huggingface_hub`` calls), for a client pointed at it with ``HF_ENDPOINT``:

* ``GET /api/models/<owner>/<name>/revision/<rev>``: repository info (commit sha, file list);
* ``GET /api/models/<owner>/<name>/tree/<sha>?recursive=true``: the file tree;
* ``HEAD``/``GET /<owner>/<name>/resolve/<rev>/<path>``: a file, with the ETag and commit headers the client checks.

Unknown repositories or revisions get 404, as on the Hub. Each served folder has one revision (its tag).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit


class HubServer:
    """``with HubServer({"owner/name": (folder, "0.2.0")}) as endpoint:`` -> ``http://127.0.0.1:PORT``."""

    def __init__(self, repos: dict[str, tuple[Path, str]]) -> None:
        self.repos = {repo: (Path(folder), tag, hashlib.sha1(f"{repo}@{tag}".encode()).hexdigest())
                      for repo, (folder, tag) in repos.items()}
        self.requests: list[tuple[str, str]] = []
        self._server: http.server.ThreadingHTTPServer | None = None

    def _files(self, repo: str) -> dict[str, Path]:
        folder = self.repos[repo][0]
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def _revision(self, repo: str, rev: str) -> str | None:
        _, tag, sha = self.repos[repo]
        return sha if rev in (tag, sha) else None

    def handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def _route(self) -> None:
                path = unquote(urlsplit(self.path).path)
                server.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                    repo = "/".join(parts[2:4])
                    sha = server._revision(repo, parts[5]) if repo in server.repos else None
                    if sha is None:
                        return self._send(404, b'{"error": "Revision Not Found"}')
                    files = server._files(repo)
                    if parts[4] == "revision":
                        return self._json({"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]})
                    return self._json([{"type": "file", "path": f, "size": p.stat().st_size,
                                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for f, p in files.items()])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = "/".join(parts[:2])
                    sha = server._revision(repo, parts[3]) if repo in server.repos else None
                    file = server._files(repo).get("/".join(parts[4:])) if sha else None
                    if file is None:
                        return self._send(404, b'{"error": "Entry Not Found"}')
                    data = file.read_bytes()
                    return self._send(200, data, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": sha,
                                                  "Content-Type": "application/octet-stream"})
                self._send(404, b'{"error": "Repository Not Found"}')

            do_GET = do_HEAD = _route

        return Handler

    def __enter__(self) -> str:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
