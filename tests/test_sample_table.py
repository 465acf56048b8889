"""The compact listing store gives back exactly the (path, label) pairs put in, in their order, in far less
memory than the tuples it replaces."""
import os
import pickle
import random
import sys

from ddmim.data.layout import list_tree
from ddmim.data.pixels import EXTENSIONS
from ddmim.data.sample_refs import member
from ddmim.data.sample_table import table

ODD = os.fsdecode(b"/data/caf\xe9/na\xefve.jpg")  # a Latin-1 name: not UTF-8, read back through surrogateescape


def test_every_kind_of_path_comes_back_exactly_and_in_order():
    samples = [("/data/a/1.jpg", 3), ("/data/a/2.jpg", -2), ("bare.png", 0), ("/x.jpg", 7), (ODD, 1),
               (member("/shards/s-0.tar", 1536, 900, "dir/key.with.dots.jpg"), 4), ("/data/a/3.jpg", 2**31 - 1)]
    stored = table(samples)
    assert list(stored) == samples and len(stored) == len(samples) and stored[-1] == samples[-1]
    assert stored[1:4] == samples[1:4] and pickle.loads(pickle.dumps(stored))[:] == samples
    assert stored.folders.count("/data/a/") == 1  # a folder is kept once
    chosen = [i % 3 == 0 for i in range(len(samples))]
    rest, picked = stored.split(chosen)
    assert list(picked) == samples[::3] and list(rest) == [s for i, s in enumerate(samples) if i % 3]


def test_ten_thousand_paths_take_a_fraction_of_their_tuples_memory():
    samples = [(f"/datasets/imagenet/train/n{n // 1300:08d}/n{n // 1300:08d}_{n}.JPEG", n // 1300)
               for n in range(10_000)]
    stored = table(samples)
    tuples = sum(sys.getsizeof(t) + sys.getsizeof(t[0]) for t in samples) + sys.getsizeof(samples)
    arrays = sum(a.nbytes for a in (stored.folder_ids, stored.names, stored.ends, stored.labels))
    assert arrays * 4 < tuples and list(stored) == samples


def test_a_tree_is_listed_in_the_order_of_its_sorted_paths(tmp_path):
    names = ["a.jpg", "a/b.jpg", "a-b.jpg", "a/b/c.jpg", "a.b/c.jpg", "ab/d.png", "Z.jpg", "a/b-c.jpg", "a/b.c/d.jpg"]
    for name in random.Random(0).sample(names, len(names)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    listed = [p for p, _ in list_tree(tmp_path, EXTENSIONS).files]
    assert listed == sorted(str(tmp_path / n) for n in names)
