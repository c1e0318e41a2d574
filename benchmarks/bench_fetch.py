"""Model distribution over 127.0.0.1, each figure next to its baseline from the same run.

    python benchmarks/bench_fetch.py [--megabytes 500] [--cap 8] [--work-dir DIR]

1. **One seeder, no cap.** A random Llama of about `--megabytes` MB, published by `python -m swarm.publish`
   (127.0.0.2), fetched whole by this process (127.0.0.9) with swarm's fetch; against `cp -r` of the published
   folder, and a plain HTTP download of the same files from one peer (`python -m http.server` on 127.0.0.3).
   Where the time goes: the lookup and metadata, the transfer, the last flush to disk, and the CPU seconds of
   each side (the downloader verifies every piece with SHA-256; both sides run libtorrent's protocol over
   16 KiB blocks).
2. **Capped uploads.** Each seeder's upload limited to `--cap` MB/s (libtorrent's own rate limit, standing in
   for home uplinks): the whole model from one seeder, then from three (the publisher and two
   `python -m swarm.fetch --seed` peers on 127.0.0.4 and .5). Target: three seeders >= 2.5x one.
3. **Server start.** `python -m swarm.server NAME --blocks 0:N/2` until its `ready:` line, with an empty cache
   (it fetches half the blocks, the client and small files) and again with the files cached.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import hivemind
import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.distribution.fetch import fetch_files
from swarm.distribution.torrents import TorrentSession
from swarm.launch import PeerProcess, launch_server, start_bootstrap

NAME = "bench-fetch"


def make_model(directory: Path, megabytes: int) -> Path:
    """A random Llama of about `megabytes` MB in float32 (1024 wide, 10 layers when 500 MB)."""
    per_layer = 12 * 1024 * 1024 * 4 + 8192 * 1024 * 8 // 10  # attention and MLP; embeddings spread over layers
    layers = max(2, round(megabytes * 1e6 / per_layer))
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="100GB")
    return directory


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def cpu_seconds(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(sum(item.cpu_times()[:2]) for item in [process, *process.children(recursive=True)])


def fetch_all(dht, host: str, destination: Path, timeout: float = 1800) -> dict:
    """Fetches every file; returns the phases' seconds and this process's CPU seconds."""
    session = TorrentSession(host)
    own = psutil.Process()
    cpu_before, started = sum(own.cpu_times()[:2]), time.perf_counter()
    try:
        fetched = fetch_files(dht, session, NAME, lambda manifest: sorted(manifest.files), destination, timeout=timeout)
        total = time.perf_counter() - started
        status = fetched.torrent.handle.status()
        return {"seconds": total, "cpu": sum(own.cpu_times()[:2]) - cpu_before, "bytes": status.total_payload_download}
    finally:
        session.close()


def http_download(folder: Path, host: str, destination: Path) -> float:
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "0", "--bind", host, "--directory", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        port = int(server.stdout.readline().split("port ")[1].split()[0])
        started = time.perf_counter()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                target = destination / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(f"http://{host}:{port}/{path.relative_to(folder).as_posix()}") as response:
                    with open(target, "wb") as file:
                        shutil.copyfileobj(response, file, 1 << 20)
        return time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(10)


def rate(size: int, seconds: float) -> str:
    return f"{size / seconds / 1e6:8.1f} MB/s  ({seconds:6.2f} s)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=500, help="size of the random model")
    parser.add_argument("--cap", type=float, default=8.0, help="each seeder's upload limit in the capped runs, MB/s")
    parser.add_argument("--work-dir", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    bootstrap, peers = start_bootstrap()
    processes: list[PeerProcess] = [bootstrap]
    dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True)
    try:
        print(f"making a random Llama of about {args.megabytes} MB in {work} ...", flush=True)
        model = make_model(work / "model", args.megabytes)

        def publisher(cap: float, name_dir: str) -> PeerProcess:
            process = PeerProcess(
                ["-m", "swarm.publish", str(model), "--name", NAME, "--initial-peers", *peers, "--host", "127.0.0.2",
                 "--work-dir", str(work / name_dir), "--upload-limit", str(int(cap * 1e6))], name="publisher",
            )  # fmt: skip
            processes.append(process)
            process.wait_for(r"published: ", timeout=1800)
            return process

        started = time.perf_counter()
        seeder = publisher(0, "published")
        print(f"published (split, hashed) in {time.perf_counter() - started:.1f} s", flush=True)
        published = work / "published" / "model"
        size = folder_bytes(published)

        started = time.perf_counter()
        shutil.copytree(published, work / "copy")
        copy_seconds = time.perf_counter() - started
        http_seconds = http_download(published, "127.0.0.3", work / "http")
        seeder_cpu = cpu_seconds(seeder.pid)
        swarm_fetch = fetch_all(dht, "127.0.0.9", work / "fetched-1")
        seeder_cpu = cpu_seconds(seeder.pid) - seeder_cpu
        seeder.stop()

        capped = publisher(args.cap, "published-capped")
        one = fetch_all(dht, "127.0.0.10", work / "fetched-capped-1")
        for index in (4, 5):  # two more seeders, from copies of the files (checked against their hashes, not downloaded)
            cache = work / f"seeder-{index}"
            shutil.copytree(published, cache)
            helper = PeerProcess(
                ["-m", "swarm.fetch", NAME, "--seed", "--cache-dir", str(cache), "--host", f"127.0.0.{index}",
                 "--upload-limit", str(int(args.cap * 1e6)), "--initial-peers", *peers], name=f"seeder {index}",
            )  # fmt: skip
            processes.append(helper)
            helper.wait_for("seeding it", timeout=1800)
        three = fetch_all(dht, "127.0.0.11", work / "fetched-capped-3")
        for process in processes[1:]:
            process.stop()
        del processes[1:]

        seeder = publisher(0, "published-again")
        blocks = f"0:{max(1, len(list(published.glob('block-*.safetensors'))) // 2)}"
        timings = []
        for attempt in ("empty cache", "files cached"):
            started = time.perf_counter()
            server = launch_server(NAME, blocks, peers, "--cache-dir", str(work / "server-cache"), host="127.0.0.6")
            processes.append(server)
            server.wait_ready(1800)
            timings.append((attempt, time.perf_counter() - started))
            server.stop()
            processes.remove(server)

        print(f"\n== {size / 1e6:.0f} MB ({len(list(published.iterdir()))} files) over 127.0.0.1, {psutil.cpu_count()} CPUs ==")
        print(f"{'one seeder, no cap':40s}")
        print(f"  {'cp -r':38s}{rate(size, copy_seconds)}")
        print(f"  {'HTTP from one peer (http.server)':38s}{rate(size, http_seconds)}")
        print(f"  {'swarm fetch (libtorrent)':38s}{rate(size, swarm_fetch['seconds'])}")
        print(f"    CPU seconds: downloader {swarm_fetch['cpu']:.1f}, seeder {seeder_cpu:.1f}"
              f" (of {swarm_fetch['seconds']:.1f} s wall on {psutil.cpu_count()} CPUs)")
        print(f"each seeder capped at {args.cap:.0f} MB/s")
        print(f"  {'one seeder':38s}{rate(size, one['seconds'])}")
        print(f"  {'three seeders':38s}{rate(size, three['seconds'])}")
        speedup = one["seconds"] / three["seconds"]
        print(f"  {'three / one':38s}{speedup:8.2f}x   target >= 2.5x: {'PASS' if speedup >= 2.5 else 'FAIL'}")
        print(f"server {blocks} from `swarm.server {NAME}` to ready:")
        for attempt, seconds in timings:
            print(f"  {attempt:38s}{seconds:8.1f} s")
    finally:
        for process in reversed(processes):
            process.stop()
        dht.shutdown()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
