#!/usr/bin/env bash
# Sets up a Debian bookworm host for forkd (run as root) and, unless --no-demo is given, runs
# the main job: boot a sandbox, run code in it, BRANCH it, show the children diverging.
#
#   scripts/setup.sh            everything, then the demo
#   scripts/setup.sh --no-demo  everything but the demo (used by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: sandboxes need /dev/kvm, network namespaces and cgroups"
[ -e /dev/kvm ] || die "/dev/kvm is missing: enable hardware virtualization (VT-x/AMD-V) or nested KVM"

# Host packages: kernel build tools and source, busybox for the tiny image, debootstrap for the
# default image, e2fsprogs for images, iproute2/nftables for sandbox networking.
packages=(build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils dwarves
          linux-source-6.1 busybox-static e2fsprogs debootstrap iproute2 nftables
          protobuf-compiler libclang-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || die "no Rust toolchain: install one with rustup (https://rustup.rs), then rerun"

step "building forkd (release)"
cargo build --release --workspace --bins

step "building the static guest agent"
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
    cargo build --release -p forkd-agent --target x86_64-unknown-linux-gnu

forkd=target/release/forkd
step "guest kernel (cached by hash; the first build takes about 4 minutes)"
"$forkd" kernel build

step "tiny image (busybox + agent)"
"$forkd" image build tiny

step "default image (Debian bookworm + python3 + agent; about 2 minutes)"
"$forkd" image build default

"$forkd" doctor || true

if [ "$demo" = 1 ]; then
    step "main job"
    scripts/demo.sh
fi
