"""The UI half of the end-to-end check (scripts/e2e.py): what headless Chromium must see rendered in the Prefect UI
for a run, its artifacts and plots, and the challenger-vs-champion table."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

from e2e_harness import PNG_DATA_URL, Browser, E2EError, Service, log, png_size

STATE_BADGE = (
    "[...document.querySelectorAll('[data-slot=badge]')].some(b => /state-completed/.test(b.className)"
    " && b.innerText.trim() === 'Completed')"
)


def plot_check_js(width: int, height: int) -> str:
    return (
        f"[...document.querySelectorAll('img')].filter(i => i.src.startsWith('{PNG_DATA_URL}') && i.complete"
        f" && i.naturalWidth === {width} && i.naturalHeight === {height})"
        ".map(i => ({w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
        ".filter(i => i.shown > 0)[0]"
    )


def ui_checks(browser: Browser, base: str, run, api: dict[str, Any], out: Path) -> dict[str, Any]:
    problems, shots = [], []
    page = f"{base}/v2/runs/flow-run/{run.id}"
    ready = f"document.title.includes({json.dumps(run.name)}) && {STATE_BADGE}"
    if not browser.open(page, ready):
        problems.append(f"{page}: no title with {run.name!r} and Completed state badge")
    shots.append(browser.save(out, "flow-run"))

    listed = [a.key for a in api["run_artifacts"]]
    js = f"{json.dumps(listed)}.every(k => document.body.innerText.includes(k))"
    if not browser.open(f"{page}?tab=Artifacts", js):
        problems.append(f"{page}?tab=Artifacts does not list all of {listed}")
    shots.append(browser.save(out, "flow-run-artifacts"))

    table = next((a for a in api["run_artifacts"] if a.type == "table"), None)
    if table is not None:
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        columns = json.dumps(list(rows[0]))
        js = (
            f"document.querySelectorAll('table tbody tr').length > 0 && {columns}.every(c => "
            "[...document.querySelectorAll('table th')].some(th => th.innerText.trim() === c))"
        )
        if not browser.open(f"{base}/v2/artifacts/artifact/{table.id}", js):
            problems.append(f"table artifact {table.key}: no rendered table with columns {columns}")
        shots.append(browser.save(out, f"table-{table.key}"))
    texts = [a for a in api["run_artifacts"] if a.type == "markdown" and PNG_DATA_URL not in str(a.data)]
    if texts:
        doc = max(texts, key=lambda a: len(str(a.data)))
        js = "document.querySelector('[data-testid=markdown-display] h1, [data-testid=markdown-display] h2')"
        if not browser.open(f"{base}/v2/artifacts/artifact/{doc.id}", f"!!{js}"):
            problems.append(f"markdown artifact {doc.key}: no rendered heading")
        shots.append(browser.save(out, f"markdown-{doc.key}"))

    rendered = []
    for ui, plots in (("v2", api["plots"]), ("v1", api["plots"][:1])):
        for plot in plots:
            width, height = png_size(re.search(r"data:image/png;base64,[A-Za-z0-9+/=]+", plot.data).group(0))
            url = f"{base}{'/v2' if ui == 'v2' else ''}/artifacts/artifact/{plot.id}"
            found = browser.open(url, plot_check_js(width, height))
            if not found:
                problems.append(f"{url} ({ui}): no decoded {width}x{height} PNG <img> for {plot.key}")
            else:
                rendered.append(f"{ui}:{plot.key} {found['w']}x{found['h']} shown {found['shown']:.0f}px wide")
            shots.append(browser.save(out, f"plot-{ui}-{plot.key}"))
    if problems:
        raise E2EError("UI checks failed:\n  " + "\n  ".join(problems))
    return {"pages": [str(s) for s in shots], "plots_rendered": rendered}


def save_failed_run_page(
    chromium: str, scratch: Path, report: Path, env: dict[str, str], services: list[Service], base: str, run
) -> None:
    """A screenshot of the run page for the failure report (best effort: the API error is what fails)."""
    try:
        browser = Browser(chromium, scratch / "chromium", report / "chromium.log", env)
    except E2EError as exc:
        log(f"no screenshot of the failed run: {exc}")
        return
    services.append(browser.service)
    try:
        browser.open(f"{base}/v2/runs/flow-run/{run.id}", f"document.title.includes({json.dumps(run.name)})")
        log(f"screenshot of the failed run: {browser.save(report, 'flow-run')}")
    finally:
        browser.close()


def challenger_table_check(browser: Browser, base: str, artifacts: list, out: Path) -> list[str]:
    """The classifier's challenger-vs-champion table renders in the UI with its columns and the decision row."""
    (table,) = [a for a in artifacts if fnmatch.fnmatch(a.key, "classifier-*-challenger-vs-champion")]
    js = (
        "document.querySelectorAll('table tbody tr').length > 1 && "
        "['metric', 'challenger', 'champion', 'difference'].every(c => "
        "[...document.querySelectorAll('table th')].some(th => th.innerText.trim() === c)) && "
        "[...document.querySelectorAll('table tbody td')].some(td => td.innerText.trim() === 'decision')"
    )
    problems = []
    if not browser.open(f"{base}/v2/artifacts/artifact/{table.id}", js):
        problems.append(f"table artifact {table.key}: no rendered challenger-vs-champion table")
    browser.save(out, f"table-{table.key}")
    return problems
