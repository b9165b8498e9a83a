"""Content digests: what tunebuild calls a file, a folder or a value, by what it holds.

The run-cache key of a task (`pipeline.core.store.cache_key`), a model's identity in lineage
(`pipeline.models.hf.model_identity`) and the LLM ledger's request key are made of these. A finished artifact
folder is known by its manifest (`manifest.json`, which the artifact store writes last, listing every file with its
size and sha256), another folder by its files' digests, a file by its content; large files' digests are
remembered in the digest cache.

With `pipeline.errors`, the ground floor of the package: standard library only, nothing else from `pipeline`, so
that the build core and the libraries may both import it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def input_digest(path: Path) -> str:
    """Digest of an input: a folder artifact by its manifest (its portable form, see `pipeline.core.store.localize`),
    another folder (a local model, an eval suite) by its files' digests, a file by content. Large files' digests
    come from the digest cache (`file_digest`), so an unchanged model folder is not read again."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return manifest_digest(path)
        return digest_json(folder_digests(path))
    return file_digest(path)


def folder_digests(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under a folder (links followed, as from_pretrained reads them)."""
    path = Path(path)
    return {p.relative_to(path).as_posix(): file_digest(p) for p in sorted(path.rglob("*")) if p.is_file()}


# -- the digest cache: a file's sha256 remembered by (path, size, mtime_ns, inode), as doit remembers a file_dep's
# md5 by its timestamp, so a no-op over an 8B model folder reads none of it. A digest is remembered only once the
# file is older than RACY_SECONDS (a file rewritten within its mtime's granularity could otherwise keep its stat).
DIGESTS = Path("artifacts") / ".cache" / "digests.sqlite"
CACHED_DIGEST_MIN_SIZE = 1 << 20      # smaller files are hashed each time (cheaper than a lookup)
RACY_SECONDS = 2.0
_DIGEST_DB = None


def _digest_db():
    global _DIGEST_DB
    import sqlite3

    if _DIGEST_DB is None or _DIGEST_DB[0] != os.getpid():
        DIGESTS.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(DIGESTS), timeout=60, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                    "ino INTEGER, sha256 TEXT)")
        _DIGEST_DB = (os.getpid(), con)
    return _DIGEST_DB[1]


def file_digest(path: Path) -> str:
    """sha256 of a file; for a large one, from the digest cache when its size, mtime and inode are unchanged."""
    import sqlite3
    import time

    path = Path(path)
    st = path.stat()
    if st.st_size < CACHED_DIGEST_MIN_SIZE:
        return sha256_file(path)
    key = str(path.resolve())
    try:
        con = _digest_db()
        row = con.execute("SELECT size, mtime_ns, ino, sha256 FROM digests WHERE path = ?", [key]).fetchone()
    except sqlite3.Error:
        con, row = None, None
    if row is not None and tuple(row[:3]) == (st.st_size, st.st_mtime_ns, st.st_ino):
        return row[3]
    digest = sha256_file(path)
    after = path.stat()
    unchanged = (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    if con is not None and unchanged and time.time() - st.st_mtime_ns / 1e9 > RACY_SECONDS:
        try:
            con.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
                        [key, st.st_size, st.st_mtime_ns, st.st_ino, digest])
        except sqlite3.Error:
            pass
    return digest


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def manifest_digest(folder: Path) -> str:
    """The digest of a finished folder: sha256 of its manifest, or, for a folder whose files were localized
    (`pipeline.core.store.localize`), of the manifest of its portable content (the run cache's copy), so that every
    recipe's copy of one output has the same digest."""
    data = (Path(folder) / MANIFEST).read_bytes()
    if b'"portable"' not in data:
        return hashlib.sha256(data).hexdigest()
    manifest = json.loads(data)
    files = {**manifest["files"], **manifest.get("portable", {})}
    return hashlib.sha256(manifest_text({"files": files}).encode()).hexdigest()
