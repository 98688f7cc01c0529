"""Memory shared between processes: one region per purpose (weights, KV pool), exported once, mapped by every worker.

A region is a flat uint8 tensor plus a `RegionHandle` that another process turns back into the same memory:
- "shm": a file under /dev/shm (the CPU path), mapped MAP_SHARED by every process;
- "cuda_ipc": a CUDA/HIP IPC handle of one whole allocation (the GPU path; see kernels and the GPU issue).
Views (weights, pool layers) are carved out of a region at byte offsets, so sharing happens once per region, never per
tensor (an IPC handle names a whole allocation: sub-allocated exports corrupt data in other projects).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.ipc_env import expandable_segments_on
from kvstore.shm import shm_path

ALIGN = 256  # bytes: every tensor view starts on a boundary any dtype (and a GPU vector load) accepts


@dataclass(frozen=True)
class RegionHandle:
    kind: str  # "shm" | "cuda_ipc"
    nbytes: int
    path: str = ""  # shm: the file
    ipc_handle: bytes = b""  # cuda_ipc: cudaIpcMemHandle_t / hipIpcMemHandle_t
    device_uuid: str = ""  # cuda_ipc: which GPU (indices differ between containers)


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def create_shm_region(name: str, nbytes: int) -> tuple[torch.Tensor, RegionHandle]:
    """A new zero-filled /dev/shm file of nbytes, mapped shared. The creator removes it (remove_region) on exit.

    Mode 0600: the weights and every session's K/V are the deployment user's alone (/dev/shm is world-readable by
    default umask). Created with O_EXCL | O_NOFOLLOW, so a file or link another user planted under the name in the
    shared, sticky /dev/shm is refused instead of written into and mapped.
    """
    path = shm_path(name)
    if path.exists() or path.is_symlink():
        path.unlink()  # a stale file from a crashed run of the same deployment (another user's cannot be removed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only take bits away from 0600; this says it outright
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    handle = RegionHandle("shm", nbytes, path=str(path))
    return open_region(handle), handle


def device_uuid(index: int) -> str:
    """The GPU's UUID as torch reports it: torch binds cudaDeviceProp.uuid on CUDA and ROCm builds alike (on ROCm it is
    hipDeviceProp_t's uuid). Both ends of a handle read it through this one function, so only equality matters."""
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device(uuid: str, exporter_index: int, count: int, uuid_of=None) -> int:
    """This process's index of the GPU with `uuid`. Containers (and CUDA/HIP/ROCR_VISIBLE_DEVICES) number GPUs
    differently, so the index the exporter saw is only a tie-break: where several local GPUs report the same UUID (a
    ROCm stack that reports none, all zeros, or one card in several partitions), the exporter's index among them, else
    an error rather than a guess."""
    uuid_of = uuid_of or device_uuid
    matches = [i for i in range(count) if uuid_of(i) == uuid]
    if not matches:
        raise RuntimeError(f"no local GPU has UUID {uuid} (the kvstore's GPU)")
    if len(matches) == 1:
        return matches[0]
    if exporter_index in matches:
        return exporter_index
    raise RuntimeError(f"GPUs {matches} all report UUID {uuid}: cannot tell which one is the kvstore's")


def create_cuda_region(nbytes: int, device: torch.device) -> tuple[torch.Tensor, RegionHandle]:
    """One device allocation exported as a CUDA (HIP on ROCm) IPC handle. The caller keeps the tensor alive.

    torch's own tensor reduction carries the handle (it is what torch.multiprocessing sends): it records the
    allocation's base and this tensor's offset in it, so a sub-allocated block still maps to the right bytes.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    on = expandable_segments_on(os.environ)
    if on is not None:
        raise RuntimeError(f"expandable segments break CUDA/HIP IPC: {on} turns them on; set expandable_segments:False")
    region = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    _, args = reduce_tensor(region)
    handle = RegionHandle(
        "cuda_ipc", nbytes, ipc_handle=pickle.dumps(args), device_uuid=device_uuid(region.device.index)
    )
    return region, handle


def _open_cuda(handle: RegionHandle) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(pickle.loads(handle.ipc_handle))
    # The handle names the exporter's device index; containers may number GPUs differently, so match by UUID.
    args[6] = local_device(handle.device_uuid, args[6], torch.cuda.device_count())  # storage_device
    return rebuild_cuda_tensor(*args)


def open_region(handle: RegionHandle) -> torch.Tensor:
    """Map a region exported by another process: a flat uint8 tensor over the same memory."""
    if handle.kind == "shm":
        if not os.path.exists(handle.path):
            raise FileNotFoundError(f"shared region {handle.path} is gone (is the kvstore process running?)")
        return torch.from_file(handle.path, shared=True, size=handle.nbytes, dtype=torch.uint8)
    if handle.kind == "cuda_ipc":
        return _open_cuda(handle)
    raise NotImplementedError(f"region kind {handle.kind!r} is not available in this build")


def remove_region(handle: RegionHandle) -> None:
    if handle.kind == "shm":
        Path(handle.path).unlink(missing_ok=True)


@dataclass(frozen=True)
class TensorSlice:
    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the region


def pack_layout(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorSlice], int]:
    """Offsets for packing tensors into one region; tensors that share storage (tied embeddings) share a slice."""
    slices, seen, offset = [], {}, 0
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            slices.append(TensorSlice(name, seen[key].dtype, seen[key].shape, seen[key].offset))
            continue
        s = TensorSlice(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset)
        seen[key] = s
        slices.append(s)
        offset = align(offset + t.numel() * t.element_size())
    return slices, max(offset, ALIGN)


def write_tensors(region: torch.Tensor, tensors: dict[str, torch.Tensor], slices: list[TensorSlice]) -> None:
    for s in slices:
        view_tensor(region, s).copy_(tensors[s.name])


def view_tensor(region: torch.Tensor, s: TensorSlice) -> torch.Tensor:
    dtype = getattr(torch, s.dtype)
    nbytes = dtype.itemsize
    for d in s.shape:
        nbytes *= d
    return region[s.offset : s.offset + nbytes].view(dtype).view(s.shape)


def view_tensors(region: torch.Tensor, slices: list[TensorSlice]) -> dict[str, torch.Tensor]:
    """Weights as views into the region: building the model on them allocates no second copy."""
    return {s.name: view_tensor(region, s) for s in slices}
