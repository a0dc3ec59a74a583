#!/usr/bin/env bash
# Build the aarch64 environment that runs artifacts on XNNPACK's ARM kernels, here, under
# user-mode emulation (../shared/ARM.md). Everything comes from the package registries and lands
# in one ignored folder; nothing on the system changes (apt runs with its own state folder).
#   DIR/qemu/usr/bin/qemu-aarch64-static   the emulator (Debian's qemu-user-static, amd64)
#   DIR/sysroot/                           Debian bookworm's arm64 Python 3.11 and the libraries it needs
#   DIR/site/                              aarch64 wheels from PyPI (LiteRT, numpy)
#   DIR/env.json                           what was built; the folder is reused while the pins match
# Usage: scripts/arm-env.sh [DIR]   (default .arm-env)
set -euo pipefail
DIR=$(realpath -m "${1:-.arm-env}")
PYTHON=${PYTHON:-python3}
# ai-edge-litert 2.x segfaults under qemu 7.2 when its native library loads; 1.4.0 runs.
WHEELS="ai-edge-litert==1.4.0 numpy==2.2.6"
DEBS="python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11 libc6 libexpat1 zlib1g
libssl3 libffi8 libbz2-1.0 liblzma5 libstdc++6 libgcc-s1 libsqlite3-0 libncursesw6 libtinfo6
libreadline8 libuuid1 libdb5.3 libgdbm6 libnsl2 libtirpc3 libcrypt1 media-types"
PINS=$(printf '%s\n' "$WHEELS" $DEBS qemu-user-static | sha256sum | cut -c1-16)

if [[ -f "$DIR/env.json" ]] && grep -q "\"pins\": \"$PINS\"" "$DIR/env.json"; then
    echo "ARM environment up to date: $DIR"
    exit 0
fi
command -v apt-get >/dev/null || { echo "error: apt-get not found: the ARM environment needs Debian's packages" >&2; exit 2; }
command -v dpkg >/dev/null || { echo "error: dpkg not found" >&2; exit 2; }

echo "building the ARM environment in $DIR (about 130 MB; log: $DIR.log)"
rm -rf "$DIR" "$DIR.tmp"
T="$DIR.tmp"
mkdir -p "$T/apt/state/lists/partial" "$T/apt/cache/archives/partial" "$T/debs" "$T/qemu" "$T/sysroot"
touch "$T/apt/status"
LOG="$DIR.log"
: > "$LOG"
APT=(apt-get -q -o "Dir::State=$T/apt/state" -o "Dir::Cache=$T/apt/cache" -o "Dir::State::status=$T/apt/status"
     -o Debug::NoLocking=1)
fail() { echo "error: $1 (log: $LOG)" >&2; exit 2; }

echo "  emulator: qemu-user-static (amd64)"
(cd "$T/debs" && "${APT[@]}" update >> "$LOG" 2>&1 && "${APT[@]}" download qemu-user-static >> "$LOG" 2>&1) \
    || fail "cannot download qemu-user-static (no network to the Debian mirror?)"
dpkg -x "$T"/debs/qemu-user-static_*.deb "$T/qemu.all"
mkdir -p "$T/qemu/usr/bin" && mv "$T/qemu.all/usr/bin/qemu-aarch64-static" "$T/qemu/usr/bin/"  # the rest: other CPUs
rm -rf "$T/qemu.all" "$T"/debs/*.deb

echo "  sysroot: Debian arm64 Python 3.11"
ARM=(-o APT::Architecture=arm64 -o APT::Architectures=arm64)
(cd "$T/debs" && "${APT[@]}" "${ARM[@]}" update >> "$LOG" 2>&1 && "${APT[@]}" "${ARM[@]}" download $DEBS >> "$LOG" 2>&1) \
    || fail "cannot download Debian's arm64 packages"
for deb in "$T"/debs/*.deb; do dpkg -x "$deb" "$T/sysroot"; done

echo "  wheels: $WHEELS (aarch64)"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.11 \
    --implementation cp --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_28_aarch64 --target "$T/site" $WHEELS >> "$LOG" 2>&1 \
    || fail "cannot download the aarch64 wheels"

echo "  checking: LiteRT with XNNPACK under emulation"
PYTHONPATH="$T/site" "$T/qemu/usr/bin/qemu-aarch64-static" -L "$T/sysroot" "$T/sysroot/usr/bin/python3.11" -c \
    "import platform; from ai_edge_litert.interpreter import Interpreter; assert platform.machine() == 'aarch64'" \
    >> "$LOG" 2>&1 || fail "the emulated interpreter cannot import LiteRT"
rm -rf "$T/apt" "$T/debs"
cat > "$T/env.json" <<JSON
{"pins": "$PINS", "qemu": "qemu/usr/bin/qemu-aarch64-static", "sysroot": "sysroot",
 "python": "sysroot/usr/bin/python3.11", "site": "site", "wheels": "$WHEELS",
 "runtimes": ["litert"], "executorch": "not included: see README, ARM"}
JSON
mv "$T" "$DIR"
echo "ARM environment ready: $DIR"
