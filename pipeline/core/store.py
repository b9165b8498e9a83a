"""Artifact store: stable output folders finished by a manifest, atomic writes, and the content-keyed run cache.

- An output folder is finished only when `manifest.json` exists in it. The manifest lists every file with its
  size and sha256 and nothing else, so it changes exactly when the content changes (doit's md5 check on it then
  gives early cutoff downstream).
- Work happens in a temporary sibling folder that is renamed into place, so a failed or killed stage never leaves
  something that looks finished, and the previous output stays until the new one is complete.
- The run cache keeps finished outputs under `artifacts/.cache/<stage>/<key>/`, keyed by (stage, version, config,
  input digests); a hit is restored with hard links instead of recomputing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.digests import MANIFEST, digest_json, manifest_text, sha256_file


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def config_diff(old: dict, new: dict, width: int = 60) -> list[str]:
    """'dotted.key: old → new' for every leaf value that differs between two nested dicts."""
    def show(value) -> str:
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= width else text[: width - 3] + "..."

    a, b = _flatten(old), _flatten(new)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            lines.append(f"{key}: {'(unset)' if x is missing else show(x)} → {'(unset)' if y is missing else show(y)}")
    return lines


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `<path>.lock`, held across processes for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_manifest(folder: Path) -> dict:
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"files": files}
    _write_manifest(folder, manifest)
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(manifest_text(manifest))
    os.replace(tmp, folder / MANIFEST)


def localize(folder: Path, files: dict[str, bytes]) -> bool:
    """Give a finished folder this task's own content for a few files (an adapter's `base_model_name_or_path`
    naming its recipe's start folder), keeping the run cache's copy as it is: each file is replaced by a new one
    (never written through a hard link), and the manifest lists the files as they now are plus, under
    `portable`, the entries of the content they replaced, which `manifest_digest` uses. Returns whether anything
    changed."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    portable = dict(manifest.get("portable", {}))
    changed = False
    for rel, data in sorted(files.items()):
        path = folder / rel
        if path.read_bytes() == data:
            continue
        portable.setdefault(rel, manifest["files"][rel])
        tmp = path.with_name(f".{path.name}.local-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if manifest["files"][rel] == portable[rel]:
            del portable[rel]
        changed = True
    if changed:
        manifest = {"files": manifest["files"], **({"portable": portable} if portable else {})}
        _write_manifest(folder, manifest)
    return changed


def is_complete(folder: Path) -> bool:
    """True when the folder has a manifest and every listed file is there with its size."""
    m = folder / MANIFEST
    if not m.is_file():
        return False
    try:
        files = json.loads(m.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == info["size"]
               for rel, info in files.items())


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a finished folder as hard links (a copy where links are impossible), manifest last."""
    dst.mkdir(parents=True)
    for p in sorted(src.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
    shutil.copy2(src / MANIFEST, dst / MANIFEST)


def pid_alive(pid: int) -> bool:
    """True while process `pid` runs; a zombie (killed, not yet reaped: in a container whose init reaps orphans
    late, for seconds) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_stale_temps(final: Path) -> None:
    """Remove temporary siblings left by killed runs; never those of a process that is still running."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


# doit commands that only read: they never wait for the checkout lock
READ_ONLY_COMMANDS = {"list", "info", "help", "why", "runs", "dumpdb", "tabcompletion", "strace"}
DOIT_COMMANDS = READ_ONLY_COMMANDS | {"run", "clean", "forget", "ignore", "reset-dep", "gc", "auto"}
_CHECKOUT_LOCK = None  # the open lock file, held for the life of this doit process (and its forked workers)


def _command(argv: list[str]) -> str:
    return next((a for a in argv if a in DOIT_COMMANDS), "run")


def hold_checkout(artifacts: Path, argv: list[str]) -> None:
    """One doit that builds per checkout: a second one waits for the first, saying so in one line.

    Two builds at once would fight over doit's SQLite state and the artifacts; read-only commands (list, info,
    why, ...) never wait. The lock is `artifacts/.lock` (fcntl), released when the process ends, however it ends."""
    global _CHECKOUT_LOCK
    import sys

    if _CHECKOUT_LOCK is not None or _command(argv) in READ_ONLY_COMMANDS:
        return
    artifacts.mkdir(parents=True, exist_ok=True)
    lock = open(artifacts / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        print(f"tunebuild: waiting for {holder} to finish: one build at a time in this checkout (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    lock.seek(0)
    lock.truncate()
    lock.write(f"doit {' '.join(argv)} (pid {os.getpid()})")
    lock.flush()
    _CHECKOUT_LOCK = lock


def _swap_into_place(tmp: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: Path, finish=None):
    """Yield an empty temporary sibling of `final`; on success write its manifest, call `finish(tmp)` if given,
    and move it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
        if finish is not None:
            finish(tmp)
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_key(stage: str, version: int, config: dict, inputs: dict[str, str]) -> str:
    return digest_json({"stage": stage, "version": version, "config": config, "inputs": inputs})[:40]


def build_cached(final: Path, cache_root: Path | None, stage: str, key: str, compute, local=None) -> str:
    """Make `final` hold the output of `compute(tmp_folder)`, restoring it from the run cache when possible.

    `local(folder)`, when given, returns the files ({relative path: bytes}) whose content is this task's own (see
    `localize`): the run cache keeps the portable content, `final` gets them. Returns "restored" or "computed".
    """
    final = Path(final)
    entry = Path(cache_root) / stage / key if cache_root else None

    def finish(tmp: Path):
        if local is not None:
            localize(tmp, local(tmp) or {})

    if entry is not None and is_complete(entry):
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        try:
            _link_tree(entry, tmp)
            finish(tmp)
            _swap_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return "restored"

    def store_then_finish(tmp: Path):
        if entry is not None:
            _store(tmp, entry, key)
        finish(tmp)

    with atomic_folder(final, store_then_finish) as tmp:
        compute(tmp)
    return "computed"


def _store(folder: Path, entry: Path, key: str) -> None:
    """Keep a finished folder (its portable content) as the run-cache entry `entry`, as hard links."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = entry.parent / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    _link_tree(folder, staging)
    if entry.exists() and not is_complete(entry):
        shutil.rmtree(entry, ignore_errors=True)
    try:
        os.replace(staging, entry)
    except OSError:
        # another process (doit -n, or a second recipe sharing the stage) stored the same key first
        shutil.rmtree(staging, ignore_errors=True)
        if not is_complete(entry):
            raise
