"""Sampling profiles of the daemon under load, with py-spy (optional: `pip install py-spy` into the venv).

`Profiler(pid, path)` records while the measured phase runs (py-spy's raw format: one collapsed stack per
line with its sample count); `top(path)` turns that into the functions with the most samples, by self time
(the innermost frame) and by total time (anywhere on the stack).

    python -m tests.bench.profile bench-results/profile-e2e.txt      # print the top entries again
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["Profiler", "format_top", "top"]


class Profiler:
    """py-spy attached to a running process (by PID) until `stop()`; needs ptrace rights (root here)."""

    def __init__(self, pid: int, path: Path, rate: int = 200) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.path = path
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--output", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> Path:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.path


def _frame(text: str) -> str:
    """`fn (path/module.py:123)` → `fn (module.py)`: aggregate by function, not by line."""
    name, _, where = text.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({file.rsplit('/', 1)[-1]})" if file else name


def top(path: Path, n: int = 15) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(total samples, top `n` by self samples, top `n` + 10 by total samples)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    return samples, own.most_common(n), total.most_common(n + 10)


def format_top(path: Path, n: int = 15) -> str:
    samples, own, total = top(path, n)
    lines = [f"{samples} samples in {path}", "  self%  function (by self time)"]
    lines += [f"  {100 * c / samples:5.1f}  {f}" for f, c in own]
    lines += ["  total%  function (anywhere on the stack; the event loop's frames left out)"]
    lines += [f"  {100 * c / samples:6.1f}  {f}" for f, c in total if c < 0.9 * samples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="top entries of a py-spy raw profile")
    parser.add_argument("path", type=Path)
    parser.add_argument("-n", type=int, default=15)
    args = parser.parse_args(argv)
    print(format_top(args.path, args.n))


if __name__ == "__main__":
    main()
