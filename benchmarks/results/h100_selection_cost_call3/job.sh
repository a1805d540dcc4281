# device call 3 (session 11): the code kernel after the nibble change, then default vs codes at 32K x 4 on one card
bench() {  # name, context, batch, flags...
  local name=$1 ctx=$2 b=$3; shift 3
  echo "=== bench ${ctx}x$b $name ($*) $(date +%T)"
  shadowkv-fx bench --contexts $ctx --batches $b --methods shadowkv --steps 32 "$@" --out /tmp/b_$name > /tmp/b_$name.log 2>&1
  cat /tmp/b_$name/table.txt 2>/dev/null || tail -20 /tmp/b_$name.log
  cp /tmp/b_$name/bench.json $OUT/bench_$name.json 2>/dev/null
}
python3 benchmarks/score_kernel_sweep.py 2>&1 | tee $OUT/score_kernel_sweep.txt
python3 -m pytest -q -o addopts='' -p no:cacheprovider tests/test_key_codes.py 2>&1 | tail -2
bench default_32k 32768 4
bench codes4_32k 32768 4 --key-code-bits 4
bench runs2b8_32k 32768 4 --landmark-runs 2 --landmark-bits 8
