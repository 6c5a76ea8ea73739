"""allocator.keep_freed_memory: glibc's thresholds set where glibc is, nothing elsewhere."""

from __future__ import annotations

import ctypes
import platform

import pytest

from dalle_lightning import allocator


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)
def test_sets_both_thresholds_on_glibc(monkeypatch):
    calls: list[tuple[int, int]] = []
    libc = ctypes.CDLL("libc.so.6")

    class Recording:  # the real mallopt, recording its arguments
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return libc.mallopt(param, value)

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda _name: Recording())
    assert allocator.keep_freed_memory() is True
    assert calls == [
        (allocator.M_MMAP_THRESHOLD, 32 * 1024 * 1024),  # glibc's documented upper limit
        (allocator.M_TRIM_THRESHOLD, 2**31 - 1),
    ]


def test_does_nothing_outside_glibc(monkeypatch):
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(
        allocator.ctypes, "CDLL", lambda _name: pytest.fail("no C library is loaded off glibc")
    )
    assert allocator.keep_freed_memory() is False
