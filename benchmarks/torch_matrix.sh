#!/usr/bin/env bash
# The torch version matrix (docs/torch-and-gpu.md): one venv per torch release, the package
# installed into it, the default test tier run there, one summary line per version.
#
#   bash benchmarks/torch_matrix.sh                 # torch 2.11.0 and 2.15.0 (the declared range's ends)
#   bash benchmarks/torch_matrix.sh 2.13.0          # other releases
#   VENV_ROOT=/tmp/m TESTS="tests/test_config.py" bash benchmarks/torch_matrix.sh 2.11.0
#
# Environment:
#   VENV_ROOT  where the venvs live (default /work): $VENV_ROOT/venv-<major.minor>, kept between runs
#   DIFFUSERS  the diffusers release installed beside torch (default 0.42.1)
#   TESTS      pytest arguments naming what runs (default: the default tier, `-m "not slow" tests`)
#   SETUP_ONLY=1  build the venvs, run nothing
#
# PyPI's torch wheels for Linux are CUDA builds of several GB each (they run on the CPU too), so
# this is not CI's default run, which uses the pinned CPU build (.ci/run). A machine-wide pip
# constraint (/etc/xdg/pip, /etc/pip.conf on the project's machines) may cap torch below the
# newest release: the installs below run with PIP_CONFIG_FILE=/dev/null, which makes pip read no
# configuration file, for these commands only. Runs the tests with `nice -n 5` (shared machine).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV_ROOT=${VENV_ROOT:-/work}
DIFFUSERS=${DIFFUSERS:-0.42.1}
PY=${PYTHON:-python3}
if [ $# -eq 0 ]; then set -- 2.11.0 2.15.0; fi
# the default tier (pyproject addopts say the same; spelled out for a checkout without them)
if [ -n "${TESTS:-}" ]; then eval "TEST_ARGS=($TESTS)"; else TEST_ARGS=(-m "not slow" tests); fi

commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
declare -a SUMMARY
for v in "$@"; do
  mm=$(echo "$v" | cut -d. -f1,2)
  venv="$VENV_ROOT/venv-$mm"
  log="$VENV_ROOT/torch_matrix-$v.log"
  echo "== torch $v: venv $venv, log $log"
  if [ ! -x "$venv/bin/python" ]; then "$PY" -m venv "$venv" || { SUMMARY+=("torch $v: venv failed"); continue; }; fi
  pip() { PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip "$@"; }
  have=$("$venv/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
  if [ "${have%%+*}" != "$v" ]; then
    pip install -q "torch==$v" || { SUMMARY+=("torch $v: install failed"); continue; }
  fi
  # torch pinned again so that no dependency moves it; the package from this checkout, editable
  pip install -q -e "$ROOT[test]" "diffusers==$DIFFUSERS" "torch==$v" \
    || { SUMMARY+=("torch $v: package install failed"); continue; }
  versions=$("$venv/bin/python" -c "import torch, diffusers, sys; print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, python {sys.version.split()[0]}')")
  echo "   $versions"
  if [ -n "${SETUP_ONLY:-}" ]; then SUMMARY+=("torch $v: set up ($versions)"); continue; fi
  start=$(date +%s)
  (cd "$ROOT" && PYTHONPATH="$ROOT" nice -n 5 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TEST_ARGS[@]}") \
    > "$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  # pytest's closing line, e.g. "120 passed, 3 skipped, 40 deselected in 300.00s"
  last=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error)|no tests ran" "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  SUMMARY+=("torch $v ($versions, commit $commit): rc $rc, ${last:-no summary line} [${secs}s wall]")
done
echo
echo "== torch matrix summary ($(date -u +%Y-%m-%dT%H:%MZ))"
status=0
for s in "${SUMMARY[@]}"; do
  echo "$s"
  case "$s" in *"rc 0,"*|*"set up"*) ;; *) status=1 ;; esac
done
exit $status
