"""Plots at the scale of real sweeps (issue 18): one colour per policy in every store, panels that wrap
within a bounded width, heat-map text at tick-label size that fits its cell.

The 400-trial and gpt2-sizes stores are synthetic (tests/synthetic_store.py), built as DataFrames:
every plot takes one, and nothing is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.colors import to_rgb
from matplotlib.text import Annotation, Text
from PIL import Image

from tests.synthetic_store import SIZES_100, SWEEP_400, smoke_rows, synthetic_rows
from txlab.analysis.cli import write_plots
from txlab.analysis.data import POLICY_ORDER, prepare
from txlab.analysis.frontier import frontier
from txlab.analysis.layout import MAX_COLS, MAX_WIDTH_IN
from txlab.analysis.palette import KV_POLICIES, PRESETS, RESERVED_COLORS, STATUS_MARKERS, palette, style
from txlab.analysis.plots import Skipped, draw, plot_frontier_heatmap, plot_memory_vs_length
from txlab.analysis.report import write_report
from txlab.analysis.training_plots import plot_training_curves, write_training_curves
from txlab.cli import main

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


# --- every marker at its value; labels apart; units that agree (issue 27) ----------------------------


@pytest.fixture(scope="module")
def smoke_now() -> pd.DataFrame:
    """The 0.2 smoke sweep as measured (tests/synthetic_store.py): one depth, checkpoint and recompute with
    equal peaks, naive and sdpa over the 0.15 GiB budget at 2048."""
    return prepare(pd.DataFrame(smoke_rows()))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _offsets(ax, label: str) -> np.ndarray:
    """(x, y) of every scatter point drawn for `label` in `ax`."""
    pts = [c.get_offsets() for c in ax.collections if c.get_label() == label and len(c.get_offsets())]
    return np.concatenate(pts) if pts else np.empty((0, 2))


def test_frontier_of_one_depth_is_a_dot_per_policy_at_its_value(smoke_now):
    fr = frontier(smoke_now)
    assert list(fr["budget_gib"].unique()) == [0.15]
    want = dict(zip(fr["policy"], fr["longest_feasible_seq_len"].astype(float)))
    assert want == {"naive": 512, "sdpa": 1024, "checkpoint": 2048, "recompute": 2048}
    fig = draw("frontier_steps", smoke_now)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    xs = {}
    for pol, y in want.items():
        pts = _offsets(ax, pol)
        assert len(pts) == 1 and pts[0, 1] == y, (pol, pts)  # naive's 512 was drawn at ~460 (nudged)
        xs[pol] = pts[0, 0]
    assert len(set(xs.values())) == 4  # each policy its own category: coinciding values stay apart
    assert not [line for line in ax.lines if len(line.get_xdata())]  # no line of one point
    written = sorted(t.get_text() for t in ax.texts)
    assert written == ["1024", "2048+", "2048+", "512"]  # the values, written
    assert [t.get_text() for t in ax.get_xticklabels()] == ["naive", "sdpa", "checkpoint", "recompute"]


def test_frontier_steps_markers_sit_at_their_values_policies_side_by_side():
    df = prepare(pd.DataFrame(synthetic_rows(depths=(12, 48), lengths=(1024, 4096, 16384, 32768),
                                             chunks=((256, 256),), estimated_lengths=(65536,))))  # fmt: skip
    fr = frontier(df, [40])
    fig = draw("frontier_steps", df, [40])
    (ax,) = fig.axes
    floor = fr["shortest_tried"].min() / 2
    offsets = {}  # policy -> its sideways offsets within a depth
    for pol, f in fr.groupby("policy"):
        want = sorted(f["longest_feasible_seq_len"].fillna(floor).astype(float))
        pts = _offsets(ax, pol)
        # every frontier point is drawn, at its exact value (estimated ones only where they differ)
        assert set(pts[:, 1]) <= set(want) and set(f[f["basis"] == "measured"]["longest_feasible_seq_len"]) <= set(
            pts[:, 1]
        )
        dx = pts[:, 0] - np.round(pts[:, 0])
        assert np.abs(dx).max() < 0.5 and len(set(dx.round(6))) == 1  # within its depth, at one offset
        offsets[pol] = dx[0]
    assert len(set(offsets.values())) == len(offsets)  # each policy its own place within a depth
    # checkpoint and recompute share their frontier at both depths: side by side, not on top of each other
    same = fr[fr["basis"] == "measured"].pivot(index="depth", columns="policy", values="label")
    assert (same["checkpoint"] == same["recompute"]).all()
    cp, rc = _offsets(ax, "checkpoint"), _offsets(ax, "recompute")
    assert set(cp[:, 1]) & set(rc[:, 1]) and not set(map(tuple, cp)) & set(map(tuple, rc))
    assert "Same frontier at every depth: checkpoint and recompute" in fig.texts[-1].get_text()


def test_memory_lines_at_their_values_coinciding_ones_told_apart(smoke_now):
    fig = plot_memory_vs_length(smoke_now)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    ok = smoke_now[smoke_now["status"] == "ok"]
    for pol in ("naive", "sdpa", "checkpoint", "recompute"):
        want = ok[ok["policy"] == pol].groupby("seq_len")["peak_gib"].min()
        assert list(lines[pol].get_xdata()) == [float(t) for t in want.index]
        assert list(lines[pol].get_ydata()) == list(want.values)  # exact: nothing moved
    cp, rc = lines["checkpoint"], lines["recompute"]
    assert list(cp.get_ydata()) == list(rc.get_ydata())  # equal peaks on this model ...
    assert cp.get_linewidth() > rc.get_linewidth() + 1 and cp.get_markersize() > rc.get_markersize()  # ... both seen
    note = fig.texts[-1].get_text()
    assert "checkpoint and recompute coincide" in note
    # the over-budget trials: at their length on the budget line they ran under, one inside the other
    for pol in ("naive", "sdpa"):
        assert _offsets(ax, pol).tolist() == [[2048.0, 0.15]]
    sizes = {pol: c.get_sizes()[0] for c in ax.collections for pol in ("naive", "sdpa") if c.get_label() == pol}
    assert sizes["naive"] > 1.5 * sizes["sdpa"] and "naive and sdpa over budget at 2048" in note


def test_an_axis_and_its_annotations_share_one_unit(smoke_now, stores):
    fig = plot_memory_vs_length(smoke_now)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "peak memory (MiB, log2)"
    assert [t.get_text() for t in ax.texts] == ["154 MiB"]  # the 0.15 GiB budget, in the axis unit
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert ticks and all(t.replace(".", "").isdigit() for t in ticks), ticks  # numbers in MiB, no GiB among them
    assert "0.15 GiB = 154 MiB" in fig.texts[-1].get_text()
    big = plot_memory_vs_length(stores["sweep400"], [40, 80])
    assert big.axes[0].get_ylabel() == "peak memory (GiB, log2)"
    assert {t.get_text() for t in big.axes[0].texts} == {"40 GiB", "80 GiB"}
    tvm = draw("time_vs_memory", smoke_now)
    assert tvm.axes[0].get_xlabel() == "peak memory (MiB, log2)"
    assert draw("memory_breakdown", smoke_now).axes[0].get_ylabel() == "memory at the peak (MiB)"


def _text_boxes(fig) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        for t in ax.texts:
            if isinstance(t, Annotation):
                t.update_positions(renderer)
            out.append((ax, t.get_text(), Text.get_window_extent(t, renderer)))
    return out


@pytest.mark.parametrize("which", ["smoke_now", "synthetic"])
def test_time_vs_memory_labels_do_not_overlap(which, smoke_now):
    df = smoke_now if which == "smoke_now" else pd.DataFrame(synthetic_rows(depths=(12, 48),
        lengths=(1024, 4096, 16384, 32768), chunks=((256, 256), (1024, 256)), estimated_lengths=()))  # fmt: skip
    fig = draw("time_vs_memory", df)
    boxes = _text_boxes(fig)
    assert len(boxes) >= 4
    for k, (ax, text, b) in enumerate(boxes):
        frame = ax.get_window_extent()
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1, text
        for ax2, text2, b2 in boxes[k + 1 :]:
            assert ax2 is not ax or not b.overlaps(b2), (text, text2)
    if which == "smoke_now":
        labels = {t.split("\n")[0]: t for _, t, _ in boxes}
        assert set(labels) == {"naive", "sdpa", "checkpoint", "recompute"} and labels["sdpa"] == "sdpa"
        # step time over sdpa's (0.7207 s); of the two equal-peak runs of a policy at 2048, the faster
        assert (labels["checkpoint"], labels["recompute"]) == ("checkpoint\nx1.36", "recompute\nx1.35")
    note = fig.texts[-1].get_text()
    assert "step time relative to sdpa's at the same shape" in note and "recompute overhead" not in note


def test_a_plot_run_leaves_no_figure_open(smoke_now, tmp_path):
    plt.close("all")
    write_plots(smoke_now, tmp_path / "plots", echo=lambda _: None)
    assert plt.get_fignums() == []
    write_report(smoke_now, tmp_path / "report.html")
    assert plt.get_fignums() == []
    run = _fake_run(tmp_path / "run", steps=20)
    write_training_curves([run])
    assert plt.get_fignums() == [] and (run / "training_curves.png").exists()


def test_the_main_job_draws_these_plots(smoke_now, tmp_path, capsys):
    """What `txlab sweep sweeps/smoke.yaml && txlab plot ...` writes (the README lists the same)."""
    written = write_plots(smoke_now, tmp_path, echo=print)
    assert list(written) == [
        "memory_vs_length",
        "memory_breakdown",
        "frontier_heatmap",
        "frontier_steps",
        "time_vs_memory",
        "tables",
    ]
    out = capsys.readouterr().out
    assert "skipped chunk_sizes: no measured chunked-attention rows" in out
    assert "skipped fewest_devices: no sharded trials" in out
    for name in ("predicted_throughput", "predicted_cost", "frontier_heatmap_time"):  # no profile, no prediction
        assert f"skipped {name}: " in out and "txlab calibrate" in out.split(f"skipped {name}: ")[1].splitlines()[0]
    for name in list(written)[:-1]:
        with Image.open(tmp_path / f"{name}.png") as im:
            assert 500 <= im.size[0] <= 1800 and 300 <= im.size[1] <= 1400, (name, im.size)


# --- training curves ---------------------------------------------------------------------------------


def _fake_run(path: Path, steps: int = 20, batch: int = 4, seq: int = 32, accum: int = 2, lr: float = 1e-3) -> Path:
    """A run directory as `txlab train` leaves it: config.yaml and metrics.jsonl (made-up numbers)."""
    path.mkdir(parents=True)
    cfg = {"workload": {"batch_size": batch, "seq_len": seq}, "train": {"grad_accum": accum, "steps": steps}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = []
    for s in range(0, steps + 1):
        if s:
            recs.append({"step": s, "split": "train", "loss": 5 - 0.1 * s, "bits_per_byte": 7 - 0.14 * s,
                         "lr": lr * min(1, s / 5), "grad_norm": 1.0})  # fmt: skip
        if s % 10 == 0:
            recs.append({"step": s, "split": "val", "loss": 5.2 - 0.1 * s, "bits_per_byte": 7.3 - 0.14 * s})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_training_curves_draw_loss_bpb_and_lr_against_steps_and_tokens(tmp_path):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", lr=3e-3)
    fig = plot_training_curves([a, b])
    loss, bpb, lr = fig.axes[:3]
    assert [ax.get_ylabel() for ax in (loss, bpb, lr)] == ["loss (nats / token)", "bits per byte", "learning rate"]
    lines = {line.get_label(): line for line in loss.lines}
    assert set(lines) == {"a train", "a val", "b train", "b val"}
    assert list(lines["a train"].get_xdata()) == list(range(1, 21))
    assert list(lines["a train"].get_ydata()) == pytest.approx([5 - 0.1 * s for s in range(1, 21)])
    assert list(lines["a val"].get_xdata()) == [0, 10, 20] and list(lines["a val"].get_ydata()) == pytest.approx(
        [5.2, 4.2, 3.2]
    )
    assert {line.get_label() for line in bpb.lines} == set(lines)
    assert max(next(ln for ln in lr.lines if ln.get_label() == "b train").get_ydata()) == pytest.approx(3e-3)
    # tokens seen on a top axis: 2 x 4 x 32 = 256 tokens an optimizer step
    fig.canvas.draw()
    top = [c for c in loss.child_axes if c.get_xlabel() == "tokens seen"]
    assert len(top) == 1 and top[0].get_xlim() == pytest.approx(tuple(256 * x for x in loss.get_xlim()))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["a", "b"] and "256 tokens per optimizer step" in fig.texts[-1].get_text()


def test_training_curves_of_runs_with_other_batches_compare_tokens(tmp_path):
    a, b = _fake_run(tmp_path / "x" / "run"), _fake_run(tmp_path / "y" / "run", batch=8)
    fig = plot_training_curves([a, b])
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert set(lines) == {"x/run train", "x/run val", "y/run train", "y/run val"}  # told apart by their parents
    assert fig.axes[0].get_xlabel() == "tokens seen"
    assert list(lines["y/run train"].get_xdata())[:2] == [512, 1024]  # 2 x 8 x 32 tokens a step


def test_plot_train_command(tmp_path, capsys):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b")
    assert main(["plot", "--train", str(a)]) == 0
    with Image.open(a / "training_curves.png") as im:
        assert im.size[0] > 1000 and im.size[1] > 300
    assert f"wrote {a / 'training_curves.svg'}" in capsys.readouterr().out
    assert main(["plot", "--train", str(a), str(b), "--out", str(tmp_path / "both")]) == 0
    assert (tmp_path / "both" / "training_curves.png").exists()
    capsys.readouterr()
    for argv, needle in (
        (["plot", "--train", str(a), str(b)], "--out: name an output directory"),
        (["plot", "--train", str(tmp_path)], "not a txlab train run directory (no metrics.jsonl)"),
        (["plot", "--train", str(a), "--budget-gib", "4"], "--budget-gib: a store's plots take budgets"),
        (["plot", "--train", str(a), "--store", str(tmp_path)], "not allowed with argument"),
        (["plot", "--store", str(tmp_path)], "--out: required with --store"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_train_redraws_its_curves_at_each_evaluation(tmp_path):
    from tests.support import cfg
    from txlab.train.loop import train

    calls = []

    def on_eval(run_dir):
        calls.append((run_dir, len((run_dir / "metrics.jsonl").read_text().splitlines())))

    c = cfg(train__steps=4, train__eval_every=2, train__eval_batches=1, train__warmup=1)
    r = train(c, tmp_path / "run", progress=False, on_eval=on_eval)
    assert r.status == "done"
    # after the evaluations at steps 0, 2 and 4 (the end adds no record after the last one: no extra call)
    assert [d for d, _ in calls] == [tmp_path / "run"] * 3
    assert [n for _, n in calls] == [1, 4, 7]
    # `txlab train` passes the callback that draws RUN_DIR/training_curves.png
    tiny = {"model": {"n_layers": 2, "d_model": 64, "n_heads": 4}, "workload": {"seq_len": 64, "batch_size": 8},
            "measure": {"device": "cpu"}, "train": {"steps": 2, "eval_every": 2, "eval_batches": 1, "warmup": 1}}  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "cli")]) == 0
    with Image.open(tmp_path / "cli" / "training_curves.png") as im:
        assert im.size[0] > 1000
    assert plt.get_fignums() == []
