"""A local stand-in for the Hugging Face Hub: the part of its HTTP API that ``huggingface_hub`` 2.x and ``datasets``
use to create a dataset repo, upload to it (LFS + NDJSON commits) and read it back (map-style and streaming).

Start it with :func:`serve`; point clients at it with ``HF_ENDPOINT=<url>`` and ``HF_HUB_DISABLE_XET=1`` (otherwise
huggingface_hub 2.x insists on Xet storage for uploads). State lives in memory, plus a folder for LFS objects. It is
a test fixture, not a Hub: no auth checks beyond recording the tokens it was sent, no pagination, and of discussions
only pull requests: opened by a commit with ``create_pr``, committed to at ``refs/pr/N``, listed and merged.

Run standalone (for trying dr-hf by hand): ``python tests/hub_standin.py --port 8000``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Entry:
    size: int
    oid: str  # git blob sha1 of the file (regular) or of its LFS pointer
    lfs_sha256: Optional[str] = None
    data: Optional[bytes] = None  # regular files only


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    branches: Dict[str, str] = field(default_factory=dict)
    commits: Dict[str, Dict[str, Entry]] = field(default_factory=dict)  # sha -> tree
    log: List[str] = field(default_factory=list)
    pulls: Dict[int, dict] = field(default_factory=dict)  # num -> title, status, base (commit it started from)


class HubState:
    def __init__(self, lfs_dir: str):
        self.repos: Dict[Tuple[str, str], Repo] = {}
        self.lfs_dir = lfs_dir
        self.lock = threading.RLock()
        self.tokens_seen: List[str] = []
        self.requests: List[Tuple[str, str]] = []
        self.lfs_puts: List[str] = []
        self.fail_lfs_put_after: Optional[int] = None  # fault injection: refuse PUTs after this many
        self.fail_commits: set = set()  # fault injection: answer these commit attempts (0-based; a merge is one) with a 500
        self.commit_attempts = 0
        self.fail_reads_after: Optional[int] = None  # fault injection: drop the connection of ranged parquet reads...
        self.fail_reads_count: Optional[int] = None  # ...this many of them (None: every one from then on)
        self.ranged_reads = 0
        self.reads: List[Tuple[str, str]] = []  # (path, Range) of every ranged parquet read, in order
        self.fail_reads_of: Optional[str] = None  # ...counting only the reads of files whose path ends so
        self.commits_made = 0
        self.read_bandwidth: Optional[float] = None  # bytes/s of each ranged read's answer (a network, for benchmarks)

    def lfs_path(self, repo_type: str, repo_id: str, oid: str) -> str:
        """LFS objects are stored per repo, as on the Hub."""
        return os.path.join(self.lfs_dir, repo_type, repo_id, oid)

    def has_lfs(self, repo_type: str, repo_id: str, oid: str) -> bool:
        return os.path.exists(self.lfs_path(repo_type, repo_id, oid))


def _new_sha() -> str:
    return hashlib.sha1(os.urandom(20)).hexdigest()


API = r"^/api/(?P<t>models|datasets|spaces)/(?P<id>[^/]+/[^/]+)"  # /api/{type}s/{org}/{name}
REPO = r"^/(?:(?P<t>datasets|spaces)/)?(?P<id>[^/]+/[^/]+)"  # /{type}s/{org}/{name}, models without a prefix


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-standin/1"
    state: HubState  # set by serve()

    def log_message(self, *args):  # quiet
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status=200, headers=None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str):
        self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    def _record(self):
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            self.state.tokens_seen.append(auth[7:])
        self.state.requests.append((self.command, self.path))

    def _repo(self, repo_type: str, repo_id: str) -> Optional[Repo]:
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Optional[str]:
        rev = urllib.parse.unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    def _repo_at(self, repo_type: str, repo_id: str, rev: str):
        """(repo, commit sha) of a repo at a revision; (repo or None, None) after sending a 404."""
        repo = self._repo(repo_type, repo_id)
        return (repo, None) if repo is None else (repo, self._commit(repo, rev))

    def _entries(self, tree: Dict[str, Entry], prefix: str, recursive: bool) -> List[dict]:
        prefix = prefix.strip("/")
        out, dirs = [], set()
        for path in sorted(tree):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            parts = rest.split("/")
            for d in range(1, len(parts)):
                if d == 1 or recursive:
                    dirs.add("/".join(([prefix] if prefix else []) + parts[:d]))
            if len(parts) == 1 or recursive:
                out.append(self._file_info(path, tree[path]))
        out.extend({"type": "directory", "oid": git_blob_sha(d.encode()), "size": 0, "path": d} for d in sorted(dirs))
        return out

    @staticmethod
    def _file_info(path: str, e: Entry) -> dict:
        info = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.lfs_sha256:
            info["lfs"] = {"oid": e.lfs_sha256, "size": e.size, "pointerSize": 134}
        return info

    # -- routing ---------------------------------------------------------------------------------
    ROUTES = [
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("GET", API + r"(?:/revision/(?P<rev>.+))?$", "repo_info"),
        *[("POST", API + rf"/{verb}/(?P<rev>.+)$", name) for verb, name in
          (("preupload", "preupload"), ("commit", "commit"), ("branch", "create_branch"), ("paths-info", "paths_info"))],
        ("GET", API + r"/tree/(?P<rev>[^/]+)(?:/(?P<dir>.*))?$", "tree"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", API + r"/discussions$", "discussions"),
        ("POST", API + r"/discussions/(?P<num>\d+)/merge$", "merge"),
        ("POST", REPO + r"\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", r"^/lfs-upload/(?P<t>models|datasets|spaces)/(?P<id>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
        *[(method, REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve") for method in ("GET", "HEAD")],
    ]

    def _route(self):
        self._record()
        url = urllib.parse.urlsplit(self.path)
        self.query = urllib.parse.parse_qs(url.query)
        for method, pattern, name in self.ROUTES:
            if method != self.command:
                continue
            m = re.match(pattern, url.path)
            if m:
                kw = {k: v for k, v in m.groupdict().items()}
                if "t" in kw:
                    kw["t"] = {"models": "model", "datasets": "dataset", "spaces": "space", None: "model"}[kw["t"]]
                with self.state.lock:
                    return getattr(self, "do_" + name)(**kw)
        self._body()
        self._error(404, "EntryNotFound", f"hub stand-in: no route for {self.command} {url.path}")

    do_GET = do_POST = do_PUT = do_HEAD = _route

    # -- endpoints -------------------------------------------------------------------------------
    def do_create_repo(self):
        body = json.loads(self._body() or b"{}")
        repo_type = body.get("type") or "model"
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        key = (repo_type, repo_id)
        if key in self.state.repos:
            return self._json({"error": "You already created this repo", "url": self._url(repo_type, repo_id)}, 409)
        sha = _new_sha()
        private = bool(body.get("private")) or body.get("visibility") == "private"  # (huggingface_hub 2.x sends the latter)
        repo = Repo(repo_type, repo_id, private=private, branches={"main": sha}, commits={sha: {}})
        repo.log.append("initial commit")
        self.state.repos[key] = repo
        self._json({"url": self._url(repo_type, repo_id), "name": repo_id, "id": repo_id})

    def _url(self, repo_type, repo_id):
        host = f"http://{self.headers.get('Host')}"
        return f"{host}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"

    def do_repo_info(self, t, id, rev=None):
        repo, sha = self._repo_at(t, id, rev or "main")
        if sha is None:
            return
        tree = repo.commits[sha]
        card = None
        if "README.md" in tree:
            text = tree["README.md"].data.decode()
            m = re.match(r"^---\n(.*?)\n---", text, re.S)
            if m:
                import yaml

                card = yaml.safe_load(m.group(1))
        self._json({
            "_id": git_blob_sha(id.encode())[:24], "id": id, "author": id.split("/")[0], "sha": sha,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "cardData": card,
            "siblings": [{"rfilename": p, "size": e.size} for p, e in sorted(tree.items())],
        })

    def do_create_branch(self, t, id, rev):
        repo = self._repo(t, id)
        if repo is None:
            return
        body = json.loads(self._body() or b"{}")
        branch = urllib.parse.unquote(rev)
        if branch in repo.branches:
            return self._error(409, "BranchAlreadyExists", f"branch {branch} already exists")
        start = body.get("startingPoint") or "main"
        repo.branches[branch] = repo.branches.get(start, start)
        self._json({})

    def do_preupload(self, t, id, rev):
        repo = self._repo(t, id)
        body = json.loads(self._body() or b"{}")
        if repo is None:
            return
        sha = self._commit(repo, rev)
        if sha is None:
            return
        files = []
        for f in body.get("files", []):
            # The real Hub answers "lfs" for binary and large files; datasets' push_to_hub relies on it
            # (it deletes its temporary parquet right after the pre-upload).
            sample = base64.b64decode(f.get("sample") or "")
            lfs = f["path"].endswith((".parquet", ".png", ".jpg", ".arrow", ".safetensors", ".bin")) or \
                int(f.get("size", 0)) > 10_000_000 or b"\0" in sample
            existing = repo.commits[sha].get(f["path"])
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": existing.oid if existing else None})
        self._json({"files": files, "commitOid": sha})

    def do_lfs_batch(self, id, t=None):
        t = t or "model"
        body = json.loads(self._body() or b"{}")
        host = f"http://{self.headers.get('Host')}"
        objects = []
        for obj in body.get("objects", []):
            o = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if body.get("operation") == "upload" and not self.state.has_lfs(t, id, obj["oid"]):
                o["actions"] = {"upload": {"href": f"{host}/lfs-upload/{t}s/{id}/{obj['oid']}", "header": {}}}
            objects.append(o)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def do_lfs_put(self, t, id, oid):
        data = self._body()
        fail = self.state.fail_lfs_put_after
        if fail is not None and len(self.state.lfs_puts) >= fail:
            return self._error(400, "InjectedFailure", "hub stand-in: injected upload failure")
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadRequest", "sha256 mismatch")
        path = self.state.lfs_path(t, id, oid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        self.state.lfs_puts.append(f"{id}/{oid}")
        self._send(200, b"")

    def do_validate_yaml(self):
        body = json.loads(self._body() or b"{}")
        import yaml

        content = body.get("content", "")
        m = re.match(r"^---\n(.*?)\n---", content, re.S)  # a README: validate its front matter
        try:
            meta = yaml.safe_load(m.group(1) if m else content)
            if m and not isinstance(meta, dict):
                raise yaml.YAMLError("the metadata block must be a mapping")
        except yaml.YAMLError as exc:
            return self._json({"errors": [{"message": str(exc)}]}, 400)
        self._json({"errors": [], "warnings": []})

    def _injected_failure(self) -> bool:
        attempt, self.state.commit_attempts = self.state.commit_attempts, self.state.commit_attempts + 1
        if attempt in self.state.fail_commits:
            self._error(500, "InjectedFailure", "hub stand-in: injected server error on commit")
            return True
        return False

    def do_commit(self, t, id, rev):
        raw = self._body()
        if self._injected_failure():
            return
        repo = self._repo(t, id)
        if repo is None:
            return
        branch = urllib.parse.unquote(rev)
        parent = self._commit(repo, branch)
        if parent is None:
            return
        tree = dict(repo.commits[parent])
        header = {}
        for line in raw.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                if value.get("parentCommit") and value["parentCommit"] != parent:
                    if self.query.get("create_pr", ["0"])[0] not in ("1", "true"):
                        return self._error(412, "PreconditionFailed", "parentCommit is not the head of the branch")
                    if value["parentCommit"] not in repo.commits:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {value['parentCommit']}")
                    parent = value["parentCommit"]  # a pull request is created from the given parent
                    tree = dict(repo.commits[parent])
            elif key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                tree[value["path"]] = Entry(size=len(data), oid=git_blob_sha(data), data=data)
            elif key == "lfsFile":
                if not self.state.has_lfs(t, id, value["oid"]):
                    return self._error(422, "LfsObjectMissing", f"LFS object {value['oid']} of {value['path']} was never uploaded")
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{value['oid']}\nsize {value['size']}\n"
                tree[value["path"]] = Entry(size=int(value["size"]), oid=git_blob_sha(pointer.encode()), lfs_sha256=value["oid"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in tree if p.startswith(prefix)]:
                    del tree[p]
        sha = _new_sha()
        repo.commits[sha] = tree
        answer = {"commitUrl": f"{self._url(t, id)}/commit/{sha}", "commitOid": sha, "success": True}
        if self.query.get("create_pr", ["0"])[0] in ("1", "true"):  # a pull request against the branch, from parent
            num = max(repo.pulls, default=0) + 1
            repo.pulls[num] = {"title": header.get("summary", ""), "status": "open", "base": parent, "target": branch,
                               "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
            branch = f"refs/pr/{num}"
            answer["pullRequestUrl"] = f"{self._url(t, id)}/discussions/{num}"
        repo.branches[branch] = sha
        repo.log.append(header.get("summary", ""))
        self.state.commits_made += 1
        self._json(answer)

    def do_discussions(self, t, id):
        repo = self._repo(t, id)
        if repo is None:
            return
        kind = self.query.get("type", ["all"])[0]
        status = self.query.get("status", ["all"])[0]
        found = [{"title": pr["title"], "num": num, "author": {"name": "user"}, "createdAt": pr["createdAt"],
                  "status": pr["status"], "repo": {"name": id, "type": t}, "isPullRequest": True}
                 for num, pr in sorted(repo.pulls.items(), reverse=True)
                 if kind in ("all", "pull_request") and status in ("all", pr["status"])]
        self._json({"discussions": found, "count": len(found), "start": 0, "numClosedDiscussions": 0})

    def do_merge(self, t, id, num):
        self._body()
        if self._injected_failure():
            return
        repo = self._repo(t, id)
        if repo is None:
            return
        pr = repo.pulls.get(int(num))
        if pr is None or pr["status"] != "open":
            return self._error(400 if pr else 404, "BadRequest", f"pull request #{num} is not open")
        base, head = repo.commits[pr["base"]], repo.commits[repo.branches[f"refs/pr/{num}"]]
        target = repo.commits[repo.branches[pr["target"]]]
        changed = {p for p in set(base) | set(head) if base.get(p) != head.get(p)}
        moved = {p for p in set(base) | set(target) if base.get(p) != target.get(p)}
        conflicts = sorted(p for p in changed & moved if head.get(p) != target.get(p))
        if conflicts:
            return self._error(409, "MergeConflict", f"pull request #{num} conflicts with {pr['target']} in {conflicts}")
        tree = {p: e for p, e in target.items() if p not in changed}
        tree.update({p: head[p] for p in changed if p in head})
        sha = _new_sha()
        repo.commits[sha] = tree
        repo.branches[pr["target"]] = sha
        repo.log.append(f"Merge pull request #{num}: {pr['title']}")
        pr["status"] = "merged"
        self._json({})

    def do_tree(self, t, id, rev, dir=None):
        repo, sha = self._repo_at(t, id, rev)
        if sha is None:
            return
        tree = repo.commits[sha]
        prefix = (urllib.parse.unquote(dir) if dir else "").strip("/")
        if prefix and not any(p.startswith(prefix + "/") for p in tree):
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._json(self._entries(tree, prefix, recursive))

    def do_paths_info(self, t, id, rev):
        raw = self._body()
        repo, sha = self._repo_at(t, id, rev)
        if sha is None:
            return
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(raw).get("paths", [])
        else:
            paths = urllib.parse.parse_qs(raw.decode()).get("paths", [])
        tree = repo.commits[sha]
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append(self._file_info(p, tree[p]))
            elif any(q.startswith(p + "/") for q in tree) or p == "":
                out.append({"type": "directory", "oid": git_blob_sha(p.encode()), "size": 0, "path": p})
        self._json(out)

    @staticmethod
    def _range(data: bytes, rng: str, headers: Dict[str, str]):
        """(body, headers, content_type) of a 206 answer to ``Range: rng``."""
        m = re.match(r"bytes=(\d*)-(\d*)", rng)
        start = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
        stop = min(int(m.group(2)) if m.group(1) and m.group(2) else len(data) - 1, len(data) - 1)
        return data[start:stop + 1], {**headers, "Content-Range": f"bytes {start}-{stop}/{len(data)}"}, "application/octet-stream"

    def do_resolve(self, id, rev, path, t=None):
        t = t or "model"
        repo, sha = self._repo_at(t, id, rev)
        if sha is None:
            return
        path = urllib.parse.unquote(path)
        entry = repo.commits[sha].get(path)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        if entry.lfs_sha256:
            with open(self.state.lfs_path(t, id, entry.lfs_sha256), "rb") as f:
                data = f.read()
            etag = entry.lfs_sha256
        else:
            data, etag = entry.data, entry.oid
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs_sha256:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        rng = self.headers.get("Range")
        if rng and self.command == "GET" and path.endswith(".parquet"):
            state = self.state
            state.reads.append((path, rng))
            if state.fail_reads_of and not path.endswith(state.fail_reads_of):
                return self._send(206, *self._range(data, rng, headers))
            n, state.ranged_reads = state.ranged_reads, state.ranged_reads + 1
            after, count = state.fail_reads_after, state.fail_reads_count
            if after is not None and n >= after and (count is None or n < after + count):
                # a connection that dies mid-response: headers promise the bytes, then the socket closes
                self.send_response(206)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:16])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
        if rng and self.command == "GET":
            m = re.match(r"bytes=(\d*)-(\d*)", rng)
            start = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            answer = self._range(data, rng, headers)
            if self.state.read_bandwidth:
                time.sleep(len(answer[0]) / self.state.read_bandwidth)
            return self._send(206, *answer)
        if self.command == "HEAD":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._send(200, data, headers, content_type="application/octet-stream")


class HubStandIn:
    """A running stand-in: ``url``, ``state``; ``stop()`` shuts it down."""

    def __init__(self, port: int = 0, lfs_dir: Optional[str] = None):
        self._tmp = None if lfs_dir else tempfile.TemporaryDirectory(prefix="hub-standin-")
        self.state = HubState(lfs_dir or self._tmp.name)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        if self._tmp:
            self._tmp.cleanup()

    def env(self, hf_home: str) -> Dict[str, str]:
        """Environment for a client process: this endpoint, no Xet, an empty cache, online."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": hf_home, "HF_HUB_OFFLINE": "0",
                "HF_DATASETS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}

    def point_here(self, monkeypatch) -> None:
        """Point this process's ``HfApi`` clients at the stand-in (what :meth:`env` does for a new process): its
        endpoint (also in file URLs, which huggingface_hub builds from it at import), no Xet, online. For ``dr-hf push``
        and ``dr-hf verify ORG/NAME`` in-process; ``datasets`` reads its own settings at import."""
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def serve(port: int = 0) -> HubStandIn:
    return HubStandIn(port)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    hub = HubStandIn(ap.parse_args().port)
    print(f"hub stand-in at {hub.url}: export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1")
    hub.thread.join()
