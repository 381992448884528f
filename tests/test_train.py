"""Stages 03/04 on the tiny model: SFT raises the completions' likelihood, DPO the preference margin;
labels keep the end-of-turn token, no double BOS, resume after an interruption, bad keys, LoRA."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from selftrain import generate, select, train
from selftrain.config import ConfigError, resolve_run_config
from selftrain.io import current_umask, read_jsonl
from selftrain.runs import Run, create_run
from selftrain.train import TrainingError, check_batch, completion_logprobs
from selftrain.train import stage as train_stage_mod


def _selected_run(overrides: list[str], tmp_path: Path, method: str = "central", extra: list[str] | None = None) -> Run:
    ov = [*overrides, f"output.checkpoints_dir={tmp_path / 'ck'}", *(extra or [])]
    run = create_run(resolve_run_config("tiny", method, overrides=ov, check_trainer=True))
    generate.run(run, progress=False)
    select.run(run, progress=False)
    return run


EPOCHS = ["training.sft.num_train_epochs=4", "training.dpo.num_train_epochs=4"]


def test_sft_then_dpo_learn(tiny_overrides: list[str], tmp_path: Path, tiny_model: Path) -> None:
    run = _selected_run(tiny_overrides, tmp_path, extra=EPOCHS)
    sft = read_jsonl(run.data_dir / "sft.jsonl")
    before = completion_logprobs(tiny_model, [r["prompt"] for r in sft], [r["completion"] for r in sft])
    log = train.train_stage(run, "sft", progress=False)
    assert run.is_done("sft") and len(log) > 0
    sft_dir = run.final_model()
    after = completion_logprobs(sft_dir, [r["prompt"] for r in sft], [r["completion"] for r in sft])
    assert np.mean(after) > np.mean(before) + 0.1  # the training completions became more likely
    assert (sft_dir / "model.safetensors").is_file() and (sft_dir / "chat_template.jinja").is_file()
    mask = current_umask()  # a group sharing checkpoints can read the trained model (safetensors writes 0600)
    assert (sft_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert sft_dir.stat().st_mode & 0o777 == 0o777 & ~mask
    m = json.loads((run.metrics_dir / "sft.json").read_text())
    assert m["batch_check"]["rows_with_eos_label"] == m["batch_check"]["rows"] and m["global_steps"] == 12

    dpo = read_jsonl(run.data_dir / "dpo.jsonl")
    assert dpo, "tiny selection produced no preference pairs"

    def margin(model_dir: Path) -> float:
        c = completion_logprobs(model_dir, [r["prompt"] for r in dpo], [r["chosen"] for r in dpo])
        r = completion_logprobs(model_dir, [r["prompt"] for r in dpo], [r["rejected"] for r in dpo])
        return float(np.mean(np.array(c) - np.array(r)))

    ref = margin(sft_dir)
    dlog = train.train_stage(run, "dpo", progress=False)
    assert run.is_done("dpo") and {"rewards/margins", "rewards/accuracies"} <= set(dlog.columns)
    dpo_dir = run.final_model()
    assert dpo_dir != sft_dir and json.loads((run.metrics_dir / "dpo.json").read_text())["started_from"] == str(sft_dir)
    assert margin(dpo_dir) > ref  # chosen moved up relative to rejected
    assert (run.figures_dir / "dpo_curves.png").is_file() and (run.figures_dir / "sft_curves.png").is_file()
    manifest = run.manifest()["stages"]
    assert manifest["dpo"]["metrics"]["model_sha256"] and manifest["dpo"]["metrics"]["model_path"] == str(dpo_dir)


def _tokenizer_copy(src: Path, dst: Path, **changes: str) -> Path:
    shutil.copytree(src, dst)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    for k, v in changes.items():
        setattr(tok, k, v)
    tok.save_pretrained(dst)
    return dst


def test_labels_keep_eos_and_no_double_bos(tiny_model: Path, tmp_path: Path, prompts_file: Path) -> None:
    """A tokenizer that adds BOS by itself (like SmolLM2's and llm-jp-3's) must not get a second one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    folder = _tokenizer_copy(tiny_model, tmp_path / "bos-model", bos_token="<|im_start|>")
    tok = AutoTokenizer.from_pretrained(folder)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.convert_tokens_to_ids("<|im_start|>"))]
    )
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder)("hi")["input_ids"][0] == tok.bos_token_id  # adds BOS itself

    from datasets import Dataset

    from selftrain.train.stage import _build_trainer

    cfg = resolve_run_config("tiny", "central", overrides=[f"model.path={folder}"])
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"question {i}"}],
                "completion": [{"role": "assistant", "content": f"answer number {i}"}],
            }
            for i in range(4)
        ]
    )
    trainer, tok = _build_trainer(cfg, "sft", folder, data, tmp_path / "out", [], progress=False)
    batch = next(iter(trainer.get_train_dataloader()))
    report = check_batch(batch, tok)
    assert report["double_bos_rows"] == 0 and report["rows_with_eos_label"] == report["rows"] == 2
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        trained = ids[labels != -100].tolist()
        assert tok.eos_token_id in trained  # <|im_end|> closing the answer is a target
        assert tok.pad_token_id not in trained
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id

    doubled = {k: v.clone() for k, v in batch.items()}
    doubled["input_ids"][:, 1] = tok.bos_token_id
    with pytest.raises(TrainingError, match="two BOS"):
        check_batch(doubled, tok)
    no_eos = {k: v.clone() for k, v in batch.items()}
    no_eos["labels"][no_eos["labels"] == tok.eos_token_id] = -100  # what pad == eos masking does
    with pytest.raises(TrainingError, match="never learn to stop"):
        check_batch(no_eos, tok)

    # Packed + padding-free (the GPU setting): one flattened row, sequences found by position id 0.
    packing = ["training.sft.packing=true", "training.sft.max_length=128"]
    cfg = resolve_run_config("tiny", "central", overrides=[f"model.path={folder}", *packing])
    trainer, tok = _build_trainer(cfg, "sft", folder, data, tmp_path / "out-packed", [], progress=False)
    packed = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    report = check_batch(packed, tok)
    assert report["rows"] == report["rows_with_eos_label"] == 4 and report["double_bos_rows"] == 0
    starts = (packed["position_ids"][0] == 0).nonzero().flatten()
    packed["input_ids"][0, starts[1] + 1] = tok.bos_token_id
    with pytest.raises(TrainingError, match="1 sequences start with two BOS"):
        check_batch(packed, tok)


def test_pad_equal_to_eos_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    from selftrain.train.stage import _build_trainer

    folder = _tokenizer_copy(tiny_model, tmp_path / "padeos", pad_token="<|im_end|>")
    cfg = resolve_run_config("tiny", "central")
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}]
    )
    with pytest.raises(TrainingError, match="pad token is missing or equals eos"):
        _build_trainer(cfg, "sft", folder, data, tmp_path / "out", [], progress=False)


def test_resume_after_interruption(tiny_overrides: list[str], tmp_path: Path) -> None:
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == 3:
                raise KeyboardInterrupt("killed at step 3")

    extra = ["training.sft.num_train_epochs=2", "training.sft.save_steps=2"]  # 5 examples, batch 2: 6 steps
    run = _selected_run(tiny_overrides, tmp_path, extra=extra)
    with pytest.raises(KeyboardInterrupt):
        train.train_stage(run, "sft", callbacks=[Kill()], progress=False)
    assert not run.is_done("sft") and run.manifest()["stages"]["sft"]["status"] == "failed"
    trainer_dir = train.checkpoints_dir(run, "sft") / "trainer"
    assert (trainer_dir / "checkpoint-2" / "_COMPLETE").is_file()
    partial = trainer_dir / "checkpoint-4"  # a checkpoint the kill interrupted half-way
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    train.train_stage(run, "sft", progress=False)
    m = json.loads((run.metrics_dir / "sft.json").read_text())
    assert m["resumed_from"].endswith("checkpoint-2") and m["global_steps"] == 6
    # The loss covers the whole run, the steps before the kill included (each logged step weighs its steps).
    log = [h for h in json.loads((run.metrics_dir / "sft_log.json").read_text()) if "loss" in h]
    steps = [h["step"] for h in log]
    assert steps[0] <= 2 and steps[-1] == 6, steps
    weights = [b - a for a, b in zip([0, *steps[:-1]], steps, strict=True)]
    want = sum(h["loss"] * w for h, w in zip(log, weights, strict=True)) / 6
    assert m["train_loss"] == pytest.approx(want, abs=1e-5) and m["train_loss"] > 0
    # Once the final model is written, the Trainer's checkpoints (optimizer state) are gone.
    assert not trainer_dir.exists() and (train.checkpoints_dir(run, "sft") / "final" / "_SUCCESS").is_file()

    fresh = _selected_run(tiny_overrides, tmp_path / "fresh", extra=[*extra, "generation.seed=99"])
    train.train_stage(fresh, "sft", progress=False)
    assert json.loads((fresh.metrics_dir / "sft.json").read_text())["global_steps"] == 6


def test_bad_trainer_keys_are_named(tiny_overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"command line.*unknown key 'training.sft.learning_rat'.*SFTConfig"):
        resolve_run_config("tiny", "central", overrides=["training.sft.learning_rat=1"], check_trainer=True)
    with pytest.raises(ConfigError, match=r"unknown key 'training.dpo.betta'.*DPOConfig"):
        resolve_run_config("tiny", "central", overrides=["training.dpo.betta=0.1"], check_trainer=True)
    with pytest.raises(ConfigError, match="'training.sft.output_dir' is set by selftrain"):
        resolve_run_config("tiny", "central", overrides=["training.sft.output_dir=/tmp"], check_trainer=True)


def test_orders_baseline_and_empty_data(tiny_overrides: list[str], tmp_path: Path, tiny_model: Path) -> None:
    base = _selected_run(tiny_overrides, tmp_path / "b", method="baseline")
    assert train.train_stage(base, "sft", progress=False).empty and train.train_stage(base, "dpo", progress=False).empty
    assert base.is_done("sft") and base.is_done("dpo")
    assert base.final_model() == tiny_model  # baseline judges M0

    only_dpo = _selected_run(
        tiny_overrides, tmp_path / "d", extra=["training.order=dpo", "training.dpo.precompute_ref_log_probs=true"]
    )
    train.train_stage(only_dpo, "sft", progress=False)
    assert only_dpo.manifest()["stages"]["sft"]["metrics"]["skipped"] == "training.order is dpo"
    train.train_stage(only_dpo, "dpo", progress=False)
    assert json.loads((only_dpo.metrics_dir / "dpo.json").read_text())["started_from"] == str(tiny_model)

    empty = _selected_run(tiny_overrides, tmp_path / "e")
    (empty.data_dir / "sft.jsonl").write_text("")
    # As if the selection had kept nothing: the select stage's record names the empty file as its output.
    rec = empty.stage_record("select")
    rec["outputs"]["data/sft.jsonl"] = hashlib.sha256(b"").hexdigest()
    empty.marker("select").write_text(json.dumps(rec))
    with pytest.raises(TrainingError, match="no examples to train on"):
        train.train_stage(empty, "sft", progress=False)
    assert not empty.is_done("sft")


def test_lora_option_saves_a_merged_model(tiny_overrides: list[str], tmp_path: Path) -> None:
    run = _selected_run(tiny_overrides, tmp_path, extra=["training.use_lora=true", "training.order=sft"])
    train.train_stage(run, "sft", progress=False)
    out = run.final_model()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # a plain model: adapters merged in
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.isfinite(next(model.parameters())).all()


def test_vllm_chat_prompts_get_one_bos(tiny_model: Path, tmp_path: Path) -> None:
    """vLLM tokenises prompt text with special tokens: a template-written BOS must not become a second one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from selftrain.inference import chat_prompts, without_template_bos

    plain = AutoTokenizer.from_pretrained(tiny_model)
    folder = _tokenizer_copy(tiny_model, tmp_path / "bos-model", bos_token="<|endoftext|>")
    tok = AutoTokenizer.from_pretrained(folder)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # like llm-jp-3's template
    conv = [[{"role": "user", "content": "hi"}]]
    rendered = chat_prompts(tok, conv)
    assert tok(rendered[0])["input_ids"][:2] == [bos, bos]  # what vLLM would have seen
    fixed = without_template_bos(tok, rendered)
    ids = tok(fixed[0])["input_ids"]
    assert ids[0] == bos and ids[1] != bos and fixed[0] == rendered[0].removeprefix("<|endoftext|>")
    assert without_template_bos(plain, chat_prompts(plain, conv)) == chat_prompts(plain, conv)  # no BOS added


def test_clean_frees_what_no_run_references(tiny_overrides: list[str], tmp_path: Path) -> None:
    from selftrain.cli.clean import clean, unreferenced

    cache_dir = tmp_path / "cache"  # its own cache: cleaning must not touch the session's shared one
    extra = ["training.order=sft", "training.keep_trainer_checkpoints=true", f"output.cache_dir={cache_dir}"]
    run = _selected_run(tiny_overrides, tmp_path, extra=extra)
    train.train_stage(run, "sft", progress=False)
    ck = tmp_path / "ck"
    trainer = run.checkpoints_dir("sft") / "trainer"
    assert trainer.is_dir()  # kept on request
    stray = ck / "tiny" / "tiny" / "central" / "v009-deadbeef" / "sft" / "final"
    stray.mkdir(parents=True)
    (stray / "model.safetensors").write_bytes(b"x" * 1000)
    stale = cache_dir / "embeddings" / "0000000000000000.npy"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"y" * 10)
    filling = cache_dir / "generations" / "feedfacefeedface" / "shards" / "0-of-2"  # shards not merged yet
    filling.mkdir(parents=True)
    (filling / "records.jsonl").write_text("{}\n")
    results = Path(run.config.output.results_dir)
    items = {it.path: it for it in unreferenced(results, ck, cache_dir)}
    assert filling.parent.parent not in items  # an array task may still be filling it
    assert trainer in items and stray.parent.parent in items and stale in items
    assert run.checkpoints_dir("sft") / "final" not in items  # the run's final model stays
    kept_gen = cache_dir / "generations" / json.loads((run.metrics_dir / "generate.json").read_text())["key"]
    assert kept_gen.is_dir() and kept_gen not in items
    assert clean(list(items.values()), dry_run=True) >= 1010 and stray.is_dir()
    clean(list(items.values()))
    assert not trainer.exists() and not stray.exists() and not stale.exists()
    assert (run.checkpoints_dir("sft") / "final" / "_SUCCESS").is_file() and run.final_model().is_dir()


def _one_step(cfg, start: Path, data: Path, out: Path, device: train.Device) -> tuple[dict, train.Any]:
    """The weight change of one optimizer step of the project's SFT trainer built for `device`."""
    dataset, _ = train_stage_mod._load_dataset(data, "sft")
    trainer, _ = train_stage_mod._build_trainer(cfg, "sft", start, dataset, out, [], False, device)
    before = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    delta = {n: p.detach().float() - before[n] for n, p in trainer.model.named_parameters()}
    return delta, trainer


@pytest.mark.parametrize("lr", [5e-7, 5e-6])  # the shipped DPO rate and the 3.7b SFT rate
def test_gpu_configuration_keeps_float32_master_weights(tiny_overrides: list[str], tmp_path: Path, lr: float) -> None:
    """One AdamW step as the trainer is built for a bf16 GPU (emulated here: the GPU's weights dtype and precision
    flags, bf16 autocast on the CPU) moves the weights like a float32 step. Pure bf16 weights, what a GPU run
    trained in before, lose the update: AdamW's first step is about lr per weight, far below half a bf16 step."""
    from selftrain.models import resolve_model_path

    run = _selected_run(tiny_overrides, tmp_path)
    start = resolve_model_path(run.config.model.path, run.config.output.cache_dir)
    step = [f"training.sft.learning_rate={lr}", "training.sft.max_steps=1", "training.sft.save_strategy=no",
            "training.sft.use_cpu=true", "training.sft.lr_scheduler_type=constant"]  # fmt: skip

    def cfg(precision: str):
        ov = [*tiny_overrides, *step, f"training.precision={precision}"]
        return resolve_run_config("tiny", "central", overrides=ov)

    data = run.data_dir / "sft.jsonl"
    ref, _ = _one_step(cfg("fp32"), start, data, tmp_path / "fp32", train.Device(cuda=False, bf16=False))
    mixed, trainer = _one_step(cfg("mixed"), start, data, tmp_path / "mixed", train.Device(cuda=True, bf16=True))
    pure, _ = _one_step(cfg("bf16"), start, data, tmp_path / "bf16", train.Device(cuda=True, bf16=True))
    assert trainer.args.bf16 and trainer.model.dtype == torch.float32  # mixed: autocast over float32 masters

    def norm(d: dict) -> float:
        return float(torch.sqrt(sum((v**2).sum() for v in d.values())))

    moved_ref = {n: v != 0 for n, v in ref.items()}
    total = sum(int(m.sum()) for m in moved_ref.values())

    def share(d: dict) -> float:
        return sum(int(((d[n] != 0) & m).sum()) for n, m in moved_ref.items()) / total

    print(f"lr {lr}: mixed {norm(mixed) / norm(ref):.3f}x, {share(mixed):.1%} moved; "
          f"pure bf16 {norm(pure) / norm(ref):.3f}x, {share(pure):.1%} moved")  # fmt: skip
    assert 0.7 <= norm(mixed) / norm(ref) <= 1.3 and share(mixed) >= 0.5
    assert share(pure) < 0.5 or norm(pure) / norm(ref) < 0.7  # the old GPU path: most updates lost
