"""The report opens with the answer (issue 18): the frontier per budget and what the best policy gains,
then the plots, then what the store holds; no empty header cells; one self-contained HTML file that a
headless Chromium renders with every image decoded and nothing cut off (skipped where no browser exists,
except under CI, where .ci/run installs one and its absence fails)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from tests.synthetic_store import smoke_rows, synthetic_rows, write_store
from txlab.analysis.data import prepare
from txlab.analysis.plots import PLOTS
from txlab.analysis.report import reconstructed_grids, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
LAPTOP = (1366, 900)  # a laptop screen at 100% zoom, CSS pixels


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report")
    rows = synthetic_rows(
        depths=(12, 24),
        lengths=(1024, 4096, 16384),
        policies=("sdpa", "checkpoint", "recompute"),
        chunks=((256, 256), (1024, 256)),
        estimated_lengths=(65536,),
    )
    write_store(path / "store", rows)
    return write_report(path / "store", path / "report.html", [40, 80])


def test_report_opens_with_the_frontier(report):
    html = report.read_text()
    heads = re.findall(r"<h2>(.*?)</h2>", html)
    assert heads[0] == "Feasibility frontier: longest sequence that fits"
    order = ["Feasibility frontier", "Plots", "Against sdpa", "Trials by status", "Devices", "Settings shared"]
    at = [next(i for i, h in enumerate(heads) if h.startswith(o)) for o in order]
    assert at == sorted(at), heads
    assert heads[-1].startswith("Rows with errors")
    # one table per budget, policy x depth, and the gain of the best policy over sdpa
    first = html.index("<h3>Budget 40 GiB</h3>")
    assert first < html.index("<h3>Budget 80 GiB</h3>") < html.index("<img")
    assert "<th>12 layers</th>" in html and "<th>24 layers</th>" in html
    assert html.count("<tr class='gain'>") == 2 and "best vs sdpa" in html
    assert "<td>≥ x4 recompute (est.)</td>" in html  # 40 GiB: sdpa's estimate stops at 16384, recompute's does not
    assert "<td>≥ x4 checkpoint, recompute (est.)</td>" in html  # 80 GiB: two policies tie


def test_no_empty_header_cells_and_self_contained(report):
    html = report.read_text()
    assert not re.findall(r"<th[^>]*>\s*</th>", html)
    # every plot is an image or says why it was not drawn (fewest_devices: this store shards nothing)
    assert html.count("<img") + html.count("Not drawn: ") == len(PLOTS) and "Not drawn: no sharded trials" in html
    assert not re.search(r"""src=['"](?!data:image/png;base64,)""", html)  # nothing to fetch
    assert "<link" not in html and "<script" not in html


CHECK = """<script>
window.addEventListener("load", () => {
  const vw = document.documentElement.clientWidth;
  const out = {images: [], cut: [], overflow: document.documentElement.scrollWidth - vw};
  for (const img of document.images) {
    const r = img.getBoundingClientRect();
    out.images.push({alt: img.alt, ok: img.complete && img.naturalWidth > 0, scale: r.width / img.naturalWidth});
  }
  for (const el of document.body.querySelectorAll("h1, h2, h3, p, table, img, pre")) {
    const r = el.getBoundingClientRect();
    if (r.left < 0 || r.right > vw + 1) out.cut.push(el.tagName + " " + (el.alt || el.textContent.slice(0, 40)));
  }
  const pre = document.createElement("pre");
  pre.id = "txlab-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body>"""


def test_report_renders_in_headless_chromium(request, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None and os.environ.get("CI"):
        pytest.fail("CI is set and no Chromium or Chrome is installed (.ci/run installs the chromium package)")
    if browser is None:
        pytest.skip("no Chromium or Chrome installed")
    report = request.getfixturevalue("report")  # built only where a browser can look at it
    page = tmp_path / "check.html"
    page.write_text(report.read_text().replace("</body>", CHECK))
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
    found = re.search(r'<pre id="txlab-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    out = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(out["images"]) == report.read_text().count("<img")  # every image the report embeds
    assert all(i["ok"] for i in out["images"]), out["images"]  # every image decodes
    assert out["overflow"] <= 0 and out["cut"] == [], out  # nothing runs off the page
    # shown at (nearly) the size it was drawn: readable at 100% zoom without opening the image
    assert min(i["scale"] for i in out["images"]) >= 0.75, out["images"]


def test_sweep_grids_name_every_axis_null_included(tmp_path):
    """The smoke grid's three axes: seq_len, policy.name and measure.budget_gib [null, 0.15]."""
    grids = reconstructed_grids(prepare(pd.DataFrame(smoke_rows())))
    axes = dict(zip(grids["key"], grids["values"]))
    assert axes["measure.budget_gib"] == "null, 0.15"  # left out while null did not count as a value
    assert axes["workload.seq_len"] == "512, 1024, 2048"
    assert axes["policy.name"] == "checkpoint, naive, recompute, sdpa"
    write_store(tmp_path / "store", smoke_rows())
    html = write_report(tmp_path / "store", tmp_path / "r.html").read_text()
    assert "<td>measure.budget_gib</td>" in html and "<td>null, 0.15</td>" in html
    # the time_vs_memory caption says what its ratios are
    assert "its step time relative to sdpa&#x27;s at that shape" in html and "recompute overhead" not in html
