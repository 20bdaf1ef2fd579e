#!/usr/bin/env bash
# Debian packages the project needs: the Fashion-MNIST files (the embedded default's data)
# and, for the report tests, headless Chromium. Installs only what is missing.
set -euo pipefail
want=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || want+=(dataset-fashion-mnist)
if [ "${WITH_CHROMIUM:-0}" = 1 ] && ! command -v chromium >/dev/null; then want+=(chromium); fi
[ ${#want[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${want[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${want[@]}"
