"""JupyterLab as a user meets it, timed: open 01_generate, wait for an idle kernel, Run All on the quick study;
then 02_select the same way. Debian's Chromium through Playwright (as tests/test_browser.py), JupyterLab on
127.0.0.1 over a fresh copy of the tree with its own caches (cold: the embedded model is converted, generations
made). Writes bench/out/lab.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PARAMS = (
    'run_dir = ""\nstudy = "params/studies/quick.yaml"\nmodel = "smollm2-135m"\nmethod = "central"\n'
    'overrides = []\nresults_dir = "results"\nverbose = False\n'
)


def main() -> None:
    import test_browser as tb

    results: dict = {"cpu_count": os.cpu_count(), "load_average_1min_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as d, tb.jupyterlab(Path(d)) as (url, repo), tb.chromium_page() as page:
        for name in ("01_generate.ipynb", "02_select.ipynb"):
            t0 = time.perf_counter()
            tb._open(page, url, name)
            tb._wait_kernel_idle(page)
            opened = time.perf_counter() - t0
            tb._set_parameters(page, PARAMS)
            t1 = time.perf_counter()
            nb = tb._run_all_and_save(page, repo / "notebooks" / name, timeout_s=900, params=PARAMS)
            ran = time.perf_counter() - t1
            tb._check(nb, name)
            results[name] = {"open_to_idle_kernel_s": round(opened, 1), "run_all_s": round(ran, 1)}
            print(name, results[name], flush=True)
    results["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results, indent=2))
    out = ROOT / "bench" / "out" / "lab.json"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
