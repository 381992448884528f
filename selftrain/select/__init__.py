"""Stage 02, select: score each prompt's pool (the candidates and the original) by a pairwise utility and apply a
method; write the SFT and DPO data.

Modules: ``stage`` (the selection maths, the methods, the stage function and its views), ``utilities`` (the
registry of pairwise utilities `selection.utility` names: self-embedding, embedder, chrF, judge), ``similarity``
(embedder and chrF similarities, centring), ``judge_utility`` (a judge's scores or preferences as a utility). The
names a notebook or a test needs are re-exported here.
"""

from selftrain.select.stage import (
    STAGE,
    centrality,
    centrality_from_sim,
    control_pick,
    plot_selection,
    run,
    select,
    summarise,
)
from selftrain.select.utilities import UTILITIES, embed_responses, question_text

__all__ = [
    "STAGE", "UTILITIES", "centrality", "centrality_from_sim", "control_pick", "embed_responses", "plot_selection",
    "question_text", "run", "select", "summarise",
]  # fmt: skip
