#!/usr/bin/env bash
# The disaggregation report (issue 5) on the GPU machine: loadtest/disagg_report.py, in parts.
#
#   bash scripts/gpu_report_run.sh 2gpu   # interference, decode-heavy, prefix-cache on GPUs 0,1
#   bash scripts/gpu_report_run.sh 4gpu   # splits (colocated-4, 1P3D, 2P2D, 3P1D) on GPUs 0-3
#   bash scripts/gpu_report_run.sh        # all: both parts in turn, in one call
#
# By `--dry-run`'s estimate (starts plus unsaturated runs) each part takes about 11 (2gpu)
# and 7.7 (4gpu: four configurations x four rates) minutes if every cluster starts and stops
# in a minute, 9 and 6 with 35-s starts (EXTRA_ARGS="--start-estimate-s 35", what the
# recorded calls assumed); a saturated run takes up to 35 s instead of 14. So with a
# 10-minute limit per command run the two parts as two calls (the second on the same 4-GPU
# machine) and the 2gpu part's comparisons in two calls (--comparison in EXTRA_ARGS). The
# whole script stops by BUDGET_S seconds (default 560: inside one 10-minute call): the report
# skips, and says so, whatever would not fit, and each part's tarball is written as soon as
# the part ends. In `all` mode the 2gpu part gets at most 540 s of it and 4gpu what is left
# (with BUDGET_S=900, where a call may last 15 minutes, about 340 s: not all of the splits).
#
# Environment: OUT (default ./results) receives at most 8 files: run.log (everything printed),
# gpu.txt, and per part report-PART.md, figures-PART.json (docs/benchmarks.json entries: merge
# them with `python -m loadtest.disagg_report --merge figures-PART.json`) and
# report-PART.tar.xz (the part's whole folder: configs, server logs, results JSON, per
# comparison reports and plots; rebuild the plots where matplotlib is with
# `python -m loadtest.disagg_report --report-only --out FOLDER`). WORK (default
# /tmp/baton-disagg-report) holds the parts' folders. EXTRA_ARGS go to every report command
# (say "--start-estimate-s 45"). Ray comes from the bundle on PYTHONPATH, or from
# .gpu-bundle/site.tar.xz (../shared/gpu/pack.sh) unpacked to /tmp/site.
set -u -o pipefail
mode=${1:-all}
case "$mode" in all|2gpu|4gpu) ;; *) echo "usage: $0 [all|2gpu|4gpu]" >&2; exit 2 ;; esac
OUT=${OUT:-./results}
WORK=${WORK:-/tmp/baton-disagg-report}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUT" "$WORK"
start=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee -a "$OUT/run.log") 2>&1
tee_pid=$!

if ! python -c "import ray" 2>/dev/null && [ -f .gpu-bundle/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .gpu-bundle/site.tar.xz -C /tmp/site
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python -c "import ray; print('ray', ray.__version__)" || { echo "no Ray: put the bundle on PYTHONPATH"; exit 2; }
python -c "import matplotlib" 2>/dev/null \
  || echo "note: no matplotlib here: Markdown only; plots later with --report-only on the JSON"
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1

left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
parts_run=""

# run_part NAME GPUS COMPARISONS MAX_S: the report for one part, done within MAX_S seconds
# and what is left of BUDGET_S, then its files into $OUT.
run_part() {
  local name=$1 gpus=$2 comparisons=$3 max_s=$4
  local part_s=$(( $(left) - 20 ))  # 20 s for the tarball and the summary
  [ "$part_s" -gt "$max_s" ] && part_s=$max_s
  local num_gpus
  num_gpus=$(nvidia-smi -L | wc -l)
  if [ "$num_gpus" -lt $(( $(tr -cd , <<< "$gpus" | wc -c) + 1 )) ]; then
    echo "== $name: skipped: it needs GPUs $gpus, this machine has $num_gpus"
    return
  fi
  if [ "$part_s" -lt 150 ]; then
    echo "== $name: skipped: ${part_s}s of the budget left"
    return
  fi
  echo "== $name: $comparisons on GPUs $gpus within ${part_s}s ($(date -u +%H:%M:%S) UTC)"
  rm -rf "${WORK:?}/$name"
  parts_run="$parts_run $WORK/$name/report.md"
  # The report starts nothing that would end past its budget and cuts a run at it; after
  # that it stops the last server (about 10 s) and draws the plots. SIGTERM at part_s
  # unwinds it (servers are stopped too); SIGKILL 30 s later.
  timeout --signal=TERM --kill-after=30 "$part_s" \
    python -m loadtest.disagg_report --comparison "$comparisons" --gpus "$gpus" \
      --out "$WORK/$name" --time-budget-s $(( part_s - 40 )) \
      --via "bash scripts/gpu_report_run.sh $mode" ${EXTRA_ARGS:-}
  echo "== $name: exit $? after $(( $(date +%s) - start ))s"
  cp "$WORK/$name/report.md" "$OUT/report-$name.md" 2>/dev/null
  cp "$WORK/$name/figures.json" "$OUT/figures-$name.json" 2>/dev/null
  tar -C "$WORK" -cf - "$name" | xz -T0 -6 > "$OUT/report-$name.tar.xz"
  ls -la "$OUT/report-$name.tar.xz"
}

case "$mode" in
  2gpu) run_part 2gpu 0,1 interference,decode-heavy,prefix-cache 100000 ;;
  4gpu) run_part 4gpu 0,1,2,3 splits 100000 ;;
  all)
    run_part 2gpu 0,1 interference,decode-heavy,prefix-cache 540
    run_part 4gpu 0,1,2,3 splits 100000
    ;;
esac

echo
echo "== figures ($(( $(date +%s) - start ))s in all)"
for f in "$OUT"/figures-*.json; do
  [ -f "$f" ] || continue
  python - "$f" <<'EOF'
import json, sys
for e in json.load(open(sys.argv[1])):
    print(f"{e['name']:<44} {e['value']:>10g}  target {e['target']:<7} {e['card']}")
EOF
done
# shellcheck disable=SC2086  # one word per report
[ -n "$parts_run" ] && grep -h "missing:\|FAILED\|skipped\|not started\|saturated" $parts_run | head -30
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null  # run.log complete before the files are collected
