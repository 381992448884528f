"""Benchmark prompts in llm-jp-eval's layout, shortened (fewer few-shots) only when a prompt would not fit."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from selftrain.config import EvalConfig, EvalMarkers
from selftrain.evaluate.datasets import Dataset


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


def fit_prompt(
    dataset: Dataset, input_text: str, cfg: EvalConfig, count_tokens: Callable[[str], int], max_len: int
) -> tuple[str, int, bool]:
    """The prompt with the first k few-shots, k lowered until prompt + output_length fit in max_len.

    Returns (prompt, k used, fits). llm-jp-eval does not shorten (its datasets fit 4k-token models); here
    a small model's context must not crash the whole stage, and every shortened prompt is counted.
    """
    k = min(cfg.num_few_shots, len(dataset.few_shots))
    while True:
        prompt = build_prompt(dataset.instruction, dataset.few_shots[:k], input_text, cfg.preamble, cfg.markers)
        if count_tokens(prompt) + dataset.output_length <= max_len:
            return prompt, k, True
        if k == 0:
            return prompt, 0, False
        k -= 1


def token_counter(tok: Any, chat: bool) -> Callable[[str], int]:
    if chat:

        def count(prompt: str) -> int:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return len(tok(text, add_special_tokens=False)["input_ids"])

        return count
    return lambda prompt: len(tok(prompt)["input_ids"])


def bos_prefix(tok: Any, backend: str, chat: bool) -> str:
    # llm-jp-eval tokenises plain prompts with the tokenizer's special tokens (BOS for llm-jp-3), and so does
    # vLLM; our transformers backend encodes prompt strings without them, so the BOS goes into the text.
    if chat or backend != "transformers" or tok.bos_token is None:
        return ""
    ids = tok("a")["input_ids"]
    return tok.bos_token if ids and ids[0] == tok.bos_token_id else ""
