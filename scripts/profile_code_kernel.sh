#!/usr/bin/env bash
# Nsight Compute on one layer's chunk scoring, the 4-bit code kernel beside the 16-bit landmark kernel (issue #32), inside
# scripts/device_jobs.sh (it installs and sets OUT): bash scripts/device_jobs.sh $OUT/jobs "bash scripts/profile_code_kernel.sh"
# Results: $OUT/details.txt (every section of both kernels), $OUT/sass.csv (stalls per SASS instruction of each), the report.
set -uo pipefail
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
"$NCU" --clock-control none --kernel-name regex:"code_logits|score_logits" --launch-skip 2 --launch-count 2 --set full \
    --import-source yes -o "$OUT/code_kernel" python3 benchmarks/code_kernel_profile.py > "$OUT/ncu_run.txt" 2>&1
tail -5 "$OUT/ncu_run.txt"
"$NCU" --import "$OUT/code_kernel.ncu-rep" --page details > "$OUT/details.txt" 2>&1
"$NCU" --import "$OUT/code_kernel.ncu-rep" --page source --print-source sass --csv > "$OUT/sass.csv" 2>&1
grep -E "code_logits|score_logits|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Theoretical Occupancy|Registers Per|Warp Cycles Per Issued|Stall|Block Limit" "$OUT/details.txt" | head -80
