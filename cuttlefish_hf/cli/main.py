"""``cuttlefish-hf``: one subcommand per module of this package.

Every subcommand module exposes ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit code``. A subcommand
reports bad input by raising ``ValueError`` (or ``OSError`` for files): ``main`` prints its message on one line
and exits 1; argparse's own errors exit 2.

Every subcommand takes ``--threads N`` (torch's intra-op threads). Without it, and without ``OMP_NUM_THREADS`` in
the environment, ``main`` picks the cores that are free when it starts (usable cores minus the time others kept
them busy over a quarter of a second, else minus the 1-minute load average; at least 1) and logs the choice on
stderr: on a shared machine, more threads than free cores make torch's threads wait for each other
(``benchmarks/demo_threads.py``: with two busy processes on two cores, a demo epoch took 1.9x to 23x as long with
2 threads as with 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import demo, inspect, merge, profile
from .arguments import positive_int

SUBCOMMANDS = {"inspect": inspect, "profile": profile, "merge": merge, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cuttlefish-hf", description="Cuttlefish low-rank training tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=module.HELP, description=module.__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(subparser)
        subparser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                               help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores free at "
                                    "start: usable cores minus those busy with other work, at least 1)")
    return parser


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_cores_now(window: float = 0.25, cpus=None, path: str = "/proc/stat") -> float | None:
    """CPUs' worth of time the usable CPUs (``cpus``: default this process's affinity) spent busy over the next
    ``window`` seconds, from Linux ``/proc/stat``; None where there is no such file or it lacks one of them. This
    process sleeps meanwhile, so only others count. Unlike the 1-minute load average it does not remember what has
    already finished (an install or a previous run just before)."""
    def read() -> dict[int, tuple[int, int]]:
        times = {}
        with open(path, encoding="ascii") as handle:
            for line in handle:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    ticks = [int(value) for value in fields[:8]]  # user .. steal (guest is inside user)
                    times[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4])  # (all, idle + iowait)
        return times

    try:
        cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
        before = read()
        time.sleep(window)
        after = read()
        busy = 0.0
        for cpu in cpus:
            total = after[cpu][0] - before[cpu][0]
            if total > 0:
                busy += 1.0 - (after[cpu][1] - before[cpu][1]) / total
        return busy
    except (AttributeError, OSError, ValueError, IndexError, KeyError):
        return None


def choose_threads(requested: int | None = None, environ=None) -> tuple[int | None, str]:
    """(torch threads to use, why). ``requested`` (``--threads``) wins, then ``OMP_NUM_THREADS`` (None: torch
    already follows it), else the free cores: usable cores minus the CPUs' worth of busy time others used on them
    over a quarter of a second (:func:`busy_cores_now`) or, where that cannot be read, minus the 1-minute load
    average (machine-wide, so scaled by usable / all cores), rounded, at least 1."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        return requested, "--threads"
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS'].strip()}"
    cores = usable_cores()
    busy = busy_cores_now()
    if busy is not None:
        why = f"{cores} usable cores, {busy:.2f} busy with other work"
    else:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not available on this platform
            load = 0.0
        busy = load * cores / max(cores, os.cpu_count() or cores)
        why = f"{cores} usable cores, 1-minute load {load:.2f}"
    return max(1, min(cores, int(cores - busy + 0.5))), why


def set_threads(args: argparse.Namespace) -> int:
    """Apply :func:`choose_threads` to torch, log it on stderr and record it in ``args``; returns the thread
    count torch had before, for the caller to restore."""
    import torch

    before = torch.get_num_threads()
    threads, why = choose_threads(args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    args.threads, args.threads_chosen_by = torch.get_num_threads(), why
    override = "" if why == "--threads" else "; set --threads N or OMP_NUM_THREADS to override"
    print(f"cuttlefish-hf {args.command}: {args.threads} torch thread{'s' * (args.threads != 1)} ({why}{override})",
          file=sys.stderr)
    return before


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads_before = set_threads(args)
    try:
        return SUBCOMMANDS[args.command].run(args) or 0
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split("\n")) or type(error).__name__
        print(f"cuttlefish-hf {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        import torch

        torch.set_num_threads(threads_before)  # called in-process (tests, notebooks): leave torch as it was


if __name__ == "__main__":
    sys.exit(main())
