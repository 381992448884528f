"""A real two-node Slurm cluster on this host, for the tests (Debian's slurmctld, slurmd, slurm-client, munge).

munged, slurmctld and two slurmd (``slurmd -N n1``, ``slurmd -N n2``) on 127.0.0.1, each on a free port of its
own, two CPUs each; ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroups needed); jobs go
to the least loaded node (``LLN``: two tasks started together land on two nodes); every state, spool,
log and pid file under one temporary folder; the node names made resolvable (``--main_process_ip`` of a two-node
launch is the first node's name): where ``n1``/``n2`` do not resolve, one line ``127.0.0.1 n1 n2`` is added to
/etc/hosts (once; it stays, and the fixture says so). Clients reach the cluster through ``SLURM_CONF``.

Start and stop are bounded in time; a cluster that does not come up raises with the daemons' log tails.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
NODES = ("n1", "n2")
CPUS = 2  # per node: two array tasks of one CPU each run side by side on every node


class ClusterError(RuntimeError):
    """The cluster did not come up (or a command against it failed); the message holds the daemons' log tails."""


def missing_binaries() -> list[str]:
    """The Slurm / munge programs not installed (the tests skip only then)."""
    return [b for b in BINARIES if not _which(b)]


def _which(name: str) -> str:
    """The program's path (the daemons live in /usr/sbin, often not on a user's PATH); empty when not installed."""
    for d in ("/usr/sbin", "/sbin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return shutil.which(name) or ""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ensure_hosts(names: tuple[str, ...] = NODES) -> str:
    """Make the node names resolve: add them to /etc/hosts where they do not (idempotent). Returns what it did."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if not missing:
        return f"node names {', '.join(names)} resolve"
    try:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # selftrain tests: the Slurm fixture's nodes\n")
    except OSError as e:
        raise ClusterError(f"node names {missing} do not resolve and /etc/hosts cannot be extended ({e}); add "
                           f"'127.0.0.1 {' '.join(missing)}' to it") from None  # fmt: skip
    return f"added '127.0.0.1 {' '.join(missing)}' to /etc/hosts"


class Cluster:
    """munged + slurmctld + slurmd n1, n2 under `root`; `env` is what a client (and a job) needs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.hosts_note = ""
        self.node_ports: dict[str, int] = {}

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout_s: float = 90.0) -> None:
        self.hosts_note = ensure_hosts()
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        m = self.root / "munge"
        self._run([_which("munged"), "--force", f"--socket={self.socket}", f"--key-file={key}",
                   f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                   f"--seed-file={m / 'munged.seed'}"], "munged")  # fmt: skip
        ctld, *ports = _free_ports(1 + len(NODES))
        self.node_ports = dict(zip(NODES, ports, strict=True))
        self.conf.write_text(self._conf(ctld))
        self._run([_which("slurmctld")], "slurmctld")
        for node in NODES:
            self.start_node(node)
        self.wait_idle(timeout_s)

    def _conf(self, ctld_port: int) -> str:
        r = self.root
        nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS} State=UNKNOWN"
                          for n, p in self.node_ports.items())  # fmt: skip
        return f"""ClusterName=selftrain
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={getpass.getuser()}
SlurmdUser={getpass.getuser()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}/%n
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd-%n.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log"}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=10
JobRequeue=0
KillWait=5
MinJobAge=3600
{nodes}
PartitionName=debug Nodes={",".join(self.node_ports)} Default=YES MaxTime=INFINITE State=UP LLN=YES
"""

    def start_node(self, node: str) -> None:
        self._run([_which("slurmd"), "-N", node], f"slurmd -N {node}")

    def _run(self, argv: list[str], what: str) -> None:
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise ClusterError(f"{what} did not start (exit {p.returncode}): {p.stderr.strip()}\n{self.log_tails()}")

    def wait_idle(self, timeout_s: float = 90.0, nodes: tuple[str, ...] = NODES) -> None:
        """Until every node named is idle (or allocated/mixed: up and taking jobs)."""
        deadline = time.time() + timeout_s
        states: dict[str, str] = {}
        while time.time() < deadline:
            states = self.node_states()
            if all(states.get(n, "").rstrip("*") in ("idle", "mixed", "allocated") for n in nodes):
                return
            time.sleep(0.5)
        raise ClusterError(f"nodes not up within {timeout_s:.0f} s (states: {states})\n{self.log_tails()}")

    def node_states(self) -> dict[str, str]:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True,
                           timeout=30)  # fmt: skip
        return dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)

    def stop(self) -> None:
        """scontrol shutdown, then every daemon by its pid file (and munged), bounded in time."""
        with contextlib.suppress(Exception):
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=20)
        pids = [self.root / "slurmctld.pid", *(self.root / f"slurmd-{n}.pid" for n in NODES),
                self.root / "munge" / "munged.pid"]  # fmt: skip
        deadline = time.time() + 15
        for f in pids:
            pid = _pid(f)
            while pid and _alive(pid) and time.time() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                time.sleep(0.2)
            if pid and _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in self.job_processes():  # what the steps left (a killed node's, say)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ what the tests use
    def slurmd_pid(self, node: str) -> int | None:
        return _pid(self.root / f"slurmd-{node}.pid")

    def job_processes(self, node: str | None = None) -> list[int]:
        """Processes of this cluster's jobs (on `node`, or anywhere): each step's slurmstepd (known by the node's
        log file it holds open) and every process whose environment names this cluster's configuration and the
        node (SLURMD_NODENAME, which Slurm sets in every job process)."""
        out = []
        conf = f"SLURM_CONF={self.conf}".encode()
        want = f"SLURMD_NODENAME={node}".encode() if node else b"SLURMD_NODENAME="
        logs = [str(self.root / "log" / f"slurmd-{n}.log") for n in ([node] if node else NODES)]
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes()
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"slurmstepd" in cmd.split(b"\0")[0]:
                with contextlib.suppress(OSError):
                    if any(os.readlink(fd) in logs for fd in (proc / "fd").iterdir()):
                        out.append(int(proc.name))
            elif conf in env and any(e.startswith(want) for e in env):
                out.append(int(proc.name))
        return out

    def kill_node(self, node: str) -> list[int]:
        """A node that dies: SIGKILL to its slurmd, its steps' slurmstepd and every process of its jobs."""
        victims = [p for p in [self.slurmd_pid(node), *self.job_processes(node)] if p]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return victims

    def log_tails(self, lines: int = 25) -> str:
        files = [self.root / "munge" / "munged.log", self.root / "log" / "slurmctld.log",
                 *(self.root / "log" / f"slurmd-{n}.log" for n in NODES)]  # fmt: skip
        out = []
        for f in files:
            if f.is_file():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name} (last {len(tail)} lines)\n" + "\n".join(tail))
            else:
                out.append(f"--- {f.name}: not written")
        return "\n".join(out)

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        p = subprocess.run(["sbatch", "--parsable", *args], env=self.env, capture_output=True, text=True, cwd=cwd,
                           timeout=60)  # fmt: skip
        if p.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)}: {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def squeue(self) -> list[dict[str, str]]:
        """Every job still known to slurmctld as queued or running, one row per array task."""
        p = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%j|%T|%N|%r"], env=self.env, capture_output=True,
                           text=True, timeout=30)  # fmt: skip
        keys = ("id", "name", "state", "nodes", "reason")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in p.stdout.splitlines() if line.strip()]

    def job_states(self, job: str) -> dict[str, str]:
        """Array task (or job) id -> its state, finished ones included (MinJobAge keeps them an hour)."""
        p = subprocess.run(["scontrol", "-o", "show", "job", job], env=self.env, capture_output=True, text=True,
                           timeout=30)  # fmt: skip
        out = {}
        for line in p.stdout.splitlines():
            f = dict(x.split("=", 1) for x in line.split() if "=" in x)
            task = f.get("ArrayTaskId")
            key = f"{f.get('ArrayJobId')}_{task}" if task and "-" not in task and "," not in task else f.get("JobId")
            out[key] = f.get("JobState", "")
        return out

    def wait_jobs(self, timeout_s: float) -> None:
        """Until no job is queued or running; raises with the queue and the log tails after `timeout_s`."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not self.squeue():
                return
            time.sleep(1)
        raise ClusterError(f"jobs still queued after {timeout_s:.0f} s: {self.squeue()}\n{self.log_tails()}")


def _pid(f: Path) -> int | None:
    try:
        return int(f.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie counts as gone
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1] != "Z"
    return True
