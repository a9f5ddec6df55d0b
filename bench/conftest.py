"""Benchmark summaries printed after ``make bench``.

Step op (test_bench_step.py), per group: fused time, GB/s, share of the copy bandwidth measured in
the same group, and eager / compile time over fused time. Sampling loops (test_bench_sampling.py):
time per step, fastint against diffusers.

Both min and median are kept: on a shared 2-core machine another process can hold a core, and a
2-thread run then waits a scheduler tick for its second thread, which inflates the median but not
the min. Ratios and GB/s use the min.
"""
import pytest

_RESULTS = []  # (group, name, min seconds, median seconds, bytes moved or per-step divisor)


@pytest.fixture
def bench_results():
    return _RESULTS


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    groups = {}
    for group, name, tmin, tmed, nbytes in _RESULTS:
        groups.setdefault(group, {})[name] = (tmin, tmed, nbytes)
    step = {g: r for g, r in groups.items() if "fused" in r}
    loops = {g: r for g, r in groups.items() if "fused" not in r}
    if step:
        tr.section("fastint step: fused vs eager vs torch.compile (min times)")
        tr.write_line(f"{'group':48s} {'fused ms':>9s} {'med ms':>8s} {'GB/s':>6s} {'copy GB/s':>9s} {'% copy':>6s} "
                      f"{'x eager':>7s} {'x compile':>9s}")
        for group, rows in step.items():
            tf, tmed, nb = rows["fused"]
            gbps = nb / tf / 1e9
            copy = rows.get("copy")
            cgbps = copy[2] / copy[0] / 1e9 if copy else None
            xe = f"{rows['eager'][0] / tf:7.2f}" if "eager" in rows else f"{'-':>7s}"
            xc = f"{rows['compile'][0] / tf:9.2f}" if "compile" in rows else f"{'-':>9s}"
            cg = f"{cgbps:9.1f} {100 * gbps / cgbps:5.0f}%" if cgbps else f"{'-':>9s} {'-':>6s}"
            tr.write_line(f"{group:48s} {tf * 1e3:9.3f} {tmed * 1e3:8.3f} {gbps:6.1f} {cg} {xe} {xc}")
            if "fused_out" in rows and copy:
                to = rows["fused_out"][0]
                tr.write_line(f"{'  out= (preallocated output)':48s} {to * 1e3:9.3f} {'':8s} {nb / to / 1e9:6.1f} "
                              f"{'':9s} {100 * nb / to / 1e9 / cgbps:5.0f}%")
        tr.write_line("GB/s = bytes a single-pass kernel must move / min time ((2 + K) x numel x itemsize; "
                      "2 x numel x itemsize for the copy, dst.copy_(z) between preallocated tensors); "
                      "x eager, x compile: their time / fused time")
    if loops:
        tr.section("sampling loop: time per step (min over rounds)")
        for group, rows in loops.items():
            for name, (tmin, tmed, steps) in rows.items():
                tr.write_line(f"{group:40s} {name:34s} {tmin / steps * 1e6:9.1f} us/step "
                              f"(median {tmed / steps * 1e6:.1f})")
