"""Prompt loading: every accepted shape normalises to messages; malformed records name file and line."""

from __future__ import annotations

import json
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
    many = _write(tmp_path, ["oops"] * 30, name="many.jsonl")
    with pytest.raises(DataError, match=r"30 bad record\(s\)[\s\S]*and 10 more"):
        load_prompts(many)


def test_blank_records_can_be_skipped_and_are_counted(tmp_path: Path) -> None:
    from selftrain.data import load_prompt_set

    p = _write(tmp_path, ['{"prompt": "q", "response": "a"}', '{"prompt": "\\t", "response": "a"}',
                          '{"prompt": "q2", "response": "  "}'])  # fmt: skip
    recs, skipped = load_prompt_set(p, skip_blank=True)
    assert [r["original"] for r in recs] == ["a"] and skipped == 2


def test_undecodable_bytes_and_a_folder_are_named(tmp_path: Path) -> None:
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "q", "response": "a"}\n{"prompt": "caf\xe9", "response": "a"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at offset 15 of the line\)"):
        load_prompts(p)
    with pytest.raises(DataError, match="is a folder"):
        load_prompts(tmp_path)
