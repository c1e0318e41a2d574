"""libtorrent, as swarm uses it: one private session per process, v2 torrents, only the files a peer wants.

The session listens on one address and talks only to the peers it is told about (from the hivemind DHT's
seeder records): no public DHT, no local service discovery, no UPnP, no tracker. A v2 torrent (BEP 52) keeps a
SHA-256 merkle tree per file, so each file verifies on its own: a piece that fails its hash is discarded and
fetched again, and a peer that sends too many is banned. One thread reads the session's alerts and copies
what it needs at once (an alert dies with the next `pop_alerts`).

What bites (see the project's notes on libtorrent): a file counts as complete before its bytes are on disk, so
`Torrent.flush` waits for the cache to be flushed before anyone reads it; an honest peer can be banned along
with a corrupt one, so `Torrent.wait_files` re-adds a stalled torrent without its ban list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import libtorrent as lt
from tqdm.auto import tqdm

from swarm.distribution.manifest import ROOT
from swarm.errors import PeerTimeoutError, SwarmUnavailableError

logger = logging.getLogger(__name__)

PIECE_SIZE = 1 << 20  # bytes per piece; v2 aligns every file to pieces, so a peer fetches whole files
STALL_SECONDS = 5.0  # no progress this long: re-add the torrent without its ban list and reconnect its peers
WANTED = 4  # libtorrent's default file priority; 0 skips a file


def create_torrent(folder: Path) -> tuple[bytes, str]:
    """A v2-only torrent of `folder` (its files and their merkle trees): (bencoded torrent, hex info-hash)."""
    files = lt.list_files(str(folder))
    creator = lt.create_torrent(files, PIECE_SIZE, lt.create_torrent.v2_only)
    with tqdm(total=creator.num_pieces(), desc=f"Hashing {folder.name}", unit="piece", disable=None) as progress:
        lt.set_piece_hashes(creator, str(folder.parent), lambda piece: progress.update(1))
    data = lt.bencode(creator.generate())
    return data, str(lt.load_torrent_buffer(data).ti.info_hashes().v2)


class TorrentSession:
    """A libtorrent session on `host:port` (0: any port), announced to others as `announce_host:port`."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0, announce_host: str | None = None, upload_rate_limit: int = 0):
        self.session = lt.session(
            {
                "listen_interfaces": f"{host}:{port}",
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "dht_bootstrap_nodes": "",
                "webtorrent_stun_server": "",
                "allow_multiple_connections_per_ip": True,  # peers on one machine share 127.0.0.1
                "min_reconnect_time": 1,
                "upload_rate_limit": upload_rate_limit,  # bytes per second, 0: none
                # TCP only: uTP's delay-based congestion control ran 3.7x slower than TCP on loopback (45 against
                # 166 MB/s), and three seeders capped at 8 MB/s each gave 10 MB/s over uTP, 20 over TCP
                "enable_outgoing_utp": False,
                "enable_incoming_utp": False,
                # each piece from one peer: a piece that fails its hash then names its sender, and an honest peer
                # that sent part of it is not banned along with a corrupt one
                "whole_pieces_threshold": 1_000_000,
                "alert_mask": lt.alert_category.error
                | lt.alert_category.peer
                | lt.alert_category.status
                | lt.alert_category.storage
                | lt.alert_category.file_progress,
            }
        )
        # libtorrent exempts peers on the local network from rate limits; a limit here is meant for every peer
        every_address = lt.ip_filter()
        every_address.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
        self.session.set_peer_class_filter(every_address)
        self.host = announce_host or host
        self.blocked_hosts: set[str] = set()
        self.torrents: dict[str, Torrent] = {}
        self._closed = threading.Event()
        self._alerts = threading.Thread(target=self._read_alerts, name="libtorrent-alerts", daemon=True)
        self._alerts.start()

    def block(self, hosts: set[str]):
        """Refuses every connection from and to `hosts` (peers that sent corrupt pieces again and again)."""
        self.blocked_hosts |= hosts
        rules = lt.ip_filter()
        for host in self.blocked_hosts:
            rules.add_rule(host, host, 1)
        self.session.set_ip_filter(rules)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.session.listen_port()}"

    def seed(self, save_path: Path, torrent: bytes, hashed: bool = True) -> "Torrent":
        """Seeds the files in `save_path / "model"`: files this peer has just hashed are not read again (libtorrent
        checks each piece the first time a peer asks for it); others are checked first."""
        params = lt.load_torrent_buffer(torrent)
        params.save_path = str(save_path)
        if hashed:
            params.flags |= lt.torrent_flags.seed_mode
        return self._add(params)

    def download(self, info_hash: str, save_path: Path) -> "Torrent":
        """Joins the torrent of `info_hash`, downloading nothing until told which files (`Torrent.want`). Files
        already in `save_path` are checked against their hashes and kept: an interrupted download resumes."""
        if info_hash in self.torrents:
            return self.torrents[info_hash]
        params = lt.parse_magnet_uri(f"magnet:?xt=urn:btmh:1220{info_hash}")
        params.save_path = str(save_path)
        params.flags |= lt.torrent_flags.default_dont_download
        return self._add(params)

    def _add(self, params) -> "Torrent":
        handle = self.session.add_torrent(params)
        torrent = Torrent(self, handle, str(handle.info_hashes().v2), Path(params.save_path))
        self.torrents[torrent.info_hash] = torrent
        return torrent

    def _read_alerts(self):
        while not self._closed.is_set():
            if self.session.wait_for_alert(500) is None:
                continue
            for alert in self.session.pop_alerts():
                try:
                    torrent = self.torrents.get(_info_hash_of(alert))
                    if torrent is not None:
                        torrent.on_alert(alert)
                    elif isinstance(alert, lt.listen_failed_alert):
                        logger.error(f"libtorrent: {alert.message()}")
                except RuntimeError as error:  # the alert's torrent was removed meanwhile
                    logger.debug(f"Ignoring {type(alert).__name__}: {error}")

    def close(self):
        self._closed.set()
        self._alerts.join(timeout=2)
        for torrent in list(self.torrents.values()):
            self.session.remove_torrent(torrent.handle)
        self.torrents.clear()


def _info_hash_of(alert) -> str | None:
    handle = getattr(alert, "handle", None)
    if handle is None or not handle.is_valid():
        return None
    return str(handle.info_hashes().v2)


class Torrent:
    """One torrent in a `TorrentSession`, and what its alerts said."""

    def __init__(self, session: TorrentSession, handle, info_hash: str, save_path: Path):
        self.owner = session
        self.handle = handle
        self.info_hash = info_hash
        self.save_path = save_path
        self.metadata = threading.Event()
        self.flush_requests = 0  # flushes asked of libtorrent
        self.flushes_done = 0  # flushes it reported done (in the order they were asked)
        self.flush_done = threading.Condition()
        self.renamed = threading.Event()  # every file rename asked for is done
        self.renames_pending = 0
        self.resume = threading.Event()
        self.resume_params = None
        self.banned: list[str] = []  # addresses of peers banned for corrupt pieces
        self.ban_counts: Counter[str] = Counter()  # bans per address, over restarts
        self.blocked: set[str] = set()  # addresses never connected again: banned more than any other peer
        self.hash_failures = 0
        self.peers: set[tuple[str, int]] = set()  # every peer it was told about

    def on_alert(self, alert):
        """Runs on the session's alert thread: copy what is needed, never keep the alert."""
        if isinstance(alert, lt.metadata_received_alert) or (isinstance(alert, lt.add_torrent_alert) and self.handle.status().has_metadata):
            self.metadata.set()
        elif isinstance(alert, lt.hash_failed_alert):
            self.hash_failures += 1
        elif isinstance(alert, lt.peer_ban_alert):
            address = f"{alert.ip[0]}:{alert.ip[1]}"
            self.banned.append(address)
            self.ban_counts[address] += 1
            logger.warning(f"Banned peer {address} of {self.info_hash[:12]}: it sent pieces that failed their hash")
        elif isinstance(alert, lt.cache_flushed_alert):
            with self.flush_done:
                self.flushes_done += 1
                self.flush_done.notify_all()
        elif isinstance(alert, lt.file_completed_alert):
            self._request_flush()  # a crash loses no complete file: an interrupted download resumes from it
        elif isinstance(alert, (lt.file_renamed_alert, lt.file_rename_failed_alert)):
            if isinstance(alert, lt.file_rename_failed_alert):
                logger.error(f"libtorrent: {alert.message()}")
            self.renames_pending -= 1
            if self.renames_pending == 0:
                self.renamed.set()
        elif isinstance(alert, lt.save_resume_data_alert):
            self.resume_params = lt.write_resume_data_buf(alert.params)
            self.resume.set()
        elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
            logger.error(f"libtorrent: {alert.message()}")

    # What it holds

    def files(self) -> dict[str, int]:
        """Path within the model folder -> size, for every file of the torrent (needs its metadata)."""
        layout = self.handle.torrent_file().layout()
        return {path: size for _, path, size in self._entries(layout)}

    def _entries(self, layout) -> list[tuple[int, str, int]]:
        """(file index, path within the model folder, size) of each real file; files outside `ROOT` are
        reported under their full path so that the manifest check refuses them."""
        entries = []
        for index in range(layout.num_files()):
            if layout.file_flags(index) & layout.flag_pad_file:
                continue
            path = layout.file_path(index).replace("\\", "/")
            entries.append((index, path.removeprefix(f"{ROOT}/") if path.startswith(f"{ROOT}/") else path, layout.file_size(index)))
        return entries

    def complete_files(self) -> list[str]:
        if not self.handle.status().has_metadata:
            return []
        progress = self.handle.file_progress()
        return sorted(path for index, path, size in self._entries(self.handle.torrent_file().layout()) if progress[index] == size)

    # Getting them

    def add_peers(self, endpoints: list[tuple[str, int]]):
        for endpoint in endpoints:
            if f"{endpoint[0]}:{endpoint[1]}" in self.blocked:
                continue
            self.peers.add(endpoint)
            self.handle.connect_peer(endpoint, 0, 0)

    def wait_metadata(self, timeout: float) -> dict[str, int]:
        if not self.metadata.wait(timeout) and not self.handle.status().has_metadata:
            raise PeerTimeoutError(f"no peer sent the metadata of torrent {self.info_hash} within {timeout:.0f} s")
        return self.files()

    def place_files(self, timeout: float = 600.0):
        """Puts the files straight into the save path (without the torrent's root folder), then checks those already
        there against their hashes: a download interrupted before resumes where it stopped."""
        layout = self.handle.torrent_file().layout()
        renames = [(index, path) for index, path, _ in self._entries(layout) if layout.file_path(index).replace("\\", "/") != path]
        self.renamed.clear()
        self.renames_pending = len(renames)
        for index, path in renames:
            self.handle.rename_file(index, path)
        if renames and not self.renamed.wait(30):
            raise PeerTimeoutError(f"libtorrent did not place the files of torrent {self.info_hash[:12]} in 30 s")
        if any((self.save_path / path).is_file() for _, path, _ in self._entries(layout)):
            self.handle.force_recheck()
            deadline = time.monotonic() + timeout
            checking = (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)
            while self.handle.status().state in checking and time.monotonic() < deadline:
                time.sleep(0.05)

    def want(self, paths: list[str]):
        """Downloads `paths` (within the model folder) besides what it already wants."""
        layout = self.handle.torrent_file().layout()
        wanted = set(paths)
        priorities = list(self.handle.get_file_priorities())
        for index, path, _ in self._entries(layout):
            if path in wanted:
                priorities[index] = WANTED
        self.handle.prioritize_files(priorities)
        self.handle.resume()
        self.add_peers(sorted(self.peers))  # a torrent that wanted nothing counted as finished and dropped them

    def wait_files(self, paths: list[str], timeout: float, find_peers: Callable[[], list[tuple[str, int]]], what: str):
        """Waits until `paths` are complete, verified and on disk, finding new peers every few seconds; shows a
        progress bar with bytes per second and peers. Raises `SwarmUnavailableError` after `timeout` seconds."""
        sizes = {path: size for path, size in self.files().items() if path in set(paths)}
        deadline, progress_at, last_done, last_peers = time.monotonic() + timeout, time.monotonic(), -1, 0.0
        with tqdm(total=sum(sizes.values()), desc=what, unit="B", unit_scale=True, disable=None) as bar:
            while True:
                done = self._bytes_done(sizes)
                bar.update(done - bar.n)
                status = self.handle.status()
                bar.set_postfix(peers=status.num_peers, refresh=False)
                if done == bar.total:
                    break
                now = time.monotonic()
                if done != last_done:
                    progress_at, last_done = now, done
                elif now - progress_at > STALL_SECONDS:
                    self._restart()
                    progress_at = now
                if now - last_peers > 2.0:
                    self.add_peers(find_peers())
                    last_peers = now
                if now > deadline:
                    raise SwarmUnavailableError(
                        f"{what}: {done} of {bar.total} bytes after {timeout:.0f} s from {status.num_peers} peers"
                    )
                time.sleep(0.1)
        self.flush()

    def _bytes_done(self, sizes: dict[str, int]) -> int:
        progress = self.handle.file_progress()
        return sum(progress[index] for index, path, _ in self._entries(self.handle.torrent_file().layout()) if path in sizes)

    def _restart(self):
        """Re-adds a stalled torrent without the ban list it carries, and connects its peers again: a download can
        stall after libtorrent banned an honest peer along with a corrupt one (blocks of one piece from both). The
        peers banned most often are blocked for good, as long as a peer banned less often is left."""
        known = {f"{host}:{port}" for host, port in self.peers} - self.blocked
        worst = max((self.ban_counts[address] for address in known), default=0)
        suspects = {address for address in known if self.ban_counts[address] == worst}
        if worst > 0 and known - suspects:
            logger.warning(f"Blocking peers {sorted(suspects)} of {self.info_hash[:12]}: banned {worst} times, more than any other")
            self.blocked |= suspects
            self.peers = {peer for peer in self.peers if f"{peer[0]}:{peer[1]}" not in self.blocked}
            self.owner.block({address.rsplit(":", 1)[0] for address in suspects})
        logger.warning(f"Download of {self.info_hash[:12]} stalled (banned: {self.banned}): re-adding it without its bans")
        self.resume.clear()
        self.handle.pause()
        self.handle.save_resume_data(lt.torrent_handle.flush_disk_cache | lt.torrent_handle.save_info_dict)
        if not self.resume.wait(10):
            return
        params = lt.read_resume_data(self.resume_params)
        params.banned_peers = []
        params.flags &= ~lt.torrent_flags.paused
        self.owner.session.remove_torrent(self.handle)
        self.handle = self.owner.session.add_torrent(params)
        self.handle.resume()
        self.banned = []
        self.add_peers(sorted(self.peers))

    def _request_flush(self) -> int:
        with self.flush_done:
            self.flush_requests += 1
            self.handle.flush_cache()
            return self.flush_requests

    def flush(self, timeout: float = 30.0):
        """Waits until every completed piece is written to disk (libtorrent reports files complete earlier)."""
        request = self._request_flush()
        with self.flush_done:
            if not self.flush_done.wait_for(lambda: self.flushes_done >= request, timeout):
                raise PeerTimeoutError(f"libtorrent did not flush torrent {self.info_hash[:12]} to disk in {timeout:.0f} s")
