"""ckpts on S3 (moto on loopback) against s3fs moving the same bytes in parallel: the floor.

Every number here comes from moto, a loopback, in-memory S3 server: not S3's speeds.
What carries over is the ratio to s3fs on the same server in the same run, and the
request counts. Rows, each the median of interleaved rounds (order shuffled per round)
with min/max, the ratio being the median of the per-round ratios:

- save: ``CheckpointManager(url).save`` (sync, a new step each round, one manager for
  the whole run, as in training) against the same files (taken from a local ckpts save
  of the same state) uploaded by s3fs in parallel from memory (``fs.pipe``) and from a
  local folder (``fs.put``); the faster of the two is the floor;
- restore into the live model + optimizer against parallel ranged GETs of the same
  bytes (``fs.cat_ranges`` in PART_SIZE pieces);
- ``load_weights(url)`` against ``fs.cat_file`` of the model's file (one GET) and
  ``fs.cat_ranges`` of it in PART_SIZE pieces (as many GETs as ckpts makes);
- listing a run of ``--checkpoints`` checkpoints (one real tiny checkpoint re-uploaded
  under every step, each manifest's step rewritten) against one recursive listing plus
  a parallel ``fs.cat`` of every manifest; and ``CheckpointManager(url)`` alone against
  that recursive listing alone.

Requests are counted on the client, by botocore operation (``before-call``) and by HTTP
request sent (``before-send``, retries included). The server runs in a child process so
that its request handling does not share this process's GIL with the code being timed.

Run: ``python -m benchmarks.s3_bench [--mb 256] [--reps 5] [--checkpoints 1000]``, or
``make bench-s3``. Writes ``benchmarks/results/s3-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import ckpts
from benchmarks import _measure as ms
from benchmarks import _workloads as wl
from benchmarks._measure import Deferred, Rows, log
from benchmarks.run import HEADER, table_rows
from ckpts.storage import checkpoint_name
from ckpts.storage._fsspec import PART_SIZE
from ckpts.storage._lock import LOCK_FILE

TITLE = ("S3 path on moto (a loopback, in-memory server: these are not S3's speeds; ratios "
         "against s3fs on the same server, same run)")
BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
_SERVER = ("import sys\n"
           "from moto.server import ThreadedMotoServer\n"
           "server = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), "
           "verbose=False)\n"
           "server.start()\n"
           "sys.stdin.read()\n"
           "server.stop()\n")
NOTES = [
    "moto keeps objects in this machine's memory (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE raised "
    "so that none spills to a temporary file) and answers on loopback: no network, no disk. "
    "Absolute times say little about S3; ratios against s3fs in the same run do.",
    "moto reads and copies a whole object for every GET, ranged or not: a 1 KiB ranged GET "
    "of a 171 MiB object took ~80 ms here, of a 1 KiB object ~3.3 ms. So on moto a read "
    "costs per request in proportion to the object's size; S3 does not work that way. "
    "Compare reads with the ranged peers, which make about as many requests.",
    "The server is a child process (ThreadedMotoServer): its Python request handling does "
    "not take this process's GIL, but it does share the machine's cores with the client.",
    "Saves and restores include ckpts' xxh3-128 hashing (on write; checked on read); s3fs "
    "hashes nothing.",
    "Requests are counted on the client: 'ops' are botocore operations, 'HTTP' every "
    "request sent (retries included). A save is counted after the rounds, on the same "
    "manager (steady state: the writer lease already held); a restore includes taking "
    "the lease, as restore() does.",
]


# ---------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def moto_server() -> Iterator[str]:
    """A ThreadedMotoServer on 127.0.0.1 in a child process; yields its endpoint URL."""
    port = _free_port()
    # moto spills objects above 5 MB to temporary files: keep them all in memory
    env = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(2**40)}
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # its request log
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the moto server exited with status {server.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        assert server.stdin is not None
        server.stdin.close()  # the server stops when its stdin ends
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ---------------------------------------------------------------- request counts

# botocore operation -> the HTTP request it is
VERBS = {"PutObject": "PUT", "UploadPart": "PUT", "CopyObject": "PUT",
         "GetObject": "GET", "HeadObject": "HEAD", "HeadBucket": "HEAD",
         "ListObjectsV2": "LIST", "ListObjects": "LIST",
         "CreateMultipartUpload": "POST", "CompleteMultipartUpload": "POST",
         "AbortMultipartUpload": "DELETE", "DeleteObject": "DELETE", "DeleteObjects": "POST"}


class RequestCounter:
    """Counts the requests of every s3fs client it is attached to.

    botocore emits ``before-call`` once per operation and ``before-send`` once per HTTP
    request (each retry again); s3fs' aiobotocore client emits them too, on the one
    fsspec event-loop thread, so the counts need no lock.
    """

    def __init__(self) -> None:
        self.operations: collections.Counter[str] = collections.Counter()
        self.http = 0
        self._clients: set[int] = set()

    def attach(self, fs: Any) -> None:
        """Count ``fs``'s requests from now on (once per client, however often called)."""
        fs.connect()
        client = fs.s3
        if id(client) in self._clients:
            return
        self._clients.add(id(client))
        client.meta.events.register("before-call.s3", self._on_call)
        client.meta.events.register("before-send.s3", self._on_send)

    def _on_call(self, model: Any, params: dict[str, Any], **kwargs: Any) -> None:
        # the writer lease's requests (a renewal may fall into any window) are told apart
        lease = str(params.get("url_path", "")).split("?")[0].endswith(LOCK_FILE)
        self.operations[model.name + (" (lease)" if lease else "")] += 1

    def _on_send(self, **kwargs: Any) -> None:
        self.http += 1

    @contextmanager
    def counting(self, into: dict[str, Any], key: str) -> Iterator[None]:
        """Put the requests made inside the block under ``into[key]``."""
        before, http = collections.Counter(self.operations), self.http
        yield
        ops = self.operations - before
        verbs: collections.Counter[str] = collections.Counter()
        for name, count in ops.items():
            operation, _, lease = name.partition(" ")
            verbs[VERBS.get(operation, operation) + (" " + lease if lease else "")] += count
        into[key] = {"http": self.http - http, "by_verb": dict(sorted(verbs.items())),
                     "by_operation": dict(sorted(ops.items()))}


# ---------------------------------------------------------------- the state


def shapes_for_mb(mb: float) -> list[tuple[str, tuple[int, ...]]]:
    """Transformer-like parameter shapes whose fp32 params + AdamW state make ~``mb`` MB.

    Blocks of width 1024 as in the 'standard' workload (tensors of 320 KB to 16 MB)
    while at least two fit; narrower below that; the embedding takes the remainder.
    """
    params = mb * 1e6 / 12  # fp32 param + exp_avg + exp_avg_sq
    width = next((w for w in (1024, 512, 256) if 2 * 12 * w * w <= params), 128)
    norm_rows, positions = 80, 256
    block = 12 * width * width + norm_rows * width
    blocks = max(1, int((params - positions * width) // block))
    if blocks > 1 and params - blocks * block < 256 * width:
        blocks -= 1
    vocab = max(256, int((params - blocks * block) // width) - positions)
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (vocab, width)),
                                                 ("pos", (positions, width))]
    for b in range(blocks):
        shapes += [(f"h{b}_qkv", (3 * width, width)), (f"h{b}_proj", (width, width)),
                   (f"h{b}_fc1", (4 * width, width)), (f"h{b}_fc2", (width, 4 * width)),
                   (f"h{b}_norms", (norm_rows, width))]
    return shapes


def build_state(mb: float) -> wl.Workload:
    """A Workload (see benchmarks._workloads.build) of ``shapes_for_mb(mb)``."""
    gen = torch.Generator().manual_seed(0)
    model = wl.StateModule({name: torch.empty(shape).normal_(0.0, 0.02, generator=gen)
                            for name, shape in shapes_for_mb(mb)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(generator=gen)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    return wl.Workload(f"{mb:g}MB", model, optimizer)


# ---------------------------------------------------------------- the bench


class S3Bench:
    """One moto server, one bucket, the floor's s3fs filesystem and the request counter."""

    def __init__(self, endpoint: str, workdir: Path) -> None:
        import fsspec

        self.workdir = workdir
        self.options: dict[str, Any] = {
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        # load_weights(url) and compare() take no storage_options: they find moto this way
        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        self.fs = fsspec.filesystem("s3", **self.options)
        self.fs.call_s3("create_bucket", Bucket=BUCKET)
        self.counter = RequestCounter()
        self.counter.attach(self.fs)
        self.requests: dict[str, Any] = {}
        self._prefixes = iter(range(1, 10**9))

    def url(self, run: str) -> str:
        return f"s3://{BUCKET}/{run}"

    def manager(self, run: str) -> ckpts.CheckpointManager:
        manager = ckpts.CheckpointManager(self.url(run), storage_options=self.options)
        self.counter.attach(manager.storage.fs)  # type: ignore[attr-defined]
        return manager

    def remove(self, prefix: str) -> Deferred:
        """Untimed clean-up: moto holds every object in memory."""
        return Deferred(lambda: self.fs.rm(f"{BUCKET}/{prefix}", recursive=True))

    def fresh_prefix(self, kind: str) -> str:
        return f"floor-{kind}-{next(self._prefixes)}"


def local_files(w: wl.Workload, workdir: Path) -> tuple[Path, dict[str, bytes]]:
    """The files of a local ckpts save of ``w`` (the floor uploads these very bytes)."""
    local = ckpts.CheckpointManager(workdir / "local")
    saved = local.save(1, ckpts.TrainState(model=w.model, optimizer=w.optimizer))
    local.close()
    assert saved is not None
    folder = Path(saved.path)
    return folder, {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def save_phase(b: S3Bench, w: wl.Workload, reps: int, rows: Rows, info: dict[str, Any]
               ) -> ckpts.CheckpointManager:
    folder, files = local_files(w, b.workdir)
    info["files"] = {name: len(data) for name, data in files.items()}
    manager = b.manager("run")
    state = ckpts.TrainState(model=w.model, optimizer=w.optimizer)
    steps = iter(range(1, 10**9))

    def ckpts_save(_: Path) -> Deferred:
        step = next(steps)
        manager.save(step, state)
        return b.remove(f"run/{checkpoint_name(step)}")

    def pipe(_: Path) -> Deferred:  # from memory, as ckpts saves
        prefix = b.fresh_prefix("pipe")
        b.fs.pipe({f"{BUCKET}/{prefix}/{name}": data for name, data in files.items()})
        return b.remove(prefix)

    def put(_: Path) -> Deferred:  # from the local files (page cache)
        prefix = b.fresh_prefix("put")
        b.fs.put([str(folder / name) for name in files],
                 [f"{BUCKET}/{prefix}/{name}" for name in files])
        return b.remove(prefix)

    times = ms.run_rounds({"ckpts": ckpts_save, "pipe": pipe, "put": put}, reps, b.workdir,
                          label="save", warmup=True)
    floor = "pipe" if times["pipe"].median <= times["put"].median else "put"
    info["save_floor"] = floor
    labels = {"pipe": "s3fs pipe({path: bytes}) of the same files, from memory",
              "put": "s3fs put(local files) of the same files"}
    for name in (floor, "put" if floor == "pipe" else "pipe"):
        rows.add("save (sync, new step)", times["ckpts"],
                 labels[name] + (" (floor)" if name == floor else ""), times[name])
    for key, op in (("ckpts save (steady state)", ckpts_save),
                    (f"floor save (s3fs {floor})", pipe if floor == "pipe" else put)):
        with b.counter.counting(b.requests, key):
            clean_up = op(b.workdir)
        clean_up.finish()
    return manager


def restore_phase(b: S3Bench, w: wl.Workload, manager: ckpts.CheckpointManager, reps: int,
                  rows: Rows, info: dict[str, Any]) -> None:
    expected = wl.fingerprint(w)
    step = 10**8  # kept for the restores, after every save round's step
    manager.save(step, ckpts.TrainState(model=w.model, optimizer=w.optimizer))
    manager.close()  # restore() takes the writer lease: a resumed run is a new writer
    sizes = info["files"]
    paths = [f"{BUCKET}/run/{checkpoint_name(step)}/{name}" for name in sizes]
    pieces = [(path, start, min(start + PART_SIZE, size))
              for path, size in zip(paths, sizes.values(), strict=True)
              for start in range(0, size, PART_SIZE)]
    model_file = next(p for p in paths if p.endswith("/model.safetensors"))
    model_pieces = [piece for piece in pieces if piece[0] == model_file]
    target = wl.restore_target(w)
    state = ckpts.TrainState(model=target.model, optimizer=target.optimizer)
    floor_key = f"floor restore (cat_ranges, {len(pieces)} pieces)"
    with b.counter.counting(b.requests, floor_key):
        b.fs.cat_ranges([p[0] for p in pieces], [p[1] for p in pieces], [p[2] for p in pieces])
    reader = b.manager("run")
    url = f"{b.url('run')}/{checkpoint_name(step)}"
    # what load_weights(url) uses
    b.counter.attach(ckpts.storage.FsspecStorage(b.url("run"), {}).fs)

    ops: dict[str, ms.Op] = {
        "restore": lambda _: reader.restore(state, step=step),
        "ranged": lambda _: b.fs.cat_ranges([p[0] for p in pieces], [p[1] for p in pieces],
                                            [p[2] for p in pieces]),
        "weights": lambda _: ckpts.load_weights(url, target.model),
        "cat_file": lambda _: b.fs.cat_file(model_file),
        "model_ranged": lambda _: b.fs.cat_ranges(
            [p[0] for p in model_pieces], [p[1] for p in model_pieces],
            [p[2] for p in model_pieces])}
    for key, op, model_only in (("ckpts restore", ops["restore"], False),
                                ("load_weights", ops["weights"], True)):
        wl.scramble(target)
        with b.counter.counting(b.requests, key):
            op(b.workdir)
        want = {k: v for k, v in expected.items() if k.startswith("model.") or not model_only}
        bad = wl.mismatches(want, wl.fingerprint(target, model_only=model_only))
        if bad:
            raise RuntimeError(f"{key} restored wrong values in {len(bad)} tensors: {bad[:5]}")
    times = ms.run_rounds(ops, reps, b.workdir, label="restore")
    rows.add("restore into live model + optimizer", times["restore"],
             f"s3fs cat_ranges of the same files in {PART_SIZE >> 20} MiB pieces (floor)",
             times["ranged"])
    rows.add("load_weights(url)", times["weights"], "s3fs cat_file(model.safetensors) (floor)",
             times["cat_file"])
    rows.add("load_weights(url)", times["weights"],
             f"s3fs cat_ranges of model.safetensors in {PART_SIZE >> 20} MiB pieces",
             times["model_ranged"])
    reader.close()


def make_listing_run(b: S3Bench, count: int) -> str:
    """One real tiny checkpoint, re-uploaded under steps 2..count with rewritten manifests."""
    model = torch.nn.Linear(16, 4)
    state = ckpts.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()))
    manager = b.manager("listing")
    first = manager.save(1, state, metrics={"val_loss": 1.0}, epoch=0)
    manager.close()
    assert first is not None
    prefix = f"{BUCKET}/listing"
    files = {path.rsplit("/", 1)[1]: bytes(data) for path, data in
             b.fs.cat(b.fs.find(f"{prefix}/{checkpoint_name(1)}")).items()}
    objects: dict[str, bytes] = {}
    for step in range(2, count + 1):
        manifest = json.loads(files["manifest.json"])
        manifest.update(step=step, epoch=step // 100,
                        metrics={"val_loss": 1.0 / step + (step % 7) * 1e-3})
        for name, data in files.items():
            encoded = json.dumps(manifest).encode() if name == "manifest.json" else data
            objects[f"{prefix}/{checkpoint_name(step)}/{name}"] = encoded
    b.fs.pipe(objects)
    return prefix


def listing_phase(b: S3Bench, count: int, reps: int, rows: Rows, info: dict[str, Any]) -> None:
    started = time.perf_counter()
    prefix = make_listing_run(b, count)
    info["listing_made_s"] = round(time.perf_counter() - started, 1)

    def ckpts_list(_: Path) -> None:
        found = ckpts.CheckpointManager(b.url("listing"), storage_options=b.options).checkpoints()
        if len(found) != count:
            raise RuntimeError(f"listed {len(found)} checkpoints of {count}")

    def floor(_: Path) -> None:
        b.fs.invalidate_cache()
        manifests = [p for p in b.fs.find(prefix) if p.endswith("/manifest.json")]
        b.fs.cat(manifests)

    def ckpts_open(_: Path) -> None:
        ckpts.CheckpointManager(b.url("listing"), storage_options=b.options)

    def find(_: Path) -> None:
        b.fs.invalidate_cache()
        b.fs.find(prefix)

    with b.counter.counting(b.requests, f"CheckpointManager(url) on {count} checkpoints"):
        manager = b.manager("listing")
    with b.counter.counting(b.requests, f"manager.checkpoints() of {count}"):
        manager.checkpoints()
    with b.counter.counting(b.requests, f"floor listing (find + cat of {count} manifests)"):
        floor(b.workdir)
    times = ms.run_rounds({"ckpts": ckpts_list, "floor": floor, "open": ckpts_open,
                           "find": find}, reps, b.workdir, label="listing")
    rows.add(f"CheckpointManager(url).checkpoints(), {count} checkpoints", times["ckpts"],
             f"s3fs find + parallel cat of the {count} manifests (floor)", times["floor"])
    rows.add(f"CheckpointManager(url) alone (in the row above), {count} checkpoints",
             times["open"],
             "s3fs find of the run (its list pages)", times["find"])
    b.fs.rm(prefix, recursive=True)


# ---------------------------------------------------------------- output


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(shutil.get_terminal_size().columns, 150))
    info = result["info"]
    table = Table(title=f"{TITLE}\n{info['params'] / 1e6:.1f} M params, {info['tensors']} "
                  f"tensors, {info['state_bytes'] / 1e6:.0f} MB of state in "
                  f"{len(info['files'])} files, {result['reps']} reps", title_justify="left")
    for i, name in enumerate(HEADER):
        table.add_column(name, justify="right" if i in (1, 3, 4) else "left")
    for cells in table_rows({"state_bytes": info["state_bytes"], "rows": result["rows"]}):
        table.add_row(*cells)
    console.print(table)
    requests = Table(title="Requests (counted on the client)", title_justify="left")
    for name in ("operation", "HTTP", "by verb", "by botocore operation"):
        requests.add_column(name, justify="right" if name == "HTTP" else "left")
    for name, counts in result["requests"].items():
        requests.add_row(name, str(counts["http"]),
                         ", ".join(f"{k} {v}" for k, v in counts["by_verb"].items()),
                         ", ".join(f"{k} {v}" for k, v in counts["by_operation"].items()))
    console.print(requests)
    console.print(f"Machine: {wl.machine_line(result['machine'])}")
    for note in NOTES:
        console.print(f"- {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256.0,
                        help="MB of training state: fp32 params + AdamW (default 256)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--checkpoints", type=int, default=1000,
                        help="checkpoints in the listed run (default 1000)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.reps < 1 or args.mb <= 0 or args.checkpoints < 1:
        parser.error("--reps, --mb and --checkpoints must be positive")
    started = time.perf_counter()
    w = build_state(args.mb)
    info: dict[str, Any] = {"params": w.n_params, "tensors": len(w.flat()),
                            "state_bytes": w.nbytes()}
    rows = Rows(info["state_bytes"])
    with tempfile.TemporaryDirectory(prefix="ckpts-s3-bench-") as tmp, \
            moto_server() as endpoint:
        machine = wl.machine(Path(tmp))
        b = S3Bench(endpoint, Path(tmp))
        log(f"== {info['state_bytes'] / 1e6:.0f} MB of state, moto at {endpoint}")
        manager = save_phase(b, w, args.reps, rows, info)
        restore_phase(b, w, manager, args.reps, rows, info)
        del w
        gc.collect()
        listing_phase(b, args.checkpoints, args.reps, rows, info)
    machine["loadavg_at_end"] = os.getloadavg()[0]
    result = {"title": TITLE, "machine": machine, "info": info, "reps": args.reps,
              "rows": list(rows), "requests": b.requests, "notes": NOTES,
              "total_seconds": round(time.perf_counter() - started, 1)}
    print_report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = machine["date"].replace(":", "").replace("+0000", "Z")
    path = args.out / f"s3-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"total {result['total_seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
