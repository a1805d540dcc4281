import dataclasses, sys
from shadowkv_fx import ShadowKVConfig, load_smollm2
from shadowkv_fx.evaluation.runner import run_eval
model, tok = load_smollm2()
base = ShadowKVConfig()
run_eval(lambda: load_smollm2()[0], tok, tasks=["extract_json", "table_convert"], lengths=["2k"], budgets=["1/16"],
         samples_per_task=4, methods=["shadowkv"], variants={"no-fold": dataclasses.replace(base, fold_chunks=None),
         "outliers=0": dataclasses.replace(base, outlier_chunks=0)}, output_json=sys.argv[1])
