"""``ckpts show`` and ``ckpts du``: what a checkpoint holds, where a run's bytes go (no torch).

Both read manifests only: tensor sizes come from each entry's dtype and shape,
file sizes from the byte counts the manifest records. A checkpoint saved by many
ranks (format v3) also shows its world size, each rank's files (their records carry
``rank``) and its per-rank objects; a sharded tensor is listed with its global shape
and its number of shards.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Annotated, Any

import typer
from rich.filesize import decimal

from ckpts._format.catalog import Checkpoint
from ckpts._format.index import LAYOUT, object_index_name, rank_index_name, read_manifest
from ckpts._format.manifest import DTYPE_SIZES
from ckpts._run.usage import physical_bytes, shared_bytes, usage
from ckpts.cli._common import (
    JsonOption,
    format_number,
    json_metrics,
    open_checkpoint_arg,
    open_run,
    print_json,
    print_table,
    printable,
    reports_errors,
    stderr,
    stdout,
)
from ckpts.errors import CheckpointError
from ckpts.storage._port import MANIFEST, Listed, url_protocol


@reports_errors
def show(
    checkpoint: Annotated[str, typer.Argument(
        help="A checkpoint: run/step-*, as a directory or a URL.")],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="List every tensor: key, dtype and shape.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Describe a checkpoint: step, epoch, metrics, tags, versions, objects and files.

    A checkpoint saved by many ranks also lists its files rank by rank and its
    per-rank objects (``rng.rank0``, ``rng.rank1``, ...).
    """
    storage, folder = open_checkpoint_arg(checkpoint)
    manifest = read_manifest(storage, folder)
    summary = Checkpoint.from_manifest(storage, folder, manifest)
    objects = {name: object_summary(obj, with_tensors=tensors)
               for name, obj in manifest["objects"].items()}
    files = {name: record["nbytes"] for name, record in manifest["files"].items()}
    ranks = files_by_rank(manifest)
    per_rank = per_rank_objects(manifest)
    if as_json:
        print_json({
            "path": str(summary.path),
            "step": summary.step,
            "epoch": summary.epoch,
            "created": summary.created.isoformat(),
            "nbytes": summary.nbytes,
            "metrics": json_metrics(summary.metrics),
            "tags": list(summary.tags),
            "versions": manifest.get("versions", {}),
            "world_size": manifest.get("world_size"),
            "per_rank": per_rank,
            "ranks": ranks,
            "objects": objects,
            "files": files,
        })
        return
    versions = manifest.get("versions", {})
    print_table([
        ["path", str(summary.path)],
        ["step", str(summary.step)],
        ["epoch", "" if summary.epoch is None else str(summary.epoch)],
        ["created", summary.created.astimezone().isoformat(sep=" ", timespec="seconds")],
        ["size", decimal(summary.nbytes)],
        ["metrics", ", ".join(f"{k}={format_number(v)}" for k, v in summary.metrics.items())],
        ["tags", ", ".join(summary.tags)],
        ["versions", ", ".join(f"{k} {v}" for k, v in versions.items())],
        ["world size", str(manifest.get("world_size", ""))],
        *([["per-rank objects",
            ", ".join(f"{name} ({', '.join(saved)})" for name, saved in per_rank.items())]]
          if per_rank else []),
    ])
    stdout.print()
    print_table(
        ([name, obj["kind"] or "", obj["class"] or "", str(obj["num_tensors"]),
          decimal(obj["nbytes"]), ", ".join(obj["dtypes"])] for name, obj in objects.items()),
        header=["object", "kind", "class", "tensors", "bytes", "dtypes"], right={3, 4},
    )
    if tensors:
        for name, obj in objects.items():
            stdout.print()
            print_table(
                ([k, e["dtype"], str(e["shape"]), _where(e)] for k, e in obj["tensors"].items()),
                header=["key", "dtype", "shape", "file"], title=f"{name} tensors",
            )
    if ranks:
        stdout.print()
        print_table(([str(row["rank"]), str(len(row["files"])), decimal(row["nbytes"]),
                      ", ".join(row["files"])] for row in ranks),
                    header=["rank", "files", "bytes", "names"], right={0, 1, 2},
                    title="files by rank")
    stdout.print()
    print_table(([name, decimal(nbytes)] for name, nbytes in files.items()),
                header=["file", "size"], right={1})


def _where(tensor: dict[str, Any]) -> str:
    """The file cell of a tensor row: its file, or ``N shards`` for a sharded tensor."""
    return tensor["file"] if "file" in tensor else f"{tensor['shards']} shards"


def files_by_rank(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rank's files and their bytes, in rank order, from the file records' ``rank``
    (format v3); empty for a checkpoint saved by one process."""
    by_rank: dict[int, list[str]] = {}
    for name, record in manifest["files"].items():
        if isinstance(record.get("rank"), int):
            by_rank.setdefault(record["rank"], []).append(name)
    return [{"rank": rank, "files": sorted(names),
             "nbytes": sum(manifest["files"][name]["nbytes"] for name in names)}
            for rank, names in sorted(by_rank.items())]


def per_rank_objects(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Each per-rank object (format v3's ``per_rank``: RNGs, loader positions) and the
    saved copies of it, one per rank: ``{"rng": ["rng.rank0", "rng.rank1"]}``."""
    saved = manifest["objects"]
    return {name: sorted((copy for copy in saved if copy.startswith(f"{name}.rank")
                          and copy[len(name) + 5:].isdigit()),
                         key=lambda copy: int(copy[len(name) + 5:]))
            for name in manifest.get("per_rank", [])}


@reports_errors
def du(
    run: Annotated[str, typer.Argument(help="A run: a directory or a URL.")],
    as_json: JsonOption = False,
) -> None:
    """Disk usage of a run, per checkpoint and in total: logical, physical, shared, savings.

    *logical* is what a checkpoint's files add up to (what copying it takes);
    *physical* counts a file that checkpoints share (a hard link, see ``dedup``) once,
    at the oldest checkpoint holding it, as ``du`` does, so the rows add up to the
    run's size on disk; *shared* is what a checkpoint holds in common with another
    (in the total row: the bytes held by two or more checkpoints, once); *savings*
    is logical - physical. The per-kind columns (module, optimizer, ...) are logical.
    On an object store nothing is shared: physical equals logical.
    """
    storage = open_run(run)
    checkpoints: list[dict[str, Any]] = []
    listed: list[Listed] = []
    for entry in sorted(storage.committed(), key=lambda e: e.step):
        path = storage.where(entry.name)
        try:
            by_kind = bytes_by_kind(read_manifest(storage, entry.name), entry.sizes[MANIFEST])
        except (CheckpointError, OSError) as e:
            stderr.print(printable(f"warning: skipping {path}: {e}"))
            continue
        listed.append(entry)
        checkpoints.append({"step": entry.step, "path": path, "nbytes": sum(by_kind.values()),
                            "by_kind": by_kind})
    for checkpoint, sizes in zip(checkpoints, usage(listed), strict=True):
        checkpoint.update(logical=sizes.logical, physical=sizes.physical, shared=sizes.shared,
                          savings=sizes.savings)
    totals: Counter[str] = Counter()
    for checkpoint in checkpoints:
        totals.update(checkpoint["by_kind"])
    kinds = [kind for kind, _ in totals.most_common()]
    logical = sum(c["logical"] for c in checkpoints)
    physical = physical_bytes(listed)
    total = {"logical": logical, "physical": physical, "shared": shared_bytes(listed),
             "savings": logical - physical}
    if as_json:
        print_json({"path": storage.location, "nbytes": totals.total(),
                    "by_kind": {k: totals[k] for k in kinds}, **total,
                    "checkpoints": checkpoints})
        return
    if not checkpoints:
        stderr.print(f"no checkpoints in {run}")
        return
    columns = ["logical", "physical", "shared"]
    rows = [[str(row["step"]), *(decimal(row[c]) for c in columns),
             _savings(row["savings"], row["logical"]),
             *(decimal(row["by_kind"].get(kind, 0)) for kind in kinds)] for row in checkpoints]
    rows.append(["total", *(decimal(total[c]) for c in columns),
                 _savings(total["savings"], logical), *(decimal(totals[kind]) for kind in kinds)])
    print_table(rows, header=["step", *columns, "savings", *kinds],
                right=set(range(1, 5 + len(kinds))))
    stdout.print(_legend(storage.location))


def _savings(saved: int, logical: int) -> str:
    """A savings cell: bytes and the share of the logical size, ``1.2 GB (75%)``."""
    return f"{decimal(saved)} ({saved / logical:.0%})" if saved and logical else decimal(saved)


def _legend(location: str) -> str:
    """The line under ``du``'s table that says what its columns count."""
    protocol = url_protocol(location)
    if protocol is not None:
        return (f"physical = logical: on {protocol}:// a reused file is a server-side copy (a "
                "full object), so checkpoints share no bytes; per-kind columns are logical")
    return ("physical: on disk, a file shared by checkpoints counted once, at the oldest "
            "(as du does); shared: bytes another checkpoint also holds (in the total, each "
            "shared file once); savings = logical - physical; per-kind columns are logical")


def object_summary(obj: dict[str, Any], *, with_tensors: bool) -> dict[str, Any]:
    """One manifest object in brief: kind, class, tensor count, bytes, dtypes (and tensors)."""
    entries = obj["tensors"]
    summary: dict[str, Any] = {
        "kind": obj.get("kind"),
        "class": obj.get("class"),
        "num_tensors": len(entries),
        "nbytes": sum(tensor_nbytes(e["dtype"], e["shape"]) for e in entries.values()),
        "dtypes": sorted({e["dtype"] for e in entries.values()}),
        "aliases": obj.get("aliases", {}),
    }
    if with_tensors:
        summary["tensors"] = {key: tensor_summary(e) for key, e in entries.items()}
    return summary


def tensor_summary(entry: dict[str, Any]) -> dict[str, Any]:
    """One tensor in brief: dtype, (global) shape, and its file, or for a sharded tensor
    (format v3) the number of shards and the files holding them."""
    summary = {"dtype": entry["dtype"], "shape": entry["shape"]}
    if "shards" not in entry:
        return {**summary, "file": entry["file"]}
    return {**summary, "shards": len(entry["shards"]),
            "files": list(dict.fromkeys(shard["file"] for shard in entry["shards"]))}


def tensor_nbytes(dtype: str, shape: list[int]) -> int:
    """Bytes of a tensor of this safetensors dtype name and shape."""
    return DTYPE_SIZES[dtype] * math.prod(shape)


def bytes_by_kind(manifest: dict[str, Any], manifest_nbytes: int) -> dict[str, int]:
    """A checkpoint's recorded file sizes summed by the kind of object owning each file.

    A shard index and (format v4) an object's own index belong to the object; the
    manifest, and the indexes that hold several objects' tables (v4: ``layout.json``
    and each rank's, which v3 kept in the manifest), count as ``manifest``; unowned
    files as ``other``.
    """
    owner: dict[str, str] = {}
    if LAYOUT in manifest["files"]:
        owner[LAYOUT] = "manifest"
        owner.update({rank_index_name(rank): "manifest"
                      for rank in range(manifest.get("world_size", 1))})
    for name, obj in manifest["objects"].items():
        kind = obj.get("kind") or "object"
        owner[f"{name}.safetensors.index.json"] = kind
        owner.setdefault(object_index_name(name), kind)
        owner.update({piece["file"]: kind for entry in obj["tensors"].values()
                      for piece in entry.get("shards", [entry])})
    totals: Counter[str] = Counter({"manifest": manifest_nbytes})
    for name, record in manifest["files"].items():
        totals[owner.get(name, "other")] += record["nbytes"]
    return dict(totals)
