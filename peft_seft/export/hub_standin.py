"""A local stand-in for the Hugging Face Hub's HTTP API, to test and demonstrate publishing without the Hub: the
endpoints ``huggingface_hub`` uses to create a repo, read its info, create a branch, validate a card, upload a
commit (on a branch or as a pull request) and download files. It runs on 127.0.0.1 in a thread; point
``HF_ENDPOINT`` (another process) or ``huggingface_hub.constants.ENDPOINT`` (this one) at :attr:`HubStandIn.url`.

Like the Hub, it validates a card's metadata (``/api/validate-yaml`` and again on every commit that holds a
README.md): ``base_model`` must be the id of a model on the Hub (a repo here, or one of ``known_models``),
``base_model:<relation>:<id>`` tags must name a known relation and such an id, tags must be strings without
whitespace. Private repos are invisible without a token. Every file is uploaded inline ("regular" upload mode),
so no LFS/Xet transfer is needed. Not a full Hub: no auth checks beyond presence of a token, no LFS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
RELATIONS = ("adapter", "merge", "quantized", "finetune")


@dataclass
class Repo:
    private: bool
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})
    commits: list[dict] = field(default_factory=list)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"0" * 40: {}})

    def resolve(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) of a branch, a pull request ref or a commit sha."""
        sha = self.heads.get(revision, revision)
        return (sha, self.snapshots[sha]) if sha in self.snapshots else None


def valid_repo_id(name: object) -> bool:
    return isinstance(name, str) and bool(REPO_ID.match(name)) and "--" not in name and ".." not in name


class HubStandIn:
    def __init__(self, known_models: tuple[str, ...] = (), private_by_default: bool = False) -> None:
        self.repos: dict[str, Repo] = {}
        self.known_models = set(known_models)
        self.private_by_default = private_by_default
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def writes(self) -> list[str]:
        return [path for method, path in self.requests if method == "POST"]

    # ---- metadata validation, as the Hub does it ----
    def metadata_errors(self, readme: str) -> list[str]:
        match = re.match(r"^---\n(.*?)\n---", readme, re.DOTALL)
        if not match:
            return []
        try:
            meta = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError as error:
            return [f"Invalid YAML: {error}"]
        errors = []
        bases = meta.get("base_model")
        for base in [bases] if isinstance(bases, str) else bases or []:
            if not valid_repo_id(base) or (base not in self.repos and base not in self.known_models):
                errors.append(
                    f'"base_model" with value "{base}" is not valid. Use a model id from https://hf.co/models.'
                )
        relation = meta.get("base_model_relation")
        if relation is not None and relation not in RELATIONS:
            errors.append(f'"base_model_relation" must be one of {RELATIONS}')
        tags = meta.get("tags") or []
        if not isinstance(tags, list):
            errors.append('"tags" must be an array')
            tags = []
        for tag in tags:
            if not isinstance(tag, str) or not tag or re.search(r"\s", tag):
                errors.append(f'"tags" item {tag!r} is not a valid tag')
            elif tag.startswith("base_model:"):
                parts = tag.split(":", 2)
                if len(parts) != 3 or parts[1] not in RELATIONS or not valid_repo_id(parts[2]):
                    errors.append(f'"tags" item "{tag}" is not a valid base_model tag')
        return errors

    # ---- HTTP ----
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None) -> None:
                if isinstance(body, dict | list):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str | None, message: str) -> None:
                self._send(
                    status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else {}
                )

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or (repo.private and not self.headers.get("authorization")):
                    self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
                    return None
                return repo

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                hub.requests.append((self.command, url.path))
                discussion = re.fullmatch(r"/api/models/(.+?)/discussions/(\d+)", url.path)
                if discussion:
                    return self._discussion(discussion.group(1), int(discussion.group(2)))
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", url.path)
                if tree:
                    return self._tree(tree.group(1), unquote(tree.group(2)), tree.group(3) or "")
                info = re.fullmatch(r"/api/models/(.+?)(?:/revision/(.+))?", url.path)
                resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", url.path)
                if info:
                    repo_id, revision = info.group(1), unquote(info.group(2) or "main")
                    if (repo := self._repo(repo_id)) is None:
                        return
                    if (snapshot := repo.resolve(revision)) is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    sha, files = snapshot
                    return self._send(
                        200,
                        {
                            "id": repo_id,
                            "modelId": repo_id,
                            "private": repo.private,
                            "sha": sha,
                            "siblings": [{"rfilename": name, "size": len(data)} for name, data in files.items()],
                            "tags": [],
                        },
                    )
                if resolve:
                    repo_id, revision, name = resolve.group(1), unquote(resolve.group(2)), unquote(resolve.group(3))
                    if (repo := self._repo(repo_id)) is None:
                        return
                    if (snapshot := repo.resolve(revision)) is None:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    sha, files = snapshot
                    if name not in files:
                        return self._error(404, "EntryNotFound", f"{name} does not exist on {revision}")
                    etag = hashlib.sha1(files[name]).hexdigest()
                    return self._send(200, files[name], {"X-Repo-Commit": sha, "ETag": f'"{etag}"'})
                self._error(404, None, f"Not found: {url.path}")

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                hub.requests.append(("POST", url.path))
                body = self._body()
                if url.path == "/api/repos/create":
                    return self._create(json.loads(body))
                if url.path == "/api/validate-yaml":
                    errors = hub.metadata_errors(json.loads(body)["content"])
                    return self._send(
                        400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []}
                    )
                opened = re.fullmatch(r"/api/models/(.+?)/discussions", url.path)
                if opened and (repo := self._repo(opened.group(1))) is not None:
                    number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
                    repo.refs[f"refs/pr/{number}"] = dict(repo.refs["main"])
                    repo.heads[f"refs/pr/{number}"] = repo.heads["main"]
                    return self._send(200, {"num": number})
                match = re.fullmatch(r"/api/models/(.+?)/(preupload|commit|branch)/(.+)", url.path)
                if not match or (repo := self._repo(match.group(1))) is None:
                    return None if match else self._error(404, None, f"Not found: {url.path}")
                kind, revision = match.group(2), unquote(match.group(3))
                if kind == "branch":
                    if revision in repo.refs:
                        return self._error(409, None, f"Branch {revision} already exists")
                    repo.refs[revision], repo.heads[revision] = dict(repo.refs["main"]), repo.heads["main"]
                    return self._send(200, {})
                if revision not in repo.refs:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._send(200, {"files": modes})
                self._commit(match.group(1), repo, revision, body, parse_qs(url.query).get("create_pr") == ["1"])

            def _tree(self, repo_id: str, revision: str, folder: str) -> None:
                if (repo := self._repo(repo_id)) is None:
                    return
                if (snapshot := repo.resolve(revision)) is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                prefix = f"{folder.strip('/')}/" if folder else ""
                entries = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in snapshot[1].items()
                    if name.startswith(prefix)
                ]
                if folder and not entries:
                    return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
                self._send(200, entries)

            def _discussion(self, repo_id: str, number: int) -> None:
                if (repo := self._repo(repo_id)) is None:
                    return
                if f"refs/pr/{number}" not in repo.refs:
                    return self._error(404, None, f"Discussion {number} not found")
                details = {
                    "title": "Pull request",
                    "num": number,
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "status": "draft",
                    "repo": {"name": repo_id, "type": "model"},
                    "isPullRequest": True,
                    "changes": {"base": "refs/heads/main"},
                    "filesWithConflicts": [],
                    "events": [],
                }
                self._send(200, details)

            def _create(self, payload: dict) -> None:
                name, owner = payload["name"], payload.get("organization")
                repo_id = f"{owner}/{name}" if owner else name
                if not valid_repo_id(repo_id):
                    return self._error(400, None, f"Invalid repo name: {repo_id}")
                if repo_id in hub.repos:
                    return self._error(409, None, "You already created this model repo")
                visibility = payload.get("visibility")
                private = hub.private_by_default if visibility is None else visibility == "private"
                hub.repos[repo_id] = Repo(private=private)
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

            def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes, create_pr: bool) -> None:
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                }
                if "README.md" in files:
                    errors = hub.metadata_errors(files["README.md"].decode())
                    if errors:
                        return self._error(400, None, "Invalid metadata in README.md.\n" + "\n".join(errors))
                target = revision
                if create_pr:
                    number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
                    target = f"refs/pr/{number}"
                    repo.refs[target] = dict(repo.refs[revision])
                repo.refs[target].update(files)
                oid = hashlib.sha1(f"{repo.heads[revision]}{header['summary']}{sorted(files)}".encode()).hexdigest()
                repo.heads[target] = oid
                repo.snapshots[oid] = dict(repo.refs[target])
                repo.commits.append({"ref": target, "summary": header["summary"], "files": sorted(files)})
                answer = {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid}
                if create_pr:
                    answer["pullRequestUrl"] = f"{hub.url}/{repo_id}/discussions/{target.rsplit('/', 1)[1]}"
                self._send(200, answer)

        return Handler
