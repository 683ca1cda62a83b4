"""Which processes a command starts and what CPU time they use, Ray's worker processes included.

Ray starts its workers from the raylet, not as children of the command, so `time` and `rusage` miss
them. This samples /proc every 0.3 s while the command runs and sums, per kind of process (Ray worker,
raylet, GCS, agents, the command itself), how many were seen and the CPU time each used while seen.
Linux only; a process that lives less than one sample may be missed.

    python benchmarks/process_census.py -- python tests/scenarios.py pretrain-node-loss /tmp/pnl/r.json
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import time

KINDS = ("default_worker", "raylet", "gcs_server", "dashboard_agent", "runtime_env_agent", "log_monitor", "monitor.py", "dashboard.py")


def sample(hz: int) -> dict[tuple[str, str], tuple[str, float]]:
    """(pid, start time) -> (command line, CPU seconds so far) of every process now alive."""
    seen = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seen[(pid, fields[19])] = (cmdline, (int(fields[11]) + int(fields[12])) / hz)
    return seen


def kind(cmdline: str, own: str) -> str:
    if cmdline.startswith("ray::") and "Agent" not in cmdline:  # a worker names itself after what it last ran
        return "Ray worker " + cmdline.split()[0].split(".")[0]
    return next((k for k in KINDS if k in cmdline), "the command" if own in cmdline else "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    hz = os.sysconf("SC_CLK_TCK")
    before = sample(hz)
    first: dict = {}
    last: dict = {}
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        for key, (cmdline, cpu) in sample(hz).items():
            first.setdefault(key, before[key][1] if key in before else 0.0)  # CPU it had used before the command
            # A process that has exited but not been reaped reads an empty command line: keep the last one.
            last[key] = (cmdline or last.get(key, ("", 0.0))[0], cpu)
        time.sleep(0.3)
    wall = time.perf_counter() - started
    totals = collections.defaultdict(lambda: [0, 0.0])
    for key, (cmdline, cpu) in last.items():
        used = cpu - first[key]
        if used > 0.05:
            entry = totals[kind(cmdline, " ".join(command[:2]))]
            entry[0] += 1
            entry[1] += used
    print(f"exit {proc.returncode}, wall {wall:.1f} s")
    workers = [entry for name, entry in totals.items() if name.startswith(("Ray worker", "default_worker"))]
    print(f"{sum(c for _, c in workers):8.1f} CPU-s  {sum(n for n, _ in workers):4d} processes  all Ray workers")
    for name, (count, cpu) in sorted(totals.items(), key=lambda item: -item[1][1]):
        print(f"{cpu:8.1f} CPU-s  {count:4d} processes  {name}")


if __name__ == "__main__":
    main()
