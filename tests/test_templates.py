"""The chat templates under recipes/templates/: each renders its model family's official format, and training learns
exactly the assistant turns with every one of them.

The expected strings below are written out by hand from each family's official format (the chat_template in the
model's tokenizer_config.json), with the family's own bos/eos tokens passed to apply_chat_template.
"""
from pathlib import Path

import jinja2
import pytest

from pipeline.finetuning import chat_templates as templates
from pipeline.models import tiny

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
NO_SYSTEM = CONVERSATION[1:]

# The family's own special tokens; the others render with the built-in tiny tokenizer's (<s>, <|im_end|>).
TOKENS = {
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "alpaca": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
}

ALPACA = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

# Rendering of CONVERSATION.
FULL = {
    "default": "You are terse.\n\n"
               "Human: Hi\nAssistant: Hello!<|im_end|>\n"
               "Human: 2+2?\nAssistant: 4<|im_end|>\n",
    "qwen": "<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n",
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": "<|begin_of_text|>"
              "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "llama2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
              "<s>[INST] 2+2? [/INST] 4 </s>",
    "mistral": "<s> [INST] You are terse.\n\nHi [/INST] Hello!</s> [INST] 2+2? [/INST] 4</s>",
    "gemma": "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
             "<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\n2+2?<end_of_turn>\n"
             "<start_of_turn>model\n4<end_of_turn>\n",
    "alpaca": "You are terse.\n\n"
              "### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
              "### Instruction:\n2+2?\n\n### Response:\n4</s>",
}

# Rendering of NO_SYSTEM: qwen and alpaca put in their default system prompt, the others render no system part.
FULL_NO_SYSTEM = {
    "default": "Human: Hi\nAssistant: Hello!<|im_end|>\n"
               "Human: 2+2?\nAssistant: 4<|im_end|>\n",
    "qwen": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n",
    "chatml": "<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": "<|begin_of_text|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "llama2": "<s>[INST] Hi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>",
    "mistral": "<s> [INST] Hi [/INST] Hello!</s> [INST] 2+2? [/INST] 4</s>",
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n"
             "<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\n2+2?<end_of_turn>\n"
             "<start_of_turn>model\n4<end_of_turn>\n",
    "alpaca": ALPACA + "\n\n"
              "### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
              "### Instruction:\n2+2?\n\n### Response:\n4</s>",
}

# Rendering of CONVERSATION[:4] (ending with the user's "2+2?") with add_generation_prompt=True.
GENERATION_PROMPT = {
    "default": "You are terse.\n\n"
               "Human: Hi\nAssistant: Hello!<|im_end|>\n"
               "Human: 2+2?\nAssistant: ",
    "qwen": "<|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\n2+2?<|im_end|>\n"
            "<|im_start|>assistant\n",
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|>"
              "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
              "<s>[INST] 2+2? [/INST]",
    "mistral": "<s> [INST] You are terse.\n\nHi [/INST] Hello!</s> [INST] 2+2? [/INST]",
    "gemma": "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
             "<start_of_turn>model\nHello!<end_of_turn>\n"
             "<start_of_turn>user\n2+2?<end_of_turn>\n"
             "<start_of_turn>model\n",
    "alpaca": "You are terse.\n\n"
              "### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
              "### Instruction:\n2+2?\n\n### Response:\n",
}

# What training learns of one answer `{}`: the answer as the family renders it, then its end-of-turn marker (and the
# newline that ends the turn in the families that write one). Llama 2 and Mistral write the space that follows
# [/INST] as part of the answer (a real Llama/Mistral tokenizer folds it into the answer's first token).
TRAINED_TURN = {
    "default": "{}<|im_end|>\n",
    "qwen": "{}<|im_end|>\n",
    "chatml": "{}<|im_end|>\n",
    "llama3": "{}<|eot_id|>",
    "llama2": " {} </s>",
    "mistral": " {}</s>",
    "gemma": "{}<end_of_turn>\n",
    "alpaca": "{}</s>",
}

FAMILIES = ["default", "qwen", "chatml", "llama3", "llama2", "mistral", "gemma", "alpaca"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.byte_level_tokenizer()


def template(name: str) -> str:
    return (RECIPES / templates.NAMES[name]).read_text(encoding="utf-8")


def render(tokenizer, name: str, messages: list[dict], **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template(name), **TOKENS.get(name, {}), **kwargs)


def test_every_family_has_a_template_file():
    assert sorted(templates.NAMES) == sorted(FAMILIES)
    for name, rel in templates.NAMES.items():
        assert rel == f"templates/{name}.jinja"
        text = (RECIPES / rel).read_text(encoding="utf-8")
        jinja2.Environment().parse(text)  # what recipe validation checks
        assert "add_generation_prompt" in text and "messages" in text


def test_resolve_short_names_and_paths():
    assert templates.resolve("llama3") == "templates/llama3.jinja"
    assert templates.resolve("qwen") == "templates/qwen.jinja"
    assert templates.resolve("templates/qwen.jinja") == "templates/qwen.jinja"
    assert templates.resolve("templates/mine.jinja") == "templates/mine.jinja"
    assert templates.resolve("LLAMA3") == "LLAMA3"


def test_an_unknown_template_name_says_the_shipped_names_and_the_nearest():
    for value, nearest in [("qwen2", "qwen"), ("Llama3", "llama3"), ("llama-3", "llama3"), ("chat-ml", "chatml"),
                           ("templates/gemma2.jinja", "gemma")]:
        message = templates.unknown(value, RECIPES)
        assert message == (f"unknown chat template {value!r}: not a shipped one (default, qwen, chatml, llama3, "
                           f"llama2, mistral, gemma, alpaca) nor a file under recipes/; did you mean {nearest!r}?")
    assert templates.unknown("zzz", RECIPES).endswith("nor a file under recipes/")   # nothing near: no guess
    for value in ("qwen", "templates/qwen.jinja", "templates/default.jinja"):   # a name, a file: none to say
        assert templates.unknown(value, RECIPES) is None
    with pytest.raises(ValueError, match="did you mean 'gemma'"):
        templates.end_of_turn("gemma2")


def test_doit_list_names_the_shipped_templates_for_an_unknown_one(tmp_path):
    from conftest import copy_project, run_doit

    project = copy_project(tmp_path, recipes=())
    (project / "recipes" / "only.toml").write_text('[model]\nbase = "builtin:tiny"\nchat_template = "qwen2"\n')
    _, _, out, rc = run_doit(project, "list", check=False)
    assert rc != 0 and "Traceback" not in out
    assert f"tunebuild: {project / 'recipes' / 'only.toml'}: model.chat_template: unknown chat template 'qwen2': " \
           f"not a shipped one (default, qwen, chatml, llama3, llama2, mistral, gemma, alpaca) nor a file under " \
           f"recipes/; did you mean 'qwen'?" in out.splitlines(), out


def test_end_of_turn():
    assert templates.end_of_turn("chatml") == "<|im_end|>"
    assert templates.end_of_turn("qwen") == "<|im_end|>"
    assert templates.end_of_turn("llama3") == "<|eot_id|>"
    assert templates.end_of_turn("gemma") == "<end_of_turn>"
    for name in ("llama2", "mistral", "alpaca", "default"):
        assert templates.end_of_turn(name) == "</s>"
        assert templates.end_of_turn(name, eos_token="<|im_end|>") == "<|im_end|>"
    assert templates.end_of_turn("llama3", eos_token="<|end_of_text|>") == "<|eot_id|>"
    assert templates.end_of_turn("templates/gemma.jinja") == "<end_of_turn>"
    assert templates.end_of_turn("/x/recipes/templates/llama3.jinja") == "<|eot_id|>"
    with pytest.raises(ValueError, match="unknown chat template"):
        templates.end_of_turn("templates/mine.jinja")
    # the end-of-turn marker is what closes every trained answer
    for name in FAMILIES:
        eos = TOKENS.get(name, {}).get("eos_token", "<|im_end|>")
        assert templates.end_of_turn(name, eos_token=eos) in TRAINED_TURN[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_renders_the_official_format(tokenizer, name):
    assert render(tokenizer, name, CONVERSATION, tokenize=False) == FULL[name]
    assert render(tokenizer, name, NO_SYSTEM, tokenize=False) == FULL_NO_SYSTEM[name]
    assert render(tokenizer, name, CONVERSATION[:4], tokenize=False,
                  add_generation_prompt=True) == GENERATION_PROMPT[name]
    # Without a system message the generation prompt is the same, less the system part.
    prompt = render(tokenizer, name, NO_SYSTEM[:3], tokenize=False, add_generation_prompt=True)
    assert FULL_NO_SYSTEM[name].startswith(prompt)


@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("name", FAMILIES)
def test_only_the_assistant_turns_are_trained(tokenizer, name, messages):
    def ids(msgs, generation_prompt=False):
        return list(render(tokenizer, name, msgs, add_generation_prompt=generation_prompt, tokenize=True,
                           return_dict=False))

    full = ids(messages)
    # Each assistant turn: the conversation before it with the generation prompt is a token prefix of the
    # conversation through it, which is a prefix of the whole; the turn adds at least one token.
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt, upto = ids(messages[:i], generation_prompt=True), ids(messages[: i + 1])
            assert upto[: len(prompt)] == prompt
            assert full[: len(upto)] == upto
            assert len(upto) > len(prompt)

    got, mask = templates.assistant_spans(tokenizer, messages, chat_template=template(name),
                                          **TOKENS.get(name, {}))
    assert got == full and len(mask) == len(full) and set(mask) == {0, 1}
    assert tokenizer.decode([t for t, keep in zip(full, mask) if keep]) == \
        TRAINED_TURN[name].format("Hello!") + TRAINED_TURN[name].format("4")
    # Two separate spans, one per answer, each ending at the end of its turn.
    runs, start = [], None
    for k, keep in enumerate(mask + [0]):
        if keep and start is None:
            start = k
        elif not keep and start is not None:
            runs.append(tokenizer.decode(full[start:k]))
            start = None
    assert runs == [TRAINED_TURN[name].format("Hello!"), TRAINED_TURN[name].format("4")]


def test_assistant_spans_rejects_a_template_that_does_not_extend_its_prompt(tokenizer):
    # the generation prompt says "Bot:" but the assistant turn is written "Assistant:"
    bad = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'Bot: ' }}{% endif %}")
    with pytest.raises(templates.TemplateError, match="prefix"):
        templates.assistant_spans(tokenizer, NO_SYSTEM, chat_template=bad)
    silent = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{% endif %}")
    with pytest.raises(templates.TemplateError, match="renders nothing"):
        templates.assistant_spans(tokenizer, NO_SYSTEM, chat_template=silent)


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_masks_agree(name):
    """The SFT stage's own copy of the rule trains the same tokens (with the tokenizer's own bos/eos)."""
    sft = pytest.importorskip("pipeline.stages.sft")
    if not hasattr(sft, "tokenize_conversations"):
        pytest.skip("the SFT stage no longer has its own tokenize_conversations")
    tok = tiny.byte_level_tokenizer(chat_template=template(name))
    rows, _ = sft.tokenize_conversations([CONVERSATION], tok, 4096, Path(templates.NAMES[name]))
    ids, mask = templates.assistant_spans(tok, CONVERSATION)
    assert rows == [{"input_ids": ids, "completion_mask": mask}]
