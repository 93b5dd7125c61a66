"""Files written whole or not at all: a temporary file, then one rename, so a kill never leaves half of one."""
import os

import torch


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to `path` so that a crash mid-write never leaves a truncated file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Replace a text file in one step."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
