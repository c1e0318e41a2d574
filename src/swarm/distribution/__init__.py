"""Model distribution: a peer publishes a model, others fetch only the files they serve, BitTorrent-style.

    publish.py    split a model folder into one safetensors file per block (`split.py`), make a v2 torrent of
                  it, announce NAME -> info-hash in the DHT signed by the publisher, and seed
    fetch.py      look NAME up, download only the files wanted (a span's blocks, the client's tensors, or
                  everything) from every peer that seeds them, and keep seeding
    manifest.py   what each published file holds, checked before anything is downloaded
    records.py    the DHT records: signed model announcements, and the seeders of each torrent
    torrents.py   libtorrent: one session per process, v2 torrents, file priorities, the ban watchdog

libtorrent moves and verifies the bytes (a SHA-256 merkle tree per file); the hivemind DHT only maps names to
info-hashes and tells peers each other's libtorrent addresses (no tracker, no public DHT).
"""
