#!/usr/bin/env bash
# Run once on a machine with a GPU: the GPU tests (tests/test_cuda.py: AMP modes, run_training
# with resumes, DataParallel under bf16 and torchrun/NCCL when 2+ GPUs are visible, SCST,
# decoding, extraction) and the decoder benchmark on CUDA in fp32, bf16 and fp16. Prints a few
# lines to paste into an issue; the full outputs stay in $OUT (default: a temporary folder).
#
#   bash bench/gpu_check.sh            # from the project root; PY defaults to .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXX)}
mkdir -p "$OUT"

if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA GPU visible to $PY" >&2
    exit 2
fi
$PY -c 'import torch; n = torch.cuda.device_count()
print(f"gpus: {n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)}")'

CAPTIONER_TEST_CUDA=1 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
status=$?
echo "tests/test_cuda.py: $(tail -n 1 "$OUT/test_cuda.txt")"
grep -E '^(FAILED|SKIPPED)' "$OUT/test_cuda.txt" | cut -c1-160

for amp in off bf16 fp16; do
    if $PY bench/bench_decoder.py --device cuda --amp "$amp" --json > "$OUT/bench_$amp.json" 2> "$OUT/bench_$amp.err"; then
        $PY - "$OUT/bench_$amp.json" "$amp" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"bench_decoder --amp {sys.argv[2]:4s}: train {r['train_captions_per_s']:.0f} captions/s "
      f"(batch {r['large_batch_size']}: {r['train_captions_per_s_batch128']:.0f}; textbook "
      f"{r['baseline_train_captions_per_s']:.0f}), beam {r['beam_images_per_s']:.1f} images/s "
      f"({r['beam_speedup_vs_serial']:.1f}x serial), {r['train_fraction_of_matmul']:.1%} of matmul peak")
PYEOF
    else
        echo "bench_decoder --amp $amp: FAILED ($(tail -n 1 "$OUT/bench_$amp.err"))"
        status=1
    fi
done
echo "full outputs: $OUT"
exit $status
