"""HPACK's static Huffman code (RFC 7541 §5.2, Appendix B).

The code is canonical: codes are handed out in order of (length, symbol), so the 257 code
lengths below define it fully; `CODES` is rebuilt from them at import (a test checks every code
against the RFC's table as the `hpack` package carries it).

Encoding joins per-byte bit strings in C (`str.join` over `map`) and converts once with `int(s,
2)`: no per-bit Python work. Decoding walks a byte-at-a-time state machine: a state is an
internal node of the code tree (256 of them, so the next state fits a byte), and each
(state, input byte) pair has its precomputed next state and the 0, 1 or 2 symbols it completes.
The 64 Ki-entry table costs about 0.6 MB, so it is built on the first Huffman-coded string,
composed from a 4-bit table (which takes a few milliseconds), not at import.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["HuffmanError", "decode", "encode", "encoded_length"]

# Code length in bits of each symbol 0..255 and EOS (256), RFC 7541 Appendix B.
_LENGTHS_HEX = (
    "0d171c1c1c1c1c1c1c181e1c1c1e1c1c1c1c1c1c1c1c1e1c1c1c1c1c1c1c1c1c060a0a0c0d06080b0a0a080b"
    "080606060505050606060606060607080f060c0a0d06070707070707070707070707070707070707070707"
    "070807080d130d0e060f05060506050606060507070606060506070605050607070707070f0b0e0d1c1416"
    "14141616161716171717171718171818161718171717171516171617171816151416161717151716161815"
    "161717151516151716171714161616171616171a1a1413161716191a1a1a1b1b1a181913151a1b1b1a1b18"
    "15151a1a1c1b1b1b14181415161515171616191918181a171a1b1a1a1b1b1b1b1b1c1b1b1b1b1b1a1e"
)
LENGTHS: Sequence[int] = bytes.fromhex(_LENGTHS_HEX)
EOS = 256


def _canonical_codes(lengths: Sequence[int]) -> list[int]:
    codes = [0] * len(lengths)
    code = -1
    previous = 0
    for symbol in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code = (code + 1) << (lengths[symbol] - previous)
        previous = lengths[symbol]
        codes[symbol] = code
    return codes


CODES: Sequence[int] = _canonical_codes(LENGTHS)
_BITS = [format(CODES[s], f"0{LENGTHS[s]}b") for s in range(256)]


class HuffmanError(ValueError):
    """A Huffman-coded string that is not valid (EOS in the data, or bad padding)."""


def encoded_length(data: bytes) -> int:
    """Bytes that `encode(data)` returns."""
    return (sum(map(LENGTHS.__getitem__, data)) + 7) >> 3


def encode(data: bytes) -> bytes:
    bits = "".join(map(_BITS.__getitem__, data))
    pad = -len(bits) & 7
    if not bits:
        return b""
    return int(bits + "1" * pad, 2).to_bytes((len(bits) + pad) >> 3, "big")


# Decoding tables, built on first use: state*256 + byte -> next state / emitted bytes (None
# when the byte decodes EOS, which RFC 7541 §5.2 makes an error).
_next: bytes = b""
_emit: list[bytes | None] = []
_accept: bytes = b""


def _build() -> None:
    global _next, _emit, _accept
    # The code tree: children[node] = [child for bit 0, child for bit 1]; a child >= 0 is an
    # internal node, -1 - symbol a leaf.
    children: list[list[int]] = [[0, 0]]
    for symbol in range(257):
        node = 0
        code, length = CODES[symbol], LENGTHS[symbol]
        for depth in range(length - 1, -1, -1):
            bit = (code >> depth) & 1
            if depth == 0:
                children[node][bit] = -1 - symbol
            else:
                if children[node][bit] == 0:
                    children.append([0, 0])
                    children[node][bit] = len(children) - 1
                node = children[node][bit]
    # The root's 0-child is never 0 here (no code is a single bit), so 0 marks "unset" safely.
    assert len(children) == 256
    # Accepting end states: on the all-ones path at depth <= 7 (the padding, §5.2).
    accept = bytearray(256)
    node = 0
    for _ in range(8):
        accept[node] = 1
        node = children[node][1]
    # 4-bit steps: (state, nibble) -> (next state, emitted bytes or None for EOS).
    nibble: list[tuple[int, bytes | None]] = []
    for state in range(256):
        for value in range(16):
            node, out = state, bytearray()
            failed = False
            for shift in (3, 2, 1, 0):
                child = children[node][(value >> shift) & 1]
                if child < 0:
                    symbol = -1 - child
                    if symbol == EOS:
                        failed = True
                        break
                    out.append(symbol)
                    node = 0
                else:
                    node = child
            nibble.append((0, None) if failed else (node, bytes(out)))
    interned: dict[bytes, bytes] = {}
    next_state = bytearray(65536)
    emit: list[bytes | None] = [None] * 65536
    for state in range(256):
        for high in range(16):
            middle, first = nibble[state << 4 | high]
            if first is None:
                continue
            for low in range(16):
                end, second = nibble[middle << 4 | low]
                if second is None:
                    continue
                index = state << 8 | high << 4 | low
                next_state[index] = end
                both = first + second
                emit[index] = interned.setdefault(both, both)
    _next, _emit, _accept = bytes(next_state), emit, bytes(accept)


def decode(data: bytes) -> bytes:
    if not _emit:
        _build()
    next_state, emit = _next, _emit
    out = bytearray()
    state = 0
    try:
        for byte in data:
            index = state << 8 | byte
            out += emit[index]  # type: ignore[arg-type]  # None (EOS) raises TypeError
            state = next_state[index]
    except TypeError:
        raise HuffmanError("Huffman-coded string contains EOS") from None
    if not _accept[state]:
        raise HuffmanError("Huffman-coded string has bad padding")
    return bytes(out)
