"""The 8K report's runs in one results.json, table and plots: the first run (dense, ShadowKV at 1/16) and the
later ones (Quest and sink + local at 1/16 and 1/8; ShadowKV's selection ablation at 1/8), each record checked to
hold the same prompt as dense's (context tokens and references).

    python3 merge.py results.json results_baselines.json results_selection_1_8.json   # -> results.json, table.txt, plots
"""
import json
import sys
from pathlib import Path

from rich.console import Console

from shadowkv_fx.evaluation.plots import plot_all
from shadowkv_fx.evaluation.results import print_results_table

here = Path(__file__).parent
runs = [json.loads((here / name).read_text()) for name in sys.argv[1:]]
dense = {(r["task"], r["index"]): r for r in runs[0]["records"] if r["method"] == "dense"}
records, seen = [], set()
for run in runs:
    for r in run["records"]:
        d = dense[(r["task"], r["index"])]
        assert (d["context_tokens"], d["references"]) == (r["context_tokens"], r["references"]), (r["label"], r["task"])
        key = (r["label"], r["task"], r["index"])
        if key not in seen:  # the first run's rows win (the ablation's rows have labels of their own)
            seen.add(key)
            records.append(r)
meta = {"runs": [run["meta"] for run in runs], "merged_by": "merge.py " + " ".join(sys.argv[1:])}
(here / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
with open(here / "table.txt", "w") as out:
    print_results_table(records, console=Console(file=out, width=160))
plot_all(records, here)
print((here / "table.txt").read_text())
