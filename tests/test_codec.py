"""The result codec (wire/codec.py): binary frames, JSON around raw bytes."""

import pytest
from kombu.exceptions import DecodeError
from kombu.serialization import dumps, loads

from clustersearch.wire import codec
from clustersearch.wire.config import compresses_results, create_app


def _meta(payload):
    return {"status": "SUCCESS", "task_id": "t1", "children": [],
            "result": {"payload": payload, "auth": "v1:abc", "nested": [b"\x00\x01", 3]}}  # fmt: skip


def test_bytes_travel_raw_and_come_back_equal():
    payload = bytes(range(256)) * 4000  # 1 MB, not UTF-8
    content_type, encoding, body = dumps(_meta(payload), serializer=codec.NAME)
    assert (content_type, encoding) == (codec.CONTENT_TYPE, "binary")
    # The payload is in the message as it is: no base64 (4/3 the size).
    assert payload in body and len(body) < len(payload) + 400
    back = loads(body, content_type, encoding, accept=[codec.CONTENT_TYPE])
    assert back == _meta(payload)
    # Each bytes value comes back as a read-only view into the message: a
    # forest's result (tens of MB) is not copied out of it.
    view = back["result"]["payload"]
    assert type(view) is memoryview and view.readonly and view.obj is body
    assert bytes(view) == payload


def test_json_results_still_decode():
    # Redis and file:// results carry no content type: a node of an older
    # version (JSON) is read by the same decoder.
    body = b'{"status": "SUCCESS", "result": 1, "task_id": "t"}'
    assert codec.decode(body) == {"status": "SUCCESS", "result": 1, "task_id": "t"}


@pytest.mark.parametrize(
    "body",
    [
        b"CSR",
        b"XXXX\x00\x00\x00\x02{}",
        b"CSR1\xff\xff\xff\xff{}",  # header longer than the message
        b"CSR1\x00\x00\x00\x02{}\x00\x00",  # frame length cut short
        b"CSR1\x00\x00\x00\x02{}" + (10**6).to_bytes(8, "big") + b"abc",  # frame cut short
        b'CSR1\x00\x00\x00\x10{"__csbytes__":0}',  # a frame it does not have
        b'CSR1\x00\x00\x00\x12{"__csbytes__":"0"}',
        b"{not json",
        b"\x80\x05K\x01.",  # a pickle: never unpickled
        b'{"status": "SUCCESS", "result": 1}',  # no task id: Celery would fail on it
        b'CSR1\x00\x00\x00\x02[]',
    ],
)
def test_malformed_messages_are_decode_errors(body):
    with pytest.raises(DecodeError):
        loads(body, codec.CONTENT_TYPE, "binary", accept=[codec.CONTENT_TYPE])


def test_nodes_store_results_with_it_and_compress_them_off_the_machine(tmp_path):
    amqp = create_app("amqp://guest:guest@127.0.0.1:5672//")
    assert amqp.conf.result_serializer == codec.NAME
    assert codec.CONTENT_TYPE in amqp.conf.result_accept_content
    assert amqp.conf.accept_content == ["json"]  # tasks stay JSON
    assert compresses_results(amqp.conf)
    assert compresses_results(create_app("redis://127.0.0.1:6379/0").conf)
    embedded = create_app(f"filesystem://{tmp_path}")
    assert not compresses_results(embedded.conf)


def test_chunks_are_one_frame_and_sign_as_the_joined_bytes():
    # A node's pickle stays in the pieces the pickler wrote (its arrays not
    # copied) until the message is encoded: one frame, the same bytes and
    # the same signature as the joined pickle.
    import numpy as np

    from clustersearch.wire.serialization import dumps_chunks, loads
    from clustersearch.wire.signing import Signer

    trees = {"nodes": np.arange(200_000.0), "values": np.ones((500, 300)).T}
    data = dumps_chunks(trees)
    assert isinstance(data, codec.Chunks) and len(data.parts) > 1
    assert len(data) == len(bytes(data)) > trees["nodes"].nbytes
    body = codec.encode(_meta(data))
    back = codec.decode(body)["result"]["payload"]
    assert bytes(back) == bytes(data)
    restored = loads(back)
    assert np.array_equal(restored["values"], trees["values"])
    signer = Signer(b"s" * 32)
    signer.verify("result", "t1", back, signer.sign("result", "t1", data))
    assert "bytes in" in repr(data) and len(repr(data)) < 100
