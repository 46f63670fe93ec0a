"""Value codecs shared by every backend that stores bytes (file, redis, s3, mooncake, lm…)."""

from lmcache.serde.frame import FRAME_VERSION, FrameHeader, decode_frame, encode_header, frame_size

__all__ = ["FRAME_VERSION", "FrameHeader", "decode_frame", "encode_header", "frame_size"]
