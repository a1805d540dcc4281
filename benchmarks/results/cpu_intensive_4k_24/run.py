import dataclasses, sys
from shadowkv_fx import ShadowKVConfig, load_smollm2
from shadowkv_fx.evaluation.runner import run_eval
model, tok = load_smollm2()
base = ShadowKVConfig()
# chunk 4 with the default's dense tokens (416) split as outliers 72 x 4 + local 32 x 4
variants = {"chunk=4+local=128": dataclasses.replace(base, chunk_size=4, outlier_chunks=72, local_chunks=32)}
run_eval(lambda: load_smollm2()[0], tok, tasks=["extract_json", "multi_needle_all", "table_convert"], lengths=[sys.argv[3]],
         budgets=["1/16"], samples_per_task=int(sys.argv[2]), methods=["dense", "shadowkv"], variants=variants,
         output_json=sys.argv[1])
