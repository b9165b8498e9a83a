"""The LLM-call ledger: every completion ever received, keyed by what was asked.

Key = sha256 of (backend, model, rendered prompt, sampling parameters, sample index). A request whose key is in
the ledger is answered from it, so an interrupted generation resumes where it stopped and a rebuild never pays
twice for the same request. SQLite in WAL mode: several processes (doit -n 2) may read and write at once; each
answer is committed as soon as it arrives.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.digests import digest_json


@dataclass(frozen=True)
class Entry:
    text: str
    prompt_tokens: int
    completion_tokens: int


def request_key(backend: str, model: str, prompt: str, params: dict, sample_index: int) -> str:
    return digest_json({"backend": backend, "model": model, "prompt": prompt, "params": params,
                        "sample": sample_index})


class Ledger:
    def __init__(self, path: Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.db = sqlite3.connect(str(path), timeout=60, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, backend TEXT, model TEXT, prompt TEXT,"
            " params TEXT, sample_index INTEGER, text TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,"
            " recipe TEXT, created REAL)")

    def get(self, key: str) -> Entry | None:
        row = self.db.execute("SELECT text, prompt_tokens, completion_tokens FROM calls WHERE key = ?",
                              (key,)).fetchone()
        return Entry(*row) if row else None

    def put(self, key: str, *, backend: str, model: str, prompt: str, params: dict, sample_index: int,
            entry: Entry, recipe: str = "") -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, backend, model, prompt, json.dumps(params, sort_keys=True), sample_index, entry.text,
             entry.prompt_tokens, entry.completion_tokens, recipe, time.time()))

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        self.db.close()
