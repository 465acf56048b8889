"""Whether a JPEG's header (its segments from SOI up to the first scan) is well formed.

DALI's CPU and GPU decoders parse the header themselves. Most header damage makes them fail the batch, but
a damaged header once killed a training process with SIGSEGV in DALI's native decoder, which no handler can
catch, and a frame size blown up by a flipped byte makes them allocate and decode a huge image of noise. So
the DALI loader walks every sample's header before DALI sees it. The walk reads only the header's bytes;
the compressed scan data after it is not checked here.
"""
from __future__ import annotations

from collections.abc import Callable

SOI, EOI, SOS, DQT, DHT, DRI = 0xD8, 0xD9, 0xDA, 0xDB, 0xC4, 0xDD
# start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC)
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length


def _tables(body: bytes, name: str, table_size: Callable[[bytes, int], int | str]) -> str | None:
    """Checks a segment that is a run of tables; `table_size(body, at)` gives a table's length or a fault."""
    at = 0
    while at < len(body):
        size = table_size(body, at)
        if isinstance(size, str):
            return f"{name}: {size}"
        at += size
    return None if at == len(body) else f"{name}: its tables overrun the segment"


def _quant_table(body: bytes, at: int) -> int | str:
    precision, slot = body[at] >> 4, body[at] & 15
    if precision > 1 or slot > 3:
        return f"precision {precision}, table {slot}"
    return 1 + 64 * (precision + 1)


def _huffman_table(body: bytes, at: int) -> int | str:
    kind, slot = body[at] >> 4, body[at] & 15
    if kind > 1 or slot > 3:
        return f"class {kind}, table {slot}"
    counts = body[at + 1:at + 17]
    if len(counts) < 16:
        return "short code counts"
    free = 1  # codes still available at the current length: a table must fit the binary code tree
    for count in counts:
        free = 2 * free - count
        if free < 0:
            return "more codes than the code lengths allow"
    if sum(counts) > 256:
        return f"{sum(counts)} symbols"
    return 17 + sum(counts)


def _frame(body: bytes, size: int, arithmetic: bool) -> str | None:
    if len(body) < 6:
        return "SOF: short segment"
    precision, height, width, components = body[0], int.from_bytes(body[1:3]), int.from_bytes(body[3:5]), body[5]
    if precision not in (8, 12, 16) or width == 0 or not 1 <= components <= 4:
        return f"SOF: precision {precision}, width {width}, {components} components"
    if len(body) != 6 + 3 * components:
        return f"SOF: length for {components} components"
    factors = [(body[7 + 3 * c] >> 4, body[7 + 3 * c] & 15, body[8 + 3 * c]) for c in range(components)]
    for c, (h, v, table) in enumerate(factors):
        if not (1 <= h <= 4 and 1 <= v <= 4) or table > 3:
            return f"SOF: component {c} sampling {h}x{v}, table {table}"
    if not height:
        return "SOF: height 0 (a DNL marker; not read by the decoders)"
    if arithmetic:
        return None
    # Under Huffman coding every 8x8 block of every component costs at least one bit of scan data (its DC
    # code), so a frame larger than the file could hold is damage; the decoders would allocate its full size
    # and fill it with noise. Arithmetic coding can spend less than a bit on a block.
    h_max, v_max = max(f[0] for f in factors), max(f[1] for f in factors)
    blocks = sum(-(-width * h // (8 * h_max)) * -(-height * v // (8 * v_max)) for h, v, _ in factors)
    if blocks > 8 * size:
        return f"SOF: a {width} x {height} frame needs at least {blocks // 8} bytes, the file has {size}"
    return None


def _scan(body: bytes) -> str | None:
    components = body[0] if body else 0
    if not 1 <= components <= 4 or len(body) != 4 + 2 * components:
        return f"SOS: {components} components in {len(body)} bytes"
    return None


# the starts of the other image files DALI decodes (PNG, WebP, BMP, TIFF, PNM), which a view of another tool's
# shards may hold: not JPEGs with a damaged start
OTHER_FORMATS = (b"\x89PNG", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")


def header_fault(read: Callable[[int, int], bytes], size: int) -> str | None:
    """What is wrong with the header of the `size`-byte JPEG that `read(offset, count)` reads; None when the
    header is well formed up to the first scan."""
    if read(0, 2) != b"\xff\xd8":
        return "no JPEG start marker"
    at, frame = 2, False
    while True:
        head = read(at, 4)
        if len(head) < 2 or head[0] != 0xFF:
            return f"no marker at byte {at}"
        marker = head[1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in STANDALONE:
            at += 2
            continue
        if marker in (SOI, EOI, 0x00):
            return f"marker {marker:#04x} before the first scan"
        if len(head) < 4:
            return f"segment {marker:#04x} cut off"
        length = int.from_bytes(head[2:4])
        if length < 2 or at + 2 + length > size:
            return f"segment {marker:#04x} of {length} bytes at byte {at} runs past the file's {size} bytes"
        body = read(at + 4, length - 2) if marker in (SOS, DQT, DHT, DRI) or marker in SOF else b""
        fault = None
        if marker == DQT:
            fault = _tables(body, "DQT", _quant_table)
        elif marker == DHT:
            fault = _tables(body, "DHT", _huffman_table)
        elif marker == DRI and length != 4:
            fault = "DRI: length"
        elif marker in SOF:
            fault, frame = (_frame(body, size, marker in ARITHMETIC), True) if not frame else ("a second SOF", True)
        elif marker == SOS:
            return _scan(body) or (None if frame else "a scan before any SOF")
        if fault:
            return fault
        at += 2 + length


def bytes_fault(data: bytes) -> str | None:
    """`header_fault` of a JPEG held in memory."""
    return header_fault(lambda offset, count: data[offset:offset + count], len(data))
