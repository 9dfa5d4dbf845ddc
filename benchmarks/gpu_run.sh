#!/usr/bin/env bash
# One call on the GPU machine: build the extension (sm_90, timed), then run the selected stages:
#   build  - nothing after the build (the build alone, e.g. before a stage run in a later call)
#   ab     - same-run timing against a baseline tree: AB_BASELINE (default build/baseline.tar, made with
#            `git archive <commit> -o build/baseline.tar` and carried to the machine) is unpacked and
#            built in the background while this tree builds; then cuda_quickcheck.py --timing-only
#            runs baseline, this tree, baseline, this tree, and a table compares the medians (AB_SHAPES,
#            e.g. "8x1536x2048x2,8x1536x2048x64:fp32", times those shapes, bf16 unless a shape names its
#            dtype, instead of the anchors; envab too, unless ENVAB_SHAPES names its own). AB_VARIANTS
#            (space-separated tars of further trees, e.g. one per part of a change) builds and times
#            those too, in the same rounds, each with its own table against the baseline
#   envab  - same-run timing of this tree without and with the run-time switches in ENV_AB (e.g.
#            ENV_AB="SELECTIVE_SCAN_FWD_REGS=128"): cuda_quickcheck.py --timing-only runs without,
#            with, without, with, and a table compares the medians
#   quick  - benchmarks/cuda_quickcheck.py (accuracy grid + anchor timings, per states-per-thread choice;
#            QUICK_SPT lists the choices, default "auto 4")
#   tests  - the CUDA tests (pytest -m cuda; CUDA_TESTS narrows them, e.g. tests/test_state_update.py;
#            tests/test_multi_gpu.py runs on a machine with two GPUs only)
#   bench  - benchmarks/bench_scan.py on the GPU (JSON to $OUT)
#   decode - benchmarks/bench_decode.py on the GPU (JSON to $OUT)
#   generate - benchmarks/bench_generate.py on the GPU: the language model's time per token, eager and
#            with the decode step as a CUDA graph (JSON to $OUT)
#   breakdown - benchmarks/op_breakdown.py: one forward and one backward split by device kernel at
#            BREAKDOWN_SHAPES (default "8x1536x2048x16,8x1536x2048x64", bf16; JSON to $OUT)
#   host   - benchmarks/host_cost.py: host time per call of short problems, eager and as a CUDA graph
#            (HOST_SHAPES, e.g. "8x1536x128x16,1x64x128x16", instead of the script's; JSON to $OUT), for
#            this tree and, when the ab stage ran before it, the baseline
#   sanitize - compute-sanitizer memcheck and racecheck on small forwards + backwards (SANITIZE_SHAPES)
#   profile - Nsight Compute (ncu, full set) on the first PROFILE_COUNT (default 2) kernels matching
#            PROFILE_KERNELS (default "scan_(fwd|bwd)_kernel") at PROFILE_SHAPE (default
#            "8 1536 2048 16", then optionally fp32); the details page as text, the per-instruction
#            SASS page gzipped, and its summary by benchmarks/ncu_sass_summary.py (stall reasons,
#            loops, shared-memory wavefronts, top instructions); the report itself is not kept
# Usage: bash benchmarks/gpu_run.sh [stage ...]   (default: tests bench). Logs and JSON go to $OUT.
# SELECTIVE_SCAN_COMMIT names the commit in the JSON when the tree was copied without its history.
# SKIP_BUILD=1 skips the build (the extension was built by an earlier invocation in the same call:
# each build is a full one). Give one invocation all the stages of a call instead where possible.
# The bench stage writes its JSON after every record; the whole run (anchors, references, sweeps)
# takes about six minutes on an H200.
set -uo pipefail
OUT=${OUT:-/tmp/selective_scan_gpu}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench)

AB_BASELINE=${AB_BASELINE:-build/baseline.tar}
envab_shapes=${ENVAB_SHAPES:-${AB_SHAPES:-}}
AB_DIR=/tmp/selective_scan_baseline
AB_VARIANT_DIR=/tmp/selective_scan_variant_  # + the variant's number, from 1
read -r -a ab_variants <<< "${AB_VARIANTS:-}"
ab_pids=()
if [[ " ${stages[*]} " == *" ab "* ]]; then
  # The baseline's tree, then the variants' ($AB_VARIANT_DIR1, ...), built in the background.
  ab_trees=("$AB_BASELINE" "${ab_variants[@]}")
  for i in "${!ab_trees[@]}"; do
    tar_file=${ab_trees[$i]}
    dir=$AB_DIR; log="$OUT/ab_baseline_build.log"
    [ "$i" -gt 0 ] && dir=$AB_VARIANT_DIR$i && log="$OUT/ab_variant${i}_build.log"
    if [ ! -f "$tar_file" ]; then echo "ab: $tar_file not found"; exit 1; fi
    rm -rf "$dir" && mkdir -p "$dir" && tar -xf "$tar_file" -C "$dir"
    ( cd "$dir" && python3 setup.py build_ext --inplace > "$log" 2>&1 ) &
    ab_pids+=($!)
  done
fi

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s.%N)
if [ "${SKIP_BUILD:-0}" = 1 ]; then
  echo "build skipped (SKIP_BUILD=1)"
elif ! python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
else
  echo "build_seconds=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")" | tee "$OUT/build_time.txt"
fi
python3 -c "import selective_scan, torch; print(selective_scan.build_info(), torch.__version__, torch.version.cuda)"

rc=0
for stage in "${stages[@]}"; do
  case "$stage" in
    build) ;;
    ab)
      built=1
      for pid in "${ab_pids[@]}"; do wait "$pid" || built=0; done
      if [ "$built" -eq 0 ]; then tail -30 "$OUT"/ab_*_build.log; rc=1; continue; fi
      for run in 1 2; do
        PYTHONPATH="$AB_DIR/python" python3 benchmarks/cuda_quickcheck.py --timing-only ${AB_SHAPES:+--shapes $AB_SHAPES} \
          --out "$OUT/ab_base_$run.json" > "$OUT/ab_base_$run.log" 2>&1 || rc=1
        python3 benchmarks/cuda_quickcheck.py --timing-only ${AB_SHAPES:+--shapes $AB_SHAPES} --out "$OUT/ab_new_$run.json" \
          > "$OUT/ab_new_$run.log" 2>&1 || rc=1
        for i in "${!ab_variants[@]}"; do
          v=$((i + 1))
          PYTHONPATH="$AB_VARIANT_DIR$v/python" python3 benchmarks/cuda_quickcheck.py --timing-only \
            ${AB_SHAPES:+--shapes $AB_SHAPES} --out "$OUT/ab_variant${v}_$run.json" > "$OUT/ab_variant${v}_$run.log" 2>&1 || rc=1
        done
      done
      : > "$OUT/ab.txt"
      labels=(new)
      for i in "${!ab_variants[@]}"; do labels+=("variant$((i + 1))"); done
      for label in "${labels[@]}"; do
        if [ -f "$OUT/ab_base_2.json" ] && [ -f "$OUT/ab_${label}_2.json" ]; then
          { [ "$label" != new ] && echo "$label (${ab_variants[${label#variant} - 1]}) against the baseline:"
            python3 benchmarks/ab_table.py "$OUT"/ab_base_{1,2}.json -- "$OUT/ab_${label}_1.json" "$OUT/ab_${label}_2.json"
          } | tee -a "$OUT/ab.txt"
        else
          echo "ab: a timing run failed (logs: $OUT/ab_*.log)"; tail -5 "$OUT"/ab_*_1.log
        fi
      done ;;
    envab)
      for run in 1 2; do
        python3 benchmarks/cuda_quickcheck.py --timing-only ${envab_shapes:+--shapes $envab_shapes} --out "$OUT/envab_off_$run.json" \
          > "$OUT/envab_off_$run.log" 2>&1 || rc=1
        env ${ENV_AB:?ENV_AB names the switches, e.g. SELECTIVE_SCAN_FWD_REGS=128} \
          python3 benchmarks/cuda_quickcheck.py --timing-only ${envab_shapes:+--shapes $envab_shapes} --out "$OUT/envab_on_$run.json" \
          > "$OUT/envab_on_$run.log" 2>&1 || rc=1
      done
      if [ -f "$OUT/envab_off_2.json" ] && [ -f "$OUT/envab_on_2.json" ]; then
        echo "without / with: $ENV_AB"
        python3 benchmarks/ab_table.py "$OUT"/envab_off_{1,2}.json -- "$OUT"/envab_on_{1,2}.json | tee "$OUT/envab.txt"
      else
        echo "envab: a timing run failed (logs: $OUT/envab_*.log)"; tail -5 "$OUT"/envab_*_1.log
      fi ;;
    quick)
      for spt in ${QUICK_SPT:-auto 4}; do
        if [ "$spt" = auto ]; then unset SELECTIVE_SCAN_SPT; else export SELECTIVE_SCAN_SPT=$spt; fi
        python3 benchmarks/cuda_quickcheck.py --out "$OUT/quick_spt_$spt.json" 2>&1 | tee "$OUT/quick_spt_$spt.log" || rc=1
      done
      unset SELECTIVE_SCAN_SPT ;;
    tests)
      python3 -m pytest ${CUDA_TESTS:-tests} -m cuda -q -x --durations=15 2>&1 | tee "$OUT/tests_cuda.log"; rc=$((rc | PIPESTATUS[0])) ;;
    bench)
      python3 benchmarks/bench_scan.py --device cuda --out "$OUT/bench_h200.json" 2>&1 | tee "$OUT/bench.log" || rc=1 ;;
    decode)
      python3 benchmarks/bench_decode.py --device cuda --out "$OUT/decode_h200.json" 2>&1 | tee "$OUT/decode.log" || rc=1 ;;
    generate)
      python3 benchmarks/bench_generate.py --device cuda --out "$OUT/generate_h200.json" 2>&1 | tee "$OUT/generate.log" \
        || rc=1 ;;
    breakdown)
      python3 benchmarks/op_breakdown.py --device cuda --shapes "${BREAKDOWN_SHAPES:-8x1536x2048x16,8x1536x2048x64}" \
        --out "$OUT/breakdown.json" 2>&1 | tee "$OUT/breakdown.log"; rc=$((rc | PIPESTATUS[0])) ;;
    host)
      if [[ " ${stages[*]} " == *" ab "* ]]; then
        PYTHONPATH="$AB_DIR/python" python3 benchmarks/host_cost.py ${HOST_SHAPES:+--shapes $HOST_SHAPES} \
          --out "$OUT/host_base.json" 2>&1 | sed 's/^/baseline: /' | tee "$OUT/host.log"; rc=$((rc | PIPESTATUS[0]))
      fi
      python3 benchmarks/host_cost.py ${HOST_SHAPES:+--shapes $HOST_SHAPES} --out "$OUT/host_new.json" 2>&1 \
        | tee -a "$OUT/host.log"; rc=$((rc | PIPESTATUS[0])) ;;
    sanitize)
      # SANITIZE_SHAPES: "batch,dim,seqlen,dstate[,fp32]" entries (bf16 unless fp32; few rows: they
      # take the sequence split).
      for shape in ${SANITIZE_SHAPES:-2,40,200,16}; do
        for tool in memcheck racecheck; do
          log="$OUT/sanitize_${tool}_${shape//,/x}.log"
          compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/profile_shape.py ${shape//,/ } \
            > "$log" 2>&1; code=$?
          echo "compute-sanitizer $tool $shape: exit $code, $(grep -h 'SUMMARY' "$log" | tail -1)"
          [ $code -eq 0 ] || rc=1
        done
      done ;;
    profile)
      ncu --set full --clock-control none -k regex:"${PROFILE_KERNELS:-scan_(fwd|bwd)_kernel}" -c "${PROFILE_COUNT:-2}" \
        --export "$OUT/scan" -f python3 benchmarks/profile_shape.py ${PROFILE_SHAPE:-8 1536 2048 16} \
        > "$OUT/ncu.log" 2>&1 || rc=1
      ncu --import "$OUT/scan.ncu-rep" --page details > "$OUT/ncu_details.txt" 2>&1
      ncu --import "$OUT/scan.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_sass.csv" 2>&1
      rm -f "$OUT/scan.ncu-rep" && gzip -f -9 "$OUT/ncu_sass.csv"
      python3 benchmarks/ncu_sass_summary.py "$OUT/ncu_sass.csv.gz" > "$OUT/ncu_summary.txt" 2>&1 || rc=1
      grep -E "scan_|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Executed Ipc A|Block Limit|L1/TEX Cache Throughput" \
        "$OUT/ncu_details.txt" | head -40
      cut -c1-200 "$OUT/ncu_summary.txt" | head -60 ;;
    *)
      echo "unknown stage $stage"; rc=1 ;;
  esac
done
exit $rc
