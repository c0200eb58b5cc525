#!/usr/bin/env bash
# Builds the bench guest: a static library for the host target (the only Rust
# target installed), linked by ld with our own script into a PVH ELF.
# Output: $OUT (default target/guest/bench-guest.elf at the repository root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target/guest}
out=${OUT:-$target_dir/bench-guest.elf}
cd "$here"
RUSTFLAGS="-C relocation-model=static -C code-model=small -C target-cpu=x86-64-v2" \
  cargo build --release --quiet --target-dir "$target_dir"
ld -static -nostdlib --gc-sections -z noexecstack --no-warn-rwx-segments -u _start32 \
  -T "$here/linker.ld" -o "$out" "$target_dir/release/libbench_guest.a"
echo "$out"
