"""Plots at the scale of real sweeps (issue 18): one colour per policy in every store, panels that wrap
within a bounded width, heat-map text at tick-label size that fits its cell.

The 400-trial and gpt2-sizes stores are synthetic (tests/synthetic_store.py), built as DataFrames:
every plot takes one, and nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from tests.synthetic_store import SIZES_100, SWEEP_400, synthetic_rows
from txlab.analysis.data import POLICY_ORDER, prepare
from txlab.analysis.layout import MAX_COLS, MAX_WIDTH_IN
from txlab.analysis.palette import KV_POLICIES, PRESETS, RESERVED_COLORS, STATUS_MARKERS, palette, style
from txlab.analysis.plots import Skipped, draw, plot_frontier_heatmap, plot_memory_vs_length

SMOKE = Path(__file__).parent / "fixtures" / "store_v0_1_smoke"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The smoke store of the previous release (a real one), the 400-trial estimate sweep and the
    estimated frontier of gpt2 small..xl."""
    smoke = tmp_path_factory.mktemp("smoke") / "store"
    shutil.copytree(SMOKE, smoke)  # the fixture stays untouched
    return {
        "smoke": prepare(str(smoke)),
        "sweep400": prepare(pd.DataFrame(synthetic_rows(**SWEEP_400))),
        "sizes": prepare(pd.DataFrame(synthetic_rows(**SIZES_100))),
    }


def _legend_colors(fig) -> dict[str, tuple]:
    leg = fig.legends[0]
    return {t.get_text(): to_rgb(h.get_color()) for t, h in zip(leg.get_texts(), leg.legend_handles)}


def test_a_policy_has_one_colour_in_every_store(stores):
    assert len(stores["sweep400"]) == 400 and len(stores["smoke"]) == 16 and len(stores["sizes"]) == 100
    seen: dict[str, tuple] = {}
    for df in stores.values():
        for label, color in palette(df["policy"]).items():
            assert seen.setdefault(label, color) == color, label
    # recompute was red-orange with 4 policies in a store and purple with 5 before (issue 18)
    assert {"recompute", "sdpa", "naive", "checkpoint"} <= set(seen) and len(set(seen.values())) == len(seen)
    # and the plots draw with it: the smoke store's legend (a real store) gives the palette's colours
    fig = plot_memory_vs_length(stores["smoke"])
    legend = _legend_colors(fig)
    for label in palette(stores["smoke"]["policy"]):
        assert legend[label] == style(label).color, label
    matplotlib.pyplot.close(fig)


def test_palette_is_fixed_per_label_and_distinct():
    fixed = [style(p) for p in POLICY_ORDER] + [style(f"sdpa (kv={kv})") for kv in KV_POLICIES]
    assert len({s.color for s in fixed}) == len(fixed)  # presets and KV policies: all different colours
    assert len({style(p).marker for p in POLICY_ORDER}) == len(POLICY_ORDER)
    assert not {style(p).marker for p in POLICY_ORDER} & set(STATUS_MARKERS)  # X, ^, v mean a status
    assert style("sdpa").color == to_rgb(PRESETS["sdpa"][0])
    # prefill/decode rows: the KV policy's colour, the preset's marker
    assert style("sdpa (kv=recompute)").color == to_rgb(KV_POLICIES["recompute"])
    assert style("naive (kv=cache)").marker == style("naive").marker
    # independent of the other labels in a store
    assert palette(["recompute"]) == {"recompute": palette(POLICY_ORDER)["recompute"]}


def test_unknown_labels_get_a_stable_colour_of_their_own():
    new = style("llama-remat")
    assert new == style("llama-remat") and new.color in {to_rgb(c) for c in RESERVED_COLORS}
    assert new.color not in {style(p).color for p in POLICY_ORDER}
    # sha1, not Python's per-process salted hash(): the colour is pinned across runs and machines
    assert new.color == to_rgb("#997700") and new.marker == "<"
    # variants keep a shade of their family's colour and take a marker of their own
    a, b = style("custom (remat=every)"), style("custom (remat=none)")
    assert a != b and a.color != style("custom").color
    assert palette(["custom (remat=every)", "sdpa"])["custom (remat=every)"] == a.color


def _synthetic_depths(n: int) -> pd.DataFrame:
    rows = synthetic_rows(
        depths=tuple(range(2, 2 + 2 * n, 2)),
        lengths=(1024, 4096),
        policies=("sdpa", "checkpoint"),
        estimated_lengths=(),
        error=False,
    )
    return pd.DataFrame(rows)


def _rendered_width_in(fig) -> float:
    """Width of the saved image (bbox_inches='tight': the legend beside the panels included)."""
    return fig.get_tightbbox(fig.canvas.get_renderer()).width


@pytest.mark.parametrize("n, shape", [(1, (1, 1)), (4, (1, 4)), (16, (4, 4))])
def test_memory_panels_wrap_at_four_within_a_bounded_width(n, shape):
    fig = plot_memory_vs_length(_synthetic_depths(n))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == n
    rows = sorted({round(ax.get_position().y0, 3) for ax in visible})
    cols = sorted({round(ax.get_position().x0, 3) for ax in visible})
    assert (len(rows), len(cols)) == shape and len(cols) <= MAX_COLS
    assert _rendered_width_in(fig) <= MAX_WIDTH_IN + 0.3
    for ax in visible:  # panels stay big enough to read, tick labels legible
        w_in = ax.get_position().width * fig.get_figwidth()
        assert w_in >= 2.5, w_in
        assert ax.yaxis.get_major_ticks()[0].label1.get_fontsize() >= 9
    assert visible[0].get_title() == "2 layers" and visible[-1].get_title() == f"{2 * n} layers"
    matplotlib.pyplot.close(fig)


def test_400_trial_store_plots_are_readable(stores):
    df = stores["sweep400"]
    fig = plot_memory_vs_length(df, [40, 80])
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 8
    assert _rendered_width_in(fig) <= MAX_WIDTH_IN + 0.3  # it was 32 inches, eight panels in one row
    matplotlib.pyplot.close(fig)
    heat = plot_frontier_heatmap(df, [40, 80])
    assert _rendered_width_in(heat) <= MAX_WIDTH_IN + 0.3
    renderer = heat.canvas.get_renderer()
    for ax in heat.axes:
        tick_pt = min(t.get_fontsize() for t in ax.get_yticklabels())
        cell_px = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
        assert len(ax.texts) == 5 * 8
        for t in ax.texts:  # cell text as large as the tick labels, and inside its cell
            assert t.get_fontsize() >= tick_pt
            assert t.get_window_extent(renderer).width <= cell_px, t.get_text()
        # an estimate-only store says so once, not "est." in every cell
        assert not any(t.get_text().startswith("est.") for t in ax.texts)
    matplotlib.pyplot.close(heat)


def test_sizes_with_their_own_depths_share_one_heatmap_panel_per_budget(stores):
    fig = plot_frontier_heatmap(stores["sizes"], [40, 80])
    assert len(fig.axes) == 2
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["gpt2-small\n12", "gpt2-medium\n24", "gpt2-large\n36", "gpt2-xl\n48"]
    assert not any(t.get_text() == "not run" for ax in fig.axes for t in ax.texts)
    matplotlib.pyplot.close(fig)
    steps = draw("frontier_steps", stores["sizes"], [40, 80])
    assert [ax.get_title() for ax in steps.axes] == ["budget 40 GiB", "budget 80 GiB"]
    matplotlib.pyplot.close(steps)


def test_skipped_says_why(stores):
    got = draw("time_vs_memory", stores["sweep400"])
    assert isinstance(got, Skipped) and not got and str(got) == "no measured ok rows with a step time"
