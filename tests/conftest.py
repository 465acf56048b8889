import gc
import multiprocessing.popen_forkserver
import multiprocessing.popen_spawn_posix
import os
import subprocess
import sys

# FFCV JIT-compiles its pipeline in every process and for every loader; on the tests' tiny images LLVM's
# optimisation passes cost more than they save (a 30-step FFCV run: 26.6 s, 22.7 s without them). Set before
# numba is imported, and inherited by the processes the tests start.
os.environ.setdefault("NUMBA_OPT", "0")

import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; it must be chosen before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one core per pytest-xdist worker, for its processes too: torch's threads would otherwise fight the other
    # worker's for the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

from pathlib import Path

import pytest

from ddmim.config import make_config
from ddmim.data.sample_digits import build_sample_dataset
from ddmim.train.launch import Launch


class InterpreterStarted(AssertionError):
    """A test that is not marked slow started a Python interpreter."""


def _starts_python(args) -> bool:
    program = os.path.basename(str(args if isinstance(args, (str, bytes)) else args[0]))
    return program == os.path.basename(sys.executable) or program.startswith(("python", "torchrun"))


class InterpreterWatch:
    """While active, starting a Python interpreter (a subprocess or a spawned multiprocessing worker) raises
    InterpreterStarted and is recorded in `seen`."""

    def __init__(self, name: str):
        self.name, self.seen = name, []
        self.patched = [(subprocess.Popen, "_execute_child"), (multiprocessing.popen_spawn_posix.Popen, "_launch"),
                        (multiprocessing.popen_forkserver.Popen, "_launch")]

    def _refuse(self, what: str):
        self.seen.append(f"{self.name} {what}; mark it @pytest.mark.slow")
        raise InterpreterStarted(self.seen[-1])

    def __enter__(self):
        self.saved = [getattr(owner, attr) for owner, attr in self.patched]
        execute = self.saved[0]

        def checked(popen, args, *rest, **kwargs):
            if _starts_python(args):
                self._refuse(f"starts {args!r}")
            return execute(popen, args, *rest, **kwargs)

        subprocess.Popen._execute_child = checked
        for owner, _ in self.patched[1:]:
            owner._launch = lambda popen, process_obj: self._refuse("spawns a process")
        return self

    def __exit__(self, *exc):
        for (owner, attr), original in zip(self.patched, self.saved):
            setattr(owner, attr, original)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_interpreter(request):
    """`make test-fast` leaves out the tests marked slow, which it can only do if every test that starts an
    interpreter (a `ddmim` process, a converter script, a data-parallel launcher, a spawned worker) is marked:
    an unmarked one fails, naming itself, also when the code under test caught the error."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    with InterpreterWatch(request.node.nodeid) as watch:
        yield
    if watch.seen:
        pytest.fail(watch.seen[0], pytrace=False)


@pytest.fixture(autouse=True)
def _no_dali_pipeline_outlives_its_test():
    """A DALI pipeline left in a reference cycle was freed later by the garbage collector, and if a test forked
    first (a converter's worker pool, a loader's workers), in the child, whose DALI threads do not exist: the
    child hung in the pipeline's destructor, and the suite with it (seen in a fresh-clone CI). Collected here,
    in the process whose threads they are."""
    yield
    if "nvidia.dali" in sys.modules:
        gc.collect()


def pytest_collection_modifyitems(items):
    """The slow tests first (in their order), so that under pytest-xdist the longest ones start early instead
    of one worker finishing the suite alone while the others wait."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def QUIET_STEPS(steps: int = -1) -> Launch:  # noqa: N802 - reads as a constant at the call sites
    return Launch(max_steps=steps, progress_bar=False)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    return build_sample_dataset(tmp_path_factory.mktemp("data") / "digits")


@pytest.fixture
def tiny_cfg():
    torch.manual_seed(0)
    return make_config("tiny", ["train.batch_size=8", "data.num_workers=0"])


# Each image of the coloured source is a flat colour that encodes its index (red and blue, in steps of 16
# that survive JPEG re-encoding) and its label (green), so a loader's output can be traced back to the
# exact source image even after cropping, re-encoding and normalisation.
COLOURED_CLASSES = ("ant", "bee", "cat")
N_COLOURED_TRAIN = 16 * len(COLOURED_CLASSES)


def index_colour(index: int, label: int) -> tuple[int, int, int]:
    return 8 + 16 * (index % 16), 30 + 80 * label, 8 + 16 * (index // 16)


def decode_index(images, mean, std) -> list[int]:
    """Source index of each (B, 3, H, W) normalised image of the coloured source."""
    means = images.float().mean(dim=(2, 3)) * torch.tensor(std) + torch.tensor(mean)
    return [round((r * 255 - 8) / 16) + 16 * round((b * 255 - 8) / 16) for r, _, b in means.tolist()]


@pytest.fixture(scope="session")
def coloured_source(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("coloured")
    index = 0
    for split, per_class in (("train", 16), ("val", 4)):
        for label, name in enumerate(COLOURED_CLASSES):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                size = (40 + 4 * k, 36 + 2 * (k % 5))  # varied sizes and aspect ratios
                Image.new("RGB", size, index_colour(index, label)).save(root / split / name / f"{index:03d}.JPEG",
                                                                         quality=95)
                index += 1
    return root


@pytest.fixture(scope="session")
def converted(coloured_source, tmp_path_factory) -> dict[str, Path]:
    from data_prep import to_dali, to_ffcv

    out = tmp_path_factory.mktemp("converted")
    assert to_ffcv.main([str(coloured_source), str(out / "ffcv"), "--workers", "2"]) == 0
    assert to_dali.main([str(coloured_source), str(out / "dali"), "--workers", "2", "--shard-size", "20"]) == 0
    return {"ffcv": out / "ffcv", "dali": out / "dali"}


@pytest.fixture(scope="session")
def digits_dali(sample_root, tmp_path_factory) -> Path:
    """The sample digits as DALI shards, converted once for the session."""
    from data_prep import to_dali

    out = tmp_path_factory.mktemp("digits") / "dali"
    assert to_dali.main([str(sample_root), str(out), "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def digits_ffcv(sample_root, tmp_path_factory) -> Path:
    """The sample digits as FFCV files, converted once for the session."""
    from data_prep import to_ffcv

    out = tmp_path_factory.mktemp("digits") / "ffcv"
    assert to_ffcv.main([str(sample_root), str(out), "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def pretrain_ckpt(sample_root, tmp_path_factory) -> Path:
    from ddmim.train.pretrain import pretrain

    cfg = make_config("tiny", ["train.epochs=1", "data.num_workers=0"])
    summary = pretrain(cfg, sample_root, tmp_path_factory.mktemp("pre") / "run", QUIET_STEPS(4))
    return Path(summary["checkpoint_last"])


@pytest.fixture(scope="session")
def finetune_ckpt(sample_root, tmp_path_factory) -> Path:
    from ddmim.finetune_config import make_finetune_config
    from ddmim.train.finetune import finetune

    cfg = make_finetune_config("tiny", ["train.epochs=1", "data.num_workers=0"])
    summary = finetune(cfg, sample_root, tmp_path_factory.mktemp("ft") / "run", QUIET_STEPS(2))
    return Path(summary["checkpoint_last"])
