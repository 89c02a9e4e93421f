"""yamux that holds a remote to the receive window this side granted.

py-libp2p 0.8's yamux counts the receive window but does not enforce it: a DATA frame past the window
only logs "peer exceeded receive window" and its bytes are appended to the stream's buffer anyway. A
hostile remote (a publisher a validator lists, or anyone dialling a publisher) can therefore push
gigabytes into a stream the local side is not reading — e.g. a listing stream after its answer was
read — and the process keeps every byte until it runs out of memory (measured: +400 MiB in 2.4 s from
one publisher, never released).

:class:`WindowedYamux` refuses such a frame before its bytes are kept: on a data frame the stream is
closed for receiving (the reader sees the end of the stream, then ``truncated``); on a frame that opens
or acknowledges a stream, py-libp2p closes the whole connection (the offender's own). No stream ever
buffers more than the window this side granted (256 KiB by default, 16 MiB for blob streams). Imported only by
py-libp2p processes (the publisher and the validator's fetch client: ``make_host`` calls :func:`install`).
"""

from __future__ import annotations

from libp2p.stream_muxer.yamux.yamux import Yamux


class WindowExceeded(ConnectionError):
    """The remote sent more bytes on a stream than the receive window allows (a protocol violation)."""


class _WindowedBuffer(bytearray):
    __slots__ = ("_conn", "_sid")

    def extend(self, data) -> None:  # type: ignore[override]
        stream = self._conn.streams.get(self._sid)
        n = len(data)
        if stream is not None and n > max(0, stream.recv_window):
            self._conn.window_violations += 1
            raise WindowExceeded(
                f"stream {self._sid}: {n} bytes > receive window {stream.recv_window}; dropped"
            )
        super().extend(data)


class _WindowedBuffers(dict):
    """stream id → receive buffer; every buffer stored is a :class:`_WindowedBuffer`."""

    def __init__(self, conn: WindowedYamux):
        super().__init__()
        self._conn = conn

    def __setitem__(self, sid, buf) -> None:
        wb = _WindowedBuffer(buf)
        wb._conn, wb._sid = self._conn, sid
        super().__setitem__(sid, wb)


class WindowedYamux(Yamux):
    """py-libp2p's Yamux, but a stream never buffers more than the receive window it granted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window_violations = 0
        self.stream_buffers = _WindowedBuffers(self)


def install() -> None:
    """Make py-libp2p build :class:`WindowedYamux` for every yamux connection of this process.

    py-libp2p 0.8's ``MuxerMultistream.new_conn`` constructs ``Yamux`` by its module-level name and
    ignores the class given in ``muxer_opt``, so the name is replaced there (idempotent)."""
    import libp2p.stream_muxer.muxer_multistream as mm

    mm.Yamux = WindowedYamux


__all__ = ["WindowExceeded", "WindowedYamux", "install"]
