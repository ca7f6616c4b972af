"""A real SLURM cluster (Debian's Slurm 22.05: munged, slurmctld, two slurmd nodes) started as
root under one temporary folder, as ../shared/SLURM.md measured. For tests only."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    return f"missing {', '.join(missing)} (scripts/test.sh installs {' '.join(PACKAGES)})" if missing else None


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2):
        self.root, self.nodes = root, [f"n{i + 1}" for i in range(nodes)]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munge_pid = root / "munged.pid"

    # --- start and stop ----------------------------------------------------------------------
    def start(self) -> None:
        root = self.root
        root.chmod(0o755)  # munged wants its socket's folders searchable by everyone
        for sub in ("state", "spool", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub).chmod(0o755)
        key = root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        socket_path = root / "munge" / "munge.sock"
        subprocess.run(
            [
                "munged",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={self.munge_pid}",
                f"--log-file={root / 'munge' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'seed'}",
            ],
            check=True,
        )
        self.conf.write_text(self._config(socket_path))
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], check=True, env=self.env)
        for node in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", node], check=True, env=self.env)
        self._wait_idle(30)

    def _config(self, munge_socket: Path) -> str:
        root, host = self.root, socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        memory = max(256, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8))
        ctld_port, node_port = _free_port(), _free_port()
        lines = [
            "ClusterName=nnunetlaunch",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}/%n",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={root / 'jobcomp.txt'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MinJobAge=3600",
            "MpiDefault=none",
            "SlurmdParameters=config_overrides",
            "SchedulerParameters=sched_interval=1",
        ]
        for i, node in enumerate(self.nodes):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={node_port + i} "
                f"CPUs={cpus} RealMemory={memory} State=UNKNOWN"
            )
        lines.append(f"PartitionName=main Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
            if out.split() and all(s == "idle" for s in out.split()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM nodes not idle in {timeout} s: {out!r}")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        pid_files = [self.root / "slurmctld.pid", *(self.root / f"slurmd-{n}.pid" for n in self.nodes)]
        deadline = time.monotonic() + 15
        for pid_file in pid_files:
            pid = _read_pid(pid_file)
            while pid and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        pid = _read_pid(self.munge_pid)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGTERM)

    # --- jobs --------------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env={**self.env, **(env or {})}, check=check)

    def jobs(self, job_id: str) -> dict[str, dict[str, str]]:
        """{"<id>_<k>" or "<id>": every field `scontrol -o show job` prints for it}."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        found = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            name = fields["JobId"] if "ArrayTaskId" not in fields else f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            found[name] = fields
        return found

    def job_states(self, job_id: str) -> dict[str, tuple[str, str]]:
        """{"<id>_<k>" or "<id>": (JobState, ExitCode)} from scontrol."""
        return {name: (f.get("JobState", "?"), f.get("ExitCode", "?")) for name, f in self.jobs(job_id).items()}

    def wait_done(self, job_id: str, timeout: float) -> dict[str, tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if states and all(
                s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED") for s, _ in states.values()
            ):
                return states
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not done in {timeout} s: {self.job_states(job_id)}")

    def wait_state(self, task: str, states: tuple[str, ...], timeout: float) -> str:
        """Wait until one task (e.g. "12_0") is in one of these states; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_states(task).get(task, ("?", "?"))[0]
            if state in states:
                return state
            time.sleep(0.2)
        raise AssertionError(f"{task} not in {states} within {timeout} s: {self.job_states(task)}")

    def requeue(self, task: str, timeout: float = 60) -> None:
        """`scontrol requeue` for real, then start the task at once: SLURM holds a requeued task
        about 120 s in PD (BeginTime), and only a PENDING task's start time can be moved."""
        self.run("scontrol", "requeue", task)
        self.wait_state(task, ("PENDING",), timeout)

    def release(self, task: str) -> None:
        self.run("scontrol", "update", f"JobId={task}", "StartTime=now")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port if port < 60000 else _free_port()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
