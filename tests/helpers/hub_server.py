"""A local stand-in for the part of the Hugging Face Hub HTTP API that our tests exercise.

CI cannot reach huggingface.co, yet Hub features should be tested through the real ``huggingface_hub`` and
``transformers`` code paths (uploads, downloads, ``push_to_hub``/``from_pretrained``) rather than through
mocks. This server speaks the wire protocol those clients use (checked against huggingface_hub 2.4):

- ``POST /api/repos/create``: create a model repo; answers 409 with the repo ``url`` when it exists, which
  ``create_repo(exist_ok=True)`` relies on.
- ``GET /api/models/{repo_id}[/revision/{rev}]``: repo info with ``sha`` and ``siblings`` (``model_info``,
  ``repo_info``, ``repo_exists``, first step of ``snapshot_download``).
- ``GET /api/models/{repo_id}/tree/{rev}[/{path}]``: ``list_repo_tree`` and ``list_repo_files``.
- ``POST /api/models/{repo_id}/preupload/{rev}``: upload mode per file, "lfs" for binary or large files
  (as the Hub does for weights) and "regular" for the rest.
- ``POST /{repo_id}.git/info/lfs/objects/batch`` and ``PUT /lfs-objects/{sha256}``: the git-LFS batch API
  (basic transfer), which the client uses for LFS files when Xet is disabled.
- ``POST /api/models/{repo_id}/commit/{rev}``: the NDJSON commit (inline base64 files, LFS pointers,
  deletions); it creates a commit whose sha hashes its parent, message and files, and moves ``main`` to it.
- ``HEAD``/``GET /{repo_id}/resolve/{rev}/{path}``: file download with the headers ``hf_hub_download``
  needs (``X-Repo-Commit``, ``ETag``, ``Content-Length``, plus ``X-Linked-Etag``/``X-Linked-Size`` for LFS
  files); errors carry ``X-Error-Code`` like the Hub's, so clients raise their specific error types.
- ``POST /api/validate-yaml``: accepts any model card (``create_commit`` validates ``README.md`` first).

Not implemented: Xet storage (clients must run with ``HF_HUB_DISABLE_XET=1``), dataset and Space repos,
branches other than ``main``, tags, pull requests, pagination and auth (any token is accepted). Repo state
lives in memory; file contents are content-addressed blobs in the storage directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# The Hub stores files of 10 MB or more in LFS even when they are text.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def _now() -> str:
    """Timestamp in the only format ``huggingface_hub.utils.parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(content: bytes) -> str:
    """Git's blob sha1, which the client compares with to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """The pointer file git stores in place of an LFS file: its blob id and size are what the Hub reports."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _File:
    sha256: str  # address of the content in the blob store
    size: int
    git_oid: str  # git blob id: of the content, or of the LFS pointer file for LFS files (as in git)
    lfs: bool

    @classmethod
    def regular(cls, sha256: str, content: bytes) -> _File:
        return cls(sha256, len(content), _git_blob_oid(content), lfs=False)

    @classmethod
    def lfs_object(cls, sha256: str, size: int) -> _File:
        return cls(sha256, size, _git_blob_oid(_lfs_pointer(sha256, size)), lfs=True)

    @property
    def etag(self) -> str:
        """The Hub's ETag: the sha256 for LFS files and the git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class _Commit:
    oid: str
    date: str
    files: dict[str, _File]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit]
    head: str  # commit that ``main`` points to


class _HubError(Exception):
    """An error answered the way the Hub does: JSON ``{"error": ...}`` plus ``X-Error-*`` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        commit: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.commit = commit  # the Hub sends X-Repo-Commit on "entry not found" so clients cache the miss
        self.extra = extra or {}  # more fields of the JSON body


class HubServer:
    """A Hub-compatible HTTP server on 127.0.0.1, storing blobs under ``storage_dir``.

    Attributes tests may use:
        url: base URL to point ``HF_ENDPOINT`` at (set by ``start``).
        requests: ``(method, path)`` of every request served, to assert which protocol paths were taken.
        fail_commit_status: when set (e.g. 500), the commit endpoint answers with this status and commits
            nothing, to test how failed uploads surface.
    """

    def __init__(self, storage_dir: str | Path, port: int = 0, user: str = "test-user") -> None:
        self.blob_dir = Path(storage_dir) / "blobs"
        self.port = port
        self.user = user  # namespace of repos created without one (the Hub uses the token's owner)
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self.fail_commit_status: int | None = None
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> HubServer:
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # A short poll interval keeps `stop` (which waits for the serving loop to notice) fast.
        serve = {"poll_interval": 0.05}
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs=serve, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            assert self._thread is not None
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- storage -----------------------------------------------------------------------------------------

    def _blob_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):  # the oid becomes a file name: never let it be a path
            raise _HubError(400, f"Invalid sha256 oid: {sha256!r}")
        return self.blob_dir / sha256

    def _store_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self._blob_path(sha256)
        if not path.exists():
            # Write then rename, so that concurrent readers never see a partial blob.
            fd, tmp = tempfile.mkstemp(dir=self.blob_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(tmp, path)
        return sha256

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise _HubError(404, f"Repository {repo_id} not found", code="RepoNotFound")
        return repo

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        if revision == "main":
            return repo.commits[repo.head]
        if _COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    # -- endpoints ---------------------------------------------------------------------------------------

    def create_repo(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("type", "model") != "model":
            raise _HubError(400, "This test server only supports model repos")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self._repos:
                # `create_repo(exist_ok=True)` reads the repo URL from this 409 body.
                raise _HubError(409, "You already created this model repo", extra={"url": url})
            initial_oid = hashlib.sha1(f"initial commit of {repo_id}".encode()).hexdigest()
            initial = _Commit(oid=initial_oid, date=_now(), files={})
            self._repos[repo_id] = _Repo(
                repo_id=repo_id,
                private=payload.get("visibility") == "private",
                created_at=initial.date,
                commits={initial.oid: initial},
                head=initial.oid,
            )
        return {"url": url, "name": repo_id, "id": repo_id}

    def repo_info(self, repo_id: str, revision: str, blobs: bool) -> dict[str, Any]:
        with self._lock:
            repo = self._repo(repo_id)
            commit = self._commit(repo, revision)
        siblings = []
        for path, file in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:  # the Hub only sends file metadata when asked (`files_metadata=True`)
                sibling |= {"size": file.size, "blobId": file.git_oid}
                if file.lfs:
                    sibling["lfs"] = {
                        "sha256": file.sha256,
                        "size": file.size,
                        "pointerSize": file.pointer_size,
                    }
            siblings.append(sibling)
        return {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    def tree(self, repo_id: str, revision: str, path: str, recursive: bool) -> list[dict[str, Any]]:
        with self._lock:
            commit = self._commit(self._repo(repo_id), revision)
        prefix = f"{path}/" if path else ""
        children = {p: f for p, f in commit.files.items() if p.startswith(prefix)}
        if path and not children:
            raise _HubError(
                404, f"{path} does not exist on {revision}", code="EntryNotFound", commit=commit.oid
            )
        entries: dict[str, dict[str, Any]] = {}
        for file_path, file in children.items():
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder, "oid": _tree_oid(commit, folder)}
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {
                    "type": "file",
                    "path": file_path,
                    "size": file.size,
                    "oid": file.git_oid,
                }
                if file.lfs:
                    entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": file.pointer_size}
                entries[file_path] = entry
        return [entries[p] for p in sorted(entries)]

    def preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            commit = self._commit(self._repo(repo_id), revision)
        files = []
        for item in payload["files"]:
            binary = b"\0" in base64.b64decode(item["sample"])
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if binary or item["size"] >= LFS_SIZE_THRESHOLD else "regular",
                    "shouldIgnore": False,
                    # Same convention as the client's `_local_oid`, so that unchanged files are skipped.
                    "oid": existing.etag if existing is not None else None,
                }
            )
        return {"files": files}

    def lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._repo(repo_id)
        if payload.get("operation") != "upload":
            raise _HubError(400, "This test server only supports LFS uploads")
        objects = []
        for obj in payload["objects"]:
            answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if not self._blob_path(obj["oid"]).exists():  # no "actions": the client skips known objects
                answer |= {
                    "authenticated": True,
                    "actions": {"upload": {"href": f"{self.url}/lfs-objects/{obj['oid']}"}},
                }
            objects.append(answer)
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, oid: str, content: bytes) -> None:
        self._blob_path(oid)  # validates the oid
        if hashlib.sha256(content).hexdigest() != oid:
            raise _HubError(400, f"Uploaded content does not match LFS oid {oid}")
        self._store_blob(content)

    def commit(self, repo_id: str, revision: str, body: bytes) -> dict[str, Any]:
        if self.fail_commit_status is not None:
            raise _HubError(
                self.fail_commit_status, "Simulated commit failure (HubServer.fail_commit_status)"
            )
        with self._lock:
            self._repo(repo_id)  # a missing repo is reported before anything else, as on the Hub
        if revision != "main":
            raise _HubError(
                404, f"Invalid rev id: {revision} (only 'main' can be committed to)", "RevisionNotFound"
            )
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            raise _HubError(400, "Commit payload has no header line")
        # Store contents before taking the lock: hashing and writing blobs needs no repo state.
        changes: dict[str, _File | None] = {}
        folders_deleted = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                changes[value["path"]] = _File.regular(self._store_blob(content), content)
            elif key == "lfsFile":
                blob = self._blob_path(value["oid"])
                if not blob.exists():
                    raise _HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                changes[value["path"]] = _File.lfs_object(value["oid"], blob.stat().st_size)
            elif key == "deletedFile":
                changes[value["path"]] = None
            elif key == "deletedFolder":
                folders_deleted.append(value["path"].rstrip("/") + "/")
            elif key != "header":
                raise _HubError(400, f"Unsupported commit operation {key!r}")
        with self._lock:
            repo = self._repo(repo_id)
            parent = repo.commits[repo.head]
            if header.get("parentCommit") not in (None, parent.oid):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            files = {p: f for p, f in parent.files.items() if not p.startswith(tuple(folders_deleted))}
            for path, file in changes.items():
                if file is not None:
                    files[path] = file
                elif files.pop(path, None) is None:
                    raise _HubError(
                        404, f"A file with this name doesn't exist: {path}", "EntryNotFound", parent.oid
                    )
            content_id = {p: f.git_oid for p, f in sorted(files.items())}
            oid = hashlib.sha1(json.dumps([parent.oid, header["summary"], content_id]).encode()).hexdigest()
            repo.commits[oid] = _Commit(oid=oid, date=_now(), files=files)
            repo.head = oid
        return {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
            "hookOutput": "",
        }

    def resolve(self, repo_id: str, revision: str, path: str) -> tuple[_Commit, _File]:
        with self._lock:
            commit = self._commit(self._repo(repo_id), revision)
        file = commit.files.get(path)
        if file is None:
            raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound", commit=commit.oid)
        return commit, file


def _tree_oid(commit: _Commit, folder: str) -> str:
    """A stable id for a folder, derived from what it contains (git trees are content-addressed too)."""
    content = sorted((p, f.git_oid) for p, f in commit.files.items() if p.startswith(f"{folder}/"))
    return hashlib.sha1(json.dumps(content).encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 30  # frees the thread of an idle pooled connection
    server: ThreadingHTTPServer

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: ``requests`` records the traffic, stderr noise would bury test output."""

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path))
        # Split before unquoting: revisions are sent with "/" encoded as %2F.
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        try:
            self._route(segments, parse_qs(url.query), self._read_body())
        except _HubError as e:
            headers = {"X-Error-Message": str(e)}
            if e.code is not None:
                headers["X-Error-Code"] = e.code
            if e.commit is not None:
                headers["X-Repo-Commit"] = e.commit
            self._send_json(e.status, {"error": str(e), **e.extra}, headers)
        except Exception as e:  # a server bug must fail the request, never hang the client
            self._send_json(500, {"error": f"HubServer bug: {e!r}"})

    def _route(self, segments: list[str], query: dict[str, list[str]], body: bytes) -> None:
        hub, method = self.hub, self.command
        match segments:
            case ["api", "repos", "create"] if method == "POST":
                self._send_json(200, hub.create_repo(json.loads(body)))
            case ["api", "validate-yaml"] if method == "POST":
                self._send_json(200, {"errors": [], "warnings": []})
            case ["api", "models", ns, name] if method == "GET":
                self._send_json(200, hub.repo_info(f"{ns}/{name}", "main", _flag(query, "blobs")))
            case ["api", "models", ns, name, "revision", revision] if method == "GET":
                self._send_json(200, hub.repo_info(f"{ns}/{name}", revision, _flag(query, "blobs")))
            case ["api", "models", ns, name, "tree", revision, *path] if method == "GET":
                tree = hub.tree(f"{ns}/{name}", revision, "/".join(path), _flag(query, "recursive"))
                self._send_json(200, tree)
            case ["api", "models", ns, name, "preupload", revision] if method == "POST":
                self._send_json(200, hub.preupload(f"{ns}/{name}", revision, json.loads(body)))
            case ["api", "models", ns, name, "commit", revision] if method == "POST":
                if _flag(query, "create_pr"):
                    raise _HubError(400, "This test server does not support pull requests")
                self._send_json(200, hub.commit(f"{ns}/{name}", revision, body))
            case [ns, repo_git, "info", "lfs", "objects", "batch"] if method == "POST":
                batch = hub.lfs_batch(f"{ns}/{repo_git.removesuffix('.git')}", json.loads(body))
                self._send_json(200, batch, content_type="application/vnd.git-lfs+json")
            case ["lfs-objects", oid] if method == "PUT":
                hub.lfs_upload(oid, body)
                self._send(200, b"", {})
            case [ns, name, "resolve", revision, *path] if method in ("GET", "HEAD") and path:
                self._send_file(*hub.resolve(f"{ns}/{name}", revision, "/".join(path)))
            case _:
                raise _HubError(404, f"HubServer does not implement {method} {'/'.join(segments)}")

    def _read_body(self) -> bytes:
        """The whole body, read before answering: on a keep-alive connection, unread bytes would be taken
        for the next request."""
        if self.headers.get("Transfer-Encoding"):  # huggingface_hub sizes every body it sends
            self.close_connection = True
            raise _HubError(411, "HubServer only reads bodies with a Content-Length")
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send_file(self, commit: _Commit, file: _File) -> None:
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{file.etag}"',
            "Content-Type": "application/octet-stream",
        }
        if file.lfs:  # on the Hub these describe the LFS object behind the redirect to the CDN
            headers |= {"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)}
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(file.size))
        self.end_headers()
        if self.command == "GET":
            with open(self.hub._blob_path(file.sha256), "rb") as f:
                shutil.copyfileobj(f, self.wfile)

    def _send_json(
        self,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": content_type, **(headers or {})})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """Boolean query parameter as the client sends it (``True``/``1``)."""
    return query.get(name, ["false"])[0].lower() in ("1", "true")
