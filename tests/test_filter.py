import json

from PIL import Image

from pipeline.core.recipe.load import load_recipes
from pipeline.stages import filter as filter_stage
from conftest import ROOT


def config(**over):
    c = {r.name: r for r in load_recipes(ROOT / "recipes")}["mini_lima"].section("filter")
    c.update(heldout_fraction=0.0, **over)
    return c


def task(i, instruction, instances, source="machine"):
    return {"id": f"{source}_{i}", "name": "", "instruction": instruction, "is_classification": False,
            "instances": [{"input": a, "output": b} for a, b in instances], "source": source}


def write(tmp_path, tasks):
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    return path, out


def read(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_rules_reasons_most_similar_and_histogram(tmp_path):
    tasks = [
        task(0, "Write a short poem about the sea and the wind.", [("", "Waves.")], "seed"),
        task(1, "Write a short poem about the sea and the wind!", [("", "Gulls.")]),        # ROUGE-L 1.0
        task(2, "Explain how a rainbow forms after a storm.", [("", "Light."), ("", "Light.")]),
        task(3, "Sort these numbers in ascending order please.", [("3 1", "1 3"), ("3 1", "3 1 again"),
                                                                   ("x", "x")]),
        task(4, "Draw a picture of a cat sitting on a mat.", [("", "ok")]),              # blocklisted
        task(5, "Too short.", [("", "ok")]),
        task(6, "Describe your favourite season and explain why.", [("", "")]),          # no valid instance
    ]
    path, out = write(tmp_path, tasks)
    report = filter_stage.run(out, pool=path.parent, config=config())
    dropped = {d["id"]: d for d in read(out / "dropped.jsonl")}
    assert dropped["machine_1"]["most_similar"] == tasks[0]["instruction"] and dropped["machine_1"]["score"] == 1.0
    assert dropped["machine_4"]["reason"].startswith("blocklisted keyword")
    assert dropped["machine_5"]["reason"] == "fewer than 4 words"
    assert dropped["machine_6"]["reason"] == "no valid instance"
    assert report["instances_dropped_by_reason"] == {
        "conflicting outputs for the same input": 2, "duplicate instance": 1, "output equals input": 1,
        "empty output": 1}
    kept = {json.loads(x)["task_id"] for x in (out / "train.jsonl").read_text().splitlines()}
    assert kept == {"seed_0", "machine_2"}  # machine_3 lost all its instances
    hist = report["max_similarity_histogram"]
    assert hist["threshold"] == 0.7 and all(b["exact"] for b in hist["bins"])  # 2 candidates: all scored exactly
    assert sum(b["dropped"] for b in hist["bins"]) == 1 and hist["bins"][-1]["dropped"] == 1
    assert sum(b["kept"] for b in hist["bins"]) == 1
    with Image.open(out / "similarity.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 300


def test_chinese_instructions_kept_and_deduplicated_when_language_is_zh(tmp_path):
    tasks = [
        task(0, "请写一首关于秋天的诗", [("", "秋风起")], "seed"),
        task(1, "请写一首关于秋天的短诗", [("", "落叶")]),       # near-duplicate of the seed
        task(2, "解释光合作用的基本过程和意义", [("", "植物")]),
        task(3, "把下面的句子翻译成英文", [("你好", "Hello")]),
    ]
    path, out = write(tmp_path, tasks)
    filter_stage.run(out, pool=path.parent, config=config(language="zh", min_words=1))
    dropped = {d["id"]: d["reason"] for d in read(out / "dropped.jsonl")}
    assert dropped == {"machine_1": "ROUGE-L above 0.7"}
    # the same data as English: the non-English first character rule drops every Chinese instruction
    (tmp_path / "en").mkdir()
    path, out2 = write(tmp_path / "en", tasks)
    filter_stage.run(out2, pool=path.parent, config=config(language="en", min_words=1))
    reasons = {d["id"]: d["reason"] for d in read(out2 / "dropped.jsonl")}
    assert set(reasons.values()) == {"starts with a non-English character"}
