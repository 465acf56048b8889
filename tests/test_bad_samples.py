"""One sample that does not decode never ends a run, in any format: it is skipped, named once and counted,
and only past data.max_bad_samples does the run stop, with one line."""
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run

from conftest import N_COLOURED_TRAIN, decode_index
from ddmim.cli import main
from ddmim.config import make_config
from ddmim.data.dali_repair import ranks_sharing_cores
from ddmim.data.loader_spec import LoaderSpec

CORRUPT_INDEX = 5  # the source image (and .beton sample) that gets damaged


def damage_in_place(path: Path, offset: int, size: int, how=None) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = (how or damage)(f.read(size))
        f.seek(offset)
        f.write(data)


def damage(data: bytes) -> bytes:
    """JPEG bytes overwritten from the start-of-scan marker on: the headers parse, the decode fails."""
    scan = data.find(b"\xff\xda")
    return data[:scan] + b"\x55" * (len(data) - scan - 2) + data[-2:]


def damage_header(data: bytes) -> bytes:
    """JPEG bytes whose first Huffman table is overwritten with 0xFF bytes: a header DALI must never see."""
    at = data.find(b"\xff\xc4")
    length = int.from_bytes(data[at + 2:at + 4])
    return data[:at + 4] + b"\xff" * (length - 2) + data[at + 2 + length:]


def corrupt_folder(coloured_source: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "folder"
    shutil.copytree(coloured_source, root)
    victim = next((root / "train" / "ant").glob(f"{CORRUPT_INDEX:03d}.JPEG"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    return root, victim


def corrupt_beton(converted: dict, tmp_path: Path) -> Path:
    from ffcv.reader import Reader

    root = tmp_path / "ffcv"
    shutil.copytree(converted["ffcv"], root)
    table = Reader(str(root / "train.beton")).alloc_table
    (offset, size), = [(int(r["ptr"]), int(r["size"])) for r in table if r["sample_id"] == CORRUPT_INDEX]
    damage_in_place(root / "train.beton", offset, size)
    return root


def damage_middle(data: bytes) -> bytes:
    """16 bytes of the compressed data overwritten: libjpeg-turbo decodes through them without an error."""
    at = data.find(b"\xff\xda") + (len(data) - data.find(b"\xff\xda")) // 2
    return data[:at] + bytes(range(7, 7 * 17, 7)) + data[at + 16:]


def corrupt_shard(converted: dict, tmp_path: Path, how=None, checksums: bool = True) -> tuple[Path, str]:
    """A copy of the DALI data with one sample of its second shard damaged (by `how`, default `damage`);
    without `checksums`, the copy is like an older converter's, with no SHARD.crc files."""
    from ddmim.data.dali_format import index_entries

    root = tmp_path / "dali"
    shutil.copytree(converted["dali"], root)
    for sums in [] if checksums else root.glob("*/*.crc"):
        sums.unlink()
    index = sorted((root / "train").glob("*.idx"))[1]
    key, offset, size = index_entries(str(index))[3]
    tar = index.with_suffix(".tar")
    damage_in_place(tar, offset, size, how)
    return root, f"{tar}:{key}"


def epoch_indices(batches, cfg) -> list[int]:
    return [i for x, _ in batches for i in decode_index(x, cfg.data.mean, cfg.data.std)]


@pytest.fixture
def cfg():
    return make_config("tiny", ["train.batch_size=5", "data.num_workers=1"])


def test_folder_loader_skips_a_truncated_jpeg(coloured_source, tmp_path, cfg, capfd):
    from torch.utils.data import DataLoader

    from ddmim.data.folder import open_split
    from ddmim.data.transforms import val_transform

    root, victim = corrupt_folder(coloured_source, tmp_path)
    dataset = open_split(root, "train", val_transform(cfg.model.img_size, cfg.data))
    for _ in range(2):  # named once, however often it is drawn
        seen = epoch_indices(DataLoader(dataset, batch_size=5, num_workers=2), cfg)
        assert len(seen) == N_COLOURED_TRAIN and CORRUPT_INDEX not in seen
    assert dataset.skipped.count == 1
    assert capfd.readouterr().err.count(str(victim)) == 1


def test_ffcv_loader_skips_a_damaged_sample(converted, tmp_path, cfg, capfd):
    from ddmim.data.ffcv_loader import make_loader

    root = corrupt_beton(converted, tmp_path)
    loader = make_loader(root / "train.beton", LoaderSpec.of(cfg), train=False, device=torch.device("cpu"),
                         drop_last=False)
    for _ in range(2):
        seen = epoch_indices([(x.clone(), y.clone()) for x, y in loader], cfg)
        assert len(seen) == N_COLOURED_TRAIN and CORRUPT_INDEX not in seen
    assert loader.skipped.count == 1
    assert capfd.readouterr().err.count(f"train.beton sample {CORRUPT_INDEX} ") == 1


@pytest.mark.parametrize("checksums", [True, False], ids=["checked before reading", "found after DALI failed"])
def test_dali_loader_skips_a_damaged_sample(checksums, converted, tmp_path, cfg, capfd):
    from ddmim.data.dali_loader import open_loader

    root, where = corrupt_shard(converted, tmp_path, checksums=checksums)
    loader = open_loader(root / "train", LoaderSpec.of(cfg), train=False, gpu=False)
    first = epoch_indices(list(loader), cfg)
    second = epoch_indices(list(loader), cfg)
    assert loader.skipped.count == 1 and capfd.readouterr().err.count(where) == 1
    assert len(set(second)) == N_COLOURED_TRAIN - 1 and sorted(second) == sorted(set(second))
    assert set(first) <= set(second) | {-1}


def test_dali_loader_leaves_out_a_damaged_header_before_dali_reads_it(converted, tmp_path, cfg, capfd):
    from ddmim.data.dali_loader import open_loader

    root, where = corrupt_shard(converted, tmp_path, damage_header)
    loader = open_loader(root / "train", LoaderSpec.of(cfg), train=False, gpu=False)
    err = capfd.readouterr().err  # before the first batch: DALI has not read a sample yet
    assert loader.skipped.count == 1 and err.count(where) == 1 and "damaged JPEG header: DHT" in err
    assert loader.shards is not None and where.split(":")[-1] not in "".join(Path(i).read_text()
                                                                             for i in loader.shards[1])
    indices = epoch_indices(list(loader), cfg)
    assert len(indices) == len(set(indices)) == N_COLOURED_TRAIN - 1 and loader.skipped.count == 1


def test_dali_loader_leaves_out_damage_that_dali_decodes_through(converted, tmp_path, cfg, capfd):
    from ddmim.data.dali_loader import open_loader

    unchecked, _ = corrupt_shard(converted, tmp_path / "old", damage_middle, checksums=False)
    loader = open_loader(unchecked / "train", LoaderSpec.of(cfg), train=False, gpu=False)
    assert len(epoch_indices(list(loader), cfg)) == N_COLOURED_TRAIN and loader.skipped.count == 0  # unnoticed
    root, where = corrupt_shard(converted, tmp_path / "new", damage_middle)
    loader = open_loader(root / "train", LoaderSpec.of(cfg), train=False, gpu=False)
    err = capfd.readouterr().err
    assert loader.skipped.count == 1 and err.count(where) == 1 and "CRC-32" in err
    assert len(epoch_indices(list(loader), cfg)) == N_COLOURED_TRAIN - 1


def test_a_checked_shard_is_read_again_only_when_it_changes(converted, tmp_path, cfg, monkeypatch):
    import json as jsonlib

    from ddmim.data.dali_loader import open_loader
    from ddmim.data.dali_repair import _cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, where = corrupt_shard(converted, tmp_path, damage_middle)
    assert open_loader(root / "train", LoaderSpec.of(cfg), train=False, gpu=False).skipped.count == 1
    tar = where.rsplit(":", 1)[0]
    entry = jsonlib.loads(_cache_file(tar).read_text())
    assert len(entry["bad"]) == 1
    _cache_file(tar).write_text(jsonlib.dumps({**entry, "bad": []}))  # a planted answer: read, not recomputed
    assert open_loader(root / "train", LoaderSpec.of(cfg), train=False, gpu=False).skipped.count == 0
    Path(tar).touch()  # a changed shard is read again
    assert open_loader(root / "train", LoaderSpec.of(cfg), train=False, gpu=False).skipped.count == 1


@pytest.mark.parametrize("fmt", ["folder", "ffcv", "dali"])
def test_training_goes_on_past_a_bad_sample_and_stops_past_the_limit(fmt, coloured_source, converted, tmp_path,
                                                                     capsys):
    root = {"folder": lambda: corrupt_folder(coloured_source, tmp_path)[0],
            "ffcv": lambda: corrupt_beton(converted, tmp_path),
            "dali": lambda: corrupt_shard(converted, tmp_path)[0]}[fmt]()
    base = ["train", "--data", str(root), "--preset", "tiny", "--batch-size", "8", "--workers", "1", "--epochs", "1",
            "--no-progress", "--set", "train.log_every=1"]
    assert main([*base, "--out", str(tmp_path / "run")]) == 0
    rows = (tmp_path / "run" / "logs" / "metrics.csv").read_text()
    assert "data/skipped_samples" in rows
    assert main([*base, "--out", str(tmp_path / "strict"), "--set", "data.max_bad_samples=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ddmim: error: stopped: 1 samples could not be decoded, more than data.max_bad_samples")


def _dali_rank(rank: int, port: int, root: str, out: str) -> None:  # one process of the two-rank tests
    import json as jsonlib
    import os

    import torch.distributed as dist

    from ddmim.data.bad_samples import SkippedSamples
    from ddmim.data.dali_format import list_shards, sample_count
    from ddmim.data.dali_loader import open_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    waited = []  # per all-reduce: whether the caller waited for it
    all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: waited.append(not k.get("async_op")) or all_reduce(*a, **k)
    cfg = make_config("tiny", ["train.batch_size=5", "data.num_workers=1"])
    folder = Path(root) / "train"
    skipped = SkippedSamples(sample_count(list_shards(folder)[1]))
    loader = open_loader(folder, LoaderSpec.of(cfg), train=True, gpu=False, skipped=skipped, shard_id=rank,
                         num_shards=2, group=dist.new_group(backend="gloo"))
    counts = [sum(1 for _ in loader) for _ in range(3)]
    lists = [Path(i).read_text() for i in loader.shards[1]] if loader.shards else None
    Path(out, f"rank{rank}.json").write_text(jsonlib.dumps({"counts": counts, "indexes": lists,
                                                            "failed": skipped.failed(), "waited": waited}))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["found after DALI failed", "checksum", "header"])
def test_data_parallel_ranks_repair_a_dali_split_together(how, converted, tmp_path, capfd):
    """The rank that meets the bad JPEG (or checks its shard) and the one that does not: same step, same
    filtered list, same counts, and the sample named once. The ranks wait for each other once an epoch (its
    batch count); the exchange after each batch runs in the background."""
    import json as jsonlib
    import socket

    import torch.multiprocessing as mp

    root, where = corrupt_shard(converted, tmp_path, damage_header if how == "header" else damage,
                                checksums=how != "found after DALI failed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dali_rank, args=(port, str(root), str(tmp_path)), nprocs=2, join=True)
    ranks = [jsonlib.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["counts"] == ranks[1]["counts"] and len(set(ranks[0]["counts"])) == 1
    assert ranks[0]["indexes"] is not None and ranks[0]["indexes"] == ranks[1]["indexes"]
    assert ranks[0]["failed"] == ranks[1]["failed"] and len(ranks[0]["failed"]) == 1  # one sample, on both
    assert capfd.readouterr().err.count(where) == 1
    for rank in ranks:
        assert rank["waited"].count(True) == 3 and rank["waited"].count(False) == sum(rank["counts"])


def test_the_checks_before_dali_split_only_the_cores_ranks_share():
    """8 nodes of 8 ranks: each rank checks on an eighth of its node, not a 64th; ranks bound to cores of their
    own (SLURM --cpu-bind) each use all of theirs."""
    node = frozenset(range(64))
    unbound = [(f"node{n}", node) for n in range(8) for _ in range(8)]
    assert ranks_sharing_cores(("node3", node), unbound) == 8
    bound = [(f"node{n}", frozenset(range(8 * r, 8 * r + 8))) for n in range(8) for r in range(8)]
    assert ranks_sharing_cores(("node3", frozenset(range(16, 24))), bound) == 1
    half = [("a", frozenset(range(4))), ("a", frozenset(range(4))), ("a", frozenset(range(4, 8)))]
    assert ranks_sharing_cores(half[0], half) == 2


def test_a_data_parallel_ranks_folder_workers_start_from_a_forkserver_not_a_fork_of_the_rank(sample_root):
    import torch.distributed as dist

    from ddmim.data.folder import FolderDataModule, train_loader

    spec = LoaderSpec.of(make_config("tiny", ["data.num_workers=1"]))
    data = FolderDataModule(sample_root, spec)
    # no process group (one process, or ranks simulated in it): no communication threads, so workers are forked
    assert train_loader(data.train_set, spec, rank=1, world=2).multiprocessing_context is None
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert train_loader(data.train_set, spec, rank=1, world=2).multiprocessing_context.get_start_method() == (
            "forkserver")
        assert train_loader(data.train_set, spec).multiprocessing_context is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["folder", "ffcv", "dali"])
def test_a_bad_sample_under_data_parallel_training_neither_hangs_nor_counts_twice(fmt, coloured_source, converted,
                                                                                  tmp_path):
    import csv
    import sys

    root = {"folder": lambda: corrupt_folder(coloured_source, tmp_path)[0],
            "ffcv": lambda: corrupt_beton(converted, tmp_path),
            "dali": lambda: corrupt_shard(converted, tmp_path)[0]}[fmt]()
    cmd = [sys.executable, "-m", "ddmim", "train", "--data", str(root), "--preset", "tiny", "--batch-size", "4",
           "--workers", "1", "--epochs", "3", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
           "--no-progress", "--set", "train.log_every=1"]
    done = run([*cmd, "--out", str(tmp_path / "run")], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = [float(r["data/skipped_samples"]) for r in csv.DictReader(open(tmp_path / "run" / "logs" /
                                                                            "metrics.csv"))
              if r.get("data/skipped_samples")]
    assert counts and max(counts) == 1.0  # both ranks read the sample over three epochs: one sample, counted once
    strict = run([*cmd, "--out", str(tmp_path / "strict"), "--set", "data.max_bad_samples=0"], timeout=600)
    assert strict.returncode != 0 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
    errors = [line for line in strict.stderr.splitlines() if line.startswith("ddmim: error")]
    assert errors and all("1 samples could not be decoded" in e or "rank" in e for e in errors), errors


def _resumed_rank(rank: int, port: int, root: str, out: str) -> None:  # one process of the resume test below
    import json as jsonlib
    import os

    import torch.distributed as dist

    from ddmim.data.dali_format import list_shards
    from ddmim.data.dali_loader import open_loader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = make_config("tiny", ["train.batch_size=5", "data.num_workers=1"])
    folder = Path(root) / "train"

    def loader():
        return open_loader(folder, LoaderSpec.of(cfg), train=True, gpu=False, shard_id=rank, num_shards=2,
                           group=dist.new_group(backend="gloo"))

    first = loader()
    stream = iter(first)
    next(stream), next(stream)
    state = first.state_at(2)
    tar, index = list_shards(folder)[0][0], list_shards(folder)[1][0]
    where = f"{tar}:{Path(index).read_text().splitlines()[1].split()[3].rsplit('.', 1)[0]}"
    state["ranks"][0]["unsettled"] = [(0, where, "planted")]  # rank 0's batch failed; the exchange not yet read
    resumed = loader()
    resumed.restore(state, 2)
    lines = [Path(i).read_text() for i in resumed.shards[1]]
    Path(out, f"resumed{rank}.json").write_text(jsonlib.dumps({
        "left_out": sorted(resumed.left_out), "indexes": lines, "failed": resumed.skipped.failed(),
        "repaired": resumed.repaired, "batches": sum(1 for _ in resumed), "where": where}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_resume_between_a_failed_batch_and_the_ranks_agreeing_leaves_out_the_sample_on_every_rank(converted,
                                                                                                    tmp_path):
    """A checkpoint taken after a rank's batch failed but before the ranks read their exchange: every rank
    resumes over the same list without the sample (as the run would have gone on), counts it, and starts the
    next epoch with a pass of its own."""
    import json as jsonlib
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resumed_rank, args=(port, str(converted["dali"]), str(tmp_path)), nprocs=2, join=True)
    ranks = [jsonlib.loads((tmp_path / f"resumed{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["left_out"] == ranks[1]["left_out"] == [ranks[0]["where"]]
    assert ranks[0]["indexes"] == ranks[1]["indexes"]
    assert ranks[0]["failed"] == ranks[1]["failed"] == [0]
    assert ranks[0]["repaired"] and ranks[1]["repaired"] and ranks[0]["batches"] == ranks[1]["batches"] > 0
