"""Networking and records: identities, signed records, the DHT's record rules, the artifact plane.

* :mod:`peer.net.identity` — the one libp2p identity key shared by the DHT and the publisher.
* :mod:`peer.net.records` — hotkey-signed manifests, identity records and on-chain commitments.
* :mod:`peer.net.dht_records` — signed DHT announcements and the validator every DHT node runs.
* :mod:`peer.net.outbox` — what a peer publishes each round, written atomically.
* :mod:`peer.net.artifact_protocol`, :mod:`peer.net.publisher`, :mod:`peer.net.fetch` — serving and
  fetching the outbox over py-libp2p (never imported together with hivemind); :mod:`peer.net.fetch_cli`
  is ``peer fetch``.
* :mod:`peer.net.admission`, :mod:`peer.net.muxer`, :mod:`peer.net.dial_policy` — who may connect in,
  how much a stream may send, and which committed addresses are dialled out.
* :mod:`peer.net.bootstrap` — a DHT entry point that does not train.
"""
