set -u
bash benchmarks/gpu_run.sh none 2>&1 | grep -v "unknown stage" | tail -1
python3 -m pytest tests/test_backward.py tests/test_cuda.py -m cuda -q -x -k "dstate or split or odd" 2>&1 | tail -1
S=1x2048x16384x16,1x1536x2048x16,2x2048x4096x16,1x5120x8192x16
for n in auto 24 32 48 64; do
  echo "== splits $n"
  if [ $n = auto ]; then unset SELECTIVE_SCAN_SEQ_SPLITS; else export SELECTIVE_SCAN_SEQ_SPLITS=$n; fi
  python3 benchmarks/cuda_quickcheck.py --timing-only --shapes $S 2>&1 | grep "TIME.*bfloat"
done
