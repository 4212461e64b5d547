"""The plots of a store by name, drawn with seaborn on matplotlib's Agg backend. See docs/analysis.md.

Every plot function takes a store path or a DataFrame and returns a matplotlib Figure, or a `Skipped`
saying why the store has nothing that plot can show (e.g. no chunked-attention rows). `draw(name, ...)`
calls one by name, `all_figures` all of them; whoever receives a Figure closes it
(`matplotlib.pyplot.close`, or `layout.save_figure`, which saves and closes).

The plots live one family a module: `memory_plots` (memory_vs_length, memory_breakdown), `frontier_plots`
(frontier_heatmap, frontier_steps), `tradeoff_plots` (time_vs_memory), `chunk_plots` (chunk_sizes),
`device_plots` (fewest_devices), `time_plots` (predicted_throughput, predicted_cost: the time model's predictions;
`frontier_heatmap_time` is the heat map coloured by predicted step time); what they share is in `plotting`, `layout` and `palette`. Training curves
of `txlab train` run directories (not a store) are `training_plots`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from txlab.analysis.chunk_plots import plot_chunk_sizes
from txlab.analysis.data import Source, prepare
from txlab.analysis.device_plots import plot_fewest_devices
from txlab.analysis.frontier_plots import frontier_panels, plot_frontier_heatmap, plot_frontier_steps
from txlab.analysis.memory_plots import plot_memory_breakdown, plot_memory_vs_length
from txlab.analysis.plotting import Drawn, Skipped
from txlab.analysis.time_plots import plot_predicted_cost, plot_predicted_throughput
from txlab.analysis.tradeoff_plots import pareto_front, plot_time_vs_memory, tradeoff_shapes

__all__ = [
    "PLOTS",
    "TAKES_BUDGETS",
    "Drawn",
    "Skipped",
    "all_figures",
    "draw",
    "frontier_panels",
    "pareto_front",
    "plot_chunk_sizes",
    "plot_fewest_devices",
    "plot_frontier_heatmap",
    "plot_frontier_steps",
    "plot_memory_breakdown",
    "plot_memory_vs_length",
    "plot_predicted_cost",
    "plot_predicted_throughput",
    "plot_time_vs_memory",
    "tradeoff_shapes",
]

PLOTS = {
    "memory_vs_length": plot_memory_vs_length,
    "memory_breakdown": plot_memory_breakdown,
    "frontier_heatmap": plot_frontier_heatmap,
    "frontier_steps": plot_frontier_steps,
    "time_vs_memory": plot_time_vs_memory,
    "chunk_sizes": plot_chunk_sizes,
    "fewest_devices": plot_fewest_devices,
    "predicted_throughput": plot_predicted_throughput,
    "predicted_cost": plot_predicted_cost,
    "frontier_heatmap_time": partial(plot_frontier_heatmap, color="predicted_time"),
}
TAKES_BUDGETS = {"memory_vs_length", "frontier_heatmap", "frontier_steps", "fewest_devices", "frontier_heatmap_time"}


def draw(name: str, source: Source, budgets: Iterable[float] | None = None) -> Drawn:
    """One plot by name: its Figure, or a `Skipped` saying why the store has nothing it can show."""
    fn = PLOTS[name]
    return fn(source, budgets) if name in TAKES_BUDGETS else fn(source)


def all_figures(source: Source, budgets: Iterable[float] | None = None) -> dict[str, Drawn]:
    """name -> Figure or Skipped, for every plot (the store read once). The caller closes the figures."""
    df = prepare(source)
    return {name: draw(name, df, budgets) for name in PLOTS}
