"""A small in-memory Hugging Face Hub on 127.0.0.1, enough for the real `huggingface_hub` client.

It speaks the routes that `HfApi.create_repo`, `HfApi.upload_folder` and `snapshot_download`
use in huggingface_hub 2.x (model repos only):

    POST /api/repos/create                          create a repo (409 if it exists)
    POST /api/validate-yaml                         README.md metadata check (validate_card_metadata)
    GET  /api/whoami-v2                             the configured user
    GET  /api/agent-harnesses                       empty registry (huggingface_hub's own side request)
    GET  /api/models/<ns>/<name>[/revision/<rev>]   repo info: sha, private, siblings
    GET  /api/models/<ns>/<name>/tree/<rev>[/path]  file listing (one page)
    POST /api/models/<ns>/<name>/preupload/<rev>    upload modes: every file "regular"
    POST /api/models/<ns>/<name>/commit/<rev>       NDJSON commit, base64 "file" entries
    HEAD/GET /<ns>/<name>/resolve/<rev>/<path>      file bytes with ETag, X-Repo-Commit

A commit whose README.md front matter is not valid model-card metadata is refused with 400, as
the Hub refuses it ("Invalid metadata in README.md"): see `validate_card_metadata`.

Preupload answers "regular" for every file so the client sends contents base64-encoded inside
the commit itself: no LFS or Xet storage to fake. Errors carry the JSON bodies and
X-Error-Code / X-Error-Message headers the client turns into its typed exceptions.

Every request needs `Authorization: Bearer <token>` with the configured token when it carries
one; writes need it always; reads need it only for private repos (as on the Hub). Requests are
recorded (method, path, authorised or not) without the header value itself.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading

import yaml
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
# the Hub's pipeline tags that a causal-LM adapter could carry (a subset of the Hub's list)
PIPELINE_TAGS = {"text-generation", "text2text-generation", "text-classification", "text-ranking",
                 "feature-extraction", "sentence-similarity", "fill-mask"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")


def validate_card_metadata(readme: str) -> list[str]:
    """What the Hub would object to in a model card's YAML front matter ([] when it is fine):
    YAML that does not parse, and the types / ids of the keys ULMRec writes."""
    if not readme.startswith("---\n"):
        return []  # no metadata block: the Hub accepts a card without one
    end = readme.find("\n---", 4)
    if end < 0:
        return ["the front matter block is not closed"]
    try:
        meta = yaml.safe_load(readme[4:end])
    except yaml.YAMLError as e:
        return [f"not YAML: {str(e).splitlines()[0]}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["the front matter is not a mapping"]
    errors = []

    def ids(key: str, value) -> None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str) or not _REPO_ID.match(v):
                errors.append(f"{key}: {v!r} is not a Hub repo id")

    for key in ("license", "library_name", "pipeline_tag", "model_name"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f"{key}: expected a string")
    if isinstance(meta.get("pipeline_tag"), str) and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f"pipeline_tag: unknown tag {meta['pipeline_tag']!r}")
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append("tags: expected a list of strings")
    for key in ("base_model", "datasets"):
        if key in meta:
            ids(key, meta[key])
    index = meta.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            return errors + ["model-index: expected a list"]
        for entry in index:
            results = entry.get("results") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(results, list):
                errors.append("model-index: each entry needs a name and a list of results")
                continue
            for r in results:
                ok = (isinstance(r, dict) and isinstance(r.get("task"), dict) and isinstance(r["task"].get("type"), str)
                      and isinstance(r.get("dataset"), dict) and isinstance(r["dataset"].get("type"), str)
                      and isinstance(r["dataset"].get("name"), str) and isinstance(r.get("metrics"), list)
                      and all(isinstance(m, dict) and isinstance(m.get("type"), str) and "value" in m
                              for m in r["metrics"]))
                if not ok:
                    errors.append("model-index: a result needs task.type, dataset.type/name and metrics")
    return errors


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit | None:
        return self.commits[-1] if self.commits else None

    def at(self, revision: str) -> Commit | None:
        """The commit a revision names: 'main' (the head) or a full commit sha."""
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.sha == revision), None)


@dataclass
class Request:
    method: str
    path: str
    authorised: bool


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as ETag and tree oid of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Start with `with FakeHub(token) as hub:`; `hub.url` is the endpoint to point HF_ENDPOINT at."""

    def __init__(self, token: str, user: str = USER):
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def files(self, repo_id: str) -> dict[str, bytes]:
        """{path: bytes} at the head of a repo ({} when it has no commit)."""
        head = self.repos[repo_id].head
        return dict(head.files) if head else {}

    # -- state changes (called from handler threads) ------------------------------------

    def create(self, repo_id: str, private: bool) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = Repo(repo_id, private)
            return True

    def commit(self, repo: Repo, message: str, changes: dict[str, bytes | None]) -> Commit:
        with self.lock:
            files = dict(repo.head.files) if repo.head else {}
            for path, data in changes.items():
                if data is None:
                    files.pop(path, None)
                else:
                    files[path] = data
            seed = f"{repo.repo_id}:{len(repo.commits)}:{message}".encode()
            sha = hashlib.sha1(seed + b"".join(sorted(git_blob_sha(d).encode() for d in files.values())))
            commit = Commit(sha.hexdigest(), message, files)
            repo.commits.append(commit)
            return commit


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    repo = r"/(?P<ns>[^/]+)/(?P<name>[^/]+)"
    routes = [
        ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
        ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
        ("GET", re.compile(r"^/api/agent-harnesses$"), "agent_harnesses"),
        ("GET", re.compile(rf"^/api/models{repo}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
        ("GET", re.compile(rf"^/api/models{repo}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
        ("POST", re.compile(rf"^/api/models{repo}/preupload/(?P<rev>[^/]+)$"), "preupload"),
        ("POST", re.compile(rf"^/api/models{repo}/commit/(?P<rev>[^/]+)$"), "commit"),
        ("GET", re.compile(rf"^{repo}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
        ("HEAD", re.compile(rf"^{repo}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply sets Content-Length

        def log_message(self, format, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            self._dispatch()

        def do_HEAD(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        # -- plumbing --------------------------------------------------------------------

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            self.query = parse_qs(url.query)
            self.body = self._read_body()
            self.auth = self._auth()
            with hub.lock:
                hub.requests.append(Request(self.command, url.path, self.auth == "ok"))
            if self.auth == "bad":
                return self._error(401, "Invalid credentials in Authorization header")
            for method, pattern, action in routes:
                match = pattern.match(url.path)
                if match and method == self.command:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, action)(**args)
            self._error(404, f"no route {self.command} {url.path}")

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().strip().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _auth(self) -> str:
            """'ok' (right token), 'none' (no header) or 'bad' (any other header)."""
            header = self.headers.get("Authorization")
            if header is None:
                return "none"
            return "ok" if header == f"Bearer {hub.token}" else "bad"

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, payload: object, status: int = 200) -> None:
            self._send(status, json.dumps(payload).encode())

        def _error(self, status: int, message: str, code: str | None = None,
                   headers: dict[str, str] | None = None, **body: object) -> None:
            extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
            self._send(status, json.dumps({"error": message, **body}).encode(), extra)

        def _repo(self, ns: str, name: str, write: bool) -> Repo | None:
            """The repo, or None after answering 401/404 the way the Hub does."""
            if write and self.auth != "ok":
                self._error(401, "You must be authenticated to write")
                return None
            repo = hub.repos.get(f"{ns}/{name}")
            if repo is None or (repo.private and self.auth != "ok"):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            return repo

        def _commit_at(self, repo: Repo, rev: str) -> Commit | None:
            commit = repo.at(rev)
            if commit is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return commit

        # -- routes ----------------------------------------------------------------------

        def create_repo(self) -> None:
            if self.auth != "ok":
                return self._error(401, "You must be authenticated to create a repo")
            payload = json.loads(self.body)
            if payload.get("type", "model") != "model":
                return self._error(400, "this fake hub only hosts model repos")
            namespace = payload.get("organization") or hub.user
            if namespace != hub.user:
                return self._error(403, f"You don't have the rights to create a model under {namespace}")
            repo_id = f"{namespace}/{payload['name']}"
            if not hub.create(repo_id, payload.get("visibility") == "private"):
                # The client reads the repo URL from this body when it is told exist_ok.
                return self._error(409, "You already created this model repo", url=f"{hub.url}/{repo_id}")
            self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def validate_yaml(self) -> None:
            payload = json.loads(self.body or b"{}")
            errors = validate_card_metadata(payload.get("content", ""))
            if errors:
                return self._error(400, "Invalid metadata in README.md: " + "; ".join(errors))
            self._json({"errors": [], "warnings": []})

        def whoami(self) -> None:
            if self.auth != "ok":
                return self._error(401, "Invalid credentials in Authorization header")
            self._json({"type": "user", "name": hub.user, "auth": {"type": "access_token"}})

        def agent_harnesses(self) -> None:
            self._json({"standardEnvVars": [], "harnesses": {}})

        def repo_info(self, ns: str, name: str, rev: str = "main") -> None:
            repo = self._repo(ns, name, write=False)
            if repo is None:
                return
            commit = self._commit_at(repo, rev)
            if commit is None:
                return
            self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.sha,
                        "private": repo.private, "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

        def tree(self, ns: str, name: str, rev: str, path: str = "") -> None:
            repo = self._repo(ns, name, write=False)
            commit = self._commit_at(repo, rev) if repo else None
            if commit is None:
                return
            prefix = f"{path.strip('/')}/" if path else ""
            recursive = self.query.get("recursive", ["False"])[0].lower() == "true"
            entries = [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)}
                       for p, d in sorted(commit.files.items())
                       if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
            self._json(entries)

        def preupload(self, ns: str, name: str, rev: str) -> None:
            repo = self._repo(ns, name, write=True)
            if repo is None:
                return
            files = json.loads(self.body)["files"]
            self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                  for f in files]})

        def commit(self, ns: str, name: str, rev: str) -> None:
            repo = self._repo(ns, name, write=True)
            if repo is None:
                return
            if rev != "main":
                return self._error(400, "this fake hub only commits to main")
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
            header = next((item["value"] for item in lines if item["key"] == "header"), None)
            if header is None or not header.get("summary"):
                return self._error(400, "commit header with a summary is required")
            changes: dict[str, bytes | None] = {}
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file" and value.get("encoding") == "base64":
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    changes[value["path"]] = None
                elif key != "header":  # lfsFile etc.: never negotiated by preupload
                    return self._error(400, f"unsupported commit operation {key!r}")
            readme = changes.get("README.md")
            errors = validate_card_metadata(readme.decode("utf-8", "replace")) if readme else []
            if errors:
                return self._error(400, "Invalid metadata in README.md: " + "; ".join(errors))
            commit = hub.commit(repo, header["summary"], changes)
            self._json({"success": True, "commitOid": commit.sha, "pullRequestUrl": None,
                        "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{commit.sha}"})

        def resolve(self, ns: str, name: str, rev: str, path: str) -> None:
            repo = self._repo(ns, name, write=False)
            commit = self._commit_at(repo, rev) if repo else None
            if commit is None:
                return
            if path not in commit.files:
                return self._error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            data = commit.files[path]
            self._send(200, data, {"ETag": f'"{git_blob_sha(data)}"', "X-Repo-Commit": commit.sha},
                       content_type="application/octet-stream")

    return Handler
