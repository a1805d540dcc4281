#!/usr/bin/env bash
# The test suite at both ends of the transformers range we declare (shadowkv_fx/compat.py,
# pyproject.toml): everything on the newest (what scripts/install.sh gives), then the pass,
# equivalence, compile and bad-input tests on the oldest, in a venv that shares every other
# package with the main install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1
OLDEST=$("$PY" -c "from shadowkv_fx.compat import TESTED_TRANSFORMERS as t; print(t[0])")
PYTEST=(-m pytest -o addopts="" -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist load)

echo "== transformers $("$PY" -c 'import transformers; print(transformers.__version__)') (newest supported): full suite"
"$PY" "${PYTEST[@]}" --durations=10 "$@"

VENV=${OLDEST_VENV:-.venv-transformers-$OLDEST}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "transformers==$OLDEST"
echo "== transformers $OLDEST (oldest supported): pass, equivalence, compile, bad-input, speculation tests"
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-oldest} "$VENV/bin/python" "${PYTEST[@]}" tests/test_pass.py \
    tests/test_equivalence.py tests/test_compile_backend.py tests/test_bad_input.py tests/test_versions.py \
    tests/test_generate_trust.py::test_crop_keeps_every_layer_its_own_tail_count \
    tests/test_generate_trust.py::test_prompt_lookup_never_changes_the_output "$@"
