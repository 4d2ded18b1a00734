"""The server's pass slots (handlers/oip/slots.py): processes that share one slot never run a pass at the same time,
and a process killed while it holds the slot does not keep it."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from torchship.handlers import sizing
from torchship.handlers.oip.config import Config, ConfigError
from torchship.handlers.oip.slots import NONE, Slots
from torchship.handlers.oip.supervisor import complete

from helpers import card

HOLDER = """
import sys, time
from torchship.handlers.oip.slots import Slots
slots = Slots(sys.argv[1], 1)
spans = []
for _ in range(int(sys.argv[2])):
    with slots.taken():
        start = time.monotonic_ns()
        sum(range(20000))  # a pass's worth of work inside the slot
        spans.append((start, time.monotonic_ns()))
    if sys.argv[3] == "hold":
        held = slots.taken()
        held.__enter__()
        print("holding", flush=True)
        time.sleep(600)
print(" ".join(f"{a},{b}" for a, b in spans))
"""


def holders(prefix, n: int, passes: int) -> list[list[tuple[int, int]]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(prefix), str(passes), "go"], stdout=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    out = []
    for p in procs:
        line = p.communicate(timeout=120)[0].split()
        out.append([tuple(map(int, s.split(","))) for s in line])
    return out


def test_processes_sharing_one_slot_never_run_a_pass_at_once(tmp_path):
    spans = sorted(s for proc in holders(tmp_path / "slot", 3, 200) for s in proc)
    assert len(spans) == 600
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # one after the other


def test_a_killed_holder_frees_its_slot(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "slot"), "1", "hold"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        slots = Slots(tmp_path / "slot", 1)
        try:  # shown first: the slot is taken while the holder lives
            fcntl.flock(slots.fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise AssertionError("the slot was free while its holder lived")
        except BlockingIOError:
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
        with slots.taken():  # blocks forever if the kernel had not freed it
            pass
        slots.close()
    finally:
        holder.kill()


def test_no_slots_never_wait_and_cost_nothing(tmp_path):
    with NONE.taken(), NONE.taken():  # nested: no lock at all
        pass
    assert NONE.around(len) is len  # a fast model's pass is the runner's own call, unwrapped
    one = Slots(tmp_path / "slot", 1)
    assert one.around(len) is not len and one.around(len)([1, 2]) == 2
    one.close()


def test_the_supervisor_makes_oversubscribed_workers_take_turns():
    threads = max(2, sizing.cores())  # every core, and more than one thread: two such workers oversubscribe them
    given = Config(("unused",), workers=2, max_batch=8, max_batch_delay_ms=2, threads=threads, max_queue=8)
    done = complete(given, state=None)
    assert done.pass_slots == max(1, sizing.cores() // threads) == 1 < done.workers
    one_thread = complete(replace(given, threads=1, workers=sizing.cores()), state=None)
    assert one_thread.pass_slots == one_thread.workers  # cores enough for every worker's pass: no turns


WIDE = """
import sys
import time
from torchship.handlers.oip.slots import Slots
slots = Slots(sys.argv[1], 2)
with slots.taken(wide=True) as held:
    print(held, flush=True)
    sys.stdin.readline()  # holds its slots until told
"""


def test_a_lone_pass_takes_every_slot_and_one_beside_others_or_a_waiter_takes_one(tmp_path):
    prefix = tmp_path / "slot"
    slots = Slots(prefix, 2)
    ran = []
    forward = slots.around(lambda x: ran.append(("wide", x)), lambda x: ran.append(("busy", x)))
    forward(1)  # alone: every slot, every core
    start = lambda: subprocess.Popen(  # noqa: E731
        [sys.executable, "-c", WIDE, str(prefix)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    first = start()
    try:
        assert first.stdout.readline().strip() == "2"  # alone too
        waiter = start()  # finds both taken: waits for one, and says so on the waiting lock
        try:
            probe = os.open(f"{prefix}-waiting.lock", os.O_RDWR)
            while True:  # until the waiter is seen waiting (it holds the lock shared)
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(probe, fcntl.LOCK_UN)
                    assert waiter.poll() is None, "the waiter ended without waiting"
                except BlockingIOError:
                    break
            os.close(probe)
            first.stdin.write("\n")
            first.stdin.flush()
            assert first.wait(30) == 0
            assert waiter.stdout.readline().strip() == "1"  # it waited for one slot: it runs on one core
            forward(2)  # the waiter holds a slot: this pass takes the other, on one core
        finally:
            waiter.communicate("\n", timeout=30)
    finally:
        first.kill()
    forward(3)  # alone again
    assert ran == [("wide", 1), ("busy", 2), ("wide", 3)]
    slots.close()


def test_busy_threads_below_threads_adapt_and_a_torch_backend_cannot():
    busy = Config(("unused",), workers=2, max_batch=8, max_batch_delay_ms=2, threads=4, busy_threads=1, max_queue=8)
    done = complete(busy, state=None)
    assert done.adapts and done.pass_slots == sizing.cores() and "1 each while passes run at once" in done.summary()
    assert not complete(replace(busy, busy_threads=0), state=None).adapts  # threads given alone: one session
    for bad, message in (({"busy_threads": 5}, "at most threads"), ({"backend": "torchscript"}, "ONNX Runtime")):
        try:
            replace(busy, **bad)
            raise AssertionError(f"{bad} was accepted")
        except ConfigError as e:
            assert message in str(e)


def test_a_worker_keeps_to_its_share_while_another_lately_ran_a_pass_beside_one(tmp_path):
    """Between two passes a loaded worker holds no slot; the other must not take that moment to go wide. A hand-moved
    clock: each busy pass takes a tenth of a second."""
    now, ran = [100.0], []

    def busy(x):
        now[0] += 0.1
        ran.append(("busy", x))

    a, b = (Slots(tmp_path / "slot", 2, clock=lambda: now[0], owner=owner) for owner in (1, 2))
    fa, fb = (s.around(lambda x: ran.append(("wide", x)), busy) for s in (a, b))
    held = b.take()  # b's pass runs
    fa(1)  # beside it: a runs on its share, and records that it ran beside another
    b.give(held)
    fb(2)  # every slot is free and nobody waits, but a ran beside another a moment ago: b keeps to its share
    fa(3)  # b's pass was alone (kept to its share by a's record only): a records nothing that holds it back
    fb(4)  # a's record is 0.1 s old, as long as its pass took: still its share
    fb(5)  # 0.2 s: the load is over
    assert ran == [("busy", 1), ("busy", 2), ("wide", 3), ("busy", 4), ("wide", 5)]
    a.close(), b.close()


def test_a_heavy_model_gets_a_busy_session_only_where_its_runtime_and_the_memory_allow_one():
    heavy = sizing.Cost(40.0, 320.0, model_bytes=100 << 20)  # ResNet-50's 100 MB, two workers
    share = max(1, sizing.cores() // 2)
    assert sizing.sized(heavy, 2).busy_threads == share
    half = sizing.memory_bytes() // 2  # every worker's two sessions within half the memory, or the workers take turns
    assert sizing.sized(replace(heavy, model_bytes=half // 4), 2).busy_threads == share
    too_big = sizing.sized(replace(heavy, model_bytes=half // 4 + 1), 2)
    # what a session holds, where measured, counts over the file's size (ResNet-50's: 2.6x it)
    holds_more = sizing.sized(replace(heavy, session_bytes=half // 4 + 1), 2)
    torch = sizing.sized(replace(heavy, threads_by_session=False), 2)  # TorchScript, pt2: threads are the process's
    for turns in (too_big, holds_more, torch):
        assert turns.busy_threads == turns.threads and turns.pass_slots == sizing.pass_slots(2, turns.threads)


HEAP = """
from torchship.handlers import sizing
blocks = [bytearray(100_000) for _ in range(2000)]  # 200 MB from glibc's heap (each under its mmap threshold)
for b in blocks:
    b[::4096] = b"\\x01" * len(b[::4096])  # resident, every page
start = sizing.resident_bytes()
del blocks[:-1]  # freed but for the last block, which keeps the heap's top from shrinking by itself
kept = sizing.resident_bytes()
sizing.release_freed_memory()
print(start >> 20, kept >> 20, sizing.resident_bytes() >> 20)
"""


def test_memory_a_measured_session_freed_goes_back_to_the_system():
    # the supervisor measures the model in its own process, then serves for days: what glibc kept of the session
    # would be held all that time (ResNet-50's 240 MB: bench/NOTES.md, lever 77)
    r = subprocess.run([sys.executable, "-c", HEAP], capture_output=True, text=True, check=True)
    start, kept, released = map(int, r.stdout.split())
    assert kept > start - 20  # the condition: freed, glibc still holds it
    assert released < kept - 150


def test_a_long_pass_is_timed_once_a_short_one_three_times_and_a_heavy_batch_of_8_unwarmed_or_left_out():
    def counted(pass_s: float):
        calls = []

        def run(x):
            calls.append(len(x))
            if pass_s:
                time.sleep(pass_s)  # the pass itself: a model this slow, not a wait for anything

        return run, calls

    for pass_s, timed in ((0.0, 3), (sizing.LONG_PASS_S + 0.01, 1)):
        run, calls = counted(pass_s)
        ms = sizing.passes(run, card(), seconds=0)
        heavy = pass_s * 1000 >= sizing.HEAVY_MS  # the condition: the long pass is a heavy model's
        assert heavy == bool(pass_s)
        # a warming pass, then the timed ones, at each batch; a heavy model's batch of 8 unwarmed
        assert calls == [1] * (1 + timed) + [8] * (1 - heavy + timed)
        assert (ms[1] >= sizing.LONG_PASS_S * 1000) == bool(pass_s)
        # the OIP server's: a heavy model's batch of 8 not run at all, its workers' warm-up runs one before ready
        run, calls = counted(pass_s)
        ms = sizing.passes(run, card(), seconds=0, heavy_batch8=False)
        assert calls == [1] * (1 + timed) + [8] * (1 - heavy) * (1 + timed)
        assert (ms[8] == 0) == heavy


def test_a_workers_warm_up_leaves_a_busy_session_cold_only_behind_a_long_pass():
    from types import SimpleNamespace

    from torchship.handlers.oip.served import warm_up

    for pass_s, wide_passes, busy_passes in ((0.0, 3, 1), (sizing.LONG_PASS_S + 0.01, 1, 0)):
        wide, busy = [], []

        def run(x, calls=wide, pass_s=pass_s):
            calls.append(len(x))
            if pass_s:
                time.sleep(pass_s)  # the pass itself: a model this slow, not a wait for anything

        batcher = SimpleNamespace(max_batch=4, run=run, inline=None)
        served = SimpleNamespace(batcher=batcher, card=card(), runs=(run, busy.append), encode=lambda out: out)
        warm_up(served)
        assert wide == [4] * wide_passes and [len(x) for x in busy] == [4] * busy_passes
        assert served.warmup["batch"] == 4 and (served.warmup["ms"] >= sizing.LONG_PASS_S * 1000) == bool(pass_s)


def test_a_worker_that_does_not_prove_the_batch_warms_a_heavy_model_at_one_row_only():
    from types import SimpleNamespace

    from torchship.handlers.oip.served import warm_up

    for pass_s in (0.0, sizing.HEAVY_MS / 1000 + 0.005):
        wide, busy = [], []

        def run(x, calls=wide, pass_s=pass_s):
            calls.append(len(x))
            time.sleep(pass_s)  # the pass itself: a model this slow, not a wait for anything
            return np.zeros((len(x), 10), np.float32)  # the digit card's logits

        def lone(x, calls=busy, pass_s=pass_s):
            return run(x, calls, pass_s)

        batcher = SimpleNamespace(max_batch=4, run=run, inline=None)
        served = SimpleNamespace(batcher=batcher, card=card(), runs=(run, lone), encode=lambda out: out)
        warm_up(served, proves=False)
        if pass_s:  # heavy: the first worker ran the full batch; this one's row ran on its busy session
            assert wide == [] and busy == [1] and served.batcher.inline is False
            assert served.warmup["batch"] == 1 and served.warmup["ms"] >= sizing.HEAVY_MS
        else:  # light: the full warm-up, which decides where its passes run
            assert wide == [4, 4, 4] and busy == [1, 4] and served.warmup["batch"] == 4


def test_only_a_pass_that_has_the_cores_to_itself_spins_between_its_operators():
    from torchship.handlers.model.runners import session_options
    from torchship.handlers.oip.served import alone

    n = sizing.cores()
    base = Config(model_dirs=["m"], workers=2, max_batch=8)
    assert alone(replace(base, threads=n, busy_threads=1, pass_slots=n))  # a heavy model's lone pass: every slot
    assert alone(replace(base, threads=n, pass_slots=1))  # the workers take turns
    assert not alone(replace(base, threads=n, pass_slots=2))  # two passes of every core at once: oversubscribed
    assert not alone(replace(base, threads=1))  # one thread: nothing to spin
    spinning = session_options(2, spin_in_pass=True)
    assert spinning.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set: ONNX Runtime's default, on
        spinning.get_session_config_entry("session.intra_op.allow_spinning")
    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
