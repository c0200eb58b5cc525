#!/usr/bin/env bash
# Builds a small Debian root filesystem image from Debian's packages:
#   target/rootfs/rootfs.img  Debian 12 (minbase, systemd as init) in an
#                             ext4 filesystem labelled "rootfs", inside a
#                             sparse snap image made by
#                             `img create --fs ext4 --from` (the tree
#                             debootstrap made); root has no password, the
#                             serial console a getty. On hardware KVM:
#     img snapshot -c golden target/rootfs/rootfs.img
#     vmctl create web --image target/rootfs/rootfs.img@golden \
#         --kernel target/linux-guest/vmlinux --cmdline "console=ttyS0 root=/dev/vda rw"
# Usage: build.sh [IMG]  (the img to use; default: the release build, else
# img on PATH). Output: its path on the last line (reused when present).
# Needs debootstrap (installed with apt-get when missing) and root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/target/rootfs
# Bumped when what goes in changes: an older image is built again.
version=1
if [ -s "$out/rootfs.img" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$version" ]; then
    echo "$out/rootfs.img"
    exit 0
fi
img=${1:-}
if [ -z "$img" ]; then
    img=$root/target/x86_64-unknown-linux-gnu/release/img
    [ -x "$img" ] || img=$(command -v img) || { echo "build.sh: no img (cargo build --release -p image-format)" >&2; exit 1; }
fi
if ! command -v debootstrap >/dev/null; then
    apt-get install -y -qq debootstrap >/dev/null
fi
mkdir -p "$out"
tree=$(mktemp -d /var/tmp/rootfs.XXXXXX)
trap 'rm -rf "$tree"' EXIT
# The mirror apt uses here (a local proxy or deb.debian.org).
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
echo "build.sh: debootstrap bookworm from $mirror" >&2
if ! debootstrap --variant=minbase --include=systemd-sysv bookworm "$tree" "$mirror" >"$out/debootstrap.log" 2>&1; then
    tail -20 "$out/debootstrap.log" >&2
    exit 1
fi
echo "LABEL=rootfs / ext4 defaults 0 1" > "$tree/etc/fstab"
echo vm > "$tree/etc/hostname"
passwd -R "$tree" -d root >/dev/null
# Package caches: nothing a running system needs.
rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/*
"$img" create -q --fs ext4 --from "$tree" --label rootfs "$out/rootfs.img.tmp" 2G
mv "$out/rootfs.img.tmp" "$out/rootfs.img"
echo "$version" > "$out/version"
echo "$out/rootfs.img"
