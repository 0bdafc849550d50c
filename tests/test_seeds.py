"""The seeds table: mean ± sample std per row, and the 2-std significance rule."""

from __future__ import annotations

import math

import pytest

from amodal3d.bench.seeds import SeedRow, seeds_markdown, significance


def _row(name, mious, reference=False):
    return SeedRow(name, [{"experiment": f"e{i}", "seed": i, "checkpoint": "", "miou": m, "miou_occ": m / 2}
                          for i, m in enumerate(mious)], reference=reference)


def test_mean_and_sample_std():
    r = _row("a", [0.70, 0.72, 0.74])
    assert r.mean("miou") == pytest.approx(0.72)
    assert r.std("miou") == pytest.approx(0.02)  # n - 1 in the denominator
    assert math.isnan(_row("one", [0.7]).std("miou"))
    assert _row("ref", [0.6], reference=True).std("miou") == 0.0


def test_a_difference_counts_only_beyond_twice_the_larger_std():
    ours = _row("Ours", [0.80, 0.81, 0.82])          # std 0.01
    close = _row("close", [0.77, 0.775, 0.78])       # 0.035 apart, beyond 2 x 0.01: significant
    noisy = _row("noisy", [0.70, 0.78, 0.86])        # std 0.08: 0.03 apart is noise
    d, spread, sig = significance(ours, close, "miou")
    assert d == pytest.approx(0.035) and spread == pytest.approx(0.02) and sig is True
    d, spread, sig = significance(ours, noisy, "miou")
    assert d == pytest.approx(0.03) and spread == pytest.approx(0.16) and sig is False
    assert significance(ours, _row("one", [0.5]), "miou")[2] is None  # one seed: unknown, not "yes"
    ref = _row("visible", [0.6], reference=True)
    assert significance(ours, ref, "miou")[2] is True  # a reference row has no spread


def test_markdown_lists_every_row_and_the_comparisons():
    rows = [_row("2D-only", [0.70, 0.71, 0.72]), _row("Ours", [0.74, 0.75, 0.76])]
    md = seeds_markdown(rows, [_row("visible", [0.62], reference=True)], {"protocol": "gt-visible"})
    assert "| Ours | 3 | 75.0 ± 1.0 |" in md and "| visible | — | 62.0 |" in md
    assert "| 2D-only | +4.0 | 2.0 | yes |" in md
