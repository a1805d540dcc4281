import dataclasses, sys
from shadowkv_fx import ShadowKVConfig, load_smollm2
from shadowkv_fx.evaluation.runner import run_eval
model, tok = load_smollm2()
base = ShadowKVConfig()
# the default's dense tokens (outliers 48x8 + local 4x8 = 416) moved from outliers to the local window
variants = {
    "chunk=4+local=128+span=1": dataclasses.replace(base, chunk_size=4, outlier_chunks=72, local_chunks=32, span_neighbors=1),
    "chunk=2+local=128": dataclasses.replace(base, chunk_size=2, outlier_chunks=144, local_chunks=64),
    "chunk=4+local=128+rank=192": dataclasses.replace(base, chunk_size=4, outlier_chunks=72, local_chunks=32, rank=192),
}
run_eval(lambda: load_smollm2()[0], tok, tasks=["extract_json", "multi_needle_all", "table_convert"], lengths=["2k"],
         budgets=["1/16"], samples_per_task=int(sys.argv[2]), methods=["shadowkv"], variants=variants,
         output_json=sys.argv[1])
