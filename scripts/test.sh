#!/usr/bin/env bash
# The test suite at both ends of the transformers range we declare (shadowkv_fx/compat.py,
# pyproject.toml): everything on the newest (what scripts/install.sh gives), then the pass,
# equivalence, compile and bad-input tests on the oldest, in a venv that shares every other
# package with the main install; then mutation testing (scripts/mutants.py: every planted bug
# must fail the fast subset). Each leg checks it runs its end of the range, and fails on any skip
# but the GPU-only tests' (scripts/check_skips.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
OLDEST=$("$PY" -c "from shadowkv_fx.compat import TESTED_TRANSFORMERS as t; print(t[0])")
PYTEST=(-m pytest -o addopts="" -q -p no:cacheprovider -rs -n "${TEST_WORKERS:-2}" --dist load)
REPORTS=$(mktemp -d)
trap 'rm -rf "$REPORTS"' EXIT

# $1: python, $2: index into TESTED_TRANSFORMERS (0 oldest, -1 newest)
check_version() {
    "$1" -c "
import transformers
from shadowkv_fx.compat import TESTED_TRANSFORMERS as tested
want = tested[$2]
assert transformers.__version__ == want, (
    f'this leg must run transformers {want} (TESTED_TRANSFORMERS[$2]), found {transformers.__version__}')
print(f'== transformers {want}')"
}

check_version "$PY" -1
echo "== newest supported transformers: full suite"
"$PY" "${PYTEST[@]}" --durations=10 --junitxml="$REPORTS/newest.xml" "$@"
"$PY" scripts/check_skips.py "$REPORTS/newest.xml"

VENV=${OLDEST_VENV:-.venv-transformers-$OLDEST}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "transformers==$OLDEST"
check_version "$VENV/bin/python" 0
echo "== oldest supported transformers: pass, equivalence, compile, cold start, hooks, bad-input, speculation tests"
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-oldest} "$VENV/bin/python" "${PYTEST[@]}" --junitxml="$REPORTS/oldest.xml" \
    tests/test_pass.py tests/test_equivalence.py tests/test_compile_backend.py tests/test_bad_input.py \
    tests/test_versions.py tests/test_hooks.py tests/test_cold_start.py \
    tests/test_generate_trust.py::test_crop_keeps_every_layer_its_own_tail_count \
    tests/test_generate_trust.py::test_prompt_lookup_never_changes_the_output "$@"
"$VENV/bin/python" scripts/check_skips.py "$REPORTS/oldest.xml"

echo "== mutation testing: every named mutant must fail the fast subset"
"$PY" scripts/mutants.py
