#!/usr/bin/env bash
# Builds a Linux guest from Debian's packages only:
#   vmlinux        the cloud kernel, decompressed to its ELF (booted through
#                  its PVH entry point)
#   bzImage        the same kernel as Debian ships it
#   initramfs.cpio busybox-static, the virtio_pci/virtio_blk modules (where
#                  the kernel has them as modules) and fio with its
#                  libraries; /init runs fio with verify on /dev/vda when the
#                  command line says `fio=1`; with `virtiofs=TAG` it mounts
#                  that virtio-fs share (fuse and virtiofs modules), prints
#                  its from-host.txt and writes from-guest.txt; it prints the
#                  results and powers off. With `root=/dev/vdX` instead it
#                  mounts that disk and hands over to its /sbin/init (a
#                  distribution: guest-artifacts/rootfs/build.sh).
# Output: target/linux-guest/ (reused when present). Needs apt-get, cpio.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=$root/target/linux-guest
# Bumped when the initramfs changes: an older one is built again.
init_version=3
if [ -s "$out/vmlinux" ] && [ -s "$out/initramfs.cpio" ] && [ "${1:-}" != "--force" ] \
    && [ "$(cat "$out/init-version" 2>/dev/null)" = "$init_version" ]; then
    echo "$out"
    exit 0
fi
rm -rf "$out.tmp"
mkdir -p "$out.tmp/debs" "$out.tmp/rootfs"
cd "$out.tmp/debs"
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build.sh: no linux-image-*-cloud-amd64 package known to apt" >&2; exit 1; }
# A stale package index (the mirror moved on) fails the download: refresh
# it once and retry.
if ! apt-get download -q "$kpkg" busybox-static >/dev/null 2>download.log; then
    apt-get update -qq
    kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    rm -f ./*.deb
    apt-get download -q "$kpkg" busybox-static >/dev/null 2>download.log \
        || { cat download.log >&2; exit 1; }
fi
for d in *.deb; do dpkg-deb -x "$d" ../unpacked; done
cd ..
kver=${kpkg#linux-image-}
cp unpacked/boot/vmlinuz-"$kver" bzImage
python3 "$root/guest-artifacts/linux/extract-vmlinux.py" bzImage vmlinux

# The initramfs.
r=rootfs
mkdir -p $r/bin $r/sbin $r/dev $r/proc $r/sys $r/lib/modules $r/tmp
cp unpacked/bin/busybox $r/bin/busybox
for m in virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk fuse virtiofs; do
    f=$(find unpacked/lib/modules -name "$m.ko*" | head -1)
    [ -n "$f" ] && cp "$f" $r/lib/modules/
done
if command -v fio >/dev/null; then
    cp "$(command -v fio)" $r/bin/fio
    for lib in $(ldd "$(command -v fio)" | awk '/=>/ {print $3} /^\s*\/lib/ {print $1}' | sort -u); do
        mkdir -p "$r$(dirname "$lib")"
        cp -L --remove-destination "$lib" "$r$lib"
    done
fi
cat > $r/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
for m in /lib/modules/*.ko*; do [ -e "$m" ] && insmod "$m" 2>/dev/null; done
echo "LINUX-GUEST USERSPACE $(uname -r)"
rootdev=$(sed -n 's/.*root=\(\/dev\/[^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$rootdev" ]; then
    mkdir -p /newroot
    if mount -o rw "$rootdev" /newroot; then
        umount /proc /sys; mount --move /dev /newroot/dev 2>/dev/null || umount /dev
        exec switch_root /newroot /sbin/init
    fi
    echo "LINUX-GUEST: cannot mount $rootdev"
fi
if grep -q 'fio=1' /proc/cmdline; then
    if fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=64M \
           --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --do_verify=1 \
           --output-format=terse > /tmp/fio.out 2>&1; then
        echo "LINUX-GUEST FIO OK $(cut -d';' -f8,49 /tmp/fio.out | head -1)"
    else
        echo "LINUX-GUEST FIO FAILED"; cat /tmp/fio.out
    fi
fi
tag=$(sed -n 's/.*virtiofs=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$tag" ]; then
    mkdir -p /mnt/share
    if mount -t virtiofs "$tag" /mnt/share; then
        echo "LINUX-GUEST VIRTIOFS READ $(cat /mnt/share/from-host.txt)"
        echo "written by the guest" > /mnt/share/from-guest.txt && sync
        umount /mnt/share && echo "LINUX-GUEST VIRTIOFS OK"
    else
        echo "LINUX-GUEST VIRTIOFS FAILED"
    fi
fi
poweroff -f
INIT
chmod +x $r/init
(cd $r && find . | cpio -o -H newc --quiet) > initramfs.cpio
mkdir -p "$out"
mv vmlinux bzImage initramfs.cpio "$out/"
echo "$kver" > "$out/version"
echo "$init_version" > "$out/init-version"
cd "$root" && rm -rf "$out.tmp"
echo "$out"
