#!/usr/bin/env bash
# forge's own dependencies that the GPU machine's image lacks, as cp312 wheels in .fwhl/
# (git-ignored), to carry with each device call and install with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .fwhl/*.whl
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info .fwhl
grep -qx '/.fwhl/' .git/info/exclude 2>/dev/null || echo /.fwhl/ >> .git/info/exclude
PLAT=""; for n in 17 24 26 27 28 31 34 35; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
PLAT="$PLAT --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .fwhl \
  hydra-core==1.3.8 omegaconf==2.3.1 aiosqlite==0.22.1 orjson datatrove==0.10.1 loguru==0.7.3 multiprocess==0.70.19 \
  jsonschema jsonschema-specifications referencing rpds-py attrs httptools
python3 -m pip wheel -q --no-deps -w .fwhl antlr4-python3-runtime==4.9.3   # sdist only; pure Python
ls .fwhl
