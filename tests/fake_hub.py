"""TEST DOUBLE: a local stand-in for the Hugging Face Hub's HTTP API, for tests only.

It is not a mock of forge: ``huggingface_hub`` itself talks to it over real HTTP (set ``HF_ENDPOINT`` to
``FakeHub.url`` in a subprocess, or use ``HfApi(endpoint=hub.url)`` in-process). State lives in memory.

Endpoints, as huggingface_hub 2.4.0 calls them (``{t}`` is ``datasets``/``models``/``spaces``, ``{p}`` the URL
prefix ``datasets/``, ``""`` or ``spaces/``):

- ``GET  /api/whoami-v2``                                whoami (``auth.accessToken.role`` = "read" | "write")
- ``POST /api/repos/create``                             create_repo (private/public; 409 if it exists)
- ``POST /api/validate-yaml``                            create_commit checks a README.md's YAML header with it
- ``GET  /api/{t}/{repo}[/revision/{rev}]``              repo_info / dataset_info (also used by create_commit
                                                         when every file is unchanged, so no commit is made)
- ``POST /api/{t}/{repo}/preupload/{rev}``               upload mode: "lfs" for paths that the repo's
                                                         .gitattributes marks LFS (*.parquet ...), binary
                                                         samples and files >= 10 MiB; "regular" otherwise
- ``POST /{p}{repo}.git/info/lfs/objects/batch``         LFS batch API, "basic" transfer: the upload href points
                                                         back here; objects already stored get no actions
- ``PUT  /lfs-upload/{type}/{repo}/{oid}?sig=...``       the upload itself (no Authorization, like a presigned
                                                         S3 URL); the sha256 and size are checked
- ``POST /{p}{repo}.git/info/lfs/objects/verify``        LFS verify
- ``POST /api/{t}/{repo}/commit/{rev}``                  NDJSON commit: header (parentCommit -> 412 if stale),
                                                         file, lfsFile, deletedFile, deletedFolder
- ``GET  /api/{t}/{repo}/tree/{rev}[/{path}]``           list_repo_tree / list_repo_files (Link-header pages)
- ``GET  /api/{t}/{repo}/commits/{rev}``                 list_repo_commits (Link-header pages)
- ``GET|HEAD /{p}{repo}/resolve/{rev}/{path}``           hf_hub_download (no redirect, no Xet headers)
- ``GET  /api/{t}/{repo}/xet-{read,write}-token/{rev}``  refused with 501: the double has no Xet storage

Xet: huggingface_hub 2.4.0 does not ask the server whether to use Xet. With hf_xet installed, create_commit sends
bytes/paths through Xet (and fails here, at the xet-write-token endpoint); it takes the LFS path for the whole call
only when at least one addition's ``path_or_fileobj`` is a binary file object (``io.BytesIO``, ``open(path, "rb")``)
or when ``HF_HUB_DISABLE_XET=1``. Everything else behaves like a repo without Xet.

Like the Hub, create_repo makes an "initial commit" holding a .gitattributes file. ``FakeHub.commits`` lists only
the commits made through the commit endpoint.

Standalone: ``python tests/fake_hub.py --port 0 --token TOKEN=write`` prints the URL on one line and serves until
killed. Nothing is written to disk unless ``--state DIR`` is given.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import http
import json
import os
import re
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ENDPOINTS = ("whoami", "create_repo", "preupload", "lfs_batch", "lfs_upload", "commit", "tree", "commits")
EXTRA_ENDPOINTS = ("repo_info", "validate_yaml", "lfs_verify", "resolve", "xet_token")
PREFIX = {"dataset": "datasets/", "model": "", "space": "spaces/"}
TYPES = {"datasets": "dataset", "models": "model", "spaces": "space"}
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_JSON = "application/vnd.git-lfs+json"
NOT_FOUND_REPO = "Repository not found"
WRITE_TOKEN_NEEDED = "you must use a write token to upload to a repository"
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in "*.7z *.arrow *.bin *.bz2 *.ckpt *.gz *.h5 *.lz4 *.msgpack *.npy *.npz *.onnx *.parquet "
    "*.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar *.tgz *.xz *.zip *.zst *.mp3 *.wav *.jpg *.png".split()
).encode()

_REPO = r"(?P<t>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_GIT = r"/(?:(?P<t>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(rx), ep)
    for m, rx, ep in [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", rf"^/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?$", "repo_info"),
        ("POST", rf"^/api/{_REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/api/{_REPO}/commit/(?P<rev>[^/]+)$", "commit"),
        ("GET", rf"^/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", "tree"),
        ("GET", rf"^/api/{_REPO}/commits/(?P<rev>[^/]+)$", "commits"),
        ("GET", rf"^/api/{_REPO}/xet-(?:read|write)-token(?:/.*)?$", "xet_token"),
        ("POST", rf"^{_GIT}/batch$", "lfs_batch"),
        ("POST", rf"^{_GIT}/verify$", "lfs_verify"),
        ("PUT", r"^/lfs-upload/(?P<type>\w+)/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$", "lfs_upload"),
        (
            "GET HEAD",
            r"^/(?:(?P<t>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$",
            "resolve",
        ),
    ]
]


class HubError(Exception):
    """An error answered the way the Hub answers it: JSON ``{"error": ...}`` plus X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


@dataclass
class Blob:
    data: bytes
    lfs: bool
    sha256: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:  # git blob sha1 of what git stores: the LFS pointer for LFS files
        stored = self.pointer if self.lfs else self.data
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    time: float
    files: dict[str, Blob]


@dataclass
class Repo:
    type: str
    private: bool
    history: list[Commit] = field(default_factory=list)  # oldest first
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    upload_sigs: dict[str, tuple[str, int]] = field(default_factory=dict)  # sig -> (oid, size)

    @property
    def head(self) -> Commit:
        return self.history[-1]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(t * 1000) % 1000:03d}Z"


def is_lfs_path(path: str, gitattributes: bytes) -> bool:
    for line in gitattributes.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and "filter=lfs" in parts[1:]:
            target = path if "/" in parts[0].strip("/") else path.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(target, parts[0].lstrip("/")):
                return True
    return False


class FakeHub:
    """TEST DOUBLE: a local stand-in for the Hugging Face Hub's HTTP API (whoami, create_repo, repo_info, preupload,
    LFS batch/upload/verify, NDJSON commit, tree, commits, resolve; see the module docstring).
    Not a mock of forge: huggingface_hub itself talks to it over real HTTP."""

    page_size = 1000  # entries per page of tree and commits listings (the Hub: 1000 and 50); lower it to test paging

    def __init__(self, tokens: dict[str, str] | None = None, user: str = "forge-tester", state_dir: str | None = None):
        self.tokens = dict(tokens) if tokens is not None else {"hf_fake_write": "write", "hf_fake_read": "read"}
        if bad := {r for r in self.tokens.values() if r not in ("read", "write")}:
            raise ValueError(f"token roles must be 'read' or 'write', got {sorted(bad)}")
        self.user = user
        self.url = ""
        self.state_dir = state_dir
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.requests: list[dict] = []
        self.injected: list[tuple[str, int]] = []
        self._faults: list[list[Any]] = []  # [endpoint, status, remaining, retry_after]
        self._repos: dict[str, Repo] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if state_dir and os.path.exists(os.path.join(state_dir, "state.json")):
            self._load()

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- test controls -----------------------------------------------------------------------------------------
    def inject(self, status: int, count: int = 1, endpoint: str = "commit", retry_after: float | None = None) -> None:
        """The next `count` requests to `endpoint` get `status` (with a Hub-like JSON error body and Retry-After
        header when given) instead of being served. endpoint is one of: "whoami", "create_repo", "preupload",
        "lfs_batch", "lfs_upload", "commit", "tree", "commits", "any" (or "repo_info", "validate_yaml",
        "lfs_verify", "resolve", "xet_token")."""
        if endpoint not in (*ENDPOINTS, *EXTRA_ENDPOINTS, "any"):
            raise ValueError(f"unknown endpoint {endpoint!r}")
        with self._lock:
            self._faults.append([endpoint, status, count, retry_after])

    def files(self, repo: str) -> dict[str, bytes]:
        """The repo's files at head (including the .gitattributes of the initial commit), content bytes."""
        with self._lock:
            return {path: blob.data for path, blob in self._repos[repo].head.files.items()}

    # ---- request plumbing --------------------------------------------------------------------------------------
    def _take_fault(self, endpoint: str) -> tuple[int, float | None] | None:
        for fault in self._faults:
            if fault[0] in (endpoint, "any") and fault[2] > 0:
                fault[2] -= 1
                self.injected.append((endpoint, fault[1]))
                return fault[1], fault[3]
        return None

    def _role(self, authorization: str | None) -> str | None:
        """None for anonymous requests; 401 for a token the Hub does not know."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, req: _Request, role: str | None, write: bool = False) -> Repo:
        repo = self._repos.get(req.repo_id)
        if repo is None or repo.type != req.kind or (repo.private and role is None):
            raise HubError(401 if role is None else 404, NOT_FOUND_REPO, "RepoNotFound")
        if write and role != "write":
            raise HubError(401 if role is None else 403, WRITE_TOKEN_NEEDED)
        return repo

    @staticmethod
    def _commit_at(repo: Repo, rev: str, branch_only: bool = False) -> Commit:
        rev = unquote(rev)
        if rev == "main":
            return repo.head
        if not branch_only and len(rev) >= 7:
            for commit in reversed(repo.history):
                if commit.oid.startswith(rev):
                    return commit
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, title: str, message: str, files: dict[str, Blob]) -> Commit:
        now = time.time()
        parent = repo.history[-1].oid if repo.history else ""
        oid = hashlib.sha1(f"{parent}\n{title}\n{message}\n{now}\n{secrets.token_hex(8)}".encode()).hexdigest()
        commit = Commit(oid=oid, title=title, message=message, time=now, files=files)
        repo.history.append(commit)
        return commit

    def _save(self) -> None:
        """Only with a state dir: blobs/<sha256> holds file contents, state.json all the rest."""
        if not self.state_dir:
            return
        os.makedirs(os.path.join(self.state_dir, "blobs"), exist_ok=True)
        contents = {sha: data for r in self._repos.values() for sha, data in r.lfs.items()}
        repos = {}
        for name, r in self._repos.items():
            history = []
            for c in r.history:
                contents.update({blob.sha256: blob.data for blob in c.files.values()})
                files = {path: [blob.sha256, blob.lfs] for path, blob in c.files.items()}
                history.append({"oid": c.oid, "title": c.title, "message": c.message, "time": c.time, "files": files})
            repos[name] = {"type": r.type, "private": r.private, "lfs": sorted(r.lfs), "history": history}
        for sha, data in contents.items():
            if not os.path.exists(blob_path := os.path.join(self.state_dir, "blobs", sha)):
                with open(blob_path, "wb") as f:
                    f.write(data)
        with open(os.path.join(self.state_dir, "state.json.tmp"), "w") as f:
            json.dump({"repos": repos, "commits": self.commits}, f, indent=1)
        os.replace(os.path.join(self.state_dir, "state.json.tmp"), os.path.join(self.state_dir, "state.json"))

    def _load(self) -> None:
        assert self.state_dir
        with open(os.path.join(self.state_dir, "state.json")) as f:
            state = json.load(f)

        def read(sha: str) -> bytes:
            with open(os.path.join(str(self.state_dir), "blobs", sha), "rb") as f:
                return f.read()

        self.commits = state["commits"]
        for name, r in state["repos"].items():
            repo = self._repos[name] = Repo(type=r["type"], private=r["private"], lfs={s: read(s) for s in r["lfs"]})
            for c in r["history"]:
                files = {path: Blob(read(sha), lfs) for path, (sha, lfs) in c["files"].items()}
                repo.history.append(Commit(c["oid"], c["title"], c["message"], c["time"], files))
            self.repos[name] = {"private": repo.private, "type": repo.type}

    # ---- endpoints: each returns (status, json body or bytes, headers) ------------------------------------------
    def whoami(self, req: _Request, role: str | None) -> Any:
        if role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return {
            "type": "user",
            "id": hashlib.sha1(self.user.encode()).hexdigest()[:24],
            "name": self.user,
            "fullname": self.user,
            "email": f"{self.user}@example.com",
            "emailVerified": True,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": "",
            "orgs": [],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": f"fake-{role}", "role": role, "createdAt": iso(0)},
            },
        }

    def create_repo(self, req: _Request, role: str | None) -> Any:
        body = req.json()
        name, namespace = body.get("name", ""), body.get("organization") or self.user
        kind = body.get("type") or "model"
        if role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if kind not in PREFIX or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repo name or type: {kind} {name!r}")
        if namespace != self.user or role != "write":
            raise HubError(403, f'You don\'t have the rights to create a {kind} under the namespace "{namespace}"')
        repo_id = f"{namespace}/{name}"
        url = f"{req.base}/{PREFIX[kind]}{repo_id}"
        if repo_id in self._repos:
            raise HubError(409, f"You already created this {kind} repo", url=url)  # the client reads "url"
        private = body["visibility"] == "private" if body.get("visibility") else bool(body.get("private", False))
        repo = self._repos[repo_id] = Repo(type=kind, private=private)
        self._new_commit(repo, "initial commit", "", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})
        self.repos[repo_id] = {"private": private, "type": kind}
        self._save()
        return {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def validate_yaml(self, req: _Request, role: str | None) -> Any:
        content = req.json().get("content", "")
        if content.startswith("---"):
            import yaml

            try:
                yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as e:
                return 400, {"errors": [{"message": str(e)}], "warnings": []}, {}
        return {"errors": [], "warnings": []}

    def repo_info(self, req: _Request, role: str | None) -> Any:
        repo = self._repo(req, role)
        commit = self._commit_at(repo, req.match["rev"] or "main")
        blobs = req.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(req.repo_id.encode()).hexdigest()[:24],
            "id": req.repo_id,
            "author": req.repo_id.split("/")[0],
            "sha": commit.oid,
            "createdAt": iso(repo.history[0].time),
            "lastModified": iso(commit.time),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(b) for b in repo.lfs.values()),
        }

    def preupload(self, req: _Request, role: str | None) -> Any:
        repo = self._repo(req, role, write=True)
        head = self._commit_at(repo, req.match["rev"], branch_only=True)
        attributes = head.files[".gitattributes"].data if ".gitattributes" in head.files else b""
        out = []
        for f in req.json().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = is_lfs_path(f["path"], attributes) or f.get("size", 0) >= LFS_THRESHOLD or b"\0" in sample
            existing = head.files.get(f["path"])
            oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
            out.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return {"files": out, "commitOid": head.oid}

    def lfs_batch(self, req: _Request, role: str | None) -> Any:
        repo, kind = self._repo(req, role, write=True), req.kind
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(422, "FakeHub implements only the 'upload' operation of the LFS batch API")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": 0, "error": {"code": 422, "message": "Invalid object"}})
            elif oid in repo.lfs:  # already present upstream: no actions, the client skips the upload
                objects.append({"oid": oid, "size": size})
            else:
                sig = secrets.token_urlsafe(16)
                repo.upload_sigs[sig] = (oid, size)
                git = f"{req.base}/{PREFIX[kind]}{req.repo_id}.git/info/lfs/objects"
                upload = f"{req.base}/lfs-upload/{kind}/{req.repo_id}/{oid}?sig={sig}"
                actions = {"upload": {"href": upload}, "verify": {"href": f"{git}/verify"}}
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {"Content-Type": LFS_JSON}

    def lfs_upload(self, req: _Request, role: str | None) -> Any:
        repo = self._repos.get(req.repo_id)
        grant = repo.upload_sigs.get(req.query.get("sig", [""])[0]) if repo else None
        if repo is None or grant is None or grant[0] != req.match["oid"]:
            raise HubError(403, "Request has expired or the signature does not match")
        oid, size = grant
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match: expected sha256 {oid} and size {size}")
        repo.lfs[oid] = req.body
        self._save()
        return 200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'}

    def lfs_verify(self, req: _Request, role: str | None) -> Any:
        repo = self._repo(req, role, write=True)
        body = req.json()
        if len(repo.lfs.get(body.get("oid", ""), b"")) != body.get("size") or body.get("oid") not in repo.lfs:
            raise HubError(404, "Object does not exist")
        return 200, {}, {"Content-Type": LFS_JSON}

    def commit(self, req: _Request, role: str | None) -> Any:
        repo = self._repo(req, role, write=True)
        head = self._commit_at(repo, req.match["rev"], branch_only=True)
        if req.query.get("create_pr"):
            raise HubError(400, "FakeHub does not implement pull requests")
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the commit payload must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files, added, deleted = dict(head.files), [], []
        attributes = files[".gitattributes"].data if ".gitattributes" in files else b""
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"]
                data = data.encode() if isinstance(data, str) else data
                files[path] = Blob(data, lfs=is_lfs_path(path, attributes))
                if files[path].lfs:
                    repo.lfs[files[path].sha256] = data
                added.append(path)
            elif key == "lfsFile":
                if value.get("oid") not in repo.lfs:
                    message = "Your push was rejected because an LFS pointer pointed to a file that does not exist"
                    raise HubError(400, f"{message}: {path} (sha256 {value.get('oid')})")
                files[path] = Blob(repo.lfs[value["oid"]], lfs=True)
                added.append(path)
            elif key in ("deletedFile", "deletedFolder"):
                gone = [
                    p for p in files if p == path or (key == "deletedFolder" and p.startswith(path.rstrip("/") + "/"))
                ]
                if not gone:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
                deleted.extend(gone)
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self._new_commit(repo, header.get("summary", ""), header.get("description", ""), files)
        name = req.repo_id
        self.commits.append(
            {
                "repo": name,
                "time": commit.time,
                "message": commit.title,
                "oid": commit.oid,
                "added": added,
                "deleted": deleted,
            }
        )
        self._save()
        url = f"{req.base}/{PREFIX[repo.type]}{name}/commit/{commit.oid}"
        return {"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None}

    def tree(self, req: _Request, role: str | None) -> Any:
        repo = self._repo(req, role)
        commit = self._commit_at(repo, req.match["rev"])
        base = unquote(req.match["path"] or "").strip("/")
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = req.query.get("expand", ["false"])[0].lower() in ("1", "true")
        dirs = {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}
        if base and base not in dirs:
            raise HubError(404, f"{base} does not exist on revision {req.match['rev']}", "EntryNotFound")
        entries: list[dict[str, Any]] = []
        for path in sorted(dirs | set(commit.files)):
            rel = path[len(base) + 1 :] if base else path
            if (base and not path.startswith(base + "/")) or (not recursive and "/" in rel):
                continue
            if path in dirs:
                tree_id = hashlib.sha1("\n".join(p for p in sorted(commit.files) if p.startswith(path + "/")).encode())
                entries.append({"type": "directory", "oid": tree_id.hexdigest(), "size": 0, "path": path})
                continue
            blob = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            if expand:
                last = self._last_commit(repo, commit, path)
                entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": iso(last.time)}
            entries.append(entry)
        return self._page(req, entries, "cursor")

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, path: str) -> Commit:
        i = repo.history.index(commit)
        while i > 0 and repo.history[i - 1].files.get(path) == repo.history[i].files.get(path):
            i -= 1
        return repo.history[i]

    def commits_list(self, req: _Request, role: str | None) -> Any:
        repo = self._repo(req, role)
        commit = self._commit_at(repo, req.match["rev"])
        formatted = "formatted" in req.query.get("expand[]", [])
        items = []
        for c in reversed(repo.history[: repo.history.index(commit) + 1]):
            item: dict[str, Any] = {
                "id": c.oid,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": self.user, "avatar": ""}],
                "date": iso(c.time),
            }
            if formatted:
                item["formatted"] = {"title": c.title, "message": c.message}
            items.append(item)
        return self._page(req, items, "p")

    def _page(self, req: _Request, items: list[Any], param: str) -> Any:
        start = int(req.query.get(param, ["0"])[0])
        headers = {}
        if start + self.page_size < len(items):
            query = {k: v[0] for k, v in req.query.items() if k != param} | {param: str(start + self.page_size)}
            link = f"{req.base}{req.path}?" + "&".join(f"{k}={v}" for k, v in query.items())
            headers["Link"] = f'<{link}>; rel="next"'
        return 200, items[start : start + self.page_size], headers

    def xet_token(self, req: _Request, role: str | None) -> Any:
        self._repo(req, role)
        raise HubError(
            501,
            "FakeHub has no Xet storage. huggingface_hub>=1.x uploads through Xet whenever hf_xet is installed: "
            "pass binary file objects (io.BytesIO / open(path, 'rb')) as path_or_fileobj, or set HF_HUB_DISABLE_XET=1",
        )

    def resolve(self, req: _Request, role: str | None) -> Any:
        repo = self._repo(req, role)
        commit = self._commit_at(repo, req.match["rev"])
        blob = commit.files.get(unquote(req.match["path"]))
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.git_oid}"', "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        if m := re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", "")):
            first, last = int(m[1]), int(m[2]) if m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {first}-{min(last, len(data) - 1)}/{len(data)}"
            data, status = data[first : last + 1], 206
        return status, data, headers


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    base: str
    match: dict[str, str | None] = field(default_factory=dict)

    @property
    def repo_id(self) -> str:
        return self.match["repo"] or ""

    @property
    def kind(self) -> str:  # "dataset" | "model" | "space"; URLs without a type prefix are models
        return self.match.get("type") or TYPES[self.match.get("t") or "models"]

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, each response waits 40 ms
    hub: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the final empty line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        started = time.time()
        split = urlsplit(self.path)
        req = _Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query),
            headers=self.headers,
            body=self._read_body(),
            base=f"http://{self.headers.get('Host') or self.server.server_address[0]}",
        )
        endpoint = "unknown"
        for method, pattern, name in ROUTES:
            if self.command in method.split() and (m := pattern.match(req.path)):
                endpoint, req.match = name, m.groupdict()
                break
        hub = self.hub
        with hub._lock:
            try:
                if endpoint == "unknown":
                    raise HubError(404, f"FakeHub does not implement {self.command} {req.path}")
                if fault := hub._take_fault(endpoint):
                    status, retry_after = fault
                    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
                    raise HubError(status, _fault_message(status, endpoint), headers=headers)
                role = None if endpoint == "lfs_upload" else hub._role(self.headers.get("Authorization"))
                method = getattr(hub, "commits_list" if endpoint == "commits" else endpoint)
                result = method(req, role)
                status, body, headers = result if isinstance(result, tuple) else (200, result, {})
            except Exception as e:  # a HubError is an answer; anything else is a bug of the double: a 500 that says so
                if not isinstance(e, HubError):
                    e = HubError(500, f"FakeHub failed: {type(e).__name__}: {e}")
                header = " ".join(e.message.encode("ascii", "replace").decode().split())
                status, body = e.status, {"error": e.message, **e.extra}
                headers = {"X-Error-Message": header, **e.headers} | ({"X-Error-Code": e.code} if e.code else {})
            hub.requests.append(
                {"method": self.command, "path": req.path, "endpoint": endpoint, "status": status, "time": started}
            )
        self._respond(status, body, headers)

    def _respond(self, status: int, body: Any, headers: dict[str, str]) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve


def _fault_message(status: int, endpoint: str) -> str:
    if status == 429:
        return f"You have exceeded our hourly quotas for action: {endpoint}. We invite you to retry later."
    if status == 500:
        return "Internal Error - We're working hard to fix this as soon as possible!"
    if status == 412:
        return "A commit has happened since. Please refresh and try again."
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"Injected error {status}"


def main() -> None:
    parser = argparse.ArgumentParser(description="TEST DOUBLE of the Hugging Face Hub HTTP API (see module doc)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", default=[], help="TOKEN=ROLE (ROLE: read|write), repeatable")
    parser.add_argument("--user", default="forge-tester")
    parser.add_argument("--state", default=None, help="directory to keep the state in (default: memory only)")
    args = parser.parse_args()
    tokens = dict(t.rsplit("=", 1) for t in args.token) if args.token else None
    hub = FakeHub(tokens=tokens, user=args.user, state_dir=args.state).start(args.host, args.port)
    print(hub.url, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    hub.stop()


if __name__ == "__main__":
    main()
