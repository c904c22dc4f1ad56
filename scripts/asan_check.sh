#!/usr/bin/env bash
# Run the whole test suite against a build of the compiled core with
# AddressSanitizer: any out-of-bounds read or write, use after free or double
# free inside the kernels stops the run with a report.
#
#   bash scripts/asan_check.sh            # from the repository, in an env with the
#                                         # build and test dependencies installed
#   bash scripts/asan_check.sh -k kernels # extra arguments go to pytest
#
# The ASan build goes to a scratch copy of the source, so the normal build is
# untouched. libasan must be preloaded: the Python interpreter itself is not
# instrumented, and the sanitizer's runtime has to come first. Leak detection is
# off because CPython keeps many allocations alive until exit by design.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/femtogpt-asan.XXXXXX")"
trap 'rm -rf "$work"' EXIT

libasan="$(gcc -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
    echo "asan_check: gcc has no libasan ($libasan); install gcc's sanitizer runtime" >&2
    exit 2
fi

# The source only: no build products, no virtual environments.
tar -C "$repo" --exclude='./.git' --exclude='./.ci-venv' --exclude='./build' \
    --exclude='*.so' --exclude='./femtogpt/*.c' -cf - . | tar -C "$work" -xf -
cd "$work"
echo "asan_check: building femtogpt._core with -fsanitize=address in $work"
FEMTOGPT_ASAN=1 python setup.py build_ext --inplace >build.log 2>&1 || {
    tail -30 build.log >&2; exit 1; }
# (not `| grep -q`: with pipefail, nm's SIGPIPE after an early match would fail it)
if [ "$(nm -D femtogpt/_core*.so | grep -c __asan_)" -eq 0 ]; then
    echo "asan_check: the built extension is not instrumented" >&2; exit 1
fi

export LD_PRELOAD="$libasan"
# halt_on_error: the first report fails the run; abort_on_error makes that a
# non-zero exit status even inside a subprocess test.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1"
# matplotlib is hidden: its extensions abort at import under the preloaded
# runtime (seen on an Intel Xeon, 2026-12-02), and plots are not what this
# checks; training then skips loss.png, as without matplotlib.
mkdir -p "$work/no-matplotlib/matplotlib"
echo 'raise ImportError("hidden for the AddressSanitizer run")' \
    > "$work/no-matplotlib/matplotlib/__init__.py"
export PYTHONPATH="$work:$work/no-matplotlib"
log="$work/asan-pytest.log"
set +e
python -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
reports=$(grep -c "ERROR: AddressSanitizer" "$log" || true)
echo "asan_check: pytest exit status $status, AddressSanitizer reports: $reports"
[ "$status" -eq 0 ] && [ "$reports" -eq 0 ]
