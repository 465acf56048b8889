"""Python as a GPU machine without network, FFCV or DALI has it, for `gpu_suite.sh --dry-run`: imported at
start-up when this folder is on PYTHONPATH. FFCV and DALI are absent there, and the project is not installed (it
is imported from the working tree through gpu_suite.sh's links), so here their imports fail and an installed
project's finder is taken out of the import system."""
import sys

BLOCKED = ("ffcv", "nvidia.dali")


class _Absent:
    """A meta-path finder that makes the blocked packages, and everything below them, fail to import."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named '{name}' (absent on the GPU machine; blocked by the "
                                      "suite's rehearsal)", name=name)
        return None


sys.meta_path[:] = [_Absent] + [f for f in sys.meta_path
                                if not getattr(f, "__module__", "").startswith("__editable__")]
