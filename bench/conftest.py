"""Benchmark summary: fused/eager time ratio and achieved bandwidth, per group.

Both min and median are shown: on a shared 2-core machine another process can hold a
core, and a 2-thread run then waits a scheduler tick for its second thread, which
inflates the median but not the min. Ratios and GB/s use the min.
"""
import pytest

_RESULTS = []  # (group, name, min seconds, median seconds, bytes moved)


@pytest.fixture
def bench_results():
    return _RESULTS


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("fastint step: fused vs eager")
    groups = {}
    for group, name, tmin, tmed, nbytes in _RESULTS:
        groups.setdefault(group, {})[name] = (tmin, tmed, nbytes)
    tr.write_line(f"{'group':44s} {'impl':16s} {'min ms':>8s} {'med ms':>8s} {'GB/s':>6s} {'/eager':>7s} {'/copy':>7s}")
    for group, rows in groups.items():
        eager = rows.get("eager", (None,))[0]
        copy = rows.get("copy", (None,))[0]
        for name, (tmin, tmed, nbytes) in rows.items():
            vs_eager = f"{tmin / eager:7.3f}" if eager else " " * 7
            vs_copy = f"{tmin / copy:7.2f}" if copy else " " * 7
            tr.write_line(f"{group:44s} {name:16s} {tmin * 1e3:8.3f} {tmed * 1e3:8.3f} "
                          f"{nbytes / tmin / 1e9:6.1f} {vs_eager} {vs_copy}")
    tr.write_line("GB/s = bytes a single-pass kernel must move / min time (12 B per element for the step, "
                  "8 for the copy)")
