"""Links between parties: framing, in-memory queues and TCP (optionally TLS 1.3, mutual auth).

One module per job:

* :mod:`.frames`: the frame format, :func:`~.frames.encode_frame` / :func:`~.frames.decode_frame`
  (every received frame is checked against what the protocol expects);
* :mod:`.link`: the :class:`~.link.Link` interface and the in-memory :class:`~.link.QueueLink`;
* :mod:`.socket_link`: :class:`~.socket_link.SocketLink`, TCP with an I/O thread;
* :mod:`.tls`: a party's TLS identity (:class:`~.tls.TLSConfig`, certificate common names);
* :mod:`.handshake`: the per-connection TLS handshake and hello;
* :mod:`.accept` and :mod:`.connect`: the connection set-up (:func:`~.connect.connect_links`);
* :mod:`.addresses`: loopback checks and :func:`~.addresses.listen`.

The errors of all of them are :class:`secure_inference.mpc.errors.ProtocolError`. Warnings
about dropped connections go to the ``secure_inference.mpc.transport`` logger.
"""
