"""Packs a tiktoken vocabulary (`<base64 token> <rank>` per line, ranks 0..n-1 in order)
into what policy/src/tokens.rs embeds: each token's bytes preceded by their length (one
byte), in rank order, zlib-compressed. 1.5 MB for cl100k_base and o200k_base together
instead of the 5.3 MB of base64 text tiktoken-rs embeds (the image's size: issue 16).

    python3 policy/assets/pack.py ~/.cargo/registry/src/*/tiktoken-rs-0.12.1/assets/cl100k_base.tiktoken \
        policy/assets/cl100k_base.ranks.zlib

The vocabularies are OpenAI's published ones (MIT), as tiktoken-rs 0.12.1 ships them;
policy/src/tokens.rs's tests check that the packed ones count exactly as tiktoken-rs's.
"""

import base64
import sys
import zlib


def main(src, dst):
    tokens = []
    with open(src) as f:
        for i, line in enumerate(f):
            b64, rank = line.split()
            if int(rank) != i:
                sys.exit(f"{src}: rank {rank} on line {i + 1}: ranks must run 0..n-1")
            tokens.append(base64.b64decode(b64))
    if max(len(t) for t in tokens) > 255:
        sys.exit("a token longer than 255 bytes does not fit the one-byte length")
    raw = b"".join(bytes([len(t)]) + t for t in tokens)
    with open(dst, "wb") as f:
        f.write(zlib.compress(raw, 9))
    print(f"{dst}: {len(tokens)} tokens")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
