"""Devices from Ray's GPU assignment, never from whatever CUDA is visible (services/devices.py),
tensor-parallel vLLM placement, and the colocated mode's sleep/wake around the update.

There is no GPU here. What needs one is tested two ways: on this machine for real (an actor
asking for GPUs on a node without usable CUDA must fail with a clear error), and with a
"GPU stand-in" - an object with ``torch.cuda``'s ``is_available`` / ``device_count`` - for
the paths a GPU node would take."""

import pytest
import torch

from services.devices import DeviceError, actor_device, process_group_backend
from services.rollout.placement import STRATEGY, engine_actor_options, engine_bundles
from tests.services.conftest import tiny_config


class GPUStandIn:
    """GPU stand-in for ``torch.cuda``: no GPU exists on the CI machine."""

    def __init__(self, available: bool, count: int = 1):
        self.available, self.count = available, count

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return self.count


def test_no_gpu_asked_means_cpu_and_no_gpu_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # a GPU node: Ray does not hide them
    device = actor_device("learner rank 1", 0, "learner.gpus_per_worker",
                          cuda=GPUStandIn(True, 2))
    assert device == torch.device("cpu")
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # torch, vLLM and NCCL see no GPU
    assert process_group_backend(device) == "gloo"


def test_gpus_asked_take_the_gpu_ray_assigned(monkeypatch):
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    gpu = actor_device("learner rank 0", 1, "learner.gpus_per_worker", gpu_ids=["3"],
                       cuda=GPUStandIn(True, 1))
    assert gpu == torch.device("cuda", 0)  # Ray narrowed CUDA_VISIBLE_DEVICES to GPU 3
    assert process_group_backend(gpu) == "nccl"
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    assert actor_device("learner rank 0", 0.5, "learner.gpus_per_worker", gpu_ids=["3"],
                        cuda=GPUStandIn(True, 4)) == torch.device("cuda", 3)


def test_gpus_asked_without_usable_cuda_is_an_error_not_a_cpu_fallback(monkeypatch):
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(DeviceError) as caught:  # a driver too old: is_available() is False
        actor_device("learner rank 0", 1, "learner.gpus_per_worker", gpu_ids=["0"],
                     cuda=GPUStandIn(False))
    message = str(caught.value)
    assert message.startswith("learner rank 0 asks for GPUs (learner.gpus_per_worker = 1) and "
                              "Ray assigned GPU(s) ['0'], but CUDA is not usable in its process")
    assert "the NVIDIA driver is missing or older than this torch build needs" in message
    assert message.endswith("or set learner.gpus_per_worker: 0 to run on CPU; harpo does not "
                            "fall back to CPU on its own")
    with pytest.raises(DeviceError, match=r"learner rank 2 asks for GPUs \(learner."
                       r"gpus_per_worker = 1\) but Ray assigned it none"):
        actor_device("learner rank 2", 1, "learner.gpus_per_worker", gpu_ids=[],
                     cuda=GPUStandIn(True))
    with pytest.raises(DeviceError, match="Ray assigned GPU 5 but this process sees 2 CUDA"):
        monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
        actor_device("learner rank 0", 1, "learner.gpus_per_worker", gpu_ids=[5],
                     cuda=GPUStandIn(True, 2))


def test_rollout_backends_on_this_cpu_machine_refuse_gpus(tiny_assets):
    """For real, on this machine (CPU torch): asking for a GPU fails clearly in both backends;
    asking for none runs on CPU. (No Ray actor here, so Ray assigned nothing.)"""
    from services.rollout.hf_backend import HFBackend
    from services.rollout.vllm_backend import _on_gpu

    assert _on_gpu({"gpus": 0}) is False and _on_gpu({}) is False
    with pytest.raises(DeviceError, match=r"vLLM rollout worker asks for GPUs "
                                          r"\(rollout.gpus_per_worker = 1"):
        _on_gpu({"gpus": 1.0})
    with pytest.raises(DeviceError, match="rollout.gpus_per_worker = 2.0.*CUDA is not usable"):
        _on_gpu({"gpus": 2.0, "tensor_parallel_size": 2})
    with pytest.raises(DeviceError, match=r"HF rollout worker asks for GPUs"):
        HFBackend.from_options(str(tiny_assets.model_dir), {"gpus": 1})


def test_vllm_engine_arguments_on_gpu_and_cpu(tiny_assets):
    from services.rollout.vllm_backend import _engine_kwargs

    model = str(tiny_assets.model_dir)
    gpu = _engine_kwargs(model, {"dtype": "bfloat16", "tensor_parallel_size": 2,
                                 "gpu_memory_utilization": 0.4, "colocate": True}, on_gpu=True)
    assert (gpu["tensor_parallel_size"], gpu["distributed_executor_backend"],
            gpu["enable_sleep_mode"], gpu["gpu_memory_utilization"]) == (2, "ray", True, 0.4)
    one = _engine_kwargs(model, {"dtype": "bfloat16"}, on_gpu=True)
    assert "distributed_executor_backend" not in one and "enable_sleep_mode" not in one
    with pytest.raises(ValueError, match="rollout.colocate needs vLLM on GPU: vLLM's sleep "
                                         "mode is not available on CPU"):
        _engine_kwargs(model, {"colocate": True}, on_gpu=False)


def test_tensor_parallel_engine_placement_group(tiny_assets, tmp_path):
    """One bundle per tensor-parallel rank, one node; the actor in bundle 0 without a GPU of
    its own, capturing vLLM's worker tasks."""
    config = tiny_config(tiny_assets, tmp_path, rollout={
        "backend": "vllm", "gpus_per_worker": 4, "cpus_per_worker": 2,
        "resources": {"rollout_node": 1}, "vllm": {"tensor_parallel_size": 4}})
    bundles = engine_bundles(config.rollout)
    assert bundles == [{"CPU": 2, "GPU": 1.0, "rollout_node": 1}] + [{"GPU": 1.0}] * 3
    assert STRATEGY == "STRICT_PACK"
    group = object()  # stands for the placement group the actor set creates from bundles
    options = engine_actor_options(config.rollout, group)
    strategy = options.pop("scheduling_strategy")
    assert options == {"num_cpus": 2, "num_gpus": 0, "resources": {"rollout_node": 1}}
    assert (strategy.placement_group, strategy.placement_group_bundle_index,
            strategy.placement_group_capture_child_tasks) == (group, 0, True)
    single = tiny_config(tiny_assets, tmp_path, rollout={"backend": "vllm",
                                                         "gpus_per_worker": 1})
    assert engine_bundles(single.rollout) is None  # an ordinary actor holding its GPU
    assert engine_bundles(config.rollout.model_copy(update={"gpus_per_worker": 0})) is None


def test_colocated_engines_sleep_during_each_update(ray_cluster, tiny_assets, tmp_path):
    """rollout.colocate on the HF backend (on CPU its sleep frees nothing, but the calls are
    the GPU path's): every worker sleeps before each learner update and wakes for the next
    weight load; the run trains as usual."""
    import ray

    from services.controller import Trainer

    config = tiny_config(tiny_assets, tmp_path / "run", run={"steps": 2,
                                                             "checkpoint_every": 0},
                         rollout={"colocate": True, "workers": 1}, reward={"scorers": 1})
    trainer = Trainer(config)
    try:
        rows = trainer.run()
        states = ray.get([m.actor.ready.remote() for m in trainer.actors.pool.workers])
    finally:
        trainer.shutdown()
    assert [r["step"] for r in rows] == [0, 1]
    assert [(s["sleeps"], s["asleep"]) for s in states] == [(2, True)]
