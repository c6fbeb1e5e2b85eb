#!/usr/bin/env bash
# run.c speed: tokens/s of `make runomp` with 2 OpenMP threads, -n 256 (and 110M at -n 1024), on random-weight
# models of llama2.c's 15M shape (dim 288, 6 layers, vocab 32000, seq 256) and 110M shape (dim 768, 12 layers,
# seq 1024), and the rates as a share of this machine's 2-thread read bandwidth (batch-1 decoding reads every
# weight once per token). Configurations run interleaved, REPS rounds; the figures are medians. A VM's
# bandwidth can swing by half within seconds (35-67 GB/s on one), so each run's share divides its rate by the
# bandwidth measured just before and just after it, in about a second's worth of passes each time: their median
# (what the machine gave around the run) and their best (what it gives at most).
#
#   bench/bench_run.sh [REPS]          # default 5; models are made once in $BENCH_DIR (default out-bench)
#   LLAMA2C_DIR=path/to/llama2.c bench/bench_run.sh [REPS]
#
# With LLAMA2C_DIR (a folder holding llama2.c's run.c and runq.c), its programs are built with its Makefile's
# runomp flags and timed in the same rounds on the same weights (version 0 for run.c, the int8 file for runq),
# so that the llama2.c column is this machine's; without it, that column shows the issue's figures, measured on
# another machine.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}
DIR=${BENCH_DIR:-out-bench}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=2

"$PY" bench/bench_models.py "$DIR" ${LLAMA2C_DIR:+v0}
make -s runomp RUN_OUT="$DIR/runomp"
for program in ${LLAMA2C_DIR:+run runq}; do
  ${CC:-gcc} -Ofast -fopenmp -march=native -o "$DIR/llama2c_$program" "$LLAMA2C_DIR/$program.c" -lm
done
${CC:-gcc} -O3 -march=native -fopenmp -Wall -Wextra -o "$DIR/bandwidth" bench/bandwidth.c

# name | model file | flags | llama2.c on the issue's machine | target | llama2.c's program and file. The last row
# shows what attention over a long context costs: at -n 1024 it reads 4x the KV cache of -n 256.
CONFIGS=(
  "15M fp32, -p 0.9|15M_v1.bin|-n 256 -t 1.0 -p 0.9|175|600|llama2c_run 15M_v0.bin"
  "15M fp32, -p 1.0|15M_v1.bin|-n 256 -t 1.0 -p 1.0|642|800|llama2c_run 15M_v0.bin"
  "110M fp32, -p 0.9|110M_v1.bin|-n 256 -t 1.0 -p 0.9|47|47|llama2c_run 110M_v0.bin"
  "110M int8, -p 0.9|110M_v2.bin|-n 256 -t 1.0 -p 0.9|67|130|llama2c_runq 110M_v2.bin"
  "110M fp32, -p 0.9, -n 1024|110M_v1.bin|-n 1024 -t 1.0 -p 0.9|-|-|llama2c_run 110M_v0.bin"
)
# "best median" in GB/s
bandwidth() { "$DIR/bandwidth" 1024 60 | sed -n 's/.*best \([0-9.]*\) GB\/s, median \([0-9.]*\) GB\/s.*/\1 \2/p'; }
# tokens/s of a program (path under $DIR) on a model file with flags; both programs print it on stderr
tokens_per_s() {
  # shellcheck disable=SC2086
  "$DIR/$1" "$DIR/$2" -z "$DIR/tok32000.bin" -s 42 $3 2>&1 >/dev/null | sed -n 's/^achieved tok\/s: //p'
}
RESULTS=$(mktemp)
REFERENCE=$(mktemp)
trap 'rm -f "$RESULTS" "$REFERENCE"' EXIT
for ((rep = 1; rep <= REPS; rep++)); do
  for i in "${!CONFIGS[@]}"; do
    IFS='|' read -r name file flags _ _ theirs <<<"${CONFIGS[$i]}"
    before=$(bandwidth)
    ours=$(tokens_per_s runomp "$file" "$flags")
    echo "$i $rep $ours $(echo "$before $(bandwidth)" | awk '{print ($2 + $4) / 2, ($1 + $3) / 2}')" >>"$RESULTS"
    if [[ -n "${LLAMA2C_DIR:-}" ]]; then
      read -r program model <<<"$theirs"
      echo "$i $rep $(tokens_per_s "$program" "$model" "$flags")" >>"$REFERENCE"
    fi
  done
  echo "round $rep/$REPS done" >&2
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
column_median() { grep "^$1 " "${3:-$RESULTS}" | awk "{print \$$2}" | median; }
# per run: rate x bytes / the bandwidth around that run (column 4: median passes, 5: best), in percent
share_median() { awk -v c="$1" -v b="$2" -v k="$3" '$1 == c {print 100 * $3 * b / 1e9 / $k}' "$RESULTS" | median; }
echo
reference="the issue's figures (LLAMA2C_DIR=... times them here)"
[[ -n "${LLAMA2C_DIR:-}" ]] && reference="its runomp and runq, timed in the same rounds"
echo "run.c (make runomp, OMP_NUM_THREADS=2), median of $REPS interleaved rounds; llama2.c: $reference"
printf "%-30s %8s %9s %7s   %s\n" "model, sampler" "tok/s" "llama2.c" "target" "share of bandwidth: median / best pass"
for i in "${!CONFIGS[@]}"; do
  IFS='|' read -r name file flags ref target _ <<<"${CONFIGS[$i]}"
  rate=$(column_median "$i" 3)
  [[ -n "${LLAMA2C_DIR:-}" ]] && ref=$(printf "%.1f" "$(column_median "$i" 3 "$REFERENCE")")
  bytes=$(($(stat -c %s "$DIR/$file") - 256))
  printf "%-30s %8.1f %9s %7s   %19.0f%% / %3.0f%%\n" "$name" "$rate" "$ref" "$target" \
    "$(share_median "$i" "$bytes" 4)" "$(share_median "$i" "$bytes" 5)"
done
echo "read bandwidth with 2 threads around the runs (medians over runs): median pass $(awk '{print $4}' "$RESULTS" |
  median) GB/s, best pass $(awk '{print $5}' "$RESULTS" | median) GB/s"
echo "share = median over runs of tok/s x bytes of weights / the bandwidth around that run; above 100%, the"
echo "weights (61 MB for 15M) fit in the caches: L3 here is $(lscpu 2>/dev/null | sed -n 's/^L3 cache: *//p')"
