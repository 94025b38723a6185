"""metarec.memory: when the heap is trimmed, and that a trim really returns holes in the heap."""

from __future__ import annotations

import gc
import platform

import numpy as np
import pytest

from metarec.memory import FreedMemoryLimit, bounded, keep_freed_memory, release_freed_memory, resident_bytes

MiB = 1 << 20


class FakeProcess:
    """A resident set that the test moves by hand; a trim drops it to `after_trim`."""

    def __init__(self, rss: int, after_trim: int) -> None:
        self.rss, self.after_trim, self.trimmed = rss, after_trim, 0

    def resident(self) -> int:
        return self.rss

    def trim(self) -> bool:
        self.trimmed += 1
        self.rss = self.after_trim
        return True


def test_trims_only_when_growth_passes_the_slack_measured_after_the_working_set_returns():
    proc = FakeProcess(rss=1000 * MiB, after_trim=900 * MiB)
    limit = FreedMemoryLimit(slack=256 * MiB, resident=proc.resident, trim=proc.trim)
    limit.check()                               # the first chunk's working set is in: level 1000
    proc.rss = 1256 * MiB                       # exactly the slack: kept
    limit.check()
    assert (proc.trimmed, limit.trims) == (0, 0)
    proc.rss = 1257 * MiB                       # one MiB past it: trimmed, down to 900
    limit.check()
    assert (proc.trimmed, limit.trims) == (1, 1)
    proc.rss = 1400 * MiB                       # the next chunk faults its working set back in:
    limit.check()                               # that sets the new level, it is not growth
    assert proc.trimmed == 1
    proc.rss = 1656 * MiB
    limit.check()
    assert proc.trimmed == 1
    proc.rss = 1657 * MiB                       # 257 above the new level: trimmed again
    limit.check()
    assert proc.trimmed == 2


def test_live_growth_costs_one_trim_per_slack_not_one_per_check():
    # Memory that is live cannot be returned: the trim leaves the resident set where it was, and
    # the next trim waits for another slack of growth past the level after it.
    rss = [500 * MiB]
    trims = []
    limit = FreedMemoryLimit(slack=100 * MiB, resident=lambda: rss[0], trim=lambda: trims.append(rss[0]) or False)
    for _ in range(50):
        rss[0] += 10 * MiB
        limit.check()
    # level +10 at the first check, trim at +120; level +130 at the check after it, trim at +240;
    # then +250 and +360, +370 and +480
    assert [t // MiB - 500 for t in trims] == [120, 240, 360, 480]


def test_unknown_resident_set_never_trims():
    calls = []
    limit = FreedMemoryLimit(slack=0, resident=lambda: None, trim=lambda: calls.append(1) or True)
    limit.check()
    limit.check()
    assert calls == [] and limit.trims == 0


def test_bounded_yields_every_item_in_order_and_checks_after_each(monkeypatch):
    events = []

    class Recording(FreedMemoryLimit):
        def __init__(self, slack: int) -> None:
            events.append(("limit", slack))

        def check(self) -> None:
            events.append("check")

    monkeypatch.setattr("metarec.memory.FreedMemoryLimit", Recording)
    for item in bounded(["a", "b", "c"], slack=7):
        events.append(item)
    assert events == [("limit", 7), "a", "check", "b", "check", "c", "check"]


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="malloc_trim and /proc/self/statm are glibc and Linux facilities")


@glibc
def test_a_trim_returns_freed_memory_that_free_alone_keeps_resident():
    if not keep_freed_memory():                 # as in every stage: freed blocks stay in the heap
        pytest.skip("this glibc refused the 1 GiB thresholds")
    release_freed_memory()
    before = resident_bytes()
    big, pins = [], []
    for i in range(64):                         # 4 MiB blocks, each followed by a small block that lives on
        big.append(np.ones(4 * MiB // 8 + i, dtype=np.float64))
        pins.append(np.ones(1024 + i, dtype=np.float64))
    grown = resident_bytes()
    assert grown - before > 200 * MiB
    del big
    gc.collect()
    after_free = resident_bytes()
    assert after_free - before > 200 * MiB      # free() alone returns none of it (the kept thresholds)
    assert release_freed_memory()
    trimmed = resident_bytes()
    assert after_free - trimmed > 200 * MiB     # the trim hands it back
    assert len(pins) == 64 and float(pins[-1].sum()) == 1024 + 63
