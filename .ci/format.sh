#!/usr/bin/env bash
# Formatting, enforced: clang-format (the repo's .clang-format) over the C++/CUDA sources and ruff
# (pyproject.toml's settings) over the Python. Lists what is off and exits 1; with --fix, rewrites
# the files first and lists only what it could not mend (lint errors that ruff cannot fix).
# Needs the pinned versions: pip install -r .ci/format-requirements.txt
#     bash .ci/format.sh          # check (CI)
#     bash .ci/format.sh --fix    # format everything in place
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") fix=0 ;;
  --fix) fix=1 ;;
  *)
    echo "usage: bash .ci/format.sh [--fix]" >&2
    exit 2
    ;;
esac

# The tools must be the pinned versions: another version would flag or rewrite correct files.
for tool in clang-format ruff; do
  pinned=$(sed -n "s/^$tool==//p" .ci/format-requirements.txt)
  found=$("$tool" --version 2> /dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1 || true)
  if [ "$found" != "$pinned" ]; then
    echo "format.sh: needs $tool $pinned, got ${found:-none}:" \
      "pip install -r .ci/format-requirements.txt" >&2
    exit 2
  fi
done

# Tracked files and new ones not ignored, so that --fix before a commit covers new files too.
mapfile -t cxx_files < <(git ls-files --cached --others --exclude-standard -- \
  'src/*.cpp' 'src/*.h' 'src/*.cu' 'src/*.cuh' 'include/*.h' \
  'tests/cpp/*.cpp' 'tests/cpp/*.h' 'benchmarks/*.cu' 'benchmarks/*.cuh' | sort -u)
python_dirs=(python tests benchmarks)

if [ $fix -eq 1 ]; then
  clang-format -i "${cxx_files[@]}"
  ruff check --fix --quiet "${python_dirs[@]}" > /dev/null || true  # the check below lists the rest
  ruff format --quiet "${python_dirs[@]}"
fi
status=0
clang-format --dry-run -Werror "${cxx_files[@]}" || status=1
ruff check --quiet "${python_dirs[@]}" || status=1
ruff format --check --quiet "${python_dirs[@]}" || status=1
if [ $status -ne 0 ] && [ $fix -eq 0 ]; then
  echo "format.sh: the files above are off the repo's formatting;" \
    "bash .ci/format.sh --fix mends them" >&2
fi
verdict=$([ $status -eq 0 ] && echo clean || echo "NOT clean")
echo "format.sh: ${#cxx_files[@]} C++/CUDA files, Python under ${python_dirs[*]}: $verdict"
exit $status
