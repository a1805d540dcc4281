# device call 2 (session 11): the scoring kernels alone, then #32's cost rows at 122K x 1 (one machine, same run)
bench() {  # name, context, batch, flags...
  local name=$1 ctx=$2 b=$3; shift 3
  echo "=== bench ${ctx}x$b $name ($*) $(date +%T)"
  shadowkv-fx bench --contexts $ctx --batches $b --methods shadowkv --steps 32 "$@" --out /tmp/b_$name > /tmp/b_$name.log 2>&1
  cat /tmp/b_$name/table.txt 2>/dev/null || tail -20 /tmp/b_$name.log
  cp /tmp/b_$name/bench.json $OUT/bench_$name.json 2>/dev/null
}
python3 benchmarks/score_kernel_sweep.py 2>&1 | tee $OUT/score_kernel_sweep.txt
bench default_122k 122880 1
bench runs2b8_122k 122880 1 --landmark-runs 2 --landmark-bits 8
bench codes4_122k 122880 1 --key-code-bits 4
