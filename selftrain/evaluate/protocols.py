"""Stage 06 protocols: `own` (this project's prompt and rules) or one llm-jp-eval version's rules, exactly.

A protocol fixes where few-shots come from, the prompt layout, BOS, answer extraction, each dataset's main
metric, the category map and the AVG rule. The llm-jp-eval rules are data (``params/eval/<protocol>.yaml``);
the prompt texts are llm-jp-eval's and stay in the user's checkout (``eval.llm_jp_eval_dir``), read at run
time: v1.x from ``get_evaluation_prompt`` in ``src/llm_jp_eval/utils.py`` (parsed, never imported: importing
it loads COMET), v2 from the Jinja templates of ``src/llm_jp_eval/prompts.py``.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selftrain.config import ConfigError, EvalConfig, EvalProtocolSpec, load_eval_protocol
from selftrain.evaluate.datasets import V2_FIELDS, Dataset, _pairs
from selftrain.evaluate.metrics import normalize, prepare_prediction
from selftrain.io import DataError, read_json
from selftrain.paths import resolve_path
from selftrain.provenance import git_commit


class ProtocolError(DataError):
    """The declared protocol does not fit the files (tree, dataset format, checkout); names file and fields."""


# ------------------------------------------------------------------------------------------- prompt layouts


@dataclass(frozen=True)
class V1Layout:
    """llm-jp-eval v1.x's prompt: head (with {instruction}), one shot block per few-shot (with {input} and
    {output}), tail (with {input}); read from the checkout, never shipped."""

    head: str
    shot: str
    tail: str

    def render(self, instruction: str, shots: Sequence[dict[str, str]], input_text: str) -> str:
        # Literal substitution, not str.format: instructions and inputs may hold braces.
        text = self.head.replace("{instruction}", instruction)
        for s in shots:
            text += self.shot.replace("{input}", s["input"]).replace("{output}", s["output"])
        return text + self.tail.replace("{input}", input_text)


def _fstring_template(node: ast.AST, names: dict[str, str], where: str) -> str:
    """An f-string or string constant as a template: each {expr} named in `names` becomes its placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if not isinstance(node, ast.JoinedStr):
        raise ProtocolError(f"{where}: expected a string or an f-string, found {type(node).__name__}")
    out = []
    for part in node.values:
        if isinstance(part, ast.Constant):
            out.append(str(part.value))
        elif isinstance(part, ast.FormattedValue):
            expr = ast.unparse(part.value)
            if expr not in names:
                raise ProtocolError(f"{where}: unexpected placeholder {{{expr}}} in the prompt")
            out.append(names[expr])
    return "".join(out)


def read_v1_layout(checkout: Path) -> V1Layout:
    """Parse get_evaluation_prompt's default branch (no custom template) in the checkout's utils.py."""
    path = checkout / "src" / "llm_jp_eval" / "utils.py"
    if not path.is_file():
        raise ProtocolError(f"{path}: not found; eval.llm_jp_eval_dir must be an llm-jp-eval v1.x checkout")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    fn = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "get_evaluation_prompt"), None)
    where = f"{path}: get_evaluation_prompt"
    if fn is None:
        raise ProtocolError(f"{path}: no function get_evaluation_prompt (not an llm-jp-eval v1.x checkout)")
    branch = next(
        (n.orelse for n in ast.walk(fn) if isinstance(n, ast.If) and "custom_prompt_template" in ast.unparse(n.test)),
        None,
    )
    if not branch:
        raise ProtocolError(f"{where}: no default branch beside custom_prompt_template; unsupported layout")
    head = shot = tail = None
    for stmt in branch:
        if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None and head is None:
            head = _fstring_template(stmt.value, {"instruction": "{instruction}"}, where)
        elif isinstance(stmt, ast.For):
            inner = next((s for s in stmt.body if isinstance(s, ast.AugAssign)), None)
            if inner is None:
                raise ProtocolError(f"{where}: the few-shot loop adds no text; unsupported layout")
            var = stmt.target.id if isinstance(stmt.target, ast.Name) else "few_shot"
            shot = _fstring_template(inner.value, {f"{var}.input": "{input}", f"{var}.output": "{output}"}, where)
        elif isinstance(stmt, ast.AugAssign) and shot is not None:
            tail = _fstring_template(stmt.value, {}, where)
    if head is None or shot is None or tail is None or "{input}" not in tail:
        raise ProtocolError(f"{where}: expected head, few-shot loop and '{{input}}' tail; unsupported layout")
    return V1Layout(head, shot, tail)


@dataclass(frozen=True)
class V2Layout:
    """llm-jp-eval v2's Jinja prompt templates (ja and en) and answer patterns, read from the checkout."""

    templates: dict[str, str]  # language -> Jinja source
    patterns: dict[str, tuple[str, str]]  # answer_pattern_id -> (pattern_text, extract_regex)

    def render(self, ds: Dataset, shots: Sequence[dict[str, str]], input_text: str) -> str:
        import jinja2

        lang = ds.language or "ja"
        source = ds.custom_prompt_template or self.templates.get(lang)
        if source is None:
            raise ProtocolError(f"{ds.path}: no prompt template for language {lang!r} in the checkout's prompts.py")
        pattern_text = self.patterns.get(ds.answer_pattern_id or "", ("", ""))[0]
        env = jinja2.Environment(keep_trailing_newline=True)
        return env.from_string(source).render(
            dataset_instruction=ds.instruction, answer_pattern=pattern_text, few_shots=list(shots), input=input_text
        )


def _str_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "..."` strings, and `NAME = OTHER` aliases of them, in file order."""
    out: dict[str, str] = {}
    for n in tree.body:
        if not isinstance(n, ast.Assign):
            continue
        if isinstance(n.value, ast.Constant) and isinstance(n.value.value, str):
            value = n.value.value
        elif isinstance(n.value, ast.Name) and n.value.id in out:
            value = out[n.value.id]
        else:
            continue
        for t in n.targets:
            if isinstance(t, ast.Name):
                out[t.id] = value
    return out


def read_v2_layout(checkout: Path) -> V2Layout:
    path = checkout / "src" / "llm_jp_eval" / "prompts.py"
    if not path.is_file():
        raise ProtocolError(f"{path}: not found; eval.llm_jp_eval_dir must be an llm-jp-eval v2 checkout")
    consts = _str_constants(ast.parse(path.read_text(encoding="utf-8")))
    templates = {}
    for lang, name in (("ja", "evaluation_prompt_template"), ("en", "evaluation_prompt_template_en")):
        if name in consts:
            templates[lang] = consts[name]
    if "ja" not in templates:
        raise ProtocolError(f"{path}: no string 'evaluation_prompt_template'; unsupported llm-jp-eval v2 layout")
    patterns: dict[str, tuple[str, str]] = {}
    parser = checkout / "src" / "llm_jp_eval" / "answer_parser.py"
    if parser.is_file():
        # ANSWER_PATTERNS = {AnswerPatternId.X: AnswerPatternConfig(pattern_text=..., extract_regex=...), ...}
        for n in ast.walk(ast.parse(parser.read_text(encoding="utf-8"))):
            if not isinstance(n, ast.Dict):
                continue
            for k, v in zip(n.keys, n.values, strict=True):
                if not (isinstance(v, ast.Call) and k is not None):
                    continue
                kw = {a.arg: a.value for a in v.keywords}
                text, regex = kw.get("pattern_text"), kw.get("extract_regex")
                if isinstance(text, ast.Constant) and isinstance(regex, ast.Constant):
                    key = k.attr if isinstance(k, ast.Attribute) else ast.literal_eval(k)
                    patterns[str(key).lower()] = (str(text.value), str(regex.value))
    return V2Layout(templates, patterns)


# ------------------------------------------------------------------------------------------- protocol


@dataclass
class Protocol:
    """What stage 06 does for one eval config."""

    name: str
    spec: EvalProtocolSpec | None  # None for own
    cfg: EvalConfig
    checkout: Path | None = None
    checkout_version: str | None = None
    checkout_commit: str | None = None
    layout: V1Layout | V2Layout | None = None
    tree_version: str | None = None
    categories_source: str | None = "eval.categories"
    categories: dict[str, dict[str, str | None]] = field(default_factory=dict)  # cat -> dataset -> main metric
    no_avg_reason: str | None = None  # why this protocol has no AVG here (v2 without a category definition)

    @property
    def own(self) -> bool:
        return self.spec is None

    # ---------------------------------------------------------------- facts for eval.json
    def describe(self) -> dict[str, Any]:
        return {
            "protocol": self.name,
            "rules": str(self.cfg.protocol_file or f"params/eval/{self.name}.yaml") if self.spec else None,
            "llm_jp_eval_dir": str(self.checkout) if self.checkout else None,
            "llm_jp_eval_version": self.checkout_version,
            "llm_jp_eval_commit": self.checkout_commit,
            "tree_version": self.tree_version,
            "categories_source": self.categories_source,
            "add_bos": self.add_bos,
            "extraction": self.spec.extraction if self.spec else "first-block-stripped",
            "empty_category": self.empty_category,
            "empty_category_evidence": self.spec.empty_category_evidence if self.spec else "own rule",
            "comet_device": self.comet_device,
        }

    # ---------------------------------------------------------------- COMET, decoding
    @property
    def comet_device(self) -> dict[str, str]:
        """Where COMET runs ("cpu" | "auto") and where that came from: eval.comet_device, else the version's rule
        (v1.3: the CPU, as its utils.py calls predict(gpus=0)); own: auto."""
        if self.cfg.comet_device != "protocol":
            return {"value": self.cfg.comet_device, "source": "eval.comet_device"}
        if self.spec is None:
            return {"value": "auto", "source": "own protocol"}
        return {"value": self.spec.comet_device, "source": f"{self.rules_file}: {self.spec.comet_device_evidence}"}

    @property
    def rules_file(self) -> str:
        return str(self.cfg.protocol_file or f"params/eval/{self.name}.yaml")

    def decoding(self, folder: Path) -> dict[str, Any]:
        """How the answers are decoded, and why: greedy, or (v1.3) the model's generation_config with the version's
        generator settings on top, as transformers' pipeline merges them. Keys: greedy, temperature, top_p, top_k,
        repetition_penalty, source, and for generation-config the model's own values read."""
        if self.spec is None or self.spec.decoding == "greedy":
            source = "own protocol" if self.spec is None else f"{self.rules_file}: {self.spec.decoding_evidence}"
            return {"greedy": True, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                    "source": source}  # fmt: skip
        return model_decoding(folder, self.spec.generator, f"{self.rules_file}: {self.spec.decoding_evidence}")

    @property
    def add_bos(self) -> bool:
        return True if self.spec is None else self.spec.add_bos

    @property
    def empty_category(self) -> str:
        return "skip" if self.spec is None else self.spec.empty_category

    @property
    def avg_excludes(self) -> list[str]:
        own = list(self.cfg.avg_excludes)
        return own if self.spec is None else sorted(set(self.spec.avg_excludes) | set(own))

    # ---------------------------------------------------------------- per dataset
    def main_metric(self, ds: Dataset) -> str | None:
        """The metric the dataset's category averages: the version's map, else the file's first implemented."""
        if self.spec is not None:
            maps: list[Mapping[str, str | None]] = [*self.categories.values(), self.spec.uncategorised]
            for names in maps:
                if ds.name in names:
                    return names[ds.name]
        return ds.main_metric

    def unconfirmed(self, ds: Dataset) -> str | None:
        """Why this dataset's main metric is not confirmed for the version (scored, marked not comparable)."""
        if self.spec is None:
            return None
        return self.spec.unconfirmed_metrics.get(self.main_metric(ds) or "")

    def category_names(self) -> dict[str, list[str]]:
        return {c: list(names) for c, names in self.categories.items()}

    def k(self, ds: Dataset) -> int:
        """Few-shots wanted for a dataset."""
        if self.spec is not None and ds.name in self.spec.zero_shot:
            return 0
        if self.spec is not None and self.spec.dataset_format == "v2" and ds.num_few_shots is not None:
            return ds.num_few_shots
        return self.cfg.num_few_shots

    def few_shots(self, ds: Dataset) -> list[dict[str, str]]:
        """The first k few-shots: from the file (own, when it has some), else the first k samples of
        ``../train/<name>.json`` (llm-jp-eval). Wanting k and finding fewer is an error, never a silent 0-shot."""
        k = self.k(ds)
        if k == 0:
            return []
        if self.own and len(ds.few_shots) >= k:
            return ds.few_shots[:k]
        train = ds.path.parent.parent / "train" / ds.path.name
        if not train.is_file():
            have = f"the file has {len(ds.few_shots)} few_shots and " if self.own else ""
            raise ProtocolError(
                f"{ds.path}: {k} few-shots wanted but {have}{train} does not exist (llm-jp-eval takes them from "
                "the train split; set eval.num_few_shots: 0 to run 0-shot on purpose)"
            )
        data = read_json(train)
        samples = _pairs(data.get("samples") if isinstance(data, dict) else None, "samples", train, non_empty=False)
        if len(samples) < k:
            raise ProtocolError(f"{train}: field 'samples': {k} few-shots wanted, the train split has {len(samples)}")
        return samples[:k]

    def prompt(self, ds: Dataset, shots: Sequence[dict[str, str]], input_text: str) -> str:
        if isinstance(self.layout, V1Layout):
            return self.layout.render(ds.instruction, shots, input_text)
        if isinstance(self.layout, V2Layout):
            return self.layout.render(ds, shots, input_text)
        from selftrain.evaluate.prompts import build_prompt

        return build_prompt(ds.instruction, shots, input_text, self.cfg.preamble, self.cfg.markers)

    def max_new_tokens(self, ds: Dataset) -> int:
        return ds.output_length + (self.spec.output_length_delta if self.spec else 0)

    def extract(self, ds: Dataset, raw: str) -> str:
        """The answer that is scored, as the version extracts it."""
        kind = self.spec.extraction if self.spec else "first-block-stripped"
        if kind == "first-block":
            return normalize(raw.split("\n\n")[0])
        if kind == "first-block-stripped":
            return prepare_prediction(raw)
        m = re.search(self.answer_regex(ds), raw, re.DOTALL)
        return normalize("".join(g or "" for g in m.groups()).strip()) if m else ""

    def answer_regex(self, ds: Dataset) -> str:
        """v2's answer_parser: the file's answer_extract_pattern only when its answer_pattern_id is custom (the
        default pattern when it gives none); any other id's own pattern, whatever the file's pattern says. A file
        without an id counts as custom (assumed)."""
        assert self.spec is not None
        pid = (ds.answer_pattern_id or "custom").lower()
        if pid == "custom":
            return ds.answer_extract_pattern or self.spec.default_pattern
        if not isinstance(self.layout, V2Layout) or pid not in self.layout.patterns:
            raise ProtocolError(f"{ds.path}: field 'answer_pattern_id': {ds.answer_pattern_id!r} is not readable here")
        return self.layout.patterns[pid][1]

    def gold(self, text: str) -> str:
        return normalize(text)

    def check_dataset(self, ds: Dataset) -> None:
        """The file's format must be the declared version's; the error names the file and the fields found."""
        if self.spec is None:
            return
        v2_keys = [f for f in ds.fields if f in V2_FIELDS]
        if self.spec.dataset_format == "v1" and (v2_keys or "few_shots" not in ds.fields):
            raise ProtocolError(
                f"{ds.path}: fields {ds.fields} are not llm-jp-eval v1.x's (instruction, output_length, metrics, "
                f"few_shots, samples){'; ' + ', '.join(v2_keys) + ' are v2 fields' if v2_keys else ''}: "
                f"eval.protocol is {self.name}"
            )
        if self.spec.dataset_format == "v2" and not v2_keys:
            raise ProtocolError(
                f"{ds.path}: fields {ds.fields} have none of llm-jp-eval v2's ({', '.join(V2_FIELDS)}): "
                f"a v1.x file, but eval.protocol is {self.name}"
            )
        if self.spec.dataset_format == "v2" and ds.answer_pattern_id:
            pid = ds.answer_pattern_id.lower()  # its own pattern is used whatever answer_extract_pattern says
            if pid != "custom" and isinstance(self.layout, V2Layout) and pid not in self.layout.patterns:
                raise ProtocolError(
                    f"{ds.path}: field 'answer_pattern_id': {ds.answer_pattern_id!r} has no pattern readable from "
                    f"the checkout's src/llm_jp_eval/answer_parser.py"
                )


# What transformers' generate used where a generation_config.json is silent, in the releases llm-jp-eval v1.3
# ran with (4.3x); transformers 5 leaves them None and resolves them at generate time, so they are written here.
GENERATE_DEFAULTS: dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                     "repetition_penalty": 1.0}  # fmt: skip
# generation_config keys the inference layer cannot reproduce, with the value that makes them do nothing.
NEUTRAL_GENERATE = {"num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "typical_p": 1.0, "min_p": None,
                    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
                    "encoder_repetition_penalty": 1.0, "bad_words_ids": None, "force_words_ids": None,
                    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
                    "forced_eos_token_id": None, "sequence_bias": None, "min_new_tokens": None, "min_length": 0,
                    "exponential_decay_length_penalty": None, "guidance_scale": None}  # fmt: skip


def model_decoding(folder: Path, generator: dict[str, float], source: str) -> dict[str, Any]:
    """llm-jp-eval v1.3's decoding for a model: its generation_config.json (transformers' defaults where silent)
    with the version's generator settings passed on top, as transformers' text-generation pipeline merges them.
    Greedy only when that says do_sample false. ProtocolError, naming the file and the key, for a setting the
    inference layer cannot reproduce (beams, a repetition penalty, ...)."""
    file = folder / "generation_config.json"
    own: dict[str, Any] = {}
    if file.is_file():
        data = read_json(file)
        if not isinstance(data, dict):
            raise ProtocolError(f"{file}: expected a JSON object")
        own = {k: data[k] for k in (*GENERATE_DEFAULTS, *NEUTRAL_GENERATE) if k in data and data[k] is not None}
    for k, neutral in NEUTRAL_GENERATE.items():
        if k in own and own[k] != neutral:
            raise ProtocolError(
                f"{file}: key '{k}': {own[k]!r} is part of llm-jp-eval v1.3's decoding of this model and cannot be "
                "reproduced by selftrain's inference layer"
            )
    merged = {**GENERATE_DEFAULTS, **{k: v for k, v in own.items() if k in GENERATE_DEFAULTS}, **generator}
    where = {k: "generator" if k in generator else str(file) if k in own else "transformers' default"
             for k in GENERATE_DEFAULTS}  # fmt: skip
    if merged["repetition_penalty"] != 1.0:
        raise ProtocolError(
            f"{where['repetition_penalty']}: repetition_penalty {merged['repetition_penalty']} cannot be reproduced by "
            "selftrain's inference layer"
        )
    sample = bool(merged["do_sample"])
    if sample and not float(merged["temperature"]) > 0:
        raise ProtocolError(f"{where['temperature']}: do_sample with temperature {merged['temperature']}")
    return {
        "greedy": not sample,
        "temperature": float(merged["temperature"]) if sample else 0.0,
        "top_p": float(merged["top_p"]) if sample else 1.0,
        "top_k": int(merged["top_k"] or 0) if sample else 0,
        "repetition_penalty": float(merged["repetition_penalty"]),
        "source": source,
        "generation_config": str(file) if file.is_file() else None,
        "model_settings": own,  # what the model's own file says (before the version's generator)
        "generator": dict(generator),
        "from": where,  # per setting: generator | the model's generation_config.json | transformers' default
    }


def _checkout_version(checkout: Path) -> str:
    path = checkout / "pyproject.toml"
    if not path.is_file():
        raise ProtocolError(f"{path}: not found; eval.llm_jp_eval_dir must be an llm-jp-eval checkout")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ProtocolError(f"{path}: not valid TOML: {e}") from None
    version = (data.get("project") or {}).get("version") or ((data.get("tool") or {}).get("poetry") or {}).get(
        "version"
    )
    if not isinstance(version, str):
        raise ProtocolError(f"{path}: no 'project.version' or 'tool.poetry.version'")
    return version


def _same_line(version: str, line: str) -> bool:
    """'1.3.0' is on line '1.3'; '2.1.2' on line '2'."""
    return version == line or version.startswith(line + ".")


def tree_version(datasets_dir: Path) -> str | None:
    """<dir>/<version>/evaluation/<split> as llm-jp-eval's preprocessing writes it; None when not so laid out."""
    parts = datasets_dir.parts
    if len(parts) >= 3 and parts[-2] == "evaluation" and re.fullmatch(r"v?\d+(\.\d+)*", parts[-3]):
        return parts[-3].removeprefix("v")
    return None


def load_protocol(cfg: EvalConfig) -> Protocol:
    """The protocol of an eval config, with everything it reads from the user's checkout and tree checked."""
    if cfg.protocol == "own":
        cats: dict[str, dict[str, str | None]] = {c: dict.fromkeys(names) for c, names in cfg.categories.items()}
        return Protocol("own", None, cfg, categories=cats)
    spec = load_eval_protocol(cfg.protocol, cfg.protocol_file)
    if not cfg.llm_jp_eval_dir:
        raise ConfigError(
            f"key 'eval.llm_jp_eval_dir': protocol {cfg.protocol} reads llm-jp-eval's prompt from your own "
            f"checkout of version {spec.version}.x; set the path (or use eval.protocol: own)"
        )
    if cfg.chat_template:
        raise ConfigError(f"key 'eval.chat_template': {cfg.protocol} applies no chat template; set it to false")
    checkout = resolve_path(cfg.llm_jp_eval_dir)
    if not checkout.is_dir():
        raise ProtocolError(f"{checkout}: llm-jp-eval checkout not found (eval.llm_jp_eval_dir)")
    version = _checkout_version(checkout)
    if not _same_line(version, spec.version):
        raise ProtocolError(
            f"{checkout / 'pyproject.toml'}: version {version} is not on llm-jp-eval's {spec.version} line "
            f"that eval.protocol {cfg.protocol} needs"
        )
    folder = resolve_path(cfg.datasets_dir)
    tv = tree_version(folder)
    if tv is None:
        raise ProtocolError(
            f"{folder}: cannot tell the llm-jp-eval version of this tree: expected <dir>/<version>/evaluation/"
            "<split> as llm-jp-eval's preprocess_dataset.py writes it (eval.datasets_dir)"
        )
    if not _same_line(tv, spec.version):
        raise ProtocolError(f"{folder}: a version {tv} tree, but eval.protocol is {cfg.protocol} ({spec.version}.x)")
    layout = read_v1_layout(checkout) if spec.prompt == "v1-utils" else read_v2_layout(checkout)
    cats = {c: dict(d) for c, d in spec.categories.items()}
    source: str | None = str(cfg.protocol_file or f"params/eval/{cfg.protocol}.yaml")
    no_avg = None
    if spec.categories_from_checkout:  # v2: the checkout's category definition, or none at all
        path = dataset_config_path(cfg)
        from_checkout = _v2_categories(path)
        if from_checkout is None:
            cats, source = {}, None
            what = "has no 'categories'" if path.is_file() else "not found"
            no_avg = (
                f"{path}: {what}; llm-jp-eval {spec.version}.x takes its categories (and so AVG) from the eval "
                "dataset config (eval.dataset_config): per-dataset scores only, no AVG"
            )
        else:
            cats, source = from_checkout, str(path)
    return Protocol(
        cfg.protocol,
        spec,
        cfg,
        checkout=checkout,
        checkout_version=version,
        checkout_commit=git_commit(checkout),
        layout=layout,
        tree_version=tv,
        categories_source=source,
        categories=cats,
        no_avg_reason=no_avg,
    )


def dataset_config_path(cfg: EvalConfig) -> Path:
    """v2's eval dataset config: eval.dataset_config, relative to the checkout unless absolute."""
    p = Path(cfg.dataset_config)
    return p if p.is_absolute() else resolve_path(cfg.llm_jp_eval_dir or ".") / p


def _v2_categories(path: Path) -> dict[str, dict[str, str | None]] | None:
    """v2 keeps its category map in the eval dataset config (eval_configs/all_datasets.yaml as LLM-jp's v2 scripts
    pass it): categories: {NAME: {default_metric, metrics: {dataset: metric}, datasets: [...]}}. None when the file
    is missing or defines no categories."""
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ProtocolError(f"{path}: not valid YAML: {e}") from None
    cats = data.get("categories") if isinstance(data, dict) else None
    if cats is None:
        return None
    if not isinstance(cats, dict):
        raise ProtocolError(f"{path}: key 'categories': expected a mapping")
    out: dict[str, dict[str, str | None]] = {}
    for name, c in cats.items():
        if not isinstance(c, dict) or not isinstance(c.get("datasets"), list):
            raise ProtocolError(f"{path}: key 'categories.{name}.datasets': expected a list")
        overrides = c.get("metrics") or {}
        out[str(name)] = {d: overrides.get(d, c.get("default_metric")) for d in c["datasets"]}
    return out
