"""The chat app (`doit chat:<recipe>`): served on 127.0.0.1, talked to through gradio_client, its answers checked
against a direct greedy `generate` with the model folder's own chat template and stop ids."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, copy_project, run_doit

QA = [("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome")]
MAX_NEW = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tuned_model(tiny_model, tmp_path_factory):
    """The tiny model taught two answers ("Paris", "Rome") in its chat template, ending with <|im_end|>. Its
    tokenizer's eos is then set to </s>: only the generation config's eos id (<|im_end|>) stops it after the
    answer, as with models whose turn-end token is not the tokenizer's eos."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False) for q, a in QA]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for i, (q, _) in enumerate(QA):  # learn the answers, not the questions
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        labels[i, :len(tok(prompt, add_special_tokens=False)["input_ids"])] = -100
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("tuned") / "tuned"
    model.save_pretrained(out)
    tok.eos_token = "</s>"
    tok.save_pretrained(out)
    return out


def greedy(folder, messages, max_new_tokens=MAX_NEW) -> str:
    """What the model folder answers, greedily: its chat template, its generation config's and tokenizer's eos."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    eos = model.generation_config.eos_token_id
    stops = [*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(c.get("text", "") for c in content)


def last_answer(history) -> str:
    assert history[-1]["role"] == "assistant", history
    return text_of(history[-1])


@pytest.fixture(scope="module")
def app(tiny_model, tuned_model):
    from pipeline.evaluation import chat_app

    port = free_port()
    served = chat_app.serve({"base": str(tiny_model), "tuned": str(tuned_model)}, ["What is the capital of Italy?"],
                            title="test chat", server_name="127.0.0.1", server_port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        served.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app, verbose=False)


def test_chat_with_the_tuned_model_answers_its_greedy_output(client, tuned_model):
    question = QA[0][0]
    history = client.predict(message=question, history=[], model="tuned", system="", temperature=0, top_p=1,
                             max_new_tokens=MAX_NEW, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] and text_of(history[0]) == question
    expected = greedy(tuned_model, [{"role": "user", "content": question}])
    assert expected == "Paris"   # the chat template reached the model, and the generation config's eos stopped it
    assert last_answer(history) == expected


def test_side_by_side_sends_the_same_message_to_both(client, tiny_model, tuned_model):
    question = QA[1][0]
    job = client.submit(message=question, history_a=[], history_b=[], model_a="base", model_b="tuned", system="",
                        temperature=0, top_p=1, max_new_tokens=MAX_NEW, api_name="/side_by_side")
    a, b = job.result(timeout=120)
    messages = [{"role": "user", "content": question}]
    assert text_of(a[0]) == text_of(b[0]) == question
    assert last_answer(a) == greedy(tiny_model, messages)
    assert last_answer(b) == greedy(tuned_model, messages) == "Rome"
    # the answers streamed: several updates, each a prefix of the final answers
    updates = [(last_answer(x), last_answer(y)) for x, y in job.outputs() if x and x[-1]["role"] == "assistant"]
    assert len(updates) > 2
    assert all(last_answer(a).startswith(u) and last_answer(b).startswith(v) for u, v in updates)


def test_chat_keeps_the_conversation_and_the_system_prompt(client, tiny_model):
    first = client.predict(message="Hi", history=[], model="base", system="Be brief.", temperature=0, top_p=1,
                           max_new_tokens=8, api_name="/chat")
    second = client.predict(message="And then?", history=first, model="base", system="Be brief.", temperature=0,
                            top_p=1, max_new_tokens=8, api_name="/chat")
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": last_answer(first)}, {"role": "user", "content": "And then?"}]
    assert last_answer(second) == greedy(tiny_model, conversation, max_new_tokens=8)


def test_sampling_is_not_greedy_only(client):
    history = client.predict(message="Hello", history=[], model="base", system="", temperature=1.5, top_p=1,
                             max_new_tokens=12, api_name="/chat")
    assert last_answer(history) != "\n" * 12   # the random tiny model repeats "\n" greedily


def test_example_prompts_come_from_judge_instructions_else_heldout_data(tmp_path):
    from pipeline.stages import chat

    judge = tmp_path / "judge.jsonl"
    judge.write_text('{"id": 1, "instruction": "Translate.", "input": "Bonjour"}\n{"instruction": "Add 2 and 3."}\n')
    assert chat.example_prompts(str(judge)) == ["Translate.\n\nBonjour", "Add 2 and 3."]
    data = tmp_path / "data"
    data.mkdir()
    (data / "heldout.jsonl").write_text(
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Name a color."},'
        ' {"role": "assistant", "content": "Red"}]}\n'
        '{"prompt": [{"role": "user", "content": "Pick one."}], "chosen": [], "rejected": []}\n')
    assert chat.example_prompts(None, [str(data)]) == ["Name a color.", "Pick one."]


def test_chat_is_a_task_per_recipe_and_not_part_of_build():
    from pipeline.core.graph import Project

    out = subprocess.run([sys.executable, "-m", "doit", "list", "--all"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert any(line.split()[:1] == ["chat:demo"] for line in out.splitlines()), out
    project = Project(ROOT)
    plan = project.plans["demo"]
    chat_task = next(t for t in plan.tasks if t["basename"] == "chat")
    assert "chat:demo" not in plan.task_phase
    build = next(t for t in project.build_tasks() if t["name"] == "demo")
    assert not any(dep.startswith("chat:") for dep in build["task_dep"])
    models = plan.models()
    (_, _, kwargs), = chat_task["actions"]
    assert kwargs["models"] == {role: m.location for role, m in models.items()} and list(models)[0] == "base"
    assert kwargs["default"] == plan.final() != "base"
    # doit builds the models (and the held-out data for the examples) before serving them
    assert {f"{m.folder}/manifest.json" for m in models.values()} <= set(chat_task["file_dep"])
    assert any(dep.endswith("heldout.jsonl") or "/data/" in dep for dep in chat_task["file_dep"])
    assert chat_task["uptodate"] == [False] and "targets" not in chat_task


BASE_ONLY = 'description = "the built-in model alone"\n[model]\nbase = "builtin:tiny"\n' \
            'chat_template = "templates/default.jinja"\n'
NO_GRADIO = '''import sys


class NoGradio:
    """gradio is not installed, as far as this interpreter can tell."""

    def find_spec(self, name, path=None, target=None):
        if name == "gradio" or name.startswith("gradio."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoGradio())
'''


def test_without_gradio_doit_chat_says_in_one_line_how_to_install_it(tmp_path):
    (tmp_path / "p").mkdir()
    project = copy_project(tmp_path / "p", recipes=())
    (project / "recipes" / "only.toml").write_text(BASE_ONLY)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(NO_GRADIO)
    proc = subprocess.run([sys.executable, "-c", "import gradio"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(stub)})
    assert proc.returncode != 0 and "No module named 'gradio'" in proc.stderr
    _, _, out, rc = run_doit(project, "chat:only", env={"PYTHONPATH": f"{stub}{os.pathsep}{ROOT}"}, check=False)
    assert rc != 0
    lines = [line for line in out.splitlines() if "Gradio" in line]
    assert lines == ["chat:only: the chat app needs Gradio: pip install -e '.[demo]'"], out
    assert "Traceback" not in out


def wait_for(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"doit chat exited ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.mark.slow
def test_doit_chat_demo_builds_what_is_missing_then_serves(tmp_path):
    """`doit chat:demo` in a fresh project: builds the demo's models, serves them, answers greedily, stops on
    Ctrl-C."""
    from gradio_client import Client

    from pipeline.core.graph import Project

    plan = Project(ROOT).plans["demo"]
    models, final = plan.models(), plan.final()
    project = copy_project(tmp_path, recipes=("mini_lima.toml", "demo.toml"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OPENAI_API_KEY": "", "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "doit", "chat:demo"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/", proc, timeout=900)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        question = "Name the capital city of the given country.\n\nFrance"
        messages = [{"role": "user", "content": question}]
        history = client.predict(message=question, history=[], model=final, system="", temperature=0, top_p=1,
                                 max_new_tokens=MAX_NEW, api_name="/chat")
        assert last_answer(history) == greedy(project / models[final].folder, messages)
        a, b = client.predict(message=question, history_a=[], history_b=[], model_a="base", model_b=final,
                              system="", temperature=0, top_p=1, max_new_tokens=MAX_NEW, api_name="/side_by_side")
        assert last_answer(a) == greedy(project / models["base"].folder, messages)
        assert last_answer(b) == last_answer(history)
    finally:
        os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert f"tunebuild chat: demo: {', '.join(models)} on http://127.0.0.1:{port}/ (Ctrl-C stops)" in out, out
    assert ".  chat:demo" in out and f".  {models[final].task}" in out, out   # it built the model first
    assert proc.returncode == 130 and "chat:demo: chat stopped" in out and "Traceback" not in out, out   # Ctrl-C


@pytest.fixture(scope="module")
def base_only_project(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("chat"), recipes=())
    (project / "recipes" / "only.toml").write_text(BASE_ONLY)
    run_doit(project, "builtin:tiny")
    return project


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_ctrl_c_stops_doit_chat_in_one_line(base_only_project, when):
    """Ctrl-C while the app starts (Gradio loading, the models preloading) or while it serves: one line, exit 130."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "GRADIO_SERVER_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "doit", "chat:only"], cwd=base_only_project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    seen = []
    try:
        mark = ".  chat:only" if when == "starting" else "(Ctrl-C stops)"
        while not seen or mark not in seen[-1]:
            seen.append(proc.stdout.readline())
            assert seen[-1], f"doit chat exited ({proc.wait()}):\n{''.join(seen)}{proc.stderr.read()}"
        if when == "starting":
            time.sleep(1)   # in the task's action, importing Gradio (a few seconds)
        else:
            wait_for(f"http://127.0.0.1:{port}/", proc, timeout=120)
            time.sleep(2)   # the base model preloaded meanwhile
        os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    out = "".join(seen) + out
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err + out and "KeyboardInterrupt" not in err + out, err
    assert [line for line in out.splitlines() if "stop" in line.lower() and "Ctrl-C stops" not in line] \
        == ["chat:only: chat stopped"], out
