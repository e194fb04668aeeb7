#!/usr/bin/env bash
# The Python packages the GPU machine's image lacks (or has at other versions), as CPython 3.12 manylinux
# wheels in .whl/ (git-ignored): the server's runtime, the stock tritonclient of the shared-memory tests,
# at the versions of constraints.txt and of this .venv. Run here, where pip reaches the registry; then
# carry .whl to the device machine with scripts/device_check.sh (its header says how).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
version() {  # the installed version of $1 in .venv
    .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}
packages=(fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection orjson uvicorn
          httptools uvloop grpcio grpcio-health-checking grpcio-reflection protobuf prometheus-client
          tritonclient python-rapidjson geventhttpclient gevent greenlet zope.event zope.interface brotli)
rm -rf .whl && mkdir .whl
for name in "${packages[@]}"; do
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
        -d .whl "$name==$(version "$name")" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
done
ls .whl | wc -l
du -sh .whl
