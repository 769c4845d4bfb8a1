"""Benchmark helpers: device timing, bandwidth / FLOP rates, and same-run ratios.

Every benchmark times one implementation under a ``group`` (the problem) with ``timer``; at the end
of the session a table lists each group's implementations with their median time, rates and speed
relative to the fastllm implementation of that group. ``--results-json PATH`` also writes it out.

On CUDA a call's time is its device time: CUDA events around the call, with the GPU kept busy by a
spin kernel while Python dispatches it, so the host's dispatch overlaps the GPU as it does in a
training loop (the view of ``triton.testing.do_bench``). The host's own time per call is reported
beside it ("host ms"): a call costs the larger of the two when nothing else hides its dispatch
(a call that waits for the GPU inside it counts the spin kernel there too). On the CPU a call's
time is its wall time.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

# Benchmarks import their shared baselines (benchmarks/baselines.py) by module name.
sys.path.insert(0, str(Path(__file__).parent))

_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)


def pytest_addoption(parser):
    parser.addoption("--results-json", default=None, help="write the ratio table as JSON to this path")


# About 1 ms of spinning at Hopper's clocks: longer than any timed op takes to dispatch (at most
# about 0.5 ms, the selective scan's backward through autograd).
_HEAD_START_CYCLES = 2_000_000


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _DeviceStamp:
    """A CUDA event recorded on the current stream; ``end - start`` waits for ``end`` and gives the
    seconds between them. pytest-benchmark's runner takes the difference of two clock readings, so
    this serves as its clock."""

    def __init__(self):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, start: "_DeviceStamp") -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) / 1e3


class Timer:
    def __init__(self, benchmark, results_json: str | None):
        self.benchmark = benchmark
        self.results_json = results_json

    def __call__(self, fn, *, group: str, name: str, device, bytes_moved: float | None = None,
                 flops: float | None = None, rounds: int = 10, warmup: int = 3) -> float:
        """Times ``fn``, returns and records the median in seconds (device time on CUDA, see above)."""
        for _ in range(warmup):
            fn()
        sync(device)
        self.benchmark.group = group
        if torch.device(device).type != "cuda":
            def timed():
                fn()
                sync(device)
            self.benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
            host_median = None
        else:
            host = []

            def dispatched():
                start = time.perf_counter()
                fn()
                host.append(time.perf_counter() - start)
            self.benchmark._timer = _DeviceStamp  # pytest-benchmark has no public per-test clock
            self.benchmark.pedantic(dispatched, setup=lambda: torch.cuda._sleep(_HEAD_START_CYCLES), rounds=rounds,
                                    iterations=1, warmup_rounds=0)
            host_median = statistics.median(host)
        median = statistics.median(self.benchmark.stats.stats.data)
        self.benchmark.extra_info.update(self._record(group, name, median, device, bytes_moved, flops, host_median))
        return median

    def interleaved(self, fns: dict, *, group: str, device, rounds: int = 10, warmup: int = 2) -> dict[str, float]:
        """Times several implementations in turn (A, B, A, B, ...), so that drift of the card or the host
        during the run weighs on all of them alike; records and returns each median in seconds. These
        are wall times, synchronised after each call: whole training steps, whose host work is theirs."""
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync(device)
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, median in medians.items():
            self._record(group, name, median, device)
        return medians

    def _record(self, group: str, name: str, median: float, device, bytes_moved: float | None = None,
                flops: float | None = None, host_median: float | None = None) -> dict:
        row = {"median_ms": median * 1e3, "device": str(torch.device(device))}
        if host_median is not None:
            row["host_ms"] = host_median * 1e3
        if bytes_moved is not None:
            row["GB_per_s"] = bytes_moved / median / 1e9
        if flops is not None:
            row["TFLOP_per_s"] = flops / median / 1e12
        _RESULTS[group][name] = row
        if self.results_json:  # after every benchmark, so a run stopped at its time limit keeps its rows
            _write_json(self.results_json)
        return row


@pytest.fixture
def timer(benchmark, pytestconfig):
    return Timer(benchmark, pytestconfig.getoption("--results-json"))


def _table() -> list[dict]:
    rows = []
    for group, impls in _RESULTS.items():
        ours = [v["median_ms"] for k, v in impls.items() if k.startswith("fastllm")]
        for name, row in impls.items():
            speedup = (row["median_ms"] / min(ours)) if ours else None
            rows.append({"group": group, "impl": name, **row, "fastllm_speedup_over_this": speedup})
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _table()
    if not rows:
        return
    tr = terminalreporter
    tr.section("fastllm benchmark ratios (same run)")
    tr.write_line(f"{'group':<44} {'impl':<28} {'median ms':>10} {'host ms':>8} {'GB/s':>8} {'TFLOP/s':>8} "
                  f"{'fastllm x':>9}")
    for r in rows:
        host = f"{r['host_ms']:.3f}" if "host_ms" in r else "-"
        gbs = f"{r['GB_per_s']:.1f}" if "GB_per_s" in r else "-"
        tfs = f"{r['TFLOP_per_s']:.1f}" if "TFLOP_per_s" in r else "-"
        sp = f"{r['fastllm_speedup_over_this']:.2f}" if r["fastllm_speedup_over_this"] else "-"
        tr.write_line(f"{r['group']:<44} {r['impl']:<28} {r['median_ms']:>10.3f} {host:>8} {gbs:>8} {tfs:>8} {sp:>9}")
    path = config.getoption("--results-json")
    if path:
        _write_json(path)


def _write_json(path: str) -> None:
    with open(path, "w") as f:
        json.dump(_table(), f, indent=1)
