"""Stage `chat`: a Gradio chat app for a recipe's models, to try them by hand before trusting a score.

`doit chat:<recipe>` builds what the recipe's models need, then serves on 127.0.0.1 (Gradio's own
`GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` pick another address; the port defaults to 7860, or the next free
one) an app with every model the recipe compares, by role: `base`, each training stage's model (`sft`, `dpo`, ...)
and the `[eval.models]`. One tab chats with one model (the recipe's final model first), tokens streaming as they
are generated; the other sends the same message to two models (base and the final model first) and shows both
answers side by side. A system prompt, the temperature (0: greedy), top-p and the maximum of new tokens apply to
both. Each model is prompted with its own folder's chat template and stops on its generation config's
end-of-sequence ids and its tokenizer's. Example prompts come from the recipe's `[eval.judge] instructions`, else
from the first user turns of its datasets' held-out records. Nothing is sent anywhere: no share link, analytics
off, no web fonts.

Contract: reads `[eval.judge] instructions` (examples only) and, through `plan.models()`, `model.base`, the
training stages and `[eval.models]`; consumes those models (the manifests of the artifact folders among them are
the task's `file_dep`, so doit builds what is missing first) and, without judge instructions, the recipe's
datasets (`heldout.jsonl`); writes nothing: one raw doit task `chat:<recipe>` per recipe, never up to date, not
part of `doit build:<recipe>` (`in_build=False`). `run(...)` is that task's action and serves until Ctrl-C, which
(at any moment: loading Gradio, starting, serving) closes the server, prints `chat:<recipe>: chat stopped` and
exits 130 (128 + SIGINT, as a shell reports an interrupted command);
Gradio is the optional extra `demo` (`pip install -e '.[demo]'`), and without it the task fails with one line
saying so. The app itself is `pipeline.evaluation.chat_app` (`build_app` and `serve` make it without doit).
"""
from __future__ import annotations
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.stage import Stage
from pipeline.errors import TunebuildError

STAGE = Stage(name="chat", version=1, phase="report", in_build=False, cache=False,
              doc="Serve a Gradio chat app for a recipe's models (base, trained, [eval.models]) on 127.0.0.1.")

INSTALL = "pip install -e '.[demo]'"
MAX_EXAMPLES = 8
INTERRUPTED = 130   # the exit status after Ctrl-C: 128 + SIGINT


def tasks(plan):
    models = plan.models()
    deps = [f"{m.folder}/manifest.json" for m in models.values() if m.folder]
    judge = plan.section("eval")["judge"]
    instructions = plan.rel(judge["instructions"]) if judge.get("instructions") else None
    datasets = [] if instructions else [p.out for p in plan.products("dataset")]
    deps += [instructions] if instructions else [f"{d}/manifest.json" for d in datasets]
    yield {"basename": STAGE.task_basename, "name": plan.name,
           "doc": f"chat with {plan.name}'s models ({', '.join(models)}) in a Gradio app on 127.0.0.1",
           "actions": [(run, [], {"recipe": plan.name, "models": {role: m.location for role, m in models.items()},
                                  "default": plan.final(), "instructions": instructions, "datasets": datasets})],
           "file_dep": sorted(set(deps)), "uptodate": [False], "verbosity": STAGE.verbosity}


def run(*, recipe: str, models: dict[str, str], default: str | None = None, instructions: str | None = None,
        datasets: list[str] = ()):
    """The `chat:<recipe>` action: serve the app until Ctrl-C, then exit 130 (SystemExit passes through doit's
    runner, which still saves the state of what it built first)."""
    from doit.exceptions import TaskFailed

    try:
        from pipeline.evaluation.chat_app import load_gradio, serve

        load_gradio()
    except ImportError:
        return TaskFailed(f"chat:{recipe}: the chat app needs Gradio: {INSTALL}")
    except KeyboardInterrupt:
        _stopped(recipe)
    try:
        serve(models, example_prompts(instructions, datasets), default=default, title=f"tunebuild chat: {recipe}")
    except TunebuildError as e:
        return TaskFailed(f"chat:{recipe}: {e}")
    except KeyboardInterrupt:
        _stopped(recipe)
    return None


def _stopped(recipe: str):
    print(f"chat:{recipe}: chat stopped", flush=True)
    raise SystemExit(INTERRUPTED) from None


# -- example prompts ------------------------------------------------------------------------------------------

def _jsonl(path: Path):
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield row


def _first_user_turn(messages) -> str | None:
    for m in messages if isinstance(messages, list) else ():
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return m["content"]
    return None


def example_prompts(instructions: str | None, datasets=(), limit: int = MAX_EXAMPLES) -> list[str]:
    """Up to `limit` prompts: the judge's instructions (instruction + input, as the answers stage asks them),
    else the first user turn of each held-out record of the datasets (SFT `messages` or preference `prompt`)."""
    found: list[str] = []
    if instructions:
        for row in _jsonl(Path(instructions)):
            if isinstance(row.get("instruction"), str) and row["instruction"].strip():
                found.append(row["instruction"].strip() + ("\n\n" + row["input"] if row.get("input") else ""))
    else:
        for folder in datasets:
            for row in _jsonl(Path(folder) / "heldout.jsonl"):
                text = _first_user_turn(row.get("messages")) or _first_user_turn(row.get("prompt"))
                if text and text.strip():
                    found.append(text.strip())
    return list(dict.fromkeys(found))[:limit]
