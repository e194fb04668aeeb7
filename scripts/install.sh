#!/usr/bin/env bash
# The one install script of advserve: `make venv` / `make serve` (--editable), `make test` (--dev) and the
# Dockerfile's builder stage (neither) all run it, so the development venv and the image cannot drift apart.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: scripts/install.sh <venv-dir> [--editable | --dev]

Creates the virtual environment <venv-dir> if it is missing, upgrades its pip and installs advserve and
its client (./client) with the exact versions of constraints.txt: the runtime only (the server, its
dependencies, torch and the client), unless --dev.

  --editable    editable installs of ./client and . (what `make venv` and `make serve` do)
  --dev         --editable plus the [test] extras: pytest, ruff, hypothesis, locust, schemathesis,
                tritonclient, matplotlib, ... (what `make test` does; run after --editable it only adds
                the extras)
                default: regular (non-editable) installs of the runtime (what the image does)
  -h, --help    show this help and exit

Environment:
  PYTHON           the interpreter that creates the venv when it is missing (default: python3)
  TORCH_INDEX_URL  when set, torch (at the version constraints.txt pins) is installed first from this
                   package index alone: https://download.pytorch.org/whl/cpu for the CPU build,
                   https://download.pytorch.org/whl/cu128 for CUDA 12.8, ... (`make ... TORCH=cpu` sets
                   it); empty (default): torch comes from pip's usual index like everything else (on
                   PyPI for Linux x86_64 that is the CUDA build)
  PIP_*            honoured by pip as usual (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_CACHE_DIR, ...)
USAGE
}

venv=""
mode=runtime
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --editable) [[ "$mode" == dev ]] || mode=editable ;;
        --dev) mode=dev ;;
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
    echo "install.sh: creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip

if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    # torch alone from that index, pinned by constraints.txt (`torch==X` also matches the index's `X+cpu`);
    # the install below then finds it satisfied and leaves it.
    echo "install.sh: torch from $TORCH_INDEX_URL"
    "${pip[@]}" install --quiet -c constraints.txt --index-url "$TORCH_INDEX_URL" torch
fi

case "$mode" in
    runtime)
        echo "install.sh: advserve and its client (runtime) into $venv"
        "${pip[@]}" install --quiet -c constraints.txt ./client .
        ;;
    editable)
        echo "install.sh: advserve and its client (runtime, editable) into $venv"
        "${pip[@]}" install --quiet -c constraints.txt -e ./client -e .
        ;;
    dev)
        echo "install.sh: advserve and its client (editable) with the test tools into $venv"
        "${pip[@]}" install --quiet -c constraints.txt -e ./client -e '.[test]'
        ;;
esac
# compile the CPU kernels now, into numba's cache beside them, so that no request waits for a compile
echo "install.sh: compiling the CPU kernels (advserve.kernels.cpu.warm)"
"$venv/bin/python" -c "from advserve.kernels import cpu; cpu.warm()"
echo "install.sh: done ($("$venv/bin/python" -m pip list --format=freeze | wc -l) packages)"
