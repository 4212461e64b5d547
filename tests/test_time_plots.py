"""The time model's plots and report table (txlab.analysis.time_plots): predicted tokens/s per device and
$/Mtok against sequence length, the frontier heat map coloured by predicted time, and the model's error on
measured rows; each skipped with its reason where the rows carry no prediction or price."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from tests.support import png_ok
from tests.synthetic_store import PREDICTION_ERROR, synthetic_rows, with_predictions
from txlab.analysis.layout import save_figure
from txlab.analysis.plots import Skipped, draw
from txlab.analysis.report import write_report
from txlab.analysis.time_plots import NO_PRICE, prediction_error

SMALL = dict(depths=(12,), lengths=(1024, 4096), policies=("sdpa", "recompute"), chunks=((256, 256),),
             estimated_lengths=(16384,), error=False)  # fmt: skip


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def rows(**kw) -> list[dict]:
    return with_predictions(synthetic_rows(**SMALL), **kw)


def sharded(rs: list[dict]) -> list[dict]:
    """The same trials again on two FSDP ranks (another layout: another panel)."""
    return rs + [{**r, "parallel.fsdp": 2, "trial_key": r["trial_key"] + "f"} for r in rs]


def test_predicted_throughput_is_per_device_a_panel_per_layout(tmp_path):
    df = pd.DataFrame(sharded(rows()))
    fig = draw("predicted_throughput", df)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 2 and all("predicted on h100-sxm" in t for t in titles)
    assert sum("fsdp=2" in t for t in titles) == 1
    for ax in fig.axes:
        two = "fsdp=2" in ax.get_title()
        line = ax.lines[0]  # sdpa from measured rows: the first policy, measured first
        sdpa = df[(df["policy.name"] == "sdpa") & df["measured"] & (df["parallel.fsdp"] == (2 if two else 1))]
        expected = sdpa.sort_values("workload.seq_len")["predicted_tokens_per_s"] / (2 if two else 1)
        assert list(line.get_xdata()) == [1024, 4096] and list(line.get_ydata()) == pytest.approx(list(expected))
    save_figure(fig, tmp_path, "t")
    assert png_ok(tmp_path / "t.png")


def test_predicted_cost_draws_the_price_and_skips_without_one(tmp_path):
    fig = draw("predicted_cost", pd.DataFrame(rows()))
    ax = fig.axes[0]
    assert "$ per million tokens" in ax.get_ylabel()
    assert all(v > 0 for line in ax.lines for v in line.get_ydata())
    save_figure(fig, tmp_path, "c")
    assert png_ok(tmp_path / "c.png")
    unpriced = draw("predicted_cost", pd.DataFrame(rows(usd_per_device_hour=None)))
    assert isinstance(unpriced, Skipped) and unpriced.reason == NO_PRICE


def test_without_predictions_each_says_why():
    plain = pd.DataFrame(synthetic_rows(**SMALL))
    for name in ("predicted_throughput", "predicted_cost", "frontier_heatmap_time"):
        skipped = draw(name, plain, [80.0])
        assert (
            isinstance(skipped, Skipped)
            and "txlab calibrate" in skipped.reason
            and "measure.hardware" in skipped.reason
        )


def test_the_frontier_heat_map_coloured_by_predicted_time_writes_the_time(tmp_path):
    df = pd.DataFrame(rows())
    fig = draw("frontier_heatmap_time", df, [80.0])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    sdpa_4096 = df[(df["policy.name"] == "sdpa") & (df["workload.seq_len"] == 4096) & df["measured"]]
    assert f"{float(sdpa_4096['predicted_step_time_s'].iloc[0]):.3g} s" in texts
    assert "predicted step time" in fig._suptitle.get_text()
    save_figure(fig, tmp_path, "h")
    assert png_ok(tmp_path / "h.png")


def test_prediction_error_is_per_hardware_over_measured_rows_only():
    a = rows()
    b = [{**r, "hardware": "local", "trial_key": r["trial_key"] + "l"} for r in rows()]
    t = prediction_error(pd.DataFrame(a + b)).set_index("hardware")
    measured_ok = [r for r in a if r["measured"] and r["status"] == "ok"]
    assert list(t.index) == ["h100-sxm", "local"] and t.loc["local", "rows"] == len(measured_ok)
    errors = sorted(PREDICTION_ERROR[r["policy.name"]] for r in measured_ok)
    assert t.loc["h100-sxm", "worst error"] == f"{max(errors, key=abs):+.0%}"  # estimates (no step time) left out
    assert t.loc["h100-sxm", "median error"] == f"{pd.Series(errors).median():+.0%}"
    assert prediction_error(pd.DataFrame(synthetic_rows(**SMALL))).empty


def test_the_report_has_the_time_model_section(tmp_path):
    out = write_report(pd.DataFrame(rows()), tmp_path / "r.md")
    text = out.read_text()
    section = text.split("## The time model against measured steps", 1)[1]
    assert "| h100-sxm | 4 |" in section and "predicted_step_time_s / step_time_s - 1" in section
    assert png_ok(tmp_path / "r_files" / "predicted_throughput.png")
    plain = write_report(pd.DataFrame(synthetic_rows(**SMALL)), tmp_path / "p.md").read_text()
    assert "No row has both a measured and a predicted step time" in plain
