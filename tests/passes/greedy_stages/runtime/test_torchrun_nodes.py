"""The stage runtime under torchrun as two nodes on loopback: 2 stages × 2 replicas = 4 ranks.

Two torchrun invocations (``--nnodes 2 --node-rank 0/1 --nproc-per-node 2``, static rendezvous on
127.0.0.1) stand for two machines: each node runs one replica's pipeline (rank = replica·K +
stage), only the gradient all-reduce of each stage's replicas crosses "nodes", and the ranks'
results travel to rank 0 over torch.distributed (no shared file system is assumed), which merges
them and writes ``--out``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[4]
DEADLINE_S = 240.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the node's whole process group (torchrun and its workers), SIGKILL after 5 s."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def test_two_torchrun_nodes_train_two_stages_times_two_replicas(tmp_path):
    port, out = _free_port(), tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    nodes = []
    try:
        for node in (0, 1):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                       "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                       "--rdzv-id", f"effcompile-test-{port}",
                       "-m", "effcompile.passes.greedy_stages.runtime", "--model", "cnn", "--dataset", "digits",
                       "--stages", "2", "--data-parallel", "2", "--steps", "20", "--timeout", "60",
                       "--out", str(out)]
            log = open(tmp_path / f"node{node}.log", "w")
            nodes.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
        deadline = time.monotonic() + DEADLINE_S
        while any(p.poll() is None for p, _ in nodes) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p, _ in nodes):
                break  # one node failed: the other would wait for its peers until its timeout
            time.sleep(0.5)
        codes = [p.poll() for p, _ in nodes]
    finally:
        for process, log in nodes:
            _stop(process)
            log.close()
    logs = "\n".join(f"--- node {n} (exit {codes[n] if n < len(codes) else '?'}):\n{_tail(tmp_path / f'node{n}.log')}"
                     for n in range(len(nodes)))
    assert codes == [0, 0], f"torchrun nodes did not both finish within {DEADLINE_S:.0f} s\n{logs}"

    summary = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert (summary["num_stages"], summary["data_parallel"]) == (2, 2)
    assert [len(stage) for stage in summary["replica_final_losses"]] == [2, 2]  # 4 ranks merged
    assert summary["replica_divergence"] == [0.0, 0.0]  # each stage's replicas, across the two nodes
    assert summary["boundaries"][0]["messages"] == 2 * 20  # every replica's pipeline sent every step
    for first, final in zip(summary["first_losses"], summary["final_losses"]):
        assert final < first, (first, final)
    assert summary["final_losses"][-1] < 0.6 * summary["first_losses"][-1]
    assert summary["accuracy"] > 0.5
    assert summary["startup_s"] == [None, None]  # no launcher clock under torchrun
