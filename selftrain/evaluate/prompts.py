"""Benchmark prompts in llm-jp-eval's layout, shortened (fewer few-shots) only when a prompt would not fit."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from selftrain.config import EvalMarkers


def build_prompt(
    instruction: str,
    few_shots: Sequence[Mapping[str, str]],
    input_text: str,
    preamble: str,
    markers: EvalMarkers,
) -> str:
    """llm-jp-eval v1.3.0's prompt: preamble, instruction, the given few-shots, then the input (no answer)."""
    text = f"{preamble}\n\n" if preamble else ""
    text += f"{markers.instruction}\n{instruction}"
    for shot in few_shots:
        text += f"\n\n{markers.input}\n{shot['input']}\n\n{markers.response}\n{shot['output']}"
    return text + f"\n\n{markers.input}\n{input_text}\n\n{markers.response}\n"


def chat_turns(instruction: str, few_shots: Sequence[Mapping[str, str]], input_text: str) -> list[dict[str, str]]:
    """eval.chat_layout turns: the instruction as the system turn, each few-shot as a user turn and the assistant's
    answer, then the input as the last user turn (a chat model answers it as the few-shots were answered)."""
    turns = [{"role": "system", "content": instruction}]
    for shot in few_shots:
        turns += [{"role": "user", "content": shot["input"]}, {"role": "assistant", "content": shot["output"]}]
    return [*turns, {"role": "user", "content": input_text}]


def fit_prompt(
    render: Callable[[Sequence[Mapping[str, str]]], Any],
    shots: Sequence[Mapping[str, str]],
    output_length: int,
    count_tokens: Callable[[Any], int],
    max_len: int,
    shorten: bool = True,
) -> tuple[Any, int, bool]:
    """The prompt with the given few-shots, and with shorten=True fewer (k lowered) until prompt + output
    fit in max_len. Returns (prompt, k used, fits).

    llm-jp-eval does not shorten (its datasets fit 4k-token models), so its protocols pass shorten=False: a
    prompt that does not fit is counted and scored as an empty answer. The own protocol shortens so that a
    small model's context does not crash the stage; every shortened prompt is counted."""
    k = len(shots)
    while True:
        prompt = render(shots[:k])
        if count_tokens(prompt) + output_length <= max_len:
            return prompt, k, True
        if k == 0 or not shorten:
            return prompt, k, False
        k -= 1


def token_counter(tok: Any, chat: bool) -> Callable[[Any], int]:
    """Tokens of a prompt as the backend will see it: a string (plain, or one user turn through the chat template),
    or a list of chat turns (eval.chat_layout turns)."""
    if chat:

        def count(prompt: str | list[dict[str, str]]) -> int:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return len(tok(text, add_special_tokens=False)["input_ids"])

        return count
    return lambda prompt: len(tok(prompt)["input_ids"])


def bos_prefix(tok: Any, backend: str, chat: bool, add_bos: bool = True) -> str:
    # llm-jp-eval tokenises plain prompts with the tokenizer's special tokens (BOS for llm-jp-3), and so does
    # vLLM; our transformers backend encodes prompt strings without them, so the BOS goes into the text.
    if not add_bos or chat or backend != "transformers" or tok.bos_token is None:
        return ""
    ids = tok("a")["input_ids"]
    return tok.bos_token if ids and ids[0] == tok.bos_token_id else ""
