"""On PYTHONPATH, makes `import torch` fail in every Python process (the serve tests: driver, Ray workers).

Each process that installs the block appends its pid to $TORCH_BLOCKER_LOG, so a test can prove the
block was active in the process it cares about (a serve replica).
"""

import os
import sys


class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process (the service must not need torch)")
        return None


sys.meta_path.insert(0, _BlockTorch())
if os.environ.get("TORCH_BLOCKER_LOG"):
    with open(os.environ["TORCH_BLOCKER_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")
