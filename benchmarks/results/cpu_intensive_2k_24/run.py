import dataclasses, sys
from shadowkv_fx import ShadowKVConfig, load_smollm2
from shadowkv_fx.evaluation.runner import run_eval
model, tok = load_smollm2()
base = ShadowKVConfig()
# chunk 4 with the same dense tokens as the default (outliers 48x8 = 96x4, local 4x8 = 8x4)
fine = dataclasses.replace(base, chunk_size=4, outlier_chunks=96, local_chunks=8)
run_eval(lambda: load_smollm2()[0], tok, tasks=["extract_json", "multi_needle_all", "table_convert"], lengths=["2k"],
         budgets=["1/16"], samples_per_task=int(sys.argv[2]), methods=["dense", "shadowkv"],
         variants={"default": base, "chunk=4": fine, "chunk=4+span=1": dataclasses.replace(fine, span_neighbors=1)},
         output_json=sys.argv[1])
