"""Every built-in codec passes the codec conformance suite (lmcache_conformance.codecs)."""

from __future__ import annotations

import pytest
from lmcache_conformance import CodecTests

from lmcache.serde.codec import Codec, make_codec


class TestRaw(CodecTests):
    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "raw"})


class TestZstd(CodecTests):
    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "zstd"})


class TestZstdUnshuffled(CodecTests):
    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "zstd", "codec_shuffle": "false", "codec_level": "1"})


class TestLz4(CodecTests):
    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "lz4"})


class TestFp8(CodecTests):
    max_relative_error = 0.05
    max_relative_error_real = 0.05

    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "fp8"})


class TestInt8(CodecTests):
    max_relative_error = 0.02
    max_relative_error_real = 0.02

    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "int8"})


class TestInt4(CodecTests):
    max_relative_error = 0.12
    max_relative_error_real = 0.15

    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "int4", "codec_group": "32"})


class TestCacheGen(CodecTests):
    max_relative_error = 0.3
    max_relative_error_real = 0.3

    @pytest.fixture
    def codec(self) -> Codec:
        return make_codec({"codec": "cachegen"})
