"""MPEG-4 Part 2 AVI clips with B-frames, made from a real clip at test time.

``packed=True`` writes them the way DivX/XviD did (and OpenCV's Megamind.avi is): each AVI chunk
is one display slot; a reference frame travels in one chunk with the first B-frame shown before
it, and its own slot holds a tiny not-coded placeholder (an N-VOP). The DivX user-data string
ending in 'p' is what tells FFmpeg's decoder the stream is packed.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SIZE = (160, 120)
RATE = 25
DIVX_PACKED = b"\x00\x00\x01\xb2DivX503b1393p"  # user data: DivX 5.03 build 1393, packed bitstream
# VOP start code, then: P-VOP '01', modulo_time_base '0', marker '1', time increment (5 bits for a
# resolution of 25) '00000', marker '1', vop_coded '0', stuffing '0111'.
N_VOP = b"\x00\x00\x01\xb6" + bytes([0b01010000, 0b00100111])


def source_frames(src: Path) -> list[av.VideoFrame]:
    """Every frame of ``src`` at SIZE in yuv420p, stripped of the decoder's picture types."""
    with av.open(str(src)) as inp:
        frames = [f.reformat(SIZE[0], SIZE[1], "yuv420p") for f in inp.decode(video=0)]
    for i, f in enumerate(frames):
        # A decoded frame keeps its I/P type, which encoders obey: clear it so B-frames are chosen.
        f.pts, f.time_base, f.pict_type = i, Fraction(1, RATE), av.video.frame.PictureType.NONE
    return frames


def encode(frames: list[av.VideoFrame]) -> list[tuple[bytes, int]]:
    """MPEG-4 Part 2 with up to 2 B-frames in a row: (payload, pts) in decode order."""
    cc = av.codec.CodecContext.create("mpeg4", "w")
    cc.width, cc.height, cc.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
    cc.time_base, cc.framerate = Fraction(1, RATE), RATE
    cc.max_b_frames, cc.gop_size = 2, 12
    packets = [p for f in frames for p in cc.encode(f)] + list(cc.encode(None))
    return [(bytes(p), p.pts) for p in packets]


def pack(packets: list[tuple[bytes, int]]) -> list[bytes]:
    """Decode-order packets -> DivX packed chunks, one per display slot."""
    first, pts0 = packets[0]
    at = first.find(b"\x00\x00\x01\xb6")  # user data goes before the first VOP
    packets = [(first[:at] + DIVX_PACKED + first[at:], pts0)] + packets[1:]
    chunks, i = [], 0
    while i < len(packets):
        data, pts = packets[i]
        j = i + 1
        while j < len(packets) and packets[j][1] < pts:  # B-frames shown before this reference
            j += 1
        b_frames = [p for p, _ in packets[i + 1 : j]]
        if b_frames:
            chunks += [data + b_frames[0], *b_frames[1:], N_VOP]
        else:
            chunks.append(data)
        i = j
    return chunks


def write_avi(path: Path, chunks: list[bytes]) -> None:
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height = SIZE
        for k, data in enumerate(chunks):
            packet = av.Packet(data)
            packet.pts = packet.dts = k  # AVI keeps no timestamps: a chunk's index is its slot
            packet.time_base, packet.stream = Fraction(1, RATE), stream
            out.mux(packet)


def make_clip(src: Path, out: Path, packed: bool) -> list[np.ndarray]:
    """Write the B-frame AVI; returns the source frames (grey) it encodes, in display order."""
    frames = source_frames(src)
    packets = encode(frames)
    order = [pts for _, pts in packets]
    assert order != sorted(order), "the encoder made no B-frames"
    write_avi(out, pack(packets) if packed else [p for p, _ in packets])
    return [f.to_ndarray(format="gray").astype(np.float32) for f in frames]


def closest(image: np.ndarray, originals: list[np.ndarray]) -> int:
    """Index of the original frame a decoded picture shows."""
    return int(np.argmin([np.abs(image - o).mean() for o in originals]))
