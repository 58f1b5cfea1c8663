#!/usr/bin/env python
"""The GPU check (``make gpu-check``): the CUDA-marked tests and ``bench.py --device cuda``, one summary.

It runs on a GPU machine's own torch and Lightning: nothing is installed and no venv is made. The
package is imported from the checkout (``PYTHONPATH`` = the repository root), so its entry points are
not registered; the CUDA-marked tests do not need them. Only the test files that hold a CUDA mark are
collected, so a test dependency missing there (hypothesis, zclip, jsonargparse) stops nothing.

    python3 benchmarks/gpu_check.py                       # what `make gpu-check` runs
    python3 benchmarks/gpu_check.py --bench-args=--quick    # a shorter benchmark
    python3 benchmarks/gpu_check.py --budget 300          # seconds for the whole check

Without CUDA (or without torch) it says so and exits 0. Otherwise it exits 1 when a test failed or
errored or the benchmark did not finish; a missed benchmark target is reported, not failed (timings
are the machine's).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CUDA_MARK = re.compile(r"\bmark\.cuda\b")


def child_env() -> dict[str, str]:
    """The environment of the test and benchmark processes: the checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("GRADCLIP_CONFIG", None)  # the zero-code route would add callbacks to every Trainer
    return env


def run_streamed(cmd: list[str], timeout: float) -> tuple[Optional[int], str, bool]:
    """Run ``cmd`` from the repository root, echoing its output; ``(returncode, output, timed_out)``.

    At ``timeout`` seconds its whole process group is killed (a Trainer may have started workers).
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(max(timeout, 1.0), kill)
    timer.start()
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
        proc.wait()
    finally:
        timer.cancel()
    return (None if killed.is_set() else proc.returncode), "".join(lines), killed.is_set()


def importable(python: str, module: str) -> Optional[str]:
    """The version of ``module`` under ``python``, ``"?"`` without one, or ``None`` if it does not import."""
    code = f"import {module} as m; print(getattr(m, '__version__', '?'))"
    try:
        result = subprocess.run([python, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    return result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else None


def cuda_test_files() -> list[str]:
    """The test files that hold a ``pytest.mark.cuda``, relative to the repository root."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if CUDA_MARK.search(p.read_text()))


def junit_counts(path: Path) -> Optional[dict[str, int]]:
    """``{"passed", "failed", "errors", "skipped"}`` from pytest's JUnit XML, or ``None`` if it was not written."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return {"passed": passed, "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def run_tests(python: str, timeout: float) -> tuple[str, bool]:
    """The CUDA-marked tests: a summary line and whether they all passed (skips allowed)."""
    if importable(python, "pytest") is None:
        return f"not run: pytest does not import under {python}", False
    files = cuda_test_files()
    if not files:
        return "not run: no test file holds a `pytest.mark.cuda`", False
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "cuda.xml"
        cmd = [python, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfEs", "-q",
               f"--junitxml={junit}", *files]
        print(f"$ {shlex.join(cmd)}", flush=True)
        code, output, timed_out = run_streamed(cmd, timeout)
        counts = junit_counts(junit)
    if timed_out:
        return f"timed out after {timeout:.0f} s ({', '.join(files)})", False
    if counts is None:  # pytest stopped before writing its report (a collection error, a crash)
        last = output.strip().splitlines()[-1] if output.strip() else "no output"
        return f"pytest exited {code} without a report: {last}", False
    text = ", ".join(f"{v} {k}" for k, v in counts.items())
    ok = code in (0, 5) and counts["failed"] == 0 and counts["errors"] == 0  # 5: every test deselected
    return f"{text} (pytest -m cuda on {', '.join(files)})", ok


def run_bench(python: str, extra: list[str], timeout: float, logger: str) -> tuple[str, bool]:
    """``bench.py --device cuda``: a summary line and whether it finished."""
    cmd = [python, "benchmarks/bench.py", "--device", "cuda", "--logger", logger, *extra]
    print(f"$ {shlex.join(cmd)}", flush=True)
    code, output, timed_out = run_streamed(cmd, timeout)
    met = re.findall(r"^Targets: (\d+) of (\d+) met(.*)$", output, flags=re.M)
    if met and code == 0:
        got, of, missed = met[-1]
        return f"targets {got} of {of} met{missed}", True
    rows = re.findall(r"\] (PASS|MISS)$", output, flags=re.M)  # the rows printed before it stopped
    so_far = f"; before it stopped: {rows.count('PASS')} of {len(rows)} targets met" if rows else ""
    if timed_out:
        return f"timed out after {timeout:.0f} s{so_far} (shorten it with --bench-args / BENCH_ARGS)", False
    return f"exited {code}{so_far}", False


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (tests, then benchmark)")
    parser.add_argument("--tests-timeout", type=float, default=180.0, help="seconds for the CUDA tests at most")
    parser.add_argument("--bench-args", default="", help="more arguments for bench.py, e.g. '--quick' or '--sections ops,train'")
    args = parser.parse_args(argv)
    started = time.monotonic()
    python = sys.executable
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    try:
        import torch
    except ImportError:
        print(f"gpu-check: no CUDA check ran: torch does not import under {python} "
              "(set PYTHON=... to the interpreter that has the GPU build of torch). Nothing to do here.")
        return 0
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False): "
              "nothing to check. Run `make gpu-check` on a GPU machine.")
        return 0

    gpu = f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
    versions = {m: importable(python, m) for m in ("pytorch_lightning", "lightning", "tensorboard", "tensorboardX")}
    print(f"gpu-check: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"pytorch_lightning {versions['pytorch_lightning']}, lightning {versions['lightning']}, Python {sys.version.split()[0]}",
          flush=True)
    if versions["pytorch_lightning"] is None:
        print("gpu-check: warning: the CUDA tests and bench.py import `pytorch_lightning`, which does not import here", flush=True)

    tests, tests_ok = run_tests(python, min(args.tests_timeout, args.budget / 2))
    remaining = args.budget - (time.monotonic() - started) - 10.0  # 10 s for the summary
    logger = "tensorboard" if versions["tensorboard"] or versions["tensorboardX"] else "csv"
    bench, bench_ok = run_bench(python, shlex.split(args.bench_args), remaining, logger)

    try:  # a copy of the checkout may come without git or without .git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    print()
    print("=" * 100)
    print(f"gpu-check summary, {date}, {time.monotonic() - started:.0f} s"
          + (f", commit {commit}" if commit else ""))
    print(f"  GPU:    {gpu}")
    print(f"  torch:  {torch.__version__} (CUDA {torch.version.cuda}); pytorch_lightning {versions['pytorch_lightning']}; "
          f"lightning {versions['lightning']}")
    print(f"  tests:  {'OK' if tests_ok else 'FAILED'}: {tests}")
    print(f"  bench:  {'OK' if bench_ok else 'FAILED'}: {bench} (logger {logger})")
    print("=" * 100)
    return 0 if tests_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
