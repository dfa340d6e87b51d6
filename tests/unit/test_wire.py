import pytest

from replication.errors import ProtocolVersionError, RemoteProtocolError
from replication.protocol import AckLevel, Feature, Hello, negotiate
from replication.v1 import common_pb2, data_pb2
from replication.wire import (
    AckMsg,
    CloseMsg,
    FrameMsg,
    OpenMsg,
    ack_from_pb,
    ack_to_pb,
    hashmap_from_pb,
    hello_from_pb,
    hello_to_pb,
    source_message_from_pb,
    source_message_to_pb,
)


def test_negotiation_takes_highest_common_version_and_common_features():
    a = Hello(protocol_min=1, protocol_max=3, features=int(Feature.ZSTD | Feature.RECEIVED_ACK))
    b = Hello(protocol_min=1, protocol_max=1, features=int(Feature.ZSTD | Feature.HASHMAP_RESYNC))
    agreed = negotiate(a, b)
    assert agreed.version == 1
    assert agreed.has(Feature.ZSTD)
    assert not agreed.has(Feature.RECEIVED_ACK) and not agreed.has(Feature.HASHMAP_RESYNC)


def test_negotiation_refuses_disjoint_ranges():
    with pytest.raises(ProtocolVersionError):
        negotiate(Hello(protocol_min=1, protocol_max=1), Hello(protocol_min=2, protocol_max=4))


def test_feature_values_match_the_proto_enum():
    assert Feature.ZSTD == common_pb2.FEATURE_ZSTD
    assert Feature.HASHMAP_RESYNC == common_pb2.FEATURE_HASHMAP_RESYNC
    assert Feature.RECEIVED_ACK == common_pb2.FEATURE_RECEIVED_ACK
    assert Feature.EPOCH_MARKERS == common_pb2.FEATURE_EPOCH_MARKERS
    assert AckLevel.PERSISTED == common_pb2.PERSISTED


@pytest.mark.parametrize(
    "msg",
    [
        OpenMsg("vol1", b"s" * 16, 65536, 1 << 30, 1),
        FrameMsg(7, b"frame-bytes"),
        CloseMsg(99),
    ],
)
def test_source_messages_round_trip(msg):
    assert source_message_from_pb(source_message_to_pb(msg)) == msg


def test_hello_and_ack_round_trip():
    h = Hello(role="master-target")
    assert hello_from_pb(hello_to_pb(h)) == h
    a = AckMsg("v", b"x" * 16, 5, AckLevel.RECEIVED)
    assert ack_from_pb(ack_to_pb(a)) == a


def test_bad_remote_messages_are_typed_errors():
    with pytest.raises(RemoteProtocolError):
        source_message_from_pb(data_pb2.SourceMessage())
    with pytest.raises(RemoteProtocolError):
        ack_from_pb(common_pb2.Ack(seq=1, level=0))
    with pytest.raises(RemoteProtocolError):
        list(hashmap_from_pb(iter([data_pb2.HashMapChunk(digests=b"123")])))
