"""Prompt loading: every accepted shape normalises to messages; malformed records name file and line."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from selftrain.data import load_prompts
from selftrain.io import DataError

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, lines: list[str], name: str = "set.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_all_shapes_normalise(prompts_file: Path) -> None:
    recs = {r["id"]: r for r in load_prompts(prompts_file)}
    assert recs["p1"]["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert recs["p1"]["original"] == "The capital of France is Paris."
    assert recs["p2"]["messages"][0]["role"] == "system"
    assert recs["p3"]["messages"] == [{"role": "user", "content": "Add the numbers.\n\n12 and 30"}]
    assert recs["p3"]["original"] == "42"
    assert recs["p4"]["messages"][0]["content"] == "Name a colour of the sky." and recs["p4"]["original"] == "Blue."
    assert [m["role"] for m in recs["p5"]["messages"]] == ["user", "assistant", "user"]
    assert recs["p5"]["original"] == "Eight."


def test_limit_and_default_ids(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps({"prompt": f"q{i}", "response": "a"}) for i in range(5)])
    recs = load_prompts(p, limit=3)
    assert [r["id"] for r in recs] == ["set-1", "set-2", "set-3"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "hi"}', "unknown record shape"),
        ('{"instruction": "x"}', "missing field 'output'"),
        ('{"prompt": "x"}', "missing field 'response'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', "missing field 'content'"),
        ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}', "role is 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}', "is blank"),
        ('{"instruction": 3, "output": "a"}', "must be a string"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps({"prompt": "q", "response": "a"})
    p = _write(tmp_path, [good, "", line])
    with pytest.raises(DataError) as e:
        load_prompts(p)
    assert f"{p}:3" in str(e.value) and message in str(e.value)


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    rec = json.dumps({"id": "x", "prompt": "q", "response": "a"})
    with pytest.raises(DataError, match="duplicate id 'x'"):
        load_prompts(_write(tmp_path, [rec, rec]))


def test_missing_file_and_hub_id(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="prompt file not found"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="huggingface-cli download llm-jp/magpie-sft-v1.0"):
        load_prompts("llm-jp/magpie-sft-v1.0")


def test_demo_prompt_set() -> None:
    recs = load_prompts(ROOT / "data" / "demo" / "prompts.jsonl")
    assert len(recs) >= 100
    raw = [json.loads(x) for x in (ROOT / "data" / "demo" / "prompts.jsonl").read_text().splitlines() if x.strip()]
    cats = Counter(r["category"] for r in raw)
    assert {"advice", "explanation", "list", "writing", "reasoning", "unsafe"} <= set(cats)
    assert cats["unsafe"] >= 10
    assert any(r["messages"][0]["role"] == "system" for r in recs)
    assert any(sum(m["role"] == "user" for m in r["messages"]) > 1 for r in recs)


# ------------------------------------------------------------------------------------------- many bad inputs at once


def test_every_bad_record_is_reported_at_once(tmp_path: Path) -> None:
    good = '{"prompt": "Name a colour.", "response": "Blue."}'
    lines = [good, '{"prompt": "q"}', "not json", good, '{"prompt": " ", "response": "a"}', "[1]", good]
    p = _write(tmp_path, lines)
    with pytest.raises(DataError) as e:
        load_prompts(p)
    msg = str(e.value)
    assert msg.startswith(f"4 bad record(s) in {p}:")
    for line, why in ((2, "missing field 'response'"), (3, "not valid JSON"), (5, "the user prompt is blank"),
                      (6, "expected a JSON object")):  # fmt: skip
        assert f"{p}:{line}: {why}" in msg
    # in file order, though the JSON errors are found in a pass before the shape errors
    assert [int(x.split(":")[-2]) for x in re.findall(rf"{re.escape(str(p))}:\d+:", msg)] == [2, 3, 5, 6]
    many = _write(tmp_path, ["oops"] * 30, name="many.jsonl")
    with pytest.raises(DataError, match=r"30 bad record\(s\)[\s\S]*and 10 more"):
        load_prompts(many)


def test_blank_records_can_be_skipped_and_are_counted(tmp_path: Path) -> None:
    from selftrain.data import load_prompt_set

    p = _write(tmp_path, ['{"prompt": "q", "response": "a"}', '{"prompt": "\\t", "response": "a"}',
                          '{"prompt": "q2", "response": "  "}'])  # fmt: skip
    recs, facts = load_prompt_set(p, skip_blank=True)
    assert [r["original"] for r in recs] == ["a"] and facts["skipped_blank_records"] == 2


def test_undecodable_bytes_and_a_folder_are_named(tmp_path: Path) -> None:
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "q", "response": "a"}\n{"prompt": "caf\xe9", "response": "a"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at offset 15 of the line\)"):
        load_prompts(p)
    with pytest.raises(DataError, match="is a folder"):
        load_prompts(tmp_path)


# ------------------------------------------------------------------------------------------- publishers' shapes

# Rows of our own in the shapes LLM-jp and others ship: LLM-jp's SFT sets (llm-jp/magpie-sft-v1.0: an integer id and
# role/content `conversations`), ShareGPT (from/value, an optional top-level system), and the same as a JSON array
# and as Parquet written by `datasets`.
MAGPIE = [
    {"id": 0, "conversations": [{"role": "user", "content": "Name two rivers in Japan."},
                                {"role": "assistant", "content": "The Shinano and the Tone."}]},
    {"id": 1, "conversations": [{"role": "user", "content": "How many minutes are in a day?"},
                                {"role": "assistant", "content": "1,440 minutes."},
                                {"role": "user", "content": "And seconds?"},
                                {"role": "assistant", "content": "86,400 seconds."}]},
]  # fmt: skip
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Suggest a name for a cat."}, {"from": "gpt", "value": "Miso."}]},
    {"system": "Reply in one word.", "conversations": [{"from": "User", "value": "Colour of grass?"},
                                                       {"from": "Assistant", "value": "Green."}]},
]  # fmt: skip


def test_llm_jp_conversations_records_load(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps(r, ensure_ascii=False) for r in MAGPIE], name="magpie.jsonl")
    recs = load_prompts(p)
    assert [r["id"] for r in recs] == ["0", "1"]
    assert recs[0]["messages"] == [{"role": "user", "content": "Name two rivers in Japan."}]
    assert recs[0]["original"] == "The Shinano and the Tone."
    assert [m["role"] for m in recs[1]["messages"]] == ["user", "assistant", "user"]
    assert recs[1]["original"] == "86,400 seconds."
    # Without an id, the file's stem and line name the record, as for the other shapes.
    q = _write(tmp_path, [json.dumps({"conversations": MAGPIE[0]["conversations"]})], name="noid.jsonl")
    assert load_prompts(q)[0]["id"] == "noid-1"


def test_sharegpt_records_load_with_their_system_line(tmp_path: Path) -> None:
    p = _write(tmp_path, [json.dumps(r) for r in SHAREGPT], name="sharegpt.jsonl")
    recs = load_prompts(p)
    assert recs[0]["messages"] == [{"role": "user", "content": "Suggest a name for a cat."}]
    assert recs[0]["original"] == "Miso."
    assert recs[1]["messages"] == [{"role": "system", "content": "Reply in one word."},
                                   {"role": "user", "content": "Colour of grass?"}]  # fmt: skip
    assert recs[1]["original"] == "Green."


def test_json_arrays_json_lines_and_parquet_as_datasets_writes_them(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [{"id": str(r["id"]), "conversations": r["conversations"]} for r in MAGPIE]
    array = tmp_path / "set.json"
    array.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    ds = Dataset.from_list(rows)
    lines = tmp_path / "lines.json"
    ds.to_json(str(lines))  # `datasets` writes JSON Lines under a .json name by default
    parquet = tmp_path / "set.parquet"
    ds.to_parquet(str(parquet))
    expected = load_prompts(_write(tmp_path, [json.dumps(r) for r in rows], name="ref.jsonl"))
    for path in (array, lines, parquet):
        assert load_prompts(path) == expected, path


def test_bad_records_in_arrays_and_parquet_name_their_place(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    array = tmp_path / "bad.json"
    array.write_text(json.dumps([MAGPIE[0], 7, {"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(DataError) as e:
        load_prompts(array)
    msg = str(e.value)
    assert msg.startswith(f"2 bad record(s) in {array}")
    assert f"{array}[1]: expected a JSON object" in msg
    assert f"{array}[2]: conversations[0].from is 'robot'" in msg
    table = pa.table({"conversations": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                        [{"role": "user", "content": "q2"}]]})  # fmt: skip
    parquet = tmp_path / "bad.parquet"
    pq.write_table(table, parquet)
    with pytest.raises(DataError, match=rf"{parquet}: row 1: the last message must be the assistant"):
        load_prompts(parquet)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_prompts(broken)
    unclosed = tmp_path / "unclosed.json"
    unclosed.write_text('[{"prompt": "q", "response": "a"},\n')
    with pytest.raises(DataError, match=rf"{unclosed}:2: not valid JSON"):
        load_prompts(unclosed)


def test_system_line_shuffle_then_limit_in_llm_jp_order(tmp_path: Path) -> None:
    import random

    from selftrain.data import load_prompt_set

    rows = [{"id": f"r{i}", "prompt": f"question {i}", "response": f"answer {i}"} for i in range(30)]
    own = [{"role": "system", "content": "Own line."}, {"role": "user", "content": "q"}]
    rows[3] = {"id": "r3", "messages": [*own, {"role": "assistant", "content": "a"}]}
    p = _write(tmp_path, [json.dumps(r) for r in rows])
    recs, facts = load_prompt_set(p, limit=5, system="A fixed line.", shuffle_seed=42)
    # The order LLM-jp's preprocessing gives: random.seed(42); random.shuffle(all records); then a subset.
    order = [r["id"] for r in rows]
    random.seed(42)
    random.shuffle(order)
    assert [r["id"] for r in recs] == order[:5]
    assert facts == {"records": 30, "skipped_blank_records": 0, "system_added": 29, "system_kept": 1,
                     "shuffle_seed": 42, "limit": 5, "used": 5}  # fmt: skip
    for r in recs:
        want = "Own line." if r["id"] == "r3" else "A fixed line."
        assert r["messages"][0] == {"role": "system", "content": want}
    plain, _ = load_prompt_set(p, limit=5)
    assert [r["id"] for r in plain] == ["r0", "r1", "r2", "r3", "r4"]  # no shuffle: file order, no system line
    assert plain[0]["messages"][0]["role"] == "user"


def test_system_line_read_from_the_users_file(tmp_path: Path) -> None:
    from selftrain.data import read_system_line

    src = tmp_path / "preprocess.py"
    src.write_text('import json\n\nLINE: str = "unused"\nSYSTEM_LINE = "Answer the task below."\nOTHER = 3\n')
    assert read_system_line(f"{src}:SYSTEM_LINE") == "Answer the task below."
    text = tmp_path / "system.txt"
    text.write_text("A line from a text file.\n")
    assert read_system_line(str(text)) == "A line from a text file."
    with pytest.raises(DataError, match=rf"{src}:5: OTHER is not a string constant"):
        read_system_line(f"{src}:OTHER")
    with pytest.raises(DataError, match="assigns no top-level MISSING"):
        read_system_line(f"{src}:MISSING")
    with pytest.raises(DataError, match="not found"):
        read_system_line(f"{tmp_path / 'nope.py'}:X")


def test_system_from_is_checked_before_any_cell_runs(tmp_path: Path) -> None:
    from selftrain.config import ConfigError, resolve_run_config
    from selftrain.runner import run_study

    bad = f"prompts.system_from={tmp_path / 'nope.py'}:LINE"
    ov = [f"output.results_dir={tmp_path / 'results'}", bad]
    with pytest.raises(ConfigError, match=r"no cell was run[\s\S]*prompts.system_from: .*nope.py not found"):
        run_study("params/studies/tiny.yaml", overrides=ov)
    assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match="prompts.system or prompts.system_from, not both"):
        resolve_run_config("tiny", "central", overrides=["prompts.system=x", f"prompts.system_from={tmp_path}/a:B"])


def test_context_guard_skips_or_truncates_and_counts() -> None:
    from selftrain.data import fit_context

    def count(msgs: list[dict]) -> int:  # one token per word plus two per turn, like a template's markers
        return sum(len(m["content"].split()) + 2 for m in msgs)

    short = {"id": "s", "messages": [{"role": "user", "content": "one two"}], "original": "x"}
    long_turns = {"id": "t", "messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "w " * 30},
        {"role": "assistant", "content": "v " * 30}, {"role": "user", "content": "last question here"}],
        "original": "x"}  # fmt: skip
    long_one = {"id": "o", "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(50))}],
                "original": "x"}  # fmt: skip
    kept, facts = fit_context([short, long_turns, long_one], count, 20, "skip")
    assert [p["id"] for p in kept] == ["s"] and facts == {"skipped_long": ["t", "o"], "truncated": []}
    kept, facts = fit_context([short, long_turns, long_one], count, 20, "truncate")
    assert [p["id"] for p in kept] == ["s", "t", "o"] and facts == {"skipped_long": [], "truncated": ["t", "o"]}
    t = kept[1]["messages"]
    assert t == [{"role": "system", "content": "sys"}, {"role": "user", "content": "last question here"}]
    o = kept[2]["messages"][0]["content"]
    assert count(kept[2]["messages"]) <= 20 and o.endswith("w49") and "w0 " not in o  # the start was cut
    too_long_system = {"id": "y", "messages": [{"role": "system", "content": "s " * 40},
                                               {"role": "user", "content": "q"}], "original": "x"}  # fmt: skip
    kept, facts = fit_context([too_long_system], count, 20, "truncate")
    assert kept == [] and facts["skipped_long"] == ["y"]
