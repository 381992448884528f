"""Prompt sets: read messages / alpaca / prompt-response records and normalise them to one shape.

A normalised record is ``{"id": str, "messages": [...], "original": str}`` where ``messages`` is the
conversation up to (not including) the last assistant turn and ``original`` is that last turn: the
response the model was originally trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selftrain.io import DataError, raise_all, scan_jsonl
from selftrain.paths import resolve_path

ROLES = ("system", "user", "assistant")


class BlankRecord(DataError):
    """A record whose prompt or original response is blank: refused, or skipped when prompts.skip_blank."""


def _from_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: messages[{i}] is missing field '{key}'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {m['role']!r}, expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: messages[{i}] is a system message; only the first may be")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _str_field(rec: dict, key: str, where: str, required: bool = True) -> str:
    if key not in rec:
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def normalise_record(rec: dict, where: str) -> list[dict[str, str]]:
    """Any supported record -> a full conversation whose last turn is the assistant's."""
    if "messages" in rec:
        msgs = _from_messages(rec["messages"], where)
    elif "instruction" in rec:  # alpaca
        instruction = _str_field(rec, "instruction", where)
        extra = _str_field(rec, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _str_field(rec, "output", where)}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": _str_field(rec, "system", where)})
    elif "prompt" in rec:
        msgs = [
            {"role": "user", "content": _str_field(rec, "prompt", where)},
            {"role": "assistant", "content": _str_field(rec, "response", where)},
        ]
    else:
        raise DataError(
            f"{where}: unknown record shape (fields {sorted(rec)}); expected 'messages', "
            "'instruction'/'input'/'output' or 'prompt'/'response'"
        )
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's original response")
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: no user message")
    if not msgs[-1]["content"].strip():
        raise BlankRecord(f"{where}: the original (last assistant) response is blank")
    last_user = next(m for m in reversed(msgs) if m["role"] == "user")
    if not last_user["content"].strip():
        raise BlankRecord(f"{where}: the user prompt is blank")
    return msgs


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not path.endswith((".jsonl", ".json"))


def prompt_files(path: str, hub_files: list[str] | None = None) -> list[Path]:
    """Local files behind prompts.path: a JSONL file, or files of a hub dataset already in the HF cache."""
    p = resolve_path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        raise DataError(f"{p}: is a folder; prompts.path must be a JSONL file (or a hub dataset id)")
    if _looks_like_hub_id(path):
        how = (
            f"prompt set '{path}' is a hub dataset id that is not in the local Hugging Face cache. On a "
            f"machine with access run `huggingface-cli download {path} --repo-type dataset`, copy the "
            "cache here (or save the JSONL under data/external/ and point prompts.path at it)"
        )
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(path, repo_type="dataset", local_files_only=True))
        except Exception:
            raise DataError(how) from None
        if not hub_files:
            raise DataError(f"prompt set '{path}': set prompts.hub_files to the JSONL files to read from it")
        files = [root / f for f in hub_files]
        for f in files:
            if not f.is_file():
                raise DataError(f"prompt set '{path}': file '{f.name}' listed in prompts.hub_files is not in {root}")
        return files
    raise DataError(f"{p}: prompt file not found")


def load_prompt_set(
    path: str | Path, limit: int | None = None, hub_files: list[str] | None = None, skip_blank: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Read a prompt set (JSONL, or a cached hub dataset) and normalise every record; ids must be unique.

    Every bad record of every file is reported at once (one DataError, each line as file:line: why). Records
    with a blank prompt or response are errors too, or skipped and counted with skip_blank. Returns (records,
    number skipped)."""
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    errors: list[str] = []
    skipped = 0
    for p in prompt_files(str(path), hub_files):
        good, bad = scan_jsonl(p)
        errors += bad
        for lineno, rec in good:
            where = f"{p}:{lineno}"
            try:
                msgs = normalise_record(rec, where)
            except BlankRecord as e:
                if skip_blank:
                    skipped += 1
                else:
                    errors.append(f"{e} (prompts.skip_blank: true skips such records)")
                continue
            except DataError as e:
                errors.append(str(e))
                continue
            rid = rec.get("id", f"{p.stem}-{lineno}")
            if not isinstance(rid, str | int) or isinstance(rid, bool):
                errors.append(f"{where}: field 'id' must be a string or an integer")
                continue
            rid = str(rid)
            if rid in seen:
                errors.append(f"{where}: duplicate id {rid!r} (first at {seen[rid]})")
                continue
            seen[rid] = where
            out.append({"id": rid, "messages": msgs[:-1], "original": msgs[-1]["content"]})
    raise_all(errors, str(path))
    if not out:
        raise DataError(f"{path}: no records")
    return (out[:limit] if limit is not None else out), skipped


def load_prompts(
    path: str | Path, limit: int | None = None, hub_files: list[str] | None = None, skip_blank: bool = False
) -> list[dict[str, Any]]:
    """The normalised records of a prompt set (see load_prompt_set)."""
    return load_prompt_set(path, limit, hub_files, skip_blank)[0]
