#!/usr/bin/env python3
"""Finds the compressed kernel inside a bzImage and writes the ELF vmlinux
(the file that carries the PVH entry note). Usage: extract-vmlinux.py BZIMAGE OUT"""
import gzip, lzma, subprocess, sys

data = open(sys.argv[1], "rb").read()

# The boot protocol says where the payload is: after the setup sectors,
# at payload_offset, payload_length bytes (2.08+).
if data[0x202:0x206] == b"HdrS":
    setup = (data[0x1F1] or 4) + 1
    off = setup * 512 + int.from_bytes(data[0x248:0x24C], "little")
    length = int.from_bytes(data[0x24C:0x250], "little")
    payload = data[off:off + length]
    tools = {b"\x02\x21\x4c\x18": ["lz4", "-dcq"], b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"],
             b"\xfd7zXZ\x00": ["xz", "-dcq"], b"\x1f\x8b\x08": ["gzip", "-dcq"]}
    for magic, cmd in tools.items():
        if payload.startswith(magic):
            out = subprocess.run(cmd, input=payload, capture_output=True).stdout
            if out[:4] == b"\x7fELF":
                open(sys.argv[2], "wb").write(out)
                sys.exit(0)

candidates = [
    (b"\x28\xb5\x2f\xfd", lambda b: subprocess.run(["zstd", "-dcq"], input=b, capture_output=True).stdout),
    (b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor().decompress(b)),
    (b"\x1f\x8b\x08", lambda b: gzip.GzipFile(fileobj=__import__("io").BytesIO(b)).read()),
]
for magic, decompress in candidates:
    at = data.find(magic)
    while at >= 0:
        try:
            out = decompress(data[at:])
        except Exception:
            out = b""
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
        at = data.find(magic, at + 1)
sys.exit("extract-vmlinux: no compressed ELF kernel found in " + sys.argv[1])
