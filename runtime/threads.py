"""Threads: how many a run uses, and an OpenMP wait that neither spins away a busy machine nor sleeps
away an idle one.

A compiled decode step is a few fused loops per sublayer, each split over the threads with a barrier
at its end: about 300 barriers per SmolLM2 token. GNU OpenMP's default wait spins up to 300,000
rounds (milliseconds) before it sleeps, so when another process holds one of the cores a thread spins
at every barrier while its partner waits for a core: steps of seconds instead of milliseconds. A wait
that sleeps at once (``OMP_WAIT_POLICY=PASSIVE``) pays a wake-up at every barrier instead: 1.9x the
idle step. ``GOMP_SPINCOUNT=3000`` (``SPIN_COUNT``) spins a short while and then sleeps: within 10% of
the spinning wait on an idle machine, and beside a busy process its p99 step stays under 3x its idle
median where the spinning wait's goes to 60x (``bench/results/startup/``). OpenMP reads it when torch loads it, so ``bounded_spin()`` runs when
``runtime`` is imported, before torch (an explicit setting wins).
"""

import os
import sys

from model.errors import UserError


SPIN_COUNT = 3000  # chosen by `python -m bench.startup --spin-counts ...` on this 2-core machine


def bounded_spin() -> bool:
    """Set ``GOMP_SPINCOUNT=SPIN_COUNT`` unless it or ``OMP_WAIT_POLICY`` is set or torch is already
    loaded (then it is too late). Returns whether the wait in effect is this one's default."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    if "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


def allowed_cores() -> int:
    """The cores this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads, flag: str = "--threads") -> int | None:
    """``threads`` (None stays None) checked against the allowed cores; UserError otherwise."""
    cores = allowed_cores()
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise UserError(f"{flag}: expected an integer from 1 to {cores} (the cores this process may use), "
                        f"got {threads!r}")
    return threads


def use_threads(threads=None, flag: str = "--threads") -> int:
    """Check ``threads`` and make torch (and its compiled steps) use that many; returns it. None: torch's
    current setting (its default is the cores OpenMP may use, or what the process set before), capped
    at the cores this process may use."""
    import torch

    n = check_threads(threads, flag)
    if n is None:
        n = min(torch.get_num_threads(), allowed_cores())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def add_threads_arg(p):
    """``--threads N`` on an argparse parser (checked by ``check_threads`` when the engine loads)."""
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads (default: the cores this process may use, {allowed_cores()} here)")
