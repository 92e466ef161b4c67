#!/usr/bin/env bash
# Runs one half of the GPU suite on a lent device machine (README, "GPU suite"); everything it writes goes to $OUT.
#   bash benchmarks/device_run.sh 1|2 [extra gpu_suite.py options]
# 1: correctness, towers, scoring, training; 2: evaluation, segmentation. The wheels of benchmarks/device_kit.py
# (carried as .whl) go into a private target that shadows the image's copies; flair_hf is imported from src/, and the
# applications as the editable install maps them (flair_hf_conversion -> conversion/, ...), linked into that target.
set -uo pipefail
part=${1:?usage: device_run.sh 1|2 [gpu_suite options]}
shift
case $part in
  1) sections=correctness,towers,scoring,training ;;
  2) sections=evaluation,segmentation ;;
  *) echo "error: part must be 1 or 2, got $part" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
out=${OUT:?OUT must name the folder that comes back}
site=${SITE:-/tmp/flair-site}
wheels=${WHEELS:-.whl}
mkdir -p "$out"
log="$out/log-$part.txt"
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "error: no wheels in $wheels: run python benchmarks/device_kit.py here and carry .whl" | tee "$log" >&2
  exit 1
fi
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl 2>&1 | tail -5 | tee "$log"
for app in conversion training benchmarks; do ln -sfn "$PWD/$app" "$site/flair_hf_$app"; done
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$python" - <<'EOF' 2>&1 | tee -a "$log" "$out/environment-$part.txt"
import importlib.metadata as metadata, platform, torch
import flair_hf, transformers  # noqa: F401  (fails here, fast, if the carried wheels do not fit the image)
names = ("torch", "transformers", "huggingface-hub", "accelerate", "datasets", "tokenizers", "numpy", "pyarrow")
print(f"python {platform.python_version()}; " + ", ".join(f"{n} {metadata.version(n)}" for n in names))
print(f"cuda {torch.cuda.is_available()}: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: the environment check failed (see $log)" >&2; exit 1; }
timeout -k 10 "${SUITE_TIMEOUT:-270}" "$python" -u benchmarks/gpu_suite.py --sections "$sections" \
  --section-timeout "${SECTION_TIMEOUT:-200}" --output "$out/gpu-suite-$part.json" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "device_run.sh part $part: exit $status; results in $out/gpu-suite-$part.json" | tee -a "$log"
exit "$status"
