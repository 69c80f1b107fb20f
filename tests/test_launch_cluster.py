"""The two cluster launch paths of docs/launching.md, run for real on this one machine with real
daemons (no mocks, no fake launchers), each on the debug decoder for 8 steps of 512 tokens:

* DeepSpeed's pdsh runner: a private sshd (its own host key, authorized_keys and port) and a
  hostfile naming this machine twice (`localhost`, `127.0.0.1`), so pdsh opens two ssh sessions
  and starts one rank in each. The environment reaches the remote ranks the way a user sends it
  (PYTHON* forwarded by DeepSpeed, the rest from a DeepSpeed env file).
* SLURM: a private munged, slurmctld and two slurmd "nodes" on this host (Debian's slurm is built
  with multiple-slurmd); `sbatch --wait launchers/slurm.sh` with the GPU directives overridden on
  the command line, one torchrun per node meeting at a c10d rendezvous.

Each must give the losses of one process at the same global batch (rel 1e-4) with two ranks.
Skipped only when the Debian packages are not installed (the reason names them); with the
binaries present, any failure fails. Every daemon is stopped in the fixture's teardown (process
groups, SIGTERM then SIGKILL); every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.train_helpers import (
    LAUNCHER,
    REPO,
    argv,
    assert_same_losses,
    env,
    free_port,
    losses,
    tiny,
)

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

STEPS = 8
SBIN = ("/usr/sbin", "/sbin")  # daemons live there; a non-root PATH may lack them
START_TIMEOUT_S = 30
RUN_TIMEOUT_S = 240  # hang guard


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def _need(names: list[str], packages: str) -> dict[str, str]:
    found = {n: _which(n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install -y {packages}")
    return found  # type: ignore[return-value]


def _tail(path: Path, num_chars: int = 3000) -> str:
    return f"--- {path.name} ---\n{path.read_text(errors='replace')[-num_chars:]}" if path.is_file() else f"({path} absent)"


def _start(cmd: list[str], log: Path, **kw) -> subprocess.Popen:
    """A daemon in the foreground of its own session (so teardown can signal its whole group)."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each daemon's process group (last started first), SIGKILL what is left after 10 s."""
    for p in reversed(procs):
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait_until(what: str, ready: Callable[[], bool], procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{dead} exited" if dead else f"not ready after {START_TIMEOUT_S} s"
            pytest.fail(f"{what}: {why}\n" + "\n".join(_tail(log) for log in logs))
        time.sleep(0.2)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _launch(cmd: list[str], run_env: dict[str, str], logs: list[Path]) -> subprocess.CompletedProcess:
    """Run a deepspeed launcher; past the timeout, SIGTERM it first: its handler then stops the ranks on
    every host (`pdsh ... pkill -f <this launch>`), which killing the launcher alone would leave running."""
    p = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, err = p.communicate(timeout=30)
        finally:
            _stop([p])
        pytest.fail(f"{' '.join(cmd)}: still running after {RUN_TIMEOUT_S} s\n{out[-4000:]}\n{err[-4000:]}")
    assert p.returncode == 0, (f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-4000:]}\n{err[-4000:]}\n"
                               + "\n".join(_tail(log) for log in logs))
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _assert_same_as_one_process(run_dir: Path, one: dict[int, float]) -> None:
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), got
    assert_same_losses(got, one, range(1, STEPS + 1))
    assert json.loads((run_dir / "run_info.json").read_text())["world_size"] == 2


# --- DeepSpeed + hostfile over pdsh/ssh ---

@dataclass
class Sshd:
    port: int
    client_key: Path
    folder: Path

    def pdsh_env(self) -> dict[str, str]:
        """What a user puts in ~/.ssh/config, given to pdsh's ssh instead (the test leaves ~/.ssh alone)."""
        return {"PDSH_SSH_ARGS_APPEND": f"-i {self.client_key} -o IdentitiesOnly=yes -o BatchMode=yes "
                                        "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"}


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    """A private sshd on a free port of 127.0.0.1 that lets in one temp key, for this user only."""
    bins = _need(["pdsh", "sshd", "ssh", "ssh-keygen"], "pdsh openssh-server openssh-client")
    folder = Path(tempfile.mkdtemp(prefix="amtrain-sshd-"))
    procs: list[subprocess.Popen] = []
    try:
        for key in ("host_key", "client_key"):
            subprocess.run([bins["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-C", f"amtrain-test-{key}",
                            "-f", str(folder / key)], check=True, timeout=30)
        shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
        port = free_port()
        conf = folder / "sshd_config"
        conf.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
                        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
                        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
                        "KbdInteractiveAuthentication no\nUsePAM no\n"
                        "StrictModes no\n")  # the keys sit under /tmp (world-writable), which StrictModes refuses
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir (made at boot by systemd)
        check = subprocess.run([bins["sshd"], "-t", "-f", str(conf)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"sshd -t: {check.stderr}"
        log = folder / "sshd.log"
        procs.append(_start([bins["sshd"], "-D", "-e", "-f", str(conf)], log))
        _wait_until("sshd", lambda: _listening(port), procs, [log])
        yield Sshd(port, folder / "client_key", folder)
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)


def _deepspeed_hostfile(sshd: Sshd, hostfile: Path, *script: str) -> list[str]:
    # --no_ssh_check: DeepSpeed's pre-flight `ssh HOST hostname` reads only ~/.ssh (key, known_hosts),
    # which this test does not touch; pdsh then makes the real ssh connections (PDSH_SSH_ARGS_APPEND).
    return ["deepspeed", "--hostfile", str(hostfile), "--launcher", "pdsh", "--ssh_port", str(sshd.port),
            "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script]


def test_deepspeed_hostfile_over_pdsh_two_nodes(sshd, kjv_gpt2, one_process, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names for this machine = two ssh sessions
    base = env()
    ds_env = tmp_path / "deepspeed_env"  # DeepSpeed exports each KEY=VALUE line on every node
    ds_env.write_text("".join(f"{k}={base[k]}\n" for k in ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "PATH")))
    run_env = {**base, **sshd.pdsh_env(), "DS_ENV_FILE": str(ds_env)}
    logs = [sshd.folder / "sshd.log"]

    # What the remote ranks see: ssh starts them in a bare environment, so this shows DeepSpeed forwarded it.
    probe = _launch(_deepspeed_hostfile(sshd, hostfile, "--no_python", "--no_local_rank", "printenv",
                                        "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "PATH", "PYTHONPATH", "RANK"),
                    run_env, logs)
    for host in ("localhost", "127.0.0.1"):
        values = [ln.removeprefix(f"{host}: ") for ln in probe.stdout.splitlines()
                  if ln.startswith(f"{host}: ") and not ln.startswith(f"{host}: [")]  # not DeepSpeed's log lines
        assert len(values) == 5, probe.stdout
        assert values[:3] == [base["OMP_NUM_THREADS"], base["TORCH_EXTENSIONS_DIR"], base["PATH"]], probe.stdout
        assert str(REPO) in values[3].split(":"), probe.stdout
        assert values[4] == {"localhost": "0", "127.0.0.1": "1"}[host], probe.stdout

    out = tmp_path / "pdsh"
    p = _launch(_deepspeed_hostfile(sshd, hostfile, LAUNCHER, *argv(tiny(kjv_gpt2, out))), run_env, logs)
    assert re.search(r"^localhost: amtrain: .* 2 rank\(s\) on cpu", p.stdout, re.M), p.stdout[-3000:]
    assert len(re.findall(r"Accepted publickey for ", (sshd.folder / "sshd.log").read_text())) >= 4  # 2 per launch
    _assert_same_as_one_process(out, one_process.losses)


# --- SLURM: sbatch launchers/slurm.sh on two slurmd nodes of this host ---

@dataclass
class Slurm:
    conf: Path
    folder: Path
    nodes: list[str]

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def logs(self) -> list[Path]:
        return [self.folder / "log" / f for f in ("slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes))]


def _node_resources(slurmd: str) -> tuple[int, int]:
    """CPUs and RealMemory (MiB) of this host as slurmd sees them."""
    out = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    return int(re.search(r"CPUs=(\d+)", out).group(1)), int(re.search(r"RealMemory=(\d+)", out).group(1))


def _slurm_conf(folder: Path, host: str, nodes: list[str], cpus: int, mem_mb: int) -> str:
    ports = [free_port() for _ in range(len(nodes) + 1)]
    user = pwd.getpwuid(os.geteuid()).pw_name
    lines = [
        "ClusterName=amtrain-test", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ports[0]}",
        f"SlurmUser={user}", f"SlurmdUser={user}",  # root in CI; the one user otherwise
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={folder / 'munge' / 'munge.sock'}",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}/%n",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd'}-%n.pid",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'log'}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
        "MinJobAge=4",  # purged 4 s after the end, so `sbatch --wait` polls every 2 s (not up to 32)
        *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
          for n, port in zip(nodes, ports[1:], strict=True)),
        "PartitionName=test Nodes=ALL Default=YES MaxTime=10 State=UP",
    ]
    return "\n".join(lines) + "\n"


def _nodes_idle(slurm: Slurm, sinfo: str) -> bool:
    p = subprocess.run([sinfo, "-h", "-N", "-o", "%N %T"], env={**os.environ, **slurm.env()},
                       capture_output=True, text=True, timeout=10)
    states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
    return p.returncode == 0 and all(states.get(n) == "idle" for n in slurm.nodes)


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    """munged + slurmctld + two slurmd (`-N node`) on this host, all private to a temp folder."""
    bins = _need(["munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "srun"],
                 "slurm-wlm munge")
    folder = Path(tempfile.mkdtemp(prefix="amtrain-slurm-"))
    folder.chmod(0o755)  # munged wants every folder above its socket searchable by all
    procs: list[subprocess.Popen] = []
    nodes = ["amtrain-n1", "amtrain-n2"]
    cluster = Slurm(folder / "slurm.conf", folder, nodes)
    daemon_env = {**os.environ, **cluster.env()}
    try:
        for sub, mode in (("munge", 0o755), ("munge-key", 0o700), ("state", 0o700), ("spool", 0o755), ("log", 0o755)):
            (folder / sub).mkdir(mode=mode)
        key = folder / "munge-key" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = folder / "munge"
        procs.append(_start([bins["munged"], "--foreground", f"--key-file={key}", f"--socket={munge / 'munge.sock'}",
                             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                             f"--seed-file={munge / 'munged.seed'}"], munge / "munged.out"))
        _wait_until("munged", (munge / "munge.sock").exists, procs, [munge / "munged.out"])

        host = socket.gethostname().split(".")[0]
        cpus, mem_mb = _node_resources(bins["slurmd"])
        cluster.conf.write_text(_slurm_conf(folder, host, nodes, max(1, cpus // len(nodes)), mem_mb // len(nodes)))
        log = folder / "log"
        procs.append(_start([bins["slurmctld"], "-D", "-i", "-f", str(cluster.conf)], log / "slurmctld.out", env=daemon_env))
        for n in nodes:
            procs.append(_start([bins["slurmd"], "-D", "-N", n, "-f", str(cluster.conf)], log / f"slurmd-{n}.out",
                                env=daemon_env))
        _wait_until("slurm nodes idle", lambda: _nodes_idle(cluster, bins["sinfo"]), procs,
                    [*cluster.logs(), *sorted(log.glob("*.out"))])
        yield cluster
    finally:
        if len(procs) > 1:  # cancel what is still queued or running before the daemons go
            subprocess.run([bins["scancel"], "--partition=test"], env=daemon_env, capture_output=True, timeout=30)
            time.sleep(1)
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)


def test_sbatch_slurm_script_two_nodes(slurm, kjv_gpt2, one_process, tmp_path):
    out = tmp_path / "slurm"
    args = tiny(kjv_gpt2, out)
    del args["ds_config"]  # the script's DS_CONFIG gives it
    job_env = env(**slurm.env(), NPROC_PER_NODE="1", MASTER_PORT=str(free_port()), DS_CONFIG="ds_configs/zero1.json")
    # The script's own directives (2 nodes, 1 task each) stand; GPUs and CPUs are overridden for this host.
    cmd = ["sbatch", "--wait", "--gpus-per-node=0", "--cpus-per-task=1", "--time=5",
           f"--output={tmp_path}/slurm-%j.out", "launchers/slurm.sh", *argv(args)]
    p = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    job_id = re.search(r"Submitted batch job (\d+)", p.stdout)
    job_log = tmp_path / f"slurm-{job_id.group(1)}.out" if job_id else tmp_path / "no-job"
    assert p.returncode == 0, f"{' '.join(cmd)}: {p.returncode}\n{p.stderr}\n" + "\n".join(
        _tail(f) for f in (job_log, *slurm.logs()))
    text = job_log.read_text()
    assert "2 node(s) x 1 rank(s), rendezvous at 127.0.0.1:" in text, text[-3000:]
    assert "2 rank(s) on cpu" in text, text[-3000:]
    for n in slurm.nodes:  # srun put a task (one torchrun) on each node
        assert re.search(rf"launch task StepId={job_id.group(1)}\.0 ", (slurm.folder / "log" / f"slurmd-{n}.log").read_text())
    _assert_same_as_one_process(out, one_process.losses)
