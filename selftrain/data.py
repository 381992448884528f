"""Prompt sets as their publishers ship them, normalised to one shape.

Accepted files: JSON Lines (`.jsonl`, or `.json` holding JSON Lines as `datasets`' `to_json` writes it), a JSON
array of records (`.json`), and Parquet (`.parquet`, as `datasets`' `to_parquet` and the hub's parquet conversion
write it). Accepted records: `messages` ([{role, content}]), `conversations` with role/content turns (LLM-jp's SFT
sets, e.g. llm-jp/magpie-sft-v1.0) or ShareGPT's from/value turns (with an optional top-level `system`), alpaca
(`instruction`/`input`/`output`) and `prompt`/`response`.

A normalised record is ``{"id": str, "messages": [...], "original": str}`` where ``messages`` is the
conversation up to (not including) the last assistant turn and ``original`` is that last turn: the
response the model was originally trained on.

What LLM-jp's own SFT preprocessing (llm-jp/instruct3 `preprocess_sft.py`) does before training is available as
params: a fixed system line put first in every example (`prompts.system` / `prompts.system_from`), and a seeded
shuffle of the whole set before any subset is taken (`prompts.shuffle`, `prompts.shuffle_seed`: Python's
`random.Random(seed).shuffle`, the generator `random.seed(42); random.shuffle(...)` uses there).
"""

from __future__ import annotations

import ast
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selftrain.io import DataError, raise_all, scan_jsonl
from selftrain.paths import resolve_path

if TYPE_CHECKING:
    from selftrain.config import RunConfig

ROLES = ("system", "user", "assistant")
# ShareGPT-style speaker names (matched case-insensitively): what LLaMA-Factory, FastChat and NVIDIA's
# Daring-Anteater ("User"/"Assistant") write in `from`.
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
            "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system"}  # fmt: skip
FORMATS = ".jsonl, .json (an array or JSON Lines) or .parquet"
SUFFIXES = (".jsonl", ".json", ".parquet")


class BlankRecord(DataError):
    """A record whose prompt or original response is blank: refused, or skipped when prompts.skip_blank."""


# ------------------------------------------------------------------------------------------- records


def _turns(turns: Any, key: str, where: str) -> list[dict[str, str]]:
    """`messages` / `conversations` turns -> [{role, content}]: role/content turns as they are, from/value turns
    (ShareGPT) with their speaker mapped to a role."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list")
    out = []
    for i, m in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content' (or ShareGPT's 'from' and 'value')")
        if "role" not in m and "from" in m:
            speaker = m["from"]
            role = SPEAKERS.get(speaker.lower()) if isinstance(speaker, str) else None
            if role is None:
                raise DataError(f"{at}.from is {speaker!r}, expected one of {sorted(set(SPEAKERS))}")
            if "value" not in m:
                raise DataError(f"{at} is missing field 'value'")
            content = m["value"]
        else:
            for field in ("role", "content"):
                if field not in m:
                    raise DataError(f"{at} is missing field '{field}'")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise DataError(f"{at}.role is {role!r}, expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{at}: the content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise DataError(f"{at} is a system message; only the first may be")
        out.append({"role": role, "content": content})
    return out


def _str_field(rec: dict, key: str, where: str, required: bool = True) -> str:
    if key not in rec or (rec[key] is None and not required):
        if required:
            raise DataError(f"{where}: missing field '{key}'")
        return ""
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def normalise_record(rec: dict, where: str) -> list[dict[str, str]]:
    """Any supported record -> a full conversation whose last turn is the assistant's."""
    if "messages" in rec:
        msgs = _turns(rec["messages"], "messages", where)
    elif "conversations" in rec:  # LLM-jp's SFT sets (role/content), ShareGPT (from/value)
        msgs = _turns(rec["conversations"], "conversations", where)
        system = _str_field(rec, "system", where, required=False)
        if system.strip() and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
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
            f"{where}: unknown record shape (fields {sorted(rec)}); expected 'messages', 'conversations', "
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


# ------------------------------------------------------------------------------------------- files


def _json_records(path: Path) -> tuple[list[tuple[str, int, dict]], list[str]]:
    """A .json file: a JSON array of objects, or JSON Lines (what `Dataset.to_json` writes by default)."""
    raw = path.read_bytes()
    head = raw.lstrip()[:1]
    if head != b"[":
        lines, errors = scan_jsonl(path)
        return [(f"{path}:{n}", n, rec) for n, rec in lines], errors
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return [], [f"{path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"]
    except json.JSONDecodeError as e:
        return [], [f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})"]
    good, bad = [], []
    for i, rec in enumerate(data):
        if isinstance(rec, dict):
            good.append((f"{path}[{i}]", i + 1, rec))
        else:
            bad.append(f"{path}[{i}]: expected a JSON object, got {type(rec).__name__}")
    return good, bad


def _parquet_records(path: Path) -> tuple[list[tuple[str, int, dict]], list[str]]:
    """A Parquet file, rows as dicts (nested lists of structs come back as lists of dicts)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        return [], [f"{path}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:160]})"]
    return [(f"{path}: row {i}", i + 1, rec) for i, rec in enumerate(rows)], []


def read_records(path: str | Path) -> tuple[list[tuple[str, int, dict]], list[str]]:
    """Every record of a prompt file as (where, position, record) and every unreadable record's error, all at
    once. `where` names the file and the line (JSONL), the array index (JSON) or the row (Parquet)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; a prompt set is one file ({FORMATS})")
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_records(path)
    if suffix == ".json":
        return _json_records(path)
    good, bad = scan_jsonl(path)
    return [(f"{path}:{n}", n, rec) for n, rec in good], bad


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and not path.endswith(SUFFIXES)


def prompt_files(path: str, hub_files: list[str] | None = None) -> list[Path]:
    """Local files behind prompts.path: one file, or files of a hub dataset already in the HF cache."""
    p = resolve_path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        raise DataError(f"{p}: is a folder; prompts.path must be one file ({FORMATS}) or a hub dataset id")
    if _looks_like_hub_id(path):
        how = (
            f"prompt set '{path}' is a hub dataset id that is not in the local Hugging Face cache. On a "
            f"machine with access run `huggingface-cli download {path} --repo-type dataset`, copy the "
            "cache here (or save the file under data/external/ and point prompts.path at it)"
        )
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(path, repo_type="dataset", local_files_only=True))
        except Exception:
            raise DataError(how) from None
        if not hub_files:
            raise DataError(f"prompt set '{path}': set prompts.hub_files to the files to read from it")
        files = [root / f for f in hub_files]
        for f in files:
            if not f.is_file():
                raise DataError(f"prompt set '{path}': file '{f.name}' listed in prompts.hub_files is not in {root}")
        return files
    raise DataError(f"{p}: prompt file not found")


def prompt_inputs(path: str, hub_files: list[str] | None, system_from: str | None) -> list[Path]:
    """Every file whose content shapes a run's prompts: the prompt files and the system line's source."""
    files = prompt_files(path, hub_files)
    if system_from:
        files.append(_system_source(system_from)[0])
    return files


# ------------------------------------------------------------------------------------------- system line


def _system_source(source: str) -> tuple[Path, str]:
    """'FILE.py:NAME' -> (FILE, NAME); a plain file -> (file, '')."""
    file, sep, name = source.rpartition(":")
    if not sep or not name.isidentifier():
        return resolve_path(source), ""
    return resolve_path(file), name


def read_system_line(source: str) -> str:
    """prompts.system_from: 'FILE.py:NAME' (a string constant assigned at the top level of a Python file, e.g.
    NO_INPUT_PROMPT in a checkout of llm-jp/instruct3's preprocess_sft.py) or a text file (its content, without
    the final newline). Read at run time from the user's own copy: the line is theirs, not shipped here."""
    path, name = _system_source(source)
    if not path.is_file():
        raise DataError(f"prompts.system_from: {path} not found")
    text = path.read_text(encoding="utf-8")
    if not name:
        return text.removesuffix("\n")
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise DataError(f"prompts.system_from: {path}:{e.lineno}: not valid Python ({e.msg})") from None
    value: ast.expr | None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
            raise DataError(f"prompts.system_from: {path}:{node.lineno}: {name} is not a string constant")
    raise DataError(f"prompts.system_from: {path} assigns no top-level {name}")


def check_sources(cfg: RunConfig) -> None:
    """What the prompt params point at outside the repository, checked before any cell runs (a ConfigError naming
    the key): prompts.system_from's file and constant."""
    from selftrain.config import ConfigError

    if cfg.prompts.system_from:
        try:
            read_system_line(cfg.prompts.system_from)
        except DataError as e:
            raise ConfigError(str(e)) from None


def system_line(system: str | None, system_from: str | None) -> str | None:
    """The system line every prompt without one gets: prompts.system, or read through prompts.system_from."""
    return read_system_line(system_from) if system_from else system


# ------------------------------------------------------------------------------------------- loading


def load_prompt_set(
    path: str | Path,
    limit: int | None = None,
    hub_files: list[str] | None = None,
    skip_blank: bool = False,
    system: str | None = None,
    shuffle_seed: int | None = None,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a prompt set (files as prompt_files finds them) and normalise every record; ids must be unique.

    Every bad record of every file is reported at once (one DataError, each as file:line: why). Records with a
    blank prompt or response are errors too, or skipped and counted with skip_blank. Then, in LLM-jp's order: the
    `system` line first in every conversation that has none, a shuffle with `shuffle_seed` (None: file order),
    and only then the first `limit` records (from record `offset`: a round's slice or the held-out slice of a study
    with rounds; the set must hold them all). Returns (records, facts: counts of each step)."""
    out: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    errors: list[str] = []
    skipped = 0
    for p in prompt_files(str(path), hub_files):
        good, bad = read_records(p)
        errors += bad
        for where, pos, rec in good:
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
            rid = rec.get("id", f"{p.stem}-{pos}")
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
    added = 0
    if system is not None:
        for r in out:
            if r["messages"][0]["role"] != "system":
                r["messages"].insert(0, {"role": "system", "content": system})
                added += 1
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(out)
    facts = {"records": len(out), "skipped_blank_records": skipped, "system_added": added,
             "system_kept": len(out) - added if system is not None else None, "shuffle_seed": shuffle_seed,
             "limit": limit}  # fmt: skip
    if offset:
        end = offset + limit if limit is not None else len(out)
        if end > len(out):
            why = "a study with rounds: rounds.prompts disjoint and rounds.heldout take slices after prompts.limit"
            raise DataError(f"{path}: {len(out)} records; records {offset}..{end - 1} are asked for ({why})")
        facts["offset"] = offset
    kept = out[offset : offset + limit] if limit is not None else out[offset:]
    facts["used"] = len(kept)
    return kept, facts


def load_prompts(
    path: str | Path, limit: int | None = None, hub_files: list[str] | None = None, skip_blank: bool = False
) -> list[dict[str, Any]]:
    """The normalised records of a prompt set (see load_prompt_set)."""
    return load_prompt_set(path, limit, hub_files, skip_blank)[0]


# ------------------------------------------------------------------------------------------- context guard


def fit_context(
    prompts: list[dict[str, Any]], count: Callable[[list[dict[str, str]]], int], budget: int, mode: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Keep every prompt whose rendered tokens (`count` of its messages) fit `budget`: the model's context less
    the answer's max_new_tokens. Longer ones are skipped (mode 'skip'), or (mode 'truncate') lose their oldest
    turns and then the start of their last user message until they fit (a prompt whose system line alone does
    not fit is skipped all the same). Returns (prompts, {"skipped_long": [ids], "truncated": [ids]})."""
    kept, skipped, truncated = [], [], []
    for p in prompts:
        if count(p["messages"]) <= budget:
            kept.append(p)
            continue
        short = _truncate(p["messages"], count, budget) if mode == "truncate" else None
        if short is None:
            skipped.append(p["id"])
        else:
            kept.append({**p, "messages": short})
            truncated.append(p["id"])
    return kept, {"skipped_long": skipped, "truncated": truncated}


def _truncate(
    msgs: list[dict[str, str]], count: Callable[[list[dict[str, str]]], int], budget: int
) -> list[dict[str, str]] | None:
    head = msgs[:1] if msgs[0]["role"] == "system" else []
    turns = msgs[len(head) :]
    while len(turns) > 1 and count(head + turns) > budget:  # oldest (user, assistant) pairs first
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    if count(head + turns) <= budget:
        return head + turns
    last = turns[-1]["content"]
    lo, hi = 0, len(last)  # the smallest cut from the left that fits: binary search on characters
    while lo < hi:
        mid = (lo + hi) // 2
        if count([*head, *turns[:-1], {**turns[-1], "content": last[mid:]}]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if lo >= len(last) or not last[lo:].strip():
        return None
    return [*head, *turns[:-1], {**turns[-1], "content": last[lo:]}]


def run_prompt_set(
    cfg: RunConfig, count: Callable[[list[dict[str, str]]], int] | None = None, heldout: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A run's prompts, the one way stages 01 and 02 (and `selftrain shard`) read them: prompts.* applied in
    LLM-jp's order (system line, shuffle, limit), then, given the model's token `count` of a conversation
    (inference.prompt_token_counter), the context guard (tokens of the rendered prompt + generation.max_new_tokens
    within model.max_model_len; prompts.too_long). Returns (prompts, facts for generate.json). In a study with
    rounds: the round's slice (RunConfig.prompt_window), or with heldout=True the held-out prompts whose original
    responses' perplexity is a drift monitor (RunConfig.heldout_window)."""
    pc = cfg.prompts
    system = system_line(pc.system, pc.system_from)
    offset, limit = cfg.heldout_window() if heldout else cfg.prompt_window()
    prompts, facts = load_prompt_set(
        pc.path, limit, pc.hub_files, pc.skip_blank, system, pc.shuffle_seed if pc.shuffle else None, offset
    )
    facts["system_from"] = pc.system_from
    if count is not None:
        budget = cfg.model.max_model_len - cfg.generation.max_new_tokens
        prompts, guard = fit_context(prompts, count, budget, pc.too_long)
        facts.update(guard, prompt_token_budget=budget)
        if not prompts:
            raise DataError(
                f"{pc.path}: no prompt fits model.max_model_len {cfg.model.max_model_len} with "
                f"generation.max_new_tokens {cfg.generation.max_new_tokens} (all {len(guard['skipped_long'])} too long)"
            )
    return prompts, facts
