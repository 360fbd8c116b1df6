"""HTTP/2 abuse against a real Turnout subprocess (contract section 11, limits and abuse).

Each attack is sent with the h2 library (and hand-built frames) over a raw socket; the test
asserts how Turnout ends the abusive connection (GOAWAY and its error code, or a cut) and that
a second, well-behaved connection is served all along, and that the reason is counted in
`turnout_http2_goaways_total{reason}` (the GOAWAY's debug data names it too).
"""

from __future__ import annotations

import select
import socket
import time
import urllib.request
from typing import Any

import h2.events
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame

from tests.support import wait_until
from tests.support.h2client import RawH2
from tests.support.turnout import TurnoutFactory, TurnoutProcess
from tests.support.upstreams import EchoUpstream


@pytest.fixture
def turnout(turnout_factory: TurnoutFactory, blue: EchoUpstream) -> TurnoutProcess:
    config: dict[str, Any] = {
        "timeouts": {"idle": "1s"},
        "upstreams": {"blue": {"endpoints": [blue.address]}},
        "routes": [{"name": "main", "split": {"blue": 100}}],
    }
    return turnout_factory(config)


def well_behaved(turnout: TurnoutProcess) -> None:
    """A second connection is served as if nothing happened."""
    with RawH2(turnout.port) as client:
        status, _, body = client.response(client.request("/still-here"))
    assert status == 200
    assert b"/still-here" in body


def counted(turnout: TurnoutProcess, *reasons: str, times: int = 1) -> None:
    """`turnout_http2_goaways_total{reason}` summed over `reasons` reaches `times` (the
    supervisor reads workers)."""
    series = [f'turnout_http2_goaways_total{{reason="{reason}"}} ' for reason in reasons]

    def seen() -> bool:
        with urllib.request.urlopen(f"{turnout.admin_url}/metrics", timeout=5) as response:
            text: str = response.read().decode()
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if any(line.startswith(name) for name in series)
        ]
        return len(values) == len(series) and sum(values) == times

    wait_until(seen, what=f"{' + '.join(series)}= {times}")


def no_traceback(turnout: TurnoutProcess) -> None:
    assert "Traceback" not in turnout.stderr_text()


def test_rapid_reset_is_closed(turnout: TurnoutProcess) -> None:
    with RawH2(turnout.port) as client:
        client.reset_burst("/reset-me", 400)
        goaway = client.goaway()
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert goaway.additional_data == b"rapid_reset"
        well_behaved(turnout)
    counted(turnout, "rapid_reset")
    no_traceback(turnout)


def test_resets_paid_by_completed_streams_are_fine(turnout: TurnoutProcess) -> None:
    with RawH2(turnout.port) as client:
        for _ in range(300):
            assert client.response(client.request("/ok"))[0] == 200
            sid = client.request("/cancelled")
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            client.flush()
        assert client.response(client.request("/last"))[0] == 200
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)


def test_continuation_flood_is_closed(turnout: TurnoutProcess) -> None:
    with RawH2(turnout.port) as client:
        encoder = hpack.Encoder()
        block = encoder.encode(
            [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")]
        )
        headers = HeadersFrame(1, block)  # no END_HEADERS: CONTINUATION frames must follow
        client.send_raw(headers.serialize())
        filler = ContinuationFrame(1, b"\x40\x01x\x01y")  # literal x: y, again and again
        try:
            for _ in range(1000):
                client.send_raw(filler.serialize())
        except (BrokenPipeError, ConnectionResetError):
            pass
        goaway = client.goaway()
        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        well_behaved(turnout)
    counted(turnout, "continuation_flood")
    no_traceback(turnout)


def test_large_continuation_block_is_closed(turnout: TurnoutProcess) -> None:
    with RawH2(turnout.port) as client:
        # Few frames (h2 itself stops at 64), but 320 KB of header block held for one request.
        client.send_raw(HeadersFrame(1, b"\x00" * 16000).serialize())
        try:
            for _ in range(20):
                client.send_raw(ContinuationFrame(1, b"\x00" * 16000).serialize())
        except (BrokenPipeError, ConnectionResetError):
            pass
        goaway = client.goaway()
        assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        well_behaved(turnout)
    counted(turnout, "continuation_flood")
    no_traceback(turnout)


def test_hpack_bomb_is_closed(turnout: TurnoutProcess) -> None:
    with RawH2(turnout.port) as client:
        encoder = hpack.Encoder()
        # One 4 KB field into the dynamic table, then referenced by its index (62, one byte)
        # a hundred times: 7 KB on the wire, 400 KB once decoded.
        block = encoder.encode(
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "a"),
                (":path", "/"),
                ("x-bomb", "a" * 4000),
            ]
        )
        block += b"\xbe" * 100
        client.send_raw(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        goaway = client.goaway()
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        well_behaved(turnout)
    counted(turnout, "header_list_too_large")
    no_traceback(turnout)


def test_ping_flood_without_reading_is_cut(turnout: TurnoutProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", turnout.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ping = PingFrame(0, b"12345678").serialize()
    batch = ping * 4096
    cut = False
    try:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        until = time.monotonic() + 60
        # Never read: every PING asks for an ACK that piles up in Turnout.
        while time.monotonic() < until:
            sock.sendall(batch)
    except (BrokenPipeError, ConnectionResetError):
        cut = True
    finally:
        sock.close()
    assert cut, "a client that never reads its PING ACKs was not cut off"
    well_behaved(turnout)
    # Cut for the ACKs it leaves unread, or for the PINGs themselves (frames that carry no
    # request): whichever limit the flood meets first.
    counted(turnout, "control_flood", "frame_flood")
    no_traceback(turnout)


def test_empty_frame_flood_is_closed(turnout: TurnoutProcess) -> None:
    with RawH2(turnout.port) as client:
        sid = client.request("/upload", method="POST", end=False)
        # What the server sends first is read: from here, anything readable is its answer.
        client.events_until(lambda e: isinstance(e, h2.events.SettingsAcknowledged))
        batch = DataFrame(sid, b"").serialize() * 4096  # empty DATA: no body, no end
        sent = 0
        try:
            # Bounded: 2.7 MB, past the credit (1 MiB of reads) and its refill by the head.
            while sent < 300_000 and not select.select([client.sock], [], [], 0)[0]:
                client.send_raw(batch)
                sent += 4096
        except (BrokenPipeError, ConnectionResetError):
            pass
        goaway = client.goaway()
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert goaway.additional_data == b"frame_flood"
        well_behaved(turnout)
    counted(turnout, "frame_flood")
    no_traceback(turnout)


def test_frames_without_payload_are_fine_beside_useful_traffic(turnout: TurnoutProcess) -> None:
    # 1.4 MB of PINGs, more than a connection's credit, but between them responses of 64 KiB
    # that earn eight times their size: a busy connection is never judged a flood.
    pings = PingFrame(0, b"12345678").serialize() * 1000
    with RawH2(turnout.port) as client:
        for _ in range(80):
            client.send_raw(pings)
            status, _, body = client.response(client.request("/fixed?n=65536"))
            assert (status, len(body)) == (200, 65536)
        assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
    no_traceback(turnout)


def test_zero_window_stream_is_reset_and_others_go_on(turnout: TurnoutProcess) -> None:
    zero: dict[int, int] = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    with RawH2(turnout.port, settings=zero) as client:
        client.conn.increment_flow_control_window(10_000_000)
        stalled = client.request("/fixed?n=200000")
        alive = client.request("/slow?ms=2500")
        client.conn.increment_flow_control_window(1_000_000, alive)
        client.flush()
        reset = client.events_until(
            lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == stalled
        )
        assert isinstance(reset, h2.events.StreamReset)
        assert reset.error_code in (ErrorCodes.CANCEL, ErrorCodes.INTERNAL_ERROR)
        assert client.response(alive)[0] == 200
    no_traceback(turnout)


def test_connection_with_every_stream_stalled_is_closed(turnout: TurnoutProcess) -> None:
    zero: dict[int, int] = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    with RawH2(turnout.port, settings=zero) as client:
        client.conn.increment_flow_control_window(10_000_000)
        client.request("/fixed?n=200000")
        client.request("/fixed?n=300000")
        goaway = client.goaway()
        assert goaway.error_code == ErrorCodes.NO_ERROR
        assert goaway.additional_data == b"flow_control_stall"
        well_behaved(turnout)
    counted(turnout, "flow_control_stall")
    no_traceback(turnout)


def test_protocol_error_goaway_logged_once(turnout: TurnoutProcess) -> None:
    for _ in range(3):
        with RawH2(turnout.port) as client:
            # DATA on stream 0 is a connection error (RFC 9113 section 6.1).
            client.send_raw(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
            goaway = client.goaway()
            assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    well_behaved(turnout)
    wait_until(
        lambda: (
            'turnout_http2_goaways_total{reason="protocol_error"} 3'
            in urllib.request.urlopen(f"{turnout.admin_url}/metrics", timeout=5).read().decode()
        ),
        what="three protocol errors counted",
    )
    stderr = turnout.stderr_text()
    assert stderr.count("GOAWAY protocol_error") == 1
    assert "Traceback" not in stderr
