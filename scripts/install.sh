#!/usr/bin/env bash
# The one install script of advserve: `make venv` (with --dev) and the Dockerfile's builder stage (without)
# both run it, so the development venv and the image cannot drift apart.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/install.sh <venv-dir> [--dev]

Creates the virtual environment <venv-dir> if it is missing, upgrades its pip and installs advserve and
its client (./client) with the exact versions of constraints.txt.

  --dev         editable installs of ./client and . with the [test] extras (what `make venv` does)
                default: regular (non-editable) installs, no test extras (what the image does)
  -h, --help    show this help and exit

Environment:
  PYTHON           the interpreter that creates the venv when it is missing (default: python3)
  TORCH_INDEX_URL  when set, torch (at the version constraints.txt pins) is installed first from this
                   package index alone, e.g. https://download.pytorch.org/whl/cpu for the CPU build;
                   empty (default): torch comes from pip's usual index like everything else (on PyPI
                   for Linux x86_64 that is the CUDA build)
  PIP_*            honoured by pip as usual (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_CACHE_DIR, ...)
EOF
}

venv=""
dev=0
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --dev) dev=1 ;;
        -*) echo "install.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n "$venv" ]]; then
                echo "install.sh: one venv directory only (got $venv and $arg)" >&2
                exit 2
            fi
            venv="$arg"
            ;;
    esac
done
if [[ -z "$venv" ]]; then
    usage >&2
    exit 2
fi

# The venv path is the caller's; every other path is relative to the repository root.
[[ "$venv" == /* ]] || venv="$PWD/$venv"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    # torch alone from that index, pinned by constraints.txt (`torch==X` also matches the index's `X+cpu`);
    # the install below then finds it satisfied and leaves it.
    "${pip[@]}" install --quiet -c constraints.txt --index-url "$TORCH_INDEX_URL" torch
fi

if ((dev)); then
    "${pip[@]}" install --quiet -c constraints.txt -e ./client -e '.[test]'
else
    "${pip[@]}" install --quiet -c constraints.txt ./client .
fi
