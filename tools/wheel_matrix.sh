#!/usr/bin/env bash
# Installs one built fastkd wheel into a fresh virtual environment per torch version and runs
# tools/smoke_test.py there (from outside the source tree, so the wheel is what is imported).
#
#   tools/wheel_matrix.sh dist/fastkd-*.whl [torch versions...]   # default: 2.13.0 2.14.1
#
# PYTHON selects the interpreter (default python3); TRITON=1 also installs the newest Triton pip
# offers, so the Triton backends run (in its CPU interpreter without a GPU).
set -euo pipefail
wheel="$(realpath "$1")"
shift
versions=("${@:-2.13.0 2.14.1}")
read -r -a versions <<< "${versions[*]}"
python="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for version in "${versions[@]}"; do
  echo "=== torch ${version} ($("$python" --version))"
  "$python" -m venv "$work/venv-$version"
  pip="$work/venv-$version/bin/pip"
  "$pip" install -q --upgrade pip
  if ! "$pip" install -q "torch==${version}" numpy; then
    echo "FAIL: torch ${version} does not install here"
    status=1
    continue
  fi
  if [[ "${TRITON:-0}" == 1 ]]; then
    "$pip" install -q triton || echo "no Triton for this environment"
  fi
  "$pip" install -q --no-deps "$wheel"
  (cd "$work" && "$work/venv-$version/bin/python" "$here/smoke_test.py") || status=1
done
exit $status
