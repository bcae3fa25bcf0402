"""The kernel's boot id: which boot of the machine a sample's monotonic time belongs to.

Monotonic time restarts at every boot, so `(boot_id, monotonic_ns)` names an instant exactly, even
before the wall clock was synchronised (reference/appliance.md §3.5). The gateway process may
restart within one boot; the kernel's id stays the same, so a ClockSync recorded by a later
process still corrects the samples an earlier one took.
"""

from __future__ import annotations

import functools
import logging
import uuid
from pathlib import Path

__all__ = ["BOOT_ID_PATH", "kernel_boot_id", "read_boot_id"]

log = logging.getLogger(__name__)

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    """The id in `path`; a random one (logged) when it cannot be read (not Linux, no /proc)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        text = ""
        why = str(exc)
    else:
        why = "empty"
    if text:
        return text
    fallback = str(uuid.uuid4())
    log.warning(
        "cannot read the kernel boot id from %s (%s); using %s for this process: samples taken "
        "before the clock is synchronised can then be corrected only by this process",
        path,
        why,
        fallback,
    )
    return fallback


@functools.cache
def kernel_boot_id() -> str:
    """This boot's id, read once per process."""
    return read_boot_id()
