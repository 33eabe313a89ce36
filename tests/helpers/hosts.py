"""Whether pretend hosts (pycpt.testing.testhosts) can be built here."""

from __future__ import annotations

import os
import shutil
from typing import Optional


def testhosts_missing() -> Optional[str]:
    """Why test hosts cannot be built here, or None."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, sshd)"
    for tool in ("/usr/sbin/sshd", "ssh", "ssh-keygen", "ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"test hosts need {tool} (`make setup` installs openssh-server and iproute2)"
    return None
