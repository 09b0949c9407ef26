"""``dr-hf push``: a reinforced folder to a Hub dataset repo, in commits of a batch of files each, resumable, and
published in one step.

Only the public ``huggingface_hub`` API is used (``create_repo``, ``create_branch``, ``list_repo_tree``,
``create_commit``, ``get_repo_discussions``, ``merge_pull_request``), so the same code runs against the Hub and
against a local stand-in (``HF_ENDPOINT``). A push that fits one commit is one commit. A larger one to main goes to a
pull request (shards first, then the card and preview, with the removal of shards an earlier push left that this
folder does not hold), merged into main at once: readers of main see the earlier dataset, whole, until they see this
one, whole, never a mix of two jobs' rows or shards without their card. A rerun after an interruption finds the
pull request by its title (the commit message and a digest of the card, which names the job) and skips every file
it already holds with the same content (LFS sha256 or git blob sha1); within a batch ``create_commit`` skips LFS
objects the server already has, and with ``hf_xet`` installed it also batches and resumes on its own. The Hub opens
pull requests against main only: a push to another branch (``revision``) commits to it directly, shards first and the
card last. Every commit to the branch names its parent (``parent_commit``), and the pull request starts from the
commit the push was planned on, so of two pushes run at once the one that would land second is refused (its commit,
or its merge, which then conflicts on the card) instead of leaving a mix of both. The token is passed through, never
printed or written.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from .errors import require_at_least, said
from .joblock import FolderInUse, holder, output_lock
from .processes import Processes
from .shards import CARD, DATA_DIR, ERRORS_DIR, PREVIEW

logger = logging.getLogger(__name__)

UPLOAD_PATTERNS = (f"{DATA_DIR}/*.parquet", f"{ERRORS_DIR}/*.jsonl", CARD, PREVIEW)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    uploaded: List[str]
    skipped: List[str]
    commits: int
    url: str
    removed: List[str]
    pull_request: Optional[int] = None  # the pull request the commits went to, merged into main


def local_files(folder: str) -> List[str]:
    """The files of a reinforced folder that belong on the Hub (shards, card, preview), repo-relative, sorted."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if any(fnmatch.fnmatch(rel, p) for p in UPLOAD_PATTERNS):
                out.append(rel)
    return sorted(out)


def _digest(local: Union[str, bytes], algorithm: str, prefix: bytes = b"") -> str:
    """The ``algorithm`` (``sha256``, ``sha1``) hex digest of ``prefix`` + ``local``: bytes, or a file's bytes. A
    file's is computed once per content (path, size, modification time), however many plans of a push ask."""
    if isinstance(local, bytes):
        return hashlib.new(algorithm, prefix + local).hexdigest()
    stat = os.stat(local)
    return _file_digest(os.path.abspath(local), stat.st_size, stat.st_mtime_ns, algorithm, prefix)


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int, algorithm: str, prefix: bytes) -> str:
    h = hashlib.new(algorithm, prefix)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_content(local: Union[str, bytes], remote) -> bool:
    """Whether a local file (its path, or the bytes published in its place) equals a repo file: LFS files by
    sha256, regular ones by git blob sha1."""
    if remote.lfs is not None:
        return remote.lfs.sha256 == _digest(local, "sha256")
    size = len(local) if isinstance(local, bytes) else os.path.getsize(local)
    return remote.blob_id == _digest(local, "sha1", b"blob %d\0" % size)


def remote_files(api, repo_id: str, revision: str) -> Dict[str, object]:
    """``path -> RepoFile`` of what the repo holds at ``revision``."""
    from huggingface_hub import RepoFile

    tree = api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True)
    return {entry.path: entry for entry in tree if isinstance(entry, RepoFile)}


def push(
    folder: str,
    repo_id: str,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    files_per_commit: int = 50,
    commit_message: str = "Upload reinforced dataset with dr-hf",
) -> PushResult:
    """Upload ``folder`` (written by ``dr-hf reinforce``) to the dataset repo ``repo_id``, holding the folder's lock
    (:mod:`dr_hf.joblock`): refused while a reinforce job writes it, and a job is refused while it is pushed."""
    require_at_least(1, files_per_commit=files_per_commit)
    if "/" not in repo_id:
        raise ValueError(f"repo id {repo_id!r}: use the form org/name, e.g. org/imagenet-plus")
    if not os.path.isfile(os.path.join(folder, CARD)) or not os.path.isdir(os.path.join(folder, DATA_DIR)):
        raise FileNotFoundError(f"{folder} is not a reinforced folder (README.md and data/ expected): run `dr-hf reinforce` first")
    if not os.access(folder, os.W_OK):  # a read-only folder: no job writes it either
        return _push(folder, repo_id, private, revision, token, files_per_commit, commit_message)
    try:  # the folder as it is: no job writes it while it is read and uploaded
        with output_lock(folder, Processes(), command=f"dr-hf push to {repo_id}"):
            return _push(folder, repo_id, private, revision, token, files_per_commit, commit_message)
    except FolderInUse:
        raise FolderInUse(f"`folder` {folder} is in use by another dr-hf job ({holder(folder)}): push it once that "
                          "ends") from None


def _push(folder: str, repo_id: str, private: Optional[bool], revision: Optional[str], token: Optional[str],
          files_per_commit: int, commit_message: str) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from .card import published_card

    check_pushable(folder)
    api = HfApi(token=token)
    url = str(api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True))
    if private and not api.dataset_info(repo_id).private:  # create_repo leaves an existing repo as it is
        raise ValueError(f"{repo_id} exists and is public: `private` makes a new repo private, not an existing one; "
                         f"make it private first (HfApi().update_repo_settings({repo_id!r}, private=True, "
                         "repo_type='dataset')) or push to a new repo")
    branch = revision or "main"
    if revision:
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    ours = local_files(folder)
    with open(os.path.join(folder, CARD), encoding="utf-8") as f:
        card = published_card(f.read(), repo_id, revision).encode()  # its snippets load this repo
    published = {rel: card if rel == CARD else os.path.join(folder, rel) for rel in ours}
    head = api.repo_info(repo_id, repo_type="dataset", revision=branch).sha  # what the push is planned against
    plan = _plan(published, remote_files(api, repo_id, head), files_per_commit)
    removed = plan.stale  # what the branch loses, in its last commit or the merge
    title = f"{commit_message} (dr-hf {hashlib.sha256(card).hexdigest()[:12]})"  # names this folder's job
    pull = None
    if branch == "main" and len(plan.batches) > 1:  # several commits: in a pull request, merged in one step
        pull = interrupted_pull(api, repo_id, title, commit_message)
        if pull is not None:  # an interrupted push of this job: go on where it stopped
            logger.info("resuming pull request #%d of %s", pull, repo_id)
            plan = _plan(published, remote_files(api, repo_id, f"refs/pr/{pull}"), files_per_commit)
    if plan.skipped:
        logger.info("%d file(s) already on %s@%s with the same content: skipped", len(plan.skipped), repo_id,
                    branch if pull is None else f"refs/pr/{pull}")
    batches = plan.batches
    parent = head  # each commit to the branch, and the pull request, start from the commit the plan was made on
    for k, batch in enumerate(batches):
        message = commit_message if len(batches) == 1 else f"{commit_message} (part {k + 1}/{len(batches)})"
        logger.info("commit %d/%d: %d file(s)", k + 1, len(batches), len(batch))
        operations = [CommitOperationAdd(rel, published[rel]) for rel in batch]
        if k == len(batches) - 1:  # with the card: an earlier push's shards go
            operations += [CommitOperationDelete(rel) for rel in plan.stale]
        opens = branch == "main" and len(batches) > 1 and pull is None
        try:
            info = api.create_commit(repo_id, repo_type="dataset", operations=operations,
                                     revision=branch if pull is None else f"refs/pr/{pull}", create_pr=opens,
                                     commit_message=title if opens else message,
                                     parent_commit=parent if pull is None else None)
        except Exception as exc:
            if getattr(getattr(exc, "response", None), "status_code", None) == 412:  # the branch moved
                raise RuntimeError(f"{repo_id}@{branch} changed while this push ran (another push, or an edit): its "
                                   f"commit was refused, so {branch} holds no mix of the two; rerun to push onto "
                                   "what it holds now") from exc
            raise
        parent = info.oid
        if opens:
            pull = int(info.pr_num)
            logger.info("opened pull request #%d of %s: the commits go there, then it is merged", pull, repo_id)
    if pull is not None:
        try:
            api.merge_pull_request(repo_id, pull, repo_type="dataset", comment="every file of the push is here")
        except Exception as exc:
            raise RuntimeError(f"{repo_id}: merging pull request #{pull}, which holds this push, failed ({said(exc)}); "
                               f"main is as it was. Rerun to retry; if main changed meanwhile, close #{pull} on the Hub "
                               "and push again") from exc
        logger.info("merged pull request #%d into %s@main", pull, repo_id)
    if removed:
        logger.info("%d file(s) of an earlier push removed from %s@%s", len(removed), repo_id, branch)
    return PushResult(repo_id, branch, plan.todo, plan.skipped, len(batches), url, removed, pull)


def check_pushable(folder: str) -> None:
    """Refuse a folder with no shards, half-written ones, or a card that does not describe its shards."""
    from .shards import check_folder, raise_if, shard_paths, splits

    if not shard_paths(folder, "*"):
        raise FileNotFoundError(f"{folder}/data holds no parquet shards")
    if any(n.endswith(".tmp") for n in os.listdir(os.path.join(folder, DATA_DIR))):
        raise ValueError(f"{folder}/data holds half-written shards (*.tmp): rerun `dr-hf reinforce` to finish it first")
    for split in splits(folder):  # never publish a card that lies about its shards, or a mix of two jobs
        raise_if(check_folder(folder, split), f"refusing to push {folder}")


def interrupted_pull(api, repo_id: str, title: str, commit_message: str) -> Optional[int]:
    """The open pull request of an interrupted push of this folder's job (its ``title`` names the job), to go on
    with; other dr-hf pushes' open pull requests are pointed out."""
    pulls = {d.num: d.title for d in api.get_repo_discussions(repo_id, repo_type="dataset",
                                                            discussion_type="pull_request", discussion_status="open")}
    pull = next((num for num, t in pulls.items() if t == title), None)
    for num in sorted(n for n, t in pulls.items() if n != pull and t.startswith(f"{commit_message} (dr-hf ")):
        logger.warning("pull request #%d of %s holds another dr-hf push, interrupted (another job's): close it "
                       "if that push is abandoned", num, repo_id)
    return pull


@dataclass
class _Plan:
    todo: List[str]  # files to upload, shards first
    skipped: List[str]  # already there with the same content
    stale: List[str]  # shards an earlier push left that this folder does not hold
    batches: List[List[str]]  # the commits: shards in batches, then the card and preview (with the removals)


def _plan(published: Dict[str, Union[str, bytes]], remote: Dict[str, object], files_per_commit: int) -> _Plan:
    """What a push of ``published`` (repo path -> local file or bytes) does to a repo holding ``remote``."""
    todo, skipped = [], []
    for rel in published:
        same = rel in remote and same_content(published[rel], remote[rel])
        (skipped if same else todo).append(rel)
    shards = (f"{DATA_DIR}/", f"{ERRORS_DIR}/")
    stale = sorted(p for p in remote if p.startswith(shards) and p not in published)  # an earlier push's
    data = [f for f in todo if f.startswith(shards)]
    last = [f for f in todo if not f.startswith(shards)]  # the card (and its preview) once every shard is there
    if len(todo) <= files_per_commit:  # one commit: nothing to order
        return _Plan(todo, skipped, stale, [data + last] if todo or stale else [])
    batches = [data[i:i + files_per_commit] for i in range(0, len(data), files_per_commit)]
    if last:
        batches.append(last)
    return _Plan(todo, skipped, stale, batches)
