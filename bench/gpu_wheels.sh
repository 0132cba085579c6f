#!/usr/bin/env bash
# Prepare here, where pip reaches PyPI, what bench/gpu.py needs on a GPU machine that has no network
# and no diffusers. Everything lands in git-ignored paths, which the device call carries:
#   .whl/                                      the pure-Python wheels that machine lacks (diffusers), commit.txt
#   bench/.cache/reference/                    diffusers' textual_inversion.py and _sdxl.py, plain copies, SOURCE.txt
#   bench/.cache/bpe_simple_vocab_16e6.txt.gz  the CLIP vocabulary of the sd15 and sdxl shapes (bench/models.py)
#   bench/.cache/photos/duck_toy/              the DreamBooth photos, where ../shared has them (else gpu.py draws some)
# Then one command there installs the wheels and runs bench/gpu.py (printed at the end; bench/README.md, The GPU figures in one call).
#
#   bash bench/gpu_wheels.sh [DIFFUSERS_SOURCE]   # a diffusers git repo (bare or not) or source folder
set -euo pipefail
cd "$(dirname "$0")/.."

# The GPU machine (/work/.library/device/KINDS.md): Python 3.12 on x86_64 with torch, transformers,
# accelerate, huggingface_hub 1.33 (diffusers asks >= 1.32), safetensors, Pillow, numpy, tqdm, regex,
# requests, filelock, tensorboard, matplotlib and torchvision; of what this project and diffusers
# need, only diffusers is missing. Add a name here if that changes; keep one version of each.
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-$(python3 -c 'import diffusers; print(diffusers.__version__)')}
WHEELS=("diffusers==$DIFFUSERS_VERSION")
DIFFUSERS_SOURCE=${1:-/work/.mirror/huggingface+diffusers/repo}
REFERENCE=bench/.cache/reference
VOCAB=bench/.cache/bpe_simple_vocab_16e6.txt.gz
PHOTOS=../shared/data/dreambooth/duck_toy

echo "wheels for Python $PYTHON_VERSION, x86_64: ${WHEELS[*]}"
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
for wheel in .whl/*.whl; do
  echo "  $(basename "$wheel") needs (check against the machine's packages):"
  unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'
done

# The commit measured: the copy on the GPU machine may have no .git.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null | grep -v RESULTS.md)" ]; then
  commit="$commit-dirty"
fi
echo "$commit" >.whl/commit.txt

# diffusers' scripts, unmodified (torchvision is on that machine); never committed.
rm -rf "$REFERENCE"
mkdir -p "$REFERENCE"
for name in textual_inversion.py textual_inversion_sdxl.py; do
  if git -C "$DIFFUSERS_SOURCE" rev-parse -q --verify HEAD >/dev/null 2>&1; then
    git -C "$DIFFUSERS_SOURCE" show "HEAD:examples/textual_inversion/$name" >"$REFERENCE/$name"
  else
    cp "$DIFFUSERS_SOURCE/examples/textual_inversion/$name" "$REFERENCE/$name"
  fi
done
if git -C "$DIFFUSERS_SOURCE" rev-parse -q --verify HEAD >/dev/null 2>&1; then
  echo "diffusers commit $(git -C "$DIFFUSERS_SOURCE" log -1 --format='%h, %cs')" >"$REFERENCE/SOURCE.txt"
else
  echo "diffusers source folder $DIFFUSERS_SOURCE" >"$REFERENCE/SOURCE.txt"
fi

# The CLIP vocabulary, from open_clip_torch's wheel (downloaded, never installed).
if [ ! -s "$VOCAB" ]; then
  python3 -c 'import sys; sys.path.insert(0, "."); from bench.models import real_clip_merges; real_clip_merges()'
fi

if [ -d "$PHOTOS" ]; then
  rm -rf bench/.cache/photos/duck_toy
  mkdir -p bench/.cache/photos/duck_toy
  for photo in "$PHOTOS"/*; do install -m 0644 "$photo" bench/.cache/photos/duck_toy/; done
else
  echo "no $PHOTOS: bench/gpu.py will draw synthetic photos of the same size"
fi

# What travels: the working tree git does not ignore, plus the carried paths; the limit is 64 MiB.
carried=(.whl "$REFERENCE" "$VOCAB")
[ -d bench/.cache/photos ] && carried+=(bench/.cache/photos)
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true) |
  awk '{s += $1} END {print s + 0}')
extra=$(du -cb "${carried[@]}" | tail -1 | cut -f1)
du -sh "${carried[@]}"
awk -v t="$tree" -v e="$extra" 'BEGIN {printf "travels: %.1f MiB (working tree %.1f + carried %.1f) of 64 MiB\n",
  (t + e) / 2^20, t / 2^20, e / 2^20}'
printf 'carry: ["%s"' "${carried[0]}"
printf ', "%s"' "${carried[@]:1}"
printf ']\n'
cat <<'EOF'
command on the GPU machine (timeout_s 420; bench/README.md, The GPU figures in one call):
set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 bench/gpu.py --reference bench/.cache/reference/textual_inversion.py --reference_sdxl bench/.cache/reference/textual_inversion_sdxl.py --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
EOF
