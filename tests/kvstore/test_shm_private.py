"""The CPU path's shared regions are the deployment user's alone: /dev/shm files made 0600 whatever the umask, a stale
file of an earlier run replaced (not reused with its old mode)."""

from __future__ import annotations

import os
import stat
import uuid

from kvstore.sharing import create_shm_region, remove_region
from kvstore.shm import shm_path


def test_shm_regions_are_private_whatever_the_umask():
    name = f"kvtest{os.environ.get('KVRELAY_TEST_RUN', '')}shm{uuid.uuid4().hex[:6]}"
    path = shm_path(name)
    path.write_bytes(b"stale")  # a crashed run's file, world-readable
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        region, handle = create_shm_region(name, 4096)
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_size == 4096 and int(region.sum()) == 0  # fresh, zero-filled
    finally:
        del region
        remove_region(handle)
    assert not path.exists()
