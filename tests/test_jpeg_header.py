"""The JPEG header walk: every header a real encoder writes passes, and damage that breaks decoding or blows up
the frame is named. PIL (libjpeg) is the reference for what decodes."""
import io

import pytest
from PIL import Image

from ddmim.data.jpeg_header import bytes_fault, header_fault


def encode(mode: str = "RGB", size=(48, 40), **options) -> bytes:
    image = Image.effect_noise(size, 60).convert(mode) if mode != "flat" else Image.new("RGB", size, (90, 20, 200))
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


def segments(data: bytes) -> dict[int, list[tuple[int, int]]]:
    """marker -> (offset, length) of each header segment up to the scan."""
    found, at = {}, 2
    while data[at + 1] != 0xDA:
        length = int.from_bytes(data[at + 2:at + 4])
        found.setdefault(data[at + 1], []).append((at, length))
        at += 2 + length
    return found


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:
        return False


GOOD = {
    "baseline": encode(),
    "progressive": encode(progressive=True),
    "optimised": encode(optimize=True, quality=100),
    "4:4:4": encode(subsampling=0),
    "4:2:2": encode(subsampling=1),
    "grey": encode("L"),
    "cmyk": encode("CMYK"),
    "exif and icc": encode(exif=b"Exif\x00\x00" + bytes(3000), icc_profile=bytes(5000)),
    "1 x 1": encode(size=(1, 1)),
    "flat 4000 x 3000 progressive": encode("flat", (4000, 3000), progressive=True, optimize=True),
}


@pytest.mark.parametrize("name", GOOD)
def test_headers_a_real_encoder_writes_pass(name):
    assert decodes(GOOD[name]) and bytes_fault(GOOD[name]) is None


def overwrite(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def dht_ff(data):
    at, length = segments(data)[0xC4][0]
    return overwrite(data, at + 4, b"\xff" * (length - 2))


def too_many_codes(data):
    at, _ = segments(data)[0xC4][0]
    return overwrite(data, at + 5, bytes([2, 4] + [0] * 14))  # 2 codes of 1 bit leave none for the 4 of 2 bits


def dqt_length(data):
    at, _ = segments(data)[0xDB][0]
    return overwrite(data, at + 2, b"\xff\xff")


def zeroed_header(data):
    return overwrite(data, 2, bytes(segments(data)[0xC0][0][0]))


def sof_field(offset: int, value: bytes):
    def damage(data):
        at, _ = segments(data)[0xC0][0]
        return overwrite(data, at + offset, value)
    return damage


DAMAGED = {
    "Huffman table of 0xFF": (dht_ff, "DHT"),
    "Huffman code counts": (too_many_codes, "DHT: more codes"),
    "quantisation length 0xFFFF": (dqt_length, "runs past"),
    "zeroed header": (zeroed_header, "no marker"),
    "width 0": (sof_field(7, b"\x00\x00"), "width 0"),
    "no components": (sof_field(9, b"\x00"), "0 components"),
    "sampling 15 x 15": (sof_field(11, b"\xff"), "sampling"),
    "quantisation table 9": (sof_field(12, b"\x09"), "table 9"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damage_that_breaks_decoding_is_named(name):
    how, reason = DAMAGED[name]
    data = how(GOOD["baseline"])
    assert not decodes(data)
    assert reason in (bytes_fault(data) or "")


def test_a_frame_larger_than_its_file_could_hold_is_named():
    """16384 x 16384 claimed by a 48 x 40 JPEG: libjpeg decodes it into a 768 MiB image of noise."""
    data = sof_field(5, (16384).to_bytes(2, "big") * 2)(GOOD["baseline"])
    assert "16384 x 16384 frame needs at least" in (bytes_fault(data) or "")
    assert bytes_fault(sof_field(5, (64).to_bytes(2, "big") * 2)(GOOD["baseline"])) is None  # a plausible size


def test_the_walk_reads_only_the_header():
    """Reads stop at the first scan: the compressed data after it is never read."""
    data = encode(size=(400, 300))
    reads = []

    def read(offset, count):
        reads.append((offset, count))
        return data[offset:offset + count]

    assert header_fault(read, len(data)) is None
    scan = data.find(b"\xff\xda")
    assert max(offset + count for offset, count in reads) <= scan + 2 + int.from_bytes(data[scan + 2:scan + 4]) + 2


def test_the_dali_converter_re_encodes_a_jpeg_whose_header_the_loader_would_leave_out(tmp_path):
    """Junk bytes before a marker: libjpeg reads through them (with a warning), the header walk does not, so
    the converter stores the decoded image re-encoded instead of the file's bytes."""
    from data_prep.images import jpeg_bytes

    clean = GOOD["baseline"]
    at, _ = segments(clean)[0xC4][0]
    source = tmp_path / "junk.JPEG"
    source.write_bytes(clean[:at] + b"\x00\x17" + clean[at:])
    assert decodes(source.read_bytes()) and bytes_fault(source.read_bytes()) == f"no marker at byte {at}"
    stored = jpeg_bytes(str(source), 512, 95)
    assert stored != source.read_bytes() and bytes_fault(stored) is None
    plain = tmp_path / "plain.JPEG"
    plain.write_bytes(clean)
    assert jpeg_bytes(str(plain), 512, 95) == clean  # a sound JPEG is still stored byte for byte
