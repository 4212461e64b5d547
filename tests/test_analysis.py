"""Every plot and table of analysis/ from small fixture stores, and `txlab plot` / `txlab report`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from tests.support import png_ok
from tests.synthetic_store import synthetic_rows, write_store
from txlab.analysis.cli import write_plots
from txlab.analysis.data import AnalysisError, budgets_of, prepare
from txlab.analysis.frontier import frontier
from txlab.analysis.plots import PLOTS, Skipped, all_figures
from txlab.analysis.report import write_report
from txlab.cli import main
from txlab.results.store import Store

SMALL = dict(
    depths=(12, 48),
    lengths=(1024, 4096, 16384, 32768),
    chunks=((256, 256), (1024, 256)),
    policies=("naive", "sdpa", "checkpoint", "recompute"),
    estimated_lengths=(65536,),
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")  # the tests that hold figures (all_figures, PLOTS[...]) leave none open


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    write_store(path, synthetic_rows(**SMALL))
    return path


def test_plot_command_writes_every_plot_and_table(store, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", "--store", str(store), "--out", str(out), "--budget-gib", "24", "40", "80"]) == 0
    printed = capsys.readouterr().out
    assert "skipped fewest_devices: no sharded trials" in printed
    for name in PLOTS:
        if f"skipped {name}: " in printed:  # said why (fewest_devices: this store shards nothing)
            continue
        for ext in ("png", "svg"):
            assert (out / f"{name}.{ext}").exists(), name
            assert f"wrote {out / f'{name}.{ext}'}" in printed
        assert png_ok(out / f"{name}.png")
    fr = pd.read_csv(out / "frontier.csv")
    assert set(fr["budget_gib"]) == {24, 40, 80} and {"measured", "estimated"} == set(fr["basis"])
    vs = pd.read_csv(out / "versus_baseline.csv")
    assert set(vs["baseline"]) == {"sdpa"} and (vs["time_overhead"] > 1).all()
    md = (out / "frontier.md").read_text()
    assert "| policy | depth | 24 GiB | 40 GiB | 80 GiB |" in md and "Against sdpa" in md


def test_infeasible_cells_say_so(store):
    fr = frontier(store, budgets=[2])  # below parameters + optimizer state of every trial
    assert fr["longest_feasible_seq_len"].isna().all()
    assert fr["label"].str.startswith("infeasible at 1024").all()
    fig = PLOTS["frontier_heatmap"](store, [2])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(t.startswith("infeasible") for t in texts) and not any(t.strip() == "0" for t in texts)


def test_oom_and_estimated_rows_are_marked(store):
    fig = PLOTS["memory_vs_length"](store)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("out of memory") for t in legend)
    assert "estimated" in legend and any(t.startswith("estimated not to fit") for t in legend)
    assert any("80 GiB" == t.get_text() for ax in fig.axes for t in ax.texts)  # budget line labelled


def test_budgets_default_from_store_then_capacity(store):
    df = prepare(store)
    assert budgets_of(df) == ([80.0], "store")
    assert budgets_of(df, [40, 24]) == ([24.0, 40.0], "asked")
    no_budget = df.assign(**{"measure.budget_gib": None})
    assert budgets_of(no_budget) == ([80.0], "device capacity")


def test_single_policy_store(tmp_path, capsys):
    rows = synthetic_rows(
        depths=(12,), lengths=(1024, 4096), policies=("checkpoint",), estimated_lengths=(), error=False
    )
    write_store(tmp_path / "s", rows)
    written = write_plots(tmp_path / "s", tmp_path / "out")
    assert {"memory_vs_length", "frontier_heatmap", "time_vs_memory", "tables"} <= set(written)
    assert "chunk_sizes" not in written and "skipped chunk_sizes" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "out" / "versus_baseline.csv").empty


def test_several_settings_facet_by_row(tmp_path):
    small = synthetic_rows(
        depths=(12,), lengths=(1024, 4096), policies=("sdpa", "checkpoint"), estimated_lengths=(), error=False
    )
    big = [dict(r, **{"workload.batch_size": 4, "trial_key": r["trial_key"] + "b4"}) for r in small]
    df = prepare(pd.DataFrame(small + big))
    assert sorted(df["setting"].unique()) == ["batch_size=1", "batch_size=4"]
    figs = all_figures(df)
    assert figs["memory_vs_length"].axes[0].get_title().startswith("batch_size=1")
    assert len(figs["frontier_heatmap"].axes) == 2  # one row of panels per setting


def test_dataframe_input_and_chunk_plot(store):
    df = Store.open(str(store)).read_pandas()
    fig = PLOTS["chunk_sizes"](df)
    assert fig is not None and "q_chunk" in fig.axes[0].get_ylabel()
    only_sdpa = df[df["policy.name"] == "sdpa"]
    skipped = PLOTS["chunk_sizes"](only_sdpa)
    assert isinstance(skipped, Skipped) and not skipped and "chunk" in skipped.reason


def test_empty_and_missing_store_exit_2(tmp_path, capsys):
    Store.open(str(tmp_path / "empty"), create=True)._ensure_created()
    assert main(["plot", "--store", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no rows yet" in err and len(err.splitlines()) == 1
    assert main(["report", "--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.html")]) == 2
    with pytest.raises(AnalysisError, match="no rows"):
        write_plots(pd.DataFrame(), tmp_path / "o")


def test_report_html_and_markdown(store, tmp_path):
    html = write_report(store, tmp_path / "report.html", [24, 80]).read_text()
    for text in (
        "Trials by status",
        "Devices",
        "Sweep grids",
        "Rows with errors (1)",
        "illegal memory access",
        "data:image/png;base64,",
        "Feasibility frontier",
        "Against sdpa",
    ):
        assert text in html, text
    # every plot is an image or says why it was not drawn (fewest_devices: this store shards nothing)
    assert html.count("<img") + html.count("Not drawn: ") == len(PLOTS) and "Not drawn: no sharded trials" in html
    # Markdown: a small single-policy store keeps the test fast; images land beside the file
    rows = synthetic_rows(
        depths=(12,), lengths=(1024, 4096), policies=("checkpoint",), estimated_lengths=(), error=False
    )
    write_store(tmp_path / "one", rows)
    md = write_report(tmp_path / "one", tmp_path / "r" / "report.md").read_text()
    assert "](report_files/memory_vs_length.png)" in md and png_ok(
        tmp_path / "r" / "report_files" / "frontier_heatmap.png"
    )
    assert "| synthetic | measured |" in md and "_Not drawn: no measured chunked-attention rows._" in md
    with pytest.raises(AnalysisError, match=".html or .md"):
        write_report(store, tmp_path / "report.pdf")


def test_memory_panels_wrap_when_sizes_have_their_own_depths():
    """gpt2 sizes each come with one depth: a size x depth grid would be mostly empty panels."""
    import pandas as pd

    from txlab.analysis.layout import panels as _panels

    own = pd.DataFrame({"setting": ["small", "medium", "xl"], "depth": [12, 24, 48]})
    layout, full = _panels(own)
    assert not full and layout == [[("medium", 24), ("small", 12), ("xl", 48)]]
    crossed = pd.DataFrame({"setting": ["a", "a", "b", "b"], "depth": [2, 4, 2, 4]})
    layout, full = _panels(crossed)
    assert full and layout == [[("a", 2), ("a", 4)], [("b", 2), ("b", 4)]]
    many = pd.DataFrame({"setting": list("abcdef"), "depth": [1, 2, 3, 4, 5, 6]})
    layout, _ = _panels(many)
    assert [len(r) for r in layout] == [4, 4] and layout[1][2:] == [None, None]
