#!/usr/bin/env bash
# Builds the bench guest: a static library for the host target (the only Rust
# target installed), linked by ld with our own script into a PVH ELF, and the
# same bytes behind a Linux setup header as a bzImage (64-bit boot protocol).
# Output: $OUT (default target/guest/bench-guest.elf at the repository root)
# and the bzImage beside it ($OUT with .bzImage for .elf). Prints the ELF's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target/guest}
out=${OUT:-$target_dir/bench-guest.elf}
bzimage=${out%.elf}.bzImage
cd "$here"
# The target named outright: the workspace's .cargo/config.toml names it
# too (its crt-static is for executables; RUSTFLAGS here replaces it).
RUSTFLAGS="-C relocation-model=static -C code-model=small -C target-cpu=x86-64-v2" \
  cargo build --release --quiet --target x86_64-unknown-linux-gnu --target-dir "$target_dir"
# Built aside and moved into place, so a VM booting the guest while another
# build runs (tests run in parallel) never reads a half-written file.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ld -static -nostdlib --gc-sections -z noexecstack --no-warn-rwx-segments -u _start32 -u startup_64 \
  -T "$here/linker.ld" -o "$work/guest.elf" "$target_dir/x86_64-unknown-linux-gnu/release/libbench_guest.a"

# The bzImage: two setup sectors, then the ELF's loadable bytes from 1 MiB on.
objcopy -O binary -R .bss "$work/guest.elf" "$work/image.bin"
image_bytes=$(stat -c %s "$work/image.bin")
sym() { echo $((16#$(nm "$work/guest.elf" | awk -v s="$1" '$3 == s { print $1 }'))); }
start=$(sym __image_start)
end=$(sym __image_end)
if [ "$start" != $((0x100000)) ]; then
  echo "bench guest: the image starts at $start, not 1 MiB" >&2
  exit 1
fi
as --64 --defsym SYSSIZE=$(((image_bytes + 15) / 16)) --defsym INIT_SIZE=$((end - start)) \
  -o "$work/header.o" "$here/src/bzimage_header.S"
objcopy -O binary -j .text "$work/header.o" "$work/header.bin"
cat "$work/header.bin" "$work/image.bin" > "$work/guest.bzImage"
# Moves within one file system are atomic; $work may be elsewhere.
cp "$work/guest.elf" "$out.tmp.$$" && mv -f "$out.tmp.$$" "$out"
cp "$work/guest.bzImage" "$bzimage.tmp.$$" && mv -f "$bzimage.tmp.$$" "$bzimage"
echo "$out"
