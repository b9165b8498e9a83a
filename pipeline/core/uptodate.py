"""How doit decides a stage task is up to date: its input files by content (`DigestChecker`, doit's
`check_file_uptodate`) and its config section by value, with the commit each of its hub models resolves to
(`config_changed`, an `uptodate` entry of every stage task, which `doit why` reads to say what changed).
"""
from __future__ import annotations

from pathlib import Path

from doit.dependency import FileChangedChecker


class DigestChecker(FileChangedChecker):
    """doit's file_dep check by content, like its md5 check: an unchanged modification time means an unchanged file,
    a changed size a changed one; otherwise the content digest decides. The digest is a sha256 from the digest
    cache (`pipeline.digests.file_digest`), remembered by size, mtime and inode: a large file whose time changed but
    whose bytes did not (touched, copied, restored from a CI cache) is read once, not on every no-op as with doit's
    md5 check (which keeps the old time for a task that stays up to date), and that read also serves the run-cache
    key of the task that uses it."""

    def check_modified(self, file_path, file_stat, state):
        from pipeline.digests import file_digest

        timestamp, size, digest = state
        if file_stat.st_mtime == timestamp:
            return False
        if file_stat.st_size != size:
            return True
        return digest != file_digest(Path(file_path))

    def get_state(self, dep, current_state):
        import os

        from pipeline.digests import file_digest

        timestamp = os.path.getmtime(dep)
        if current_state and current_state[0] == timestamp:
            return None
        return timestamp, os.path.getsize(dep), file_digest(Path(dep))


class config_changed:
    """doit `uptodate` check on a task's config section, like `doit.tools.config_changed`, but it also keeps the
    config itself in doit's state, so `doit why` can say which key changed from what to what. State written by
    `doit.tools.config_changed` (an md5 only) is still honoured.

    A task using hub models has them under `hub_models` ({argument: "<id>[@<revision>]"}); the check compares the
    commit each resolves to in the local Hugging Face cache (`pipeline.models.hf.resolved_commit`), so a branch that
    moved there reruns the task. A commit the cache does not know (a fresh machine, a CI runner that restored
    artifacts/ only) counts as unchanged."""

    KEY = "_config"
    HUB = "hub_models"
    ENGINE = "engine_version"

    def __init__(self, config: dict):
        self.config = config

    def current(self, saved: str | None = None) -> dict:
        """The config with each hub model's resolved commit and the generation engine's version
        (`pipeline.llm.engines.identity`); an unknown one is taken from the saved config."""
        import json

        if not self.config.get(self.HUB) and not self.config.get(self.ENGINE):
            return self.config
        try:
            before = json.loads(saved) if saved else {}
        except ValueError:
            before = {}
        out = dict(self.config)
        if self.config.get(self.HUB):
            from pipeline.models.hf import hub_commits

            hub = hub_commits(self.config[self.HUB])
            for name, entry in hub.items():
                old = (before.get(self.HUB) or {}).get(name)
                if entry["commit"] is None and isinstance(old, dict) and old.get("model") == entry["model"]:
                    entry["commit"] = old.get("commit")
            out[self.HUB] = hub
        if self.config.get(self.ENGINE):  # an engine not installed here (a CI runner that restored artifacts/
            from pipeline.llm.engines import identity  # only) counts as unchanged, as an unknown hub commit does

            found = identity(self.config[self.ENGINE])
            old = before.get(self.ENGINE)
            out[self.ENGINE] = old if found.endswith("(not installed)") and isinstance(old, str) \
                and old.split()[0] == found.split()[0] else found
        return out

    def _json(self, saved: str | None = None) -> str:
        import json

        return json.dumps(self.current(saved), sort_keys=True)

    def configure_task(self, task):
        task.value_savers.append(lambda: {self.KEY: self._json()})

    def __call__(self, task, values):
        saved = values.get(self.KEY)
        if saved is not None:
            return saved == self._json(saved)
        legacy = values.get("_config_changed")
        if legacy is not None:
            import hashlib

            return legacy == hashlib.md5(self._json().encode("utf-8")).hexdigest()
        return False

    def __repr__(self):
        return f"config_changed({self.config!r})"
