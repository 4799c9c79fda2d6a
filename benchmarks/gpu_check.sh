#!/usr/bin/env bash
# The prepared GPU check: the CUDA tests of the SSD backends (torch, own Triton kernel, mamba-ssm's
# Triton kernels, the int32 split), then the pretraining throughput table (torch SSD vs mamba-ssm
# vs own Triton vs an SDPA transformer, paper-medium, 2,048 / 20,000 / 60,000 tokens per cell).
# Budget: about 8 minutes on one H100/H200. Writes benchmarks/results/gpu_tests_<device>.{json,md}
# and benchmarks/results/pretrain_throughput_<device>.{json,md} (and copies them to $OUT if set).
#
# 1. Where pip works (this repository's root), fetch what an offline GPU machine lacks into .whl/
#    (this package, the scverse stack it needs, mamba-ssm's source; the GPU image has torch,
#    triton, lightning, einops and transformers):
#        bash benchmarks/gpu_check.sh --fetch
# 2. On the GPU machine, from the repository root (with .whl/ carried along):
#        bash benchmarks/gpu_check.sh
# `bash benchmarks/gpu_check.sh --smoke` is the CPU dry run (CI): the benchmark at tiny sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
# Missing on the GPU image (Python 3.12), found from this package's requirements; pure Python
# except numcodecs and google-crc32c.
MISSING="anndata==0.12.19 array-api-compat==1.16.0 docrep==0.3.2 donfig==0.8.1.post1
google-crc32c==1.9.0 legacy-api-wrap==1.5 ml-collections==1.1.0 mudata==0.3.10 natsort==8.4.0
numcodecs==0.16.6 pynndescent==0.7.0 pyro-api==0.1.2 pyro-ppl==1.9.2 scanpy==1.11.5
scverse-misc==0.0.3 scvi-tools==1.4.2 session-info2==0.4.1 sparse==0.19.3 umap-learn==0.5.12
zarr==3.1.6"
MAMBA=mamba-ssm==2.3.2.post1

if [ "${1:-}" = "--fetch" ]; then
    set -e
    mkdir -p "$WHEELS"
    EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
    for req in $MISSING; do  # a wheel for the GPU image, else one built here (pure Python)
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "$req" \
            2>/dev/null || python3 -m pip wheel -q --no-deps -w "$WHEELS" "$req"
    done
    MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip download -q --no-deps --no-binary=:all: \
        --no-build-isolation -d "$WHEELS" "$MAMBA"
    python3 -m pip wheel -q --no-deps -w "$WHEELS" .
    du -sh "$WHEELS"
    exit 0
fi

if [ "${1:-}" = "--smoke" ]; then  # CPU dry run (CI): the benchmark at tiny sizes, no files
    PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" timeout 300 \
        python3 benchmarks/pretrain_throughput.py --smoke
    exit $?
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1
START=$(date +%s)
SITE=/tmp/scmamba2_site
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# mamba-ssm's SSD kernels are Triton (nothing to compile); its other CUDA extensions are skipped.
if ls "$WHEELS"/mamba_ssm-*.tar.gz >/dev/null 2>&1; then
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE timeout 120 python3 -m pip install -q \
        --no-index --no-deps --no-build-isolation --target "$SITE" "$WHEELS"/mamba_ssm-*.tar.gz \
        || echo "mamba-ssm did not install: its rows and tests will say so"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=$(python3 -c "import re, torch; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-'))")
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
echo "== CUDA tests on $DEVICE"
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_ops_ssd.py \
    tests/test_ops_triton.py tests/test_ops_mamba_ssm.py 2>&1 | tee /tmp/gpu_tests.txt
TESTS_RC=${PIPESTATUS[0]}
python3 - "$DEVICE" "$TESTS_RC" "$RESULTS" <<'EOF'
import datetime, json, re, sys
device, rc, results = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open("/tmp/gpu_tests.txt").read()
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", log)}
out = {"date": datetime.date.today().isoformat(), "device": device, "returncode": rc, **counts}
open(f"{results}/gpu_tests_{device}.json", "w").write(json.dumps(out, indent=2))
tail = "\n".join(log.splitlines()[-40:])
md = f"# CUDA tests, {device}, {out['date']}\n\nexit code {rc}: {counts}\n\n```\n{tail}\n```\n"
open(f"{results}/gpu_tests_{device}.md", "w").write(md)
EOF
echo "== pretraining throughput ($(($(date +%s) - START)) s so far)"
LEFT=$((470 - ($(date +%s) - START)))
timeout "$LEFT" python3 benchmarks/pretrain_throughput.py --steps 3 --device-name "$DEVICE"
BENCH_RC=$?
if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/gpu_tests_"$DEVICE".* "$RESULTS"/pretrain_throughput_"$DEVICE".* "$OUT"/ 2>/dev/null
fi
echo "== done in $(($(date +%s) - START)) s: tests exit $TESTS_RC, benchmark exit $BENCH_RC"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
