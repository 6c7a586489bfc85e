"""Shared fixtures: one tiny model for the session (built here, no hub) and its torchtune policy."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlaif_recipes.models import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory in the shared cache: a cold cache builds it once."""
    from rlaif_recipes.models.get_model import get_model

    return get_model("smollm2-135m-instruct")


@pytest.fixture()
def small_disk(tmp_path):
    """A real small file system: mount(size_mib) mounts a tmpfs of that size and returns its path;
    each is unmounted when the test ends. Needs root (CI and this machine run as root)."""
    mounted: List[Path] = []

    def mount(size_mib: float) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mib * 1024)}k", "tmpfs", str(path)],
                                capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def load_policy(checkpoint_dir: Path) -> torch.nn.Module:
    """An HF checkpoint (the tiny model, SmolLM2) as a torchtune module, loaded through torchtune's HF checkpointer."""
    from rlaif_recipes.models import decoder_from_hf_dir, hf_checkpointer

    checkpointer = hf_checkpointer(str(checkpoint_dir), output_dir=str(checkpoint_dir.parent / "unused-output"))
    model = decoder_from_hf_dir(str(checkpoint_dir))
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    return model


@pytest.fixture()
def policy(tiny_model_dir) -> torch.nn.Module:
    return load_policy(tiny_model_dir)


def run_cli(args: List[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a console command of this venv (tune, rlaif) as a user would, capturing its output."""
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run([str(exe), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def what_failed(result: subprocess.CompletedProcess) -> str:
    """A failed command's stderr for an assert message: its first error lines, then its tail. Under
    torchrun the tail is the other ranks being stopped; the first error is the rank that failed."""
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()][:5]
    return "\n".join(errors) + "\n...\n" + result.stderr[-3000:]


def two_launchers(args: List[str], cwds: List[Path]) -> List[subprocess.Popen]:
    """`tune run ARGS` as two nodes on loopback, the way a cluster runs it: one torchrun launcher per
    node (`--nnodes 2 --node_rank 0|1`, one process each, c10d rendezvous), each in its own working
    directory. Returns the running launchers; see `finish` and `stderr_of`. Each one's stderr goes to
    an unnamed temporary file, not a pipe: a pipe nobody reads while waiting on the other launcher
    fills at 64 KiB, blocks its rank, and the peer then waits on it in a collective for ever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / args[0]
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", f"test-{port}"]
    # on a cluster the endpoint names node 0's host, so node 0 holds the rendezvous store; on
    # loopback every launcher's host matches, so say which one does; a launcher that never joins
    # fails the other's rendezvous in 2 minutes (torch's default: 10). One thread per rank, as one
    # launcher with two processes sets it (a thread count changes float sums, so bitwise results)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = []
    for rank, cwd in enumerate(cwds):
        err = tempfile.TemporaryFile("w+")
        launchers.append(subprocess.Popen(
            [str(exe), args[1], *node, "--node_rank", str(rank), "--rdzv-conf", f"is_host={rank == 0},join_timeout=120", *args[2:]],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True))
        launchers[-1].err_file = err
    return launchers


def stderr_of(launcher: subprocess.Popen) -> str:
    """What a launcher from `two_launchers` has written to stderr so far."""
    launcher.err_file.seek(0)
    return launcher.err_file.read()


def finish(launchers: List[subprocess.Popen], timeout: int = 300) -> List[str]:
    """Wait for every launcher; each one's stderr (all must have exited 0). Past `timeout` seconds
    the launchers and their ranks are killed and the test fails with what each one printed."""
    deadline = time.monotonic() + timeout
    try:
        for p in launchers:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for p in launchers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        tails = "\n".join(f"--- launcher {n} (exit {p.returncode}):\n{stderr_of(p)[-4000:]}" for n, p in enumerate(launchers))
        pytest.fail(f"the launchers did not finish in {timeout} s; killed. What they printed:\n{tails}")
    errs = [stderr_of(p) for p in launchers]
    for p, err in zip(launchers, errs):
        assert p.returncode == 0, err[-3000:]
    return errs
