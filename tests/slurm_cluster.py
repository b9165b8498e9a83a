"""A real single-node Slurm on 127.0.0.1 for the tests: munged, slurmctld and slurmd started in a temp folder and
stopped by their pids. Needs Debian's `slurm-wlm` and `munge` (`.ci/run` installs them)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def available() -> bool:
    return all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"
        self.jobcomp = self.dir / "jobcomp.txt"
        self.pids: list[int] = []

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> "Cluster":
        d = self.dir
        for sub in ("state", "spool", "log", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        ctld, slurmd = _free_port(), _free_port()
        self.conf.write_text(f"""ClusterName=tbtest
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort={ctld}
SlurmdPort={slurmd}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/ctld.log
SlurmdLogFile={d}/log/d.log
SlurmUser=root
MpiDefault=none
KillWait=5
MinJobAge=600
DefMemPerCPU=500
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
        subprocess.run(["chown", "-R", "munge:munge", "/etc/munge"], capture_output=True)
        os.chmod(key, 0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "munge:munge", "/run/munge"], capture_output=True)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["munged", "--force", f"--pid-file={d}/munged.pid"], check=True, capture_output=True)
            self.pids.append(int((d / "munged.pid").read_text().split()[0]))
        env = {**os.environ, **self.env}
        subprocess.run(["slurmctld", "-f", str(self.conf)], env=env, check=True, capture_output=True)
        self.pids.append(self._pid("slurmctld"))
        time.sleep(1)
        subprocess.run(["slurmd", "-f", str(self.conf)], env=env, check=True, capture_output=True)
        self.pids.append(self._pid("slurmd"))
        for _ in range(60):
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if "idle" in out:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the test Slurm did not come up: {(d / 'log' / 'ctld.log').read_text()[-2000:]}")

    def _pid(self, name: str) -> int:
        path = self.dir / f"{name}.pid"
        for _ in range(50):
            if path.exists() and path.read_text().strip():
                return int(path.read_text().split()[0])
            time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no pid file")

    def jobs(self) -> list[dict]:
        """The job-completion log: one dict per finished job (JobName, JobState, ...)."""
        if not self.jobcomp.exists():
            return []
        out = []
        for line in self.jobcomp.read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            out.append(fields)
        return out

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.pids = []
