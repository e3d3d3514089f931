"""Temporary names for atomic writes: write next to the target, then ``os.replace``.

Why not ``tempfile.mkstemp`` / ``mkdtemp``: they create the file 0o600 and the folder 0o700,
and a rename keeps those modes. In a Docker volume written by the container's user, the
checkpoint and the exported adapter then could not be read by anyone else on the host.
A fresh name created by the writer itself gets what a plain ``open`` or ``mkdir`` gives
(0o666 / 0o777 less the umask).
"""

from __future__ import annotations

import secrets
from pathlib import Path


def sibling_temp_path(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder (not created) for writing ``path`` atomically."""
    path = Path(path)
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def process_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only set it, and a
    set-and-restore would briefly open every other thread's new files); 0o022 if unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def give_default_modes(folder: Path) -> None:
    """Give every file below ``folder`` the mode a plain ``open`` would (0o666 less the umask).

    Libraries that write private files (safetensors: ``adapter_model.safetensors`` arrives
    0o600) would otherwise leave the export unreadable
    to other users of a shared volume.
    """
    mode = default_file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def default_file_mode() -> int:
    """0o666 less the umask: the mode of a file made by a plain ``open`` (safetensors'
    ``save_file`` makes them 0o600, so its files are chmod-ed to this before the rename)."""
    return 0o666 & ~process_umask()
