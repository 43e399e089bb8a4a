#!/usr/bin/env bash
# Build .whl/: what emotr's extraction benchmarks need on the lent GPU machine and it lacks.
#
#     bash jobs/gpu_carry.sh    # here; then one device run: carry [".whl"], jobs/gpu_issue9.sh
#
# That machine runs Python 3.12 with JAX on CUDA, NumPy, pandas, pyarrow, Pillow, PyYAML, rich,
# typer, psutil, aiohttp, requests, protobuf, msgpack and click (the device tool's KINDS.md), but
# not Keras, Ray or pydantic, and nothing can be fetched there. The versions are the ones
# requirements.lock pins. Ray's wheel (79 MB) is repacked without what a local Ray Data job never
# loads (the Java jars, the dashboard's web build, RLlib, Serve, LLM): 40 MiB, so that the
# wheels and the repository travel within the 64 MiB one call carries.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(ray keras namex optree pydantic pydantic_core annotated-types typing-inspection
    jsonschema jsonschema-specifications referencing rpds-py)
pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i -m1 "^${name}==" requirements.lock) || { echo "no pin for $name" >&2; exit 1; }
    pins+=("$pin")
done

rm -rf .whl
mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${pins[@]}"

# pip installs a wheel whose RECORD names files it no longer holds; it writes its own RECORD.
python3 - .whl/ray-*.whl <<'EOF'
import sys
import zipfile

DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/")
path = sys.argv[1]
with zipfile.ZipFile(path) as source:
    kept = [(info, source.read(info)) for info in source.infolist()
            if not info.filename.startswith(DROP)]
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
    for info, data in kept:
        target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
EOF
du -ch .whl/*.whl | tail -1
