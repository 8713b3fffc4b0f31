"""A stand-in for the Hugging Face Hub on 127.0.0.1 that records what a client would upload.

It handles the calls `huggingface_hub` makes to create a repository and commit files: repository creation,
the model-card metadata check (the YAML must parse to a mapping), the pre-upload check (every file is
uploaded inline, so no LFS or Xet storage is involved) and the commit, whose files it decodes and keeps in
``commits``. Other requests get 404 and are listed in ``unexpected``.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HubStandIn:
    """Run the stand-in server in a background thread: ``with HubStandIn() as hub: ... hub.endpoint``."""

    def __init__(self) -> None:
        self.commits: list[dict[str, Any]] = []
        self.created: list[str] = []
        self.unexpected: list[str] = []
        self.validated: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self._body()
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
                    hub.created.append(repo_id)
                    self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                elif parts[:2] == ["api", "validate-yaml"]:
                    content = json.loads(body)["content"]
                    errors = _metadata_errors(content)
                    hub.validated.append(content)
                    self._reply(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
                elif len(parts) >= 6 and parts[0] == "api" and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    self._reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                elif len(parts) >= 6 and parts[0] == "api" and parts[4] == "commit":
                    hub.commits.append(_decode_commit(f"{parts[2]}/{parts[3]}", body))
                    oid = "0" * 40
                    self._reply(
                        200, {"commitUrl": f"{hub.endpoint}/{parts[2]}/{parts[3]}/commit/{oid}", "commitOid": oid}
                    )
                else:
                    hub.unexpected.append(f"POST {self.path}")
                    self._reply(404, {"error": "not available in the stand-in"})

            def do_GET(self) -> None:
                hub.unexpected.append(f"GET {self.path}")
                self._reply(404, {"error": "not available in the stand-in"})

        return Handler


def _metadata_errors(readme: str) -> list[str]:
    """Check the YAML front matter of a model card the way a strict reader would: it must parse to a mapping."""
    import yaml

    if not readme.startswith("---\n"):
        return ["README.md has no YAML metadata block"]
    try:
        metadata = yaml.safe_load(readme.split("---\n", 2)[1])
    except yaml.YAMLError as error:
        return [f"YAML does not parse: {error}"]
    if not isinstance(metadata, dict):
        return ["YAML metadata is not a mapping"]
    return []


def _decode_commit(repo_id: str, body: bytes) -> dict[str, Any]:
    """Turn an NDJSON commit payload into {"repo_id", "summary", "files": {path: bytes}}."""
    commit: dict[str, Any] = {"repo_id": repo_id, "files": {}}
    for line in body.decode().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry["key"] == "header":
            commit["summary"] = entry["value"].get("summary")
        elif entry["key"] == "file":
            value = entry["value"]
            commit["files"][value["path"]] = base64.b64decode(value["content"])
        else:
            commit.setdefault("other", []).append(entry)
    return commit
