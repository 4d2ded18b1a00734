"""The bench's memory figure for a server (bench/serving.py): its processes' proportional set size, so that the model
its forked workers share is counted once, not once per worker as their resident sizes would count it."""

import subprocess
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT))  # bench/ belongs to the repository, not the package
from bench.serving import Processes  # noqa: E402

MB = 2**20
HELD = 160  # MB the parent writes, then shares with a forked child

SERVER = f"""
import os, sys
held = b"\\x01" * ({HELD} * {MB})
if os.fork() == 0:
    sys.stdin.read()
    os._exit(0)
print("ready", flush=True)
sys.stdin.read()
os.wait()
"""


def test_a_servers_memory_counts_what_its_forked_workers_share_once():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        procs = Processes(proc.pid).all()
        assert len(procs) == 2
        resident = sum(p.memory_info().rss for p in procs) / MB
        assert resident > 2 * HELD  # the condition: resident sizes count the shared pages in each process
        assert HELD < Processes(proc.pid).memory_mb() < 1.5 * HELD
    finally:
        proc.communicate("", timeout=30)
