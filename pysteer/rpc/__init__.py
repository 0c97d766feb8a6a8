"""pysteer's RPC: the one protocol of every control link.

The CLI talks to agents (their unix control socket, or their mutual-TLS peer listener
from another machine) and to the steering daemon (its unix socket); agents talk to each
other and to the steering daemon (its mutual-TLS listener). All of them speak this.

Frames
    A frame is a 4-byte big-endian length, then that many bytes of msgpack holding one
    map. Bytes travel as msgpack bin, unchanged (sealed migration blobs, migration ids);
    strings are UTF-8. A frame is at most 64 MiB (``codec.MAX_FRAME``; a blob carries both
    socket queues of a connection), less where a server only takes small requests (the
    steering daemon: 1 MiB; an agent's control socket: 64 KiB). Maps and arrays nest at
    most 32 deep and hold at most 2**20 items each; map keys are strings or bytes; there
    are no extension types. Once a frame's first byte has arrived, the rest must arrive
    within 30 s (``codec.FRAME_TIMEOUT``): a peer that stalls mid-frame is a protocol
    error, never a reader held forever. Waiting for a frame to *start* is up to each end
    (links stay open between requests; the steering daemon gives a local client 30 s).

Hello, and where the version is checked
    The first frame a client sends on every connection is its hello,
    ``{"rpc": "hello", "version": 1, "nl": "\\n"}``. The server checks the version before
    it reads anything else, and answers ``{"ok": true, "rpc": "hello", "version": 1}``,
    or refuses with ``{"ok": false, "code": "version", "error": ...}`` (the error names
    both versions) and hangs up. The client checks the version in the answer too, so a
    mismatch is a clear refusal on whichever end is newer, and nodes can be upgraded one
    at a time. A client may send its first request right behind its hello, without
    waiting (the CLI does; agents say hello when they open a link, before any migration
    needs it). The hello's last byte is a newline, so that a server of the JSON-line
    protocol that came before (call it version 0) answers at once, with a JSON error line
    that the client recognises by its first byte ``{``. The other way round, a server
    whose first byte from a client is ``{`` answers that client with one JSON line,
    ``{"ok": false, "code": "version", "error": ...}``, and hangs up.

Requests and answers
    A request is a map with ``cmd`` (the steering daemon, an agent's control socket) or
    ``op`` (an agent's peer listener). Each request gets one answer, in order:
    ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT, "code": CODE}`` (``code``
    optional). One exception: an agent's ``drain`` streams ``{"ok": true, "progress":
    ...}`` answers, then its summary; any frame from the client (or its hanging up) stops
    it after the batch in flight.

Errors
    ``pysteer.rpc.errors`` maps codes to exceptions, for every client and server: see
    there. A frame whose body is not a valid request is answered (``bad-request``) and the
    connection goes on; a framing error (a length over the bound, a hang-up or a stall
    inside a frame) is answered when it can be (``protocol``), then the connection ends.

``codec`` is the sans-IO core (frames, the decoder, the hello); ``aio`` and ``blocking``
are its adapters for asyncio streams and for blocking sockets. This package itself, and
``errors``, import nothing heavy: the CLI loads msgpack only when it opens a connection.
"""

VERSION = 1  # of the protocol: hellos carry it; change it with any incompatible change
