"""The canonical dataset artifact, shared by every stage that makes one (filter, import) or reads one (sft,
heldout evaluation).

`artifacts/<recipe>/data/<name>/` holds `train.jsonl` and `heldout.jsonl`, one record per line:
- SFT data: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], ...metadata}`,
  ending with an assistant turn;
- preference data: `{"prompt": [messages ending with a user turn], "chosen": [assistant message],
  "rejected": [assistant message], ...metadata}` (TRL's conversational preference format);
plus `report.json` (what was read, kept and dropped, length statistics) and `lengths.png`.
The train / held-out split is by a hash of the record's content, so it is the same in every run.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from pipeline.errors import TunebuildError

CONTENT_KEYS = ("messages", "prompt", "chosen", "rejected")


def kind_of(record: dict) -> str:
    return "preference" if "chosen" in record else "sft"


def declared_kind(d: dict, recipes_dir: Path) -> tuple[str | None, str]:
    """The kind of records a `[data.<name>]` table makes ('sft' or 'preference') and how that is known, before
    anything is built: generated data is SFT; a `format` says it; a local file with format = 'auto' is recognised
    from its first rows. (None, '') where the import alone can tell: a hub dataset with format = 'auto', or a file
    that cannot be read or recognised (the import names the problem)."""
    from pipeline.data.formats import kind_of_format

    if d["source"] == "generate":
        return "sft", "source = 'generate'"
    if d["format"] != "auto":
        return kind_of_format(d["format"]), f"format = '{d['format']}'"
    file = Path(recipes_dir) / d["source"]
    if not file.is_file():
        return None, ""
    stat = file.stat()
    fmt = _recognised(str(file.resolve()), stat.st_mtime_ns, stat.st_size,
                      tuple(sorted((d["columns"] or {}).items())))
    return (kind_of_format(fmt), f"its rows are {fmt} data") if fmt else (None, "")


@functools.lru_cache(maxsize=64)
def _recognised(path: str, mtime_ns: int, size: int, columns: tuple) -> str | None:
    from pipeline.data.detect import detect
    from pipeline.data.read import head_rows

    try:
        return detect(head_rows(Path(path), 20), dict(columns) or None)
    except TunebuildError:
        return None


def is_heldout(record: dict, fraction: float) -> bool:
    """A stable split by content: the same record is held out in every run, whatever else the set holds."""
    if fraction <= 0:
        return False
    key = json.dumps([record.get(k) for k in CONTENT_KEYS if k in record], ensure_ascii=False).encode()
    return int(hashlib.sha256(key).hexdigest()[:8], 16) / 0x100000000 < fraction


def write_dataset(out_dir: Path, records: list[dict], heldout_fraction: float) -> tuple[int, int]:
    """Split `records` into train.jsonl / heldout.jsonl; returns (train, heldout) counts."""
    train = heldout = 0
    with open(out_dir / "train.jsonl", "w", encoding="utf-8") as ftrain, \
            open(out_dir / "heldout.jsonl", "w", encoding="utf-8") as fheld:
        for r in records:
            line = json.dumps(r, ensure_ascii=False) + "\n"
            if is_heldout(r, heldout_fraction):
                fheld.write(line)
                heldout += 1
            else:
                ftrain.write(line)
                train += 1
    return train, heldout


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def _prompt_response(record: dict) -> tuple[str, str]:
    if kind_of(record) == "preference":
        return "\n".join(m["content"] for m in record["prompt"]), record["chosen"][-1]["content"]
    msgs = record["messages"]
    return "\n".join(m["content"] for m in msgs[:-1]), msgs[-1]["content"]


def _summary(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    return {"min": v[0], "mean": round(sum(v) / len(v), 1), "median": pick(0.5), "p95": pick(0.95), "max": v[-1]}


def length_report(records: list[dict]) -> dict:
    """Length statistics in characters: prompt (everything before the last answer) and response; turns."""
    pairs = [_prompt_response(r) for r in records]
    out = {"prompt_chars": _summary([len(p) for p, _ in pairs]),
           "response_chars": _summary([len(a) for _, a in pairs])}
    if records and kind_of(records[0]) == "sft":
        out["assistant_turns"] = _summary([sum(m["role"] == "assistant" for m in r["messages"]) for r in records])
    return out


def lengths_png(path: Path, records: list[dict], title: str) -> None:
    """Histograms of prompt and response lengths (characters, log-spaced bins)."""
    import numpy as np

    from pipeline.evaluation.plots import _pyplot, save

    plt = _pyplot()
    pairs = [_prompt_response(r) for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, values, label in ((axes[0], [len(p) for p, _ in pairs], "prompt"),
                              (axes[1], [len(a) for _, a in pairs], "response")):
        values = [max(1, v) for v in values] or [1]
        bins = np.unique(np.geomspace(min(values), max(values) + 1, 30).round())
        ax.hist(values, bins=bins, color="#4c72b0")
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} length (characters)")
        ax.set_ylabel("records")
    fig.suptitle(title, fontsize=10)
    save(fig, path)


class NoTrainingExample(TunebuildError):
    """A dataset left with no training example; `report` is what its report.json would have said. The artifact's
    folder is a temporary one that is removed, so the caller keeps the report where the user can read it."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def finish(out_dir: Path, records: list[dict], heldout_fraction: float, report: dict, title: str) -> dict:
    """Write the split, report.json (the caller's counts plus split sizes and length statistics) and lengths.png.
    Raises NoTrainingExample when no record is left for training."""
    train, heldout = write_dataset(out_dir, records, heldout_fraction)
    report = {**report, "kind": kind_of(records[0]) if records else None, "train_examples": train,
              "heldout_examples": heldout, "lengths": length_report(records)}
    if train == 0:
        raise NoTrainingExample(f"no training example left out of {report.get('rows_read', len(records))}", report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    lengths_png(out_dir / "lengths.png", records, title)
    return report
