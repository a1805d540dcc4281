# device call 1 (session 11): #32's cost rows at 32K x 4 (one warm machine, same run) around the GPU suite
bench() {  # name, context, batch, flags...
  local name=$1 ctx=$2 b=$3; shift 3
  echo "=== bench ${ctx}x$b $name ($*) $(date +%T)"
  shadowkv-fx bench --contexts $ctx --batches $b --methods shadowkv --steps 32 "$@" --out /tmp/b_$name > /tmp/b_$name.log 2>&1
  cat /tmp/b_$name/table.txt 2>/dev/null || tail -20 /tmp/b_$name.log
  cp /tmp/b_$name/bench.json $OUT/bench_$name.json 2>/dev/null
}
bench default_32k 32768 4
bench codes4_32k 32768 4 --key-code-bits 4
echo "=== GPU suite $(date +%T)"
bash scripts/gpu_suite.sh
bench runs2b8_32k 32768 4 --landmark-runs 2 --landmark-bits 8
bench codes4c4_32k 32768 4 --key-code-bits 4 --chunk-size 4 --local-tokens 128
