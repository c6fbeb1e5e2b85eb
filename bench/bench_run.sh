#!/usr/bin/env bash
# run.c speed: tokens/s of `make runomp` with 2 OpenMP threads, -n 256 (and 110M at -n 1024), on random-weight
# models of llama2.c's 15M shape (dim 288, 6 layers, vocab 32000, seq 256) and 110M shape (dim 768, 12 layers,
# seq 1024), and the rates as a share of this machine's 2-thread read bandwidth (batch-1 decoding reads every
# weight once per token). Configurations run interleaved, REPS rounds; the figures are medians. The VM's
# bandwidth swings between about 35 and 67 GB/s within seconds, so each run's share divides its rate by the
# bandwidth measured just before and just after it, in about a second's worth of passes each time: their median
# (what the machine gave around the run) and their best (what it gives at most).
#
#   bench/bench_run.sh [REPS]          # default 5; models are made once in $BENCH_DIR (default out-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}
DIR=${BENCH_DIR:-out-bench}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=2

"$PY" bench/bench_models.py "$DIR"
make -s runomp RUN_OUT="$DIR/runomp"
${CC:-gcc} -O3 -march=native -fopenmp -Wall -Wextra -o "$DIR/bandwidth" bench/bandwidth.c

# name | model file | flags | llama2.c runomp on this machine | target. The last row shows what attention over a
# long context costs: at -n 1024 it reads 4x the KV cache of -n 256.
CONFIGS=(
  "15M fp32, -p 0.9|15M_v1.bin|-n 256 -t 1.0 -p 0.9|175|600"
  "15M fp32, -p 1.0|15M_v1.bin|-n 256 -t 1.0 -p 1.0|642|800"
  "110M fp32, -p 0.9|110M_v1.bin|-n 256 -t 1.0 -p 0.9|47|47"
  "110M int8, -p 0.9|110M_v2.bin|-n 256 -t 1.0 -p 0.9|67|130"
  "110M fp32, -p 0.9, -n 1024|110M_v1.bin|-n 1024 -t 1.0 -p 0.9|-|-"
)
# "best median" in GB/s
bandwidth() { "$DIR/bandwidth" 1024 60 | sed -n 's/.*best \([0-9.]*\) GB\/s, median \([0-9.]*\) GB\/s.*/\1 \2/p'; }
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
for ((rep = 1; rep <= REPS; rep++)); do
  for i in "${!CONFIGS[@]}"; do
    IFS='|' read -r name file flags _ _ <<<"${CONFIGS[$i]}"
    before=$(bandwidth)
    # shellcheck disable=SC2086
    rate=$("$DIR/runomp" "$DIR/$file" -z "$DIR/tok32000.bin" -s 42 $flags 2>&1 >/dev/null |
           sed -n 's/^achieved tok\/s: //p')
    echo "$i $rep $rate $(echo "$before $(bandwidth)" | awk '{print ($2 + $4) / 2, ($1 + $3) / 2}')" >>"$RESULTS"
  done
  echo "round $rep/$REPS done" >&2
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
column_median() { grep "^$1 " "$RESULTS" | awk "{print \$$2}" | median; }
# per run: rate x bytes / the bandwidth around that run (column 4: median passes, 5: best), in percent
share_median() { awk -v c="$1" -v b="$2" -v k="$3" '$1 == c {print 100 * $3 * b / 1e9 / $k}' "$RESULTS" | median; }
echo
echo "run.c (make runomp, OMP_NUM_THREADS=2), median of $REPS interleaved rounds"
printf "%-30s %8s %9s %7s   %s\n" "model, sampler" "tok/s" "llama2.c" "target" "share of bandwidth: median / best pass"
for i in "${!CONFIGS[@]}"; do
  IFS='|' read -r name file flags ref target <<<"${CONFIGS[$i]}"
  rate=$(column_median "$i" 3)
  bytes=$(($(stat -c %s "$DIR/$file") - 256))
  printf "%-30s %8.1f %9s %7s   %19.0f%% / %3.0f%%\n" "$name" "$rate" "$ref" "$target" \
    "$(share_median "$i" "$bytes" 4)" "$(share_median "$i" "$bytes" 5)"
done
echo "read bandwidth with 2 threads around the runs (medians over runs): median pass $(awk '{print $4}' "$RESULTS" |
  median) GB/s, best pass $(awk '{print $5}' "$RESULTS" | median) GB/s"
echo "share = median over runs of tok/s x bytes of weights / the bandwidth around that run; the 15M weights"
echo "(61 MB) partly fit in the 32 MB L3 cache"
