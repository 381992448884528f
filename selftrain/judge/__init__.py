"""Stage 05, judge: the model under test answers the quality and safety sets and a judge scores each answer.

Modules: ``parse`` (scores out of a judge's text or probabilities), ``api`` (the OpenAI-compatible endpoint
client), ``clients`` (local and endpoint judges behind one interface), ``llmjp`` (judge.protocol=llm-jp-judge:
prompts, extraction and accounting read from the user's llm-jp-judge checkout), ``stage`` (answers, scoring,
summary, the stage function and its views). The names a notebook or a test needs are re-exported here.
"""

from selftrain.graders.clients import LocalJudge, RemoteJudge, judge_messages, make_judge
from selftrain.graders.parse import DIGITS, LABELS, ParseError, expected_from_tokens, expected_score, parse_scores
from selftrain.judge.stage import (
    SETS,
    STAGE,
    criteria_table,
    items_frame,
    llm_jp_judge_table,
    load_items,
    load_rubric,
    plot_quality,
    plot_safety,
    run,
    run_shard,
    score_items,
    summarise,
    summary_frame,
)

__all__ = [
    "DIGITS", "LABELS", "SETS", "STAGE", "LocalJudge", "ParseError", "RemoteJudge", "criteria_table",
    "expected_from_tokens", "expected_score", "items_frame", "judge_messages", "llm_jp_judge_table", "load_items",
    "load_rubric", "make_judge", "parse_scores", "plot_quality", "plot_safety", "run", "run_shard", "score_items",
    "summarise", "summary_frame",
]  # fmt: skip
