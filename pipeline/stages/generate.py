"""Stage `generate`: self-instruct bootstrapping (Wang et al. 2022), through the LLM client and its ledger.

1. Instruction generation: each request shows `num_prompt_instructions` (8) numbered in-context instructions,
   `num_machine_in_prompt` (2) of them machine-generated once the pool has some and the rest human (seed) tasks,
   and asks the model to continue the list; the completion is parsed into new instructions. Requests go out in
   rounds of `request_batch_size`, until `num_instructions` were parsed or `max_requests` were spent.
2. Classification identification: a few-shot Yes/No prompt per new instruction.
3. Instance generation: input-first for ordinary tasks, output-first (class label, then input) for
   classification tasks.

With `style = "alpaca"` (Stanford Alpaca's variant) one request shows `num_prompt_instructions` (3 in Alpaca)
seed tasks with their input and output and asks for a list of 20 tasks in the same shape; each parsed task comes
with its one instance, so there is no classification or instance request.

Output: `instructions.jsonl` (seed tasks first, then machine tasks, in the self-instruct JSONL shape plus
`source`) and `report.json` (requests, tokens, cost, yield, and why generation stopped). Nothing is filtered
here beyond exact duplicates; the filter stage decides what is kept.

A local generator (`backend = "local"`) runs on `generate.engine`: the batched HF engine, or vLLM (`[generate.vllm]`),
whose engine and version are part of the task's key and of the model id the ledger keys its answers by.

Contract: reads `[generate]`; runs for every `[data.<name>]` with `source = "generate"`; consumes the seed file and
prompt templates (and, for the local backend, the generator model); gets its LLM client from
`pipeline.llm.client.make_client` with the ledger; writes `artifacts/<recipe>/generate/<name>/` and provides it as the
`pool` the filter stage turns into the dataset `<name>`.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pipeline.llm import engines
from pipeline.errors import TunebuildError
from pipeline.llm.prompts import read_template, render
from pipeline.core.stage import Stage

STAGE = Stage(name="generate", version=1, phase="source", section="generate", gpus="generate.gpus",
              doc="Self-instruct: grow the seed tasks into instructions and instances through the LLM ledger.")


def tasks(plan):
    """One task per `[data.<name>]` with `source = "generate"`: the recipe's `[generate]` section drives it.
    Provides a `pool` (the seed + machine task pool) that the filter stage turns into a dataset."""
    c = plan.section("generate")
    keyed, run_settings = engines.task_settings(c.pop("engine"), c.pop("vllm"))
    engine = keyed.get("engine")
    c.update(keyed)  # nothing for the default engine: its tasks keep their keys
    prompts = ("prompt",) if c["style"] == "alpaca" else (
        "prompt", "classify_prompt", "instance_prompt", "instance_prompt_output_first")
    for name, d in sorted(plan.recipe.config["data"].items()):
        if d["source"] != "generate":
            continue
        inputs, params = {k: plan.rel(c[k]) for k in ("seeds", *prompts)}, {}
        if c["backend"] == "local":
            i, p = plan.model(c["model"]).as_arg("generator")
            inputs.update(i)
            params.update(p)
        out = plan.out(STAGE, name)
        local = c["backend"] == "local"
        yield plan.task(STAGE, f"{plan.name}.{name}", out, inputs=inputs, params=params, config=c,
                        unkeyed={"ledger": plan.ledger, "recipe": plan.name,
                                 **({"engine_run": run_settings} if run_settings and local else {})},
                        provides=("pool", name, {}), doc=f"self-instruct generation of {plan.name}'s {name}",
                        engine=engine if local else None,
                        gpus=engines.task_gpus(c["gpus"], run_settings) if local else 0)


def read_seeds(path: Path) -> list[dict]:
    """Self-instruct seed tasks, one JSON object per line: id, instruction, instances [{input, output}],
    is_classification. Ids must be unique."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[: e.start].count(b"\n") + 1
        raise TunebuildError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    if text.lstrip().startswith("["):
        raise TunebuildError(f"{path}: a JSON list; seeds are self-instruct JSONL (one task per line: id, "
                             f"instruction, instances, is_classification). To train on an instruction dataset such "
                             f"as Alpaca's, import it instead: [data.<name>] source = \"{Path(path).name}\"")
    seeds, ids = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except ValueError as e:
            raise TunebuildError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(task, dict):
            raise TunebuildError(f"{path}:{n}: expected a JSON object (a seed task), got {type(task).__name__}")
        if not isinstance(task.get("id"), (str, int)) or isinstance(task.get("id"), bool):
            raise TunebuildError(f"{path}:{n}: id: missing (each seed task needs a unique string or integer id)")
        for key, kind, what in (("instruction", str, "a string"), ("instances", list, "a list"),
                                ("is_classification", bool, "true or false")):
            if not isinstance(task.get(key), kind):
                raise TunebuildError(f"{path}:{n}: {key}: missing or not {what}")
        if not task["instruction"].strip():
            raise TunebuildError(f"{path}:{n}: instruction: expected a non-empty string")
        if str(task["id"]) in ids:
            raise TunebuildError(f"{path}:{n}: id: {task['id']!r} is also the id of line {ids[str(task['id'])]}; "
                                 f"seed ids must be unique")
        ids[str(task["id"])] = n
        for k, inst in enumerate(task["instances"]):
            if not isinstance(inst, dict) or not isinstance(inst.get("input"), str) \
                    or not isinstance(inst.get("output"), str):
                raise TunebuildError(f"{path}:{n}: instances[{k}]: expected {{input: string, output: string}}")
        seeds.append(task)
    if not seeds:
        raise TunebuildError(f"{path}: no seed tasks")
    return seeds


def encode_instruction_prompt(template: str, instructions: list[str]) -> str:
    lines = [re.sub(r"\s+", " ", inst).strip().rstrip(":") for inst in instructions]
    examples = "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))
    return render(template, examples=examples, next_index=len(instructions) + 1)


def parse_instructions(completion: str, next_index: int) -> list[str]:
    """Split a numbered-list continuation (which starts right after '<next_index>.') into instructions."""
    raw = f"{next_index}. " + completion
    parts = re.split(r"(?:^|\n)\s*\d+\s?\.\s", raw)
    out = []
    for part in parts:
        inst = re.sub(r"\s+", " ", part).strip()
        if inst:
            out.append(inst[0].upper() + inst[1:] if inst[0].isalpha() else inst)
    return out


def parse_yes_no(completion: str) -> bool:
    return completion.strip().lower().startswith("yes")


def parse_input_first(completion: str) -> list[dict]:
    text = re.split(r"\n\s*Task\s*:", completion)[0]
    examples = re.split(r"Example\s*\d+\s*\.?\s*:?\s*", text)
    out = []
    for ex in examples:
        ex = ex.strip()
        if not ex:
            continue
        pieces = re.split(r"Output\s*\d*\s*:", ex, maxsplit=1)
        if len(pieces) == 2:
            inp = re.sub(r"^\s*Input\s*\d*\s*:", "", pieces[0]).strip()
            out.append({"input": inp, "output": pieces[1].strip()})
    return out


def parse_output_first(completion: str) -> list[dict]:
    text = re.split(r"\n\s*Task\s*:", completion)[0]
    out = []
    for chunk in re.split(r"Class label\s*:", text)[1:]:
        pieces = re.split(r"Input\s*\d*\s*:", chunk, maxsplit=1)
        label = pieces[0].strip()
        inp = pieces[1].strip() if len(pieces) == 2 else ""
        if label:
            out.append({"input": inp, "output": label})
    return out


ALPACA_LIST = 20  # the alpaca prompt asks for a list of 20 tasks


def encode_alpaca_prompt(template: str, tasks: list[dict]) -> str:
    """Alpaca's encode_prompt: the seed tasks as numbered Instruction/Input/Output blocks separated by ###, then
    the opening of the next item."""
    blocks = []
    for i, t in enumerate(tasks, 1):
        ins = t["instances"][0] if t["instances"] else {"input": "", "output": ""}
        inp = ins["input"].strip() or "<noinput>"
        instruction = re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":")
        blocks.append(f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{inp}\n{i}. Output:\n"
                      f"{ins['output'].strip()}\n")
    return render(template, examples="".join(blocks) + f"###\n{len(tasks) + 1}. Instruction:")


def parse_alpaca(completion: str, next_index: int) -> list[dict]:
    """Alpaca's post_process_gpt3_response: split the continuation at ###, keep the items whose
    Instruction/Input/Output fields all parse; "<noinput>" means an empty input."""
    out = []
    for k, item in enumerate(re.split("###", f"{next_index}. Instruction:" + completion)):
        idx = next_index + k
        parts = re.split(rf"{idx}\.\s+(Instruction|Input|Output):", item)
        if len(parts) != 7:
            continue
        inst, inp, output = parts[2].strip(), parts[4].strip(), parts[6].strip()
        inp = "" if inp.lower() == "<noinput>" else inp
        if inst and output:
            out.append({"instruction": inst, "input": inp, "output": output})
    return out


def _rounds(c: dict, client, known: set[str], sampling: dict, make_prompt, parse, label: str):
    """Request rounds of `request_batch_size` until `num_instructions` new items were parsed or `max_requests`
    were spent. `make_prompt(rng, pool)` builds one request from the items so far; `parse(completion)` yields
    items, each with an "instruction"; exact duplicates (case-insensitive) of known instructions are skipped.
    Returns (items, requests, parsed, stop reason)."""
    items: list[dict] = []
    requests = parsed = round_no = 0
    stop_reason = "target reached"
    while len(items) < c["num_instructions"]:
        if requests >= c["max_requests"]:
            stop_reason = "request budget spent"
            break
        batch = [make_prompt(random.Random(f"{c['seed']}-{round_no}-{j}"), items)
                 for j in range(min(c["request_batch_size"], c["max_requests"] - requests))]
        completions = client.complete_many(batch, sampling)
        requests += len(batch)
        round_no += 1
        for completion in completions:
            for item in parse(completion):
                parsed += 1
                norm = item["instruction"].lower()
                if norm not in known and len(items) < c["num_instructions"]:
                    known.add(norm)
                    items.append(item)
        print(f"generate: {requests} requests, {len(items)}/{c['num_instructions']} {label}", flush=True)
    return items, requests, parsed, stop_reason


def _alpaca_tasks(seed_tasks: list[dict], template: str, c: dict, client, known: set[str]):
    """Alpaca-style rounds. Returns (machine tasks, requests, parsed, stop reason)."""
    sampling = {"max_tokens": c["max_tokens"], "temperature": c["temperature"], "top_p": c["top_p"],
                "stop": [f"\n{ALPACA_LIST}", f"{ALPACA_LIST}.", f"{ALPACA_LIST} ."]}
    machine, requests, parsed, stop_reason = _rounds(
        c, client, known, sampling,
        lambda rng, _pool: encode_alpaca_prompt(template, rng.sample(seed_tasks, c["num_prompt_instructions"])),
        lambda completion: parse_alpaca(completion, c["num_prompt_instructions"] + 1), "tasks")
    tasks = [{"id": f"machine_task_{k}", "name": "", "instruction": m["instruction"],
              "instances": [{"input": m["input"], "output": m["output"]}], "is_classification": False,
              "source": "machine"} for k, m in enumerate(machine)]
    return tasks, requests, parsed, stop_reason


def run(out_dir: Path, *, seeds: Path, prompt: Path, config: dict, ledger: str, recipe: str = "",
        generator: str | None = None, classify_prompt: Path | None = None, instance_prompt: Path | None = None,
        instance_prompt_output_first: Path | None = None, engine_run: dict | None = None) -> dict:
    """Grow the seed tasks into machine tasks with instances, through the client `[generate]` asks for."""
    from pipeline.llm.client import make_client

    client = make_client(config, generator=generator, ledger=ledger, recipe=recipe, engine_run=engine_run)
    try:
        return generate(out_dir, seeds=seeds, prompt=prompt, config=config, client=client,
                        classify_prompt=classify_prompt, instance_prompt=instance_prompt,
                        instance_prompt_output_first=instance_prompt_output_first)
    finally:
        client.close()


def generate(out_dir: Path, *, seeds: Path, prompt: Path, config: dict, client, classify_prompt: Path | None = None,
             instance_prompt: Path | None = None, instance_prompt_output_first: Path | None = None) -> dict:
    """Grow the seed tasks into machine tasks with instances. `client` is a `pipeline.llm.client.Client`."""
    seed_tasks = read_seeds(seeds)
    if len(seed_tasks) < config["num_prompt_instructions"]:
        raise TunebuildError(f"generate.num_prompt_instructions: {config['num_prompt_instructions']} in-context "
                             f"tasks per request, but {seeds} holds only {len(seed_tasks)} seed task(s)")
    if config["style"] == "alpaca":
        known = {re.sub(r"\s+", " ", t["instruction"]).strip().lower() for t in seed_tasks}
        machine_tasks, requests, parsed, stop_reason = _alpaca_tasks(
            seed_tasks, read_template(prompt, ("examples",)), config, client, known)
        return _write(out_dir, seed_tasks, machine_tasks, client, stop_reason=stop_reason,
                      instruction_requests=requests, instructions_parsed=parsed)

    gen_template = read_template(prompt, ("examples", "next_index"))
    clf_template = read_template(classify_prompt, ("instruction",))
    in_template = read_template(instance_prompt, ("instruction",))
    out_template = read_template(instance_prompt_output_first, ("instruction",))
    c = config

    human = [t["instruction"] for t in seed_tasks]
    known = {re.sub(r"\s+", " ", h).strip().lower() for h in human}
    last = c["num_prompt_instructions"] + 8  # as self-instruct: continue the list up to 7 new items
    sampling = {"max_tokens": c["max_tokens"], "temperature": c["temperature"], "top_p": c["top_p"],
                "stop": ["\n\n", f"\n{last}", f"{last}.", f"{last} ."]}

    def make_prompt(rng, pool):
        chosen = rng.sample([p["instruction"] for p in pool], min(c["num_machine_in_prompt"], len(pool)))
        chosen += rng.sample(human, c["num_prompt_instructions"] - len(chosen))
        rng.shuffle(chosen)
        return encode_instruction_prompt(gen_template, chosen)

    found, requests, parsed, stop_reason = _rounds(
        c, client, known, sampling, make_prompt,
        lambda completion: [{"instruction": i} for i in parse_instructions(completion, c["num_prompt_instructions"] + 1)],
        "instructions")
    machine = [f["instruction"] for f in found]

    short = {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "stop": ["\n"]}
    is_clf = [parse_yes_no(a) for a in
              client.complete_many([render(clf_template, instruction=i) for i in machine], short)]
    inst_sampling = {"max_tokens": c["instance_max_tokens"], "temperature": 0.0, "top_p": 1.0,
                     "stop": ["\n\nTask:", "\nTask:"]}
    prompts = [render(out_template if clf else in_template, instruction=i) for i, clf in zip(machine, is_clf)]
    answers = client.complete_many(prompts, inst_sampling)

    tasks = [dict(t, source="seed") for t in seed_tasks]
    for k, (inst, clf, answer) in enumerate(zip(machine, is_clf, answers)):
        instances = parse_output_first(answer) if clf else parse_input_first(answer)
        tasks.append({"id": f"machine_task_{k}", "name": "", "instruction": inst, "instances": instances,
                      "is_classification": clf, "source": "machine"})

    return _write(out_dir, seed_tasks, tasks[len(seed_tasks):], client, stop_reason=stop_reason,
                  instruction_requests=requests, instructions_parsed=parsed)


def _write(out_dir: Path, seed_tasks: list[dict], machine: list[dict], client, **counts) -> dict:
    tasks = [dict(t, source="seed") for t in seed_tasks] + machine
    with open(out_dir / "instructions.jsonl", "w", encoding="utf-8") as f:
        for t in tasks:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    report = {
        **counts,
        "machine_instructions": len(machine),
        "classification_tasks": sum(t["is_classification"] for t in machine),
        "instances": sum(len(t["instances"]) for t in machine),
        "machine_tasks_with_instances": sum(1 for t in machine if t["instances"]),
        "seed_tasks": len(seed_tasks),
        "pool_tasks": len(tasks),
        "usage": client.usage.as_dict(),
    }
    u = client.usage
    price = f", cost {u.cost:.4f} (at {u.price_per_1k_tokens} per 1k tokens)" if u.price_per_1k_tokens else ""
    print(f"generate: {u.requests} requests ({u.sent} sent now, {u.requests - u.sent} answered by the ledger), "
          f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens{price}", flush=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
