"""The GPU path of the shared regions on the CPU: the environment every process gets for CUDA/HIP IPC, the refusal to
export with expandable segments on, and the device matched by UUID, with fakes of torch.cuda where no GPU is here.
The same torch.cuda calls carry HIP IPC handles on ROCm; none of this has run on an AMD GPU."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch

from kvstore import sharing
from kvstore.ipc_env import ALLOC_CONF_VARS, expandable_segments_on, ipc_env
from kvstore.sharing import RegionHandle, local_device, open_region


def test_ipc_env_turns_expandable_segments_off_and_drops_legacy_ipc():
    env = ipc_env({"PATH": "/bin", "HSA_ENABLE_IPC_MODE_LEGACY": "1"})
    assert env == {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}  # set: read on both vendors
    env = ipc_env(
        {
            "PYTORCH_HIP_ALLOC_CONF": "garbage_collection_threshold:0.8, expandable_segments:True",
            "PYTORCH_ALLOC_CONF": "expandable_segments : True",
        }
    )
    # each one present keeps its other options; none is added (a new PYTORCH_CUDA_ALLOC_CONF would hide the HIP one)
    assert env == {
        "PYTORCH_HIP_ALLOC_CONF": "garbage_collection_threshold:0.8,expandable_segments:False",
        "PYTORCH_ALLOC_CONF": "expandable_segments:False",
    }
    assert expandable_segments_on(env) is None


def test_expandable_segments_on_names_the_variable():
    assert expandable_segments_on({}) is None
    assert expandable_segments_on({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) is None
    for name in ALLOC_CONF_VARS:
        assert expandable_segments_on({name: "max_split_size_mb:64,expandable_segments:True"}) == name


def test_kvstore_refuses_to_export_with_expandable_segments(monkeypatch):
    monkeypatch.setenv("PYTORCH_HIP_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(RuntimeError, match="PYTORCH_HIP_ALLOC_CONF turns them on"):
        sharing.create_cuda_region(1024, torch.device("cuda", 0))  # refused before any device call


def test_every_child_of_the_launcher_gets_the_ipc_environment(monkeypatch):
    from kvrelay import launcher as launcher_mod
    from kvrelay.settings import UpSettings

    seen = {}
    monkeypatch.setattr(launcher_mod.subprocess, "Popen", lambda argv, env, **kw: seen.update(env) or "proc")
    monkeypatch.setenv("HSA_ENABLE_IPC_MODE_LEGACY", "1")  # inherited (some ROCm images set it)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    launcher = launcher_mod.Launcher(UpSettings(prefill_cu_mask="0:0-151"))
    assert launcher.popen([sys.executable, "-V"], launcher.service_env("prefill")) == "proc"
    assert "HSA_ENABLE_IPC_MODE_LEGACY" not in seen
    assert seen["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
    assert seen["HSA_CU_MASK"] == "0:0-151"


def test_device_matched_by_uuid_whatever_the_local_numbering():
    uuids = ["GPU-b", "GPU-a", "GPU-c"]  # this container sees the kvstore's GPU 0 ("GPU-a") as its 1
    assert local_device("GPU-a", 0, 3, uuids.__getitem__) == 1
    with pytest.raises(RuntimeError, match="no local GPU has UUID GPU-x"):
        local_device("GPU-x", 0, 3, uuids.__getitem__)
    zeros = ["00000000-0000-0000-0000-000000000000"] * 2  # a stack that reports no UUID: the exporter's index decides
    assert local_device(zeros[0], 1, 2, zeros.__getitem__) == 1
    with pytest.raises(RuntimeError, match="cannot tell"):
        local_device(zeros[0], 5, 2, zeros.__getitem__)


def test_open_region_rebuilds_the_ipc_tensor_on_the_device_with_the_uuid(monkeypatch):
    """The worker's side of a cuda_ipc handle, with torch.cuda faked: the handle's storage device is the exporter's
    index, replaced by the local index of the GPU with the same UUID before torch's own rebuild_cuda_tensor."""
    import torch.multiprocessing.reductions as reductions

    rebuilt = []
    monkeypatch.setattr(reductions, "rebuild_cuda_tensor", lambda *args: rebuilt.append(args) or "tensor")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(sharing, "device_uuid", lambda i: ["GPU-other", "GPU-kv"][i])
    args = [None] * 15
    args[6] = 0  # the kvstore's index of its GPU
    handle = RegionHandle("cuda_ipc", 4096, ipc_handle=pickle.dumps(tuple(args)), device_uuid="GPU-kv")
    assert open_region(handle) == "tensor"
    assert rebuilt[0][6] == 1
