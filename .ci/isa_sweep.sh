#!/usr/bin/env bash
# Runs the test suite with torch's and XLA's CPU feature levels forced down (and up to the
# host's best), one level after another, so that no test depends on one machine's kernels.
#
#   bash .ci/isa_sweep.sh                       # every level, the `make test` selection
#   bash .ci/isa_sweep.sh tests/test_vae.py     # every level, one file (pytest arguments)
#   LEVELS="avx2 default" bash .ci/isa_sweep.sh  # some levels
#
# Levels (each sets torch's ATen dispatch, oneDNN's ISA cap and XLA's CPU ISA cap):
#   native   nothing forced (AMX / AVX512-BF16 where the CPU has them)
#   avx512   ATEN_CPU_CAPABILITY=avx512  ONEDNN_MAX_CPU_ISA=AVX512_CORE  --xla_cpu_max_isa=AVX512
#   avx2     ATEN_CPU_CAPABILITY=avx2    ONEDNN_MAX_CPU_ISA=AVX2         --xla_cpu_max_isa=AVX2
#   default  ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41        --xla_cpu_max_isa=SSE4_2
# A level the CPU lacks runs at the CPU's best instead (the libraries cap, never emulate).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LEVELS=${LEVELS:-"native avx512 avx2 default"}
if [ $# -eq 0 ]; then set -- -m "not heavy" tests; fi
declare -A ATEN=([avx512]=avx512 [avx2]=avx2 [default]=default)
declare -A DNNL=([avx512]=AVX512_CORE [avx2]=AVX2 [default]=SSE41)
declare -A XLA=([avx512]=AVX512 [avx2]=AVX2 [default]=SSE4_2)
failed=()
for level in $LEVELS; do
  echo "=== ISA level: $level"
  if [ "$level" = native ]; then
    env -u ATEN_CPU_CAPABILITY -u ONEDNN_MAX_CPU_ISA "$PY" -m pytest -q -ra "$@"
  elif [ -n "${ATEN[$level]:-}" ]; then
    ATEN_CPU_CAPABILITY=${ATEN[$level]} ONEDNN_MAX_CPU_ISA=${DNNL[$level]} \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=${XLA[$level]}" "$PY" -m pytest -q -ra "$@"
  else
    echo "unknown level '$level' (native, avx512, avx2, default)" >&2; exit 2
  fi
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then failed+=("$level"); fi
done
if [ ${#failed[@]} -gt 0 ]; then echo "failed at: ${failed[*]}"; exit 1; fi
echo "all levels passed: $LEVELS"
