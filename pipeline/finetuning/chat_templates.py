r"""Chat templates by name: the Jinja files under `recipes/templates/`, and which tokens training learns.

A recipe's `model.chat_template` is a path relative to `recipes/` or one of the short names in `NAMES` (`resolve`
turns a short name into its path; `unknown` says in one line why a value is neither, with the nearest name). Each
file is a Hugging Face chat template, used through `tokenizer.apply_chat_template(messages,
add_generation_prompt=..., tokenize=...)`; those that write the model's `bos_token` / `eos_token` read them from
the tokenizer.

| name | format of | trained span of an answer A | `end_of_turn` |
|---|---|---|---|
| default | `Human:` / `Assistant:` lines (the built-in tiny model's recipes) | `A` eos `\n` | eos_token |
| qwen | Qwen1.5/Qwen2 Chat: ChatML, system "You are a helpful assistant." by default | `A<|im_end|>\n` | `<|im_end|>` |
| chatml | ChatML (OpenHermes), no default system | `A<|im_end|>\n` | `<|im_end|>` |
| llama3 | Llama 3 Instruct | `A<|eot_id|>` | `<|eot_id|>` |
| llama2 | Llama 2 Chat: `<s>[INST] <<SYS>>...<</SYS>>...` | ` A ` eos (`</s>`) | eos_token |
| mistral | Mistral Instruct v0.1/v0.2 `[INST]` (its own file) | ` A` eos (`</s>`) | eos_token |
| gemma | Gemma 1/2/3 it; a system message opens the first user turn | `A<end_of_turn>\n` | `<end_of_turn>` |
| alpaca | Stanford Alpaca, several turns as in LLaMA-Factory | `A` eos | eos_token |

Only the standard library is imported here; the tokenizer is passed in.
"""
from __future__ import annotations

import difflib
from pathlib import Path, PurePath

NAMES = {
    "default": "templates/default.jinja",
    "qwen": "templates/qwen.jinja",
    "chatml": "templates/chatml.jinja",
    "llama3": "templates/llama3.jinja",
    "llama2": "templates/llama2.jinja",
    "mistral": "templates/mistral.jinja",
    "gemma": "templates/gemma.jinja",
    "alpaca": "templates/alpaca.jinja",
}

# The string that ends an assistant turn, for the stop (EOS) ids of generation; None: the tokenizer's eos_token.
_END_OF_TURN = {
    "default": None,
    "qwen": "<|im_end|>",
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "llama2": None,
    "mistral": None,
    "gemma": "<end_of_turn>",
    "alpaca": None,
}


class TemplateError(ValueError):
    """A chat template that cannot be trained with: it fails, or does not render a conversation turn by turn."""


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids two sequences share (where a prompt's tokens end inside prompt + answer)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def resolve(value: str) -> str:
    """The path (relative to `recipes/`) of a template's short name; any other value is returned unchanged."""
    return NAMES.get(value, value)


def _nearest(value: str) -> str:
    """`; did you mean 'qwen'?` for the shipped name nearest to `value` (a name or a path's stem), else ''."""
    key = PurePath(value.replace("\\", "/")).stem.lower()
    near = difflib.get_close_matches(key, NAMES, n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def unknown(value: str, recipes_dir) -> str | None:
    """Why `model.chat_template = value` names no template: neither a shipped name nor a path under `recipes_dir`,
    in one line listing the shipped names and suggesting the nearest (`qwen2` -> `qwen`). None when it names one
    (whether that path is a usable file is the recipe validation's business)."""
    if value in NAMES or (Path(recipes_dir) / value).exists():
        return None
    return (f"unknown chat template {value!r}: not a shipped one ({', '.join(NAMES)}) nor a file under "
            f"recipes/{_nearest(value)}")


def name_of(value: str) -> str | None:
    """The short name of a template given by short name or by a path ending in `templates/<name>.jinja`; else None."""
    if value in NAMES:
        return value
    path = PurePath(value.replace("\\", "/"))
    if path.suffix == ".jinja" and path.parent.name == "templates" and path.stem in NAMES:
        return path.stem
    return None


def end_of_turn(name: str, eos_token: str = "</s>") -> str:
    """The string that ends an assistant's turn in template `name` (a short name or its path): the token generation
    should stop on. Templates that end a turn with the tokenizer's own eos_token (default, llama2, mistral, alpaca)
    return `eos_token`, `</s>` (the Llama and Mistral tokenizers') unless given."""
    key = name_of(name)
    if key is None:
        raise ValueError(f"unknown chat template {name!r} (known: {', '.join(NAMES)}){_nearest(name)}")
    marker = _END_OF_TURN[key]
    return eos_token if marker is None else marker


def _ids(tokenizer, messages: list[dict], generation_prompt: bool, kwargs: dict) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False, **kwargs))


def assistant_spans(tokenizer, messages: list[dict], **kwargs) -> tuple[list[int], list[int]]:
    """The token ids of `messages` rendered with the tokenizer's chat template, and a mask that is 1 on every
    assistant turn's tokens (what training learns) and 0 elsewhere.

    An assistant turn `i` spans from the end of `messages[:i]` rendered with the generation prompt to the end of
    `messages[:i + 1]` rendered without it, so it holds the answer and the template's end-of-turn marker. The first
    must be a token prefix of the second, the second a prefix of the whole conversation, and the span not empty;
    otherwise TemplateError. `kwargs` go to `apply_chat_template` (e.g. `chat_template=`, `bos_token=`)."""
    full = _ids(tokenizer, messages, False, kwargs)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _ids(tokenizer, messages[:i], True, kwargs)
        upto = _ids(tokenizer, messages[: i + 1], False, kwargs)
        if upto[: len(prompt)] != prompt or full[: len(upto)] != upto:
            raise TemplateError(f"rendering a conversation does not extend its earlier turns at message {i + 1} "
                                f"(the template must render each turn as a prefix of the next)")
        if len(upto) == len(prompt):
            raise TemplateError(f"the chat template renders nothing for the assistant turn at message {i + 1}")
        mask[len(prompt): len(upto)] = [1] * (len(upto) - len(prompt))
    return full, mask
