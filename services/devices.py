"""Which device an actor computes on: the GPUs Ray assigned it, or the CPU - never a guess.

``torch.cuda.is_available()`` is not the question: Ray 2.60 does not hide a node's GPUs from
an actor that asked for none, so every such actor would take ``cuda:0``; and an actor that
asked for GPUs on a node whose driver is missing or too old for torch's CUDA build would train
on CPU without a word. Here the configuration decides (``gpus_per_worker``), Ray's assignment
says which GPU, and a mismatch is an error naming the actor and the fields.

:func:`cpu_only` hides the GPUs from an actor that asked for none (``CUDA_VISIBLE_DEVICES``
emptied before anything in its process initialises CUDA), so neither torch nor vLLM nor NCCL
can take one. :func:`actor_device` returns the device of an actor that asked for ``gpus``.
"""

from __future__ import annotations

import os


class DeviceError(RuntimeError):
    """An actor's device does not match what its configuration asks for."""


def cpu_only() -> None:
    """Hide every GPU from this process (call before CUDA is initialised in it)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def actor_device(role: str, gpus: float, fields: str, *, gpu_ids=None, cuda=None):
    """The ``torch.device`` of actor ``role`` that asked Ray for ``gpus`` GPUs (``fields``:
    the config field(s) that set it, named in errors).

    ``gpus == 0``: the CPU; the GPUs are hidden from the process (:func:`cpu_only`).
    ``gpus > 0``: the first GPU Ray assigned (``ray.get_gpu_ids()``; Ray narrows
    ``CUDA_VISIBLE_DEVICES`` to them, so it is ``cuda:0`` inside the actor unless
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` is set); a :class:`DeviceError` when
    Ray assigned none or CUDA is not usable here. ``gpu_ids`` and ``cuda`` default to
    ``ray.get_gpu_ids()`` and ``torch.cuda`` (tests pass stand-ins: there is no GPU in CI).
    """
    import torch

    if gpus <= 0:
        cpu_only()
        return torch.device("cpu")
    if gpu_ids is None:
        import ray

        # outside Ray nothing was assigned (and get_gpu_ids would start a local Ray)
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    cuda = cuda if cuda is not None else torch.cuda
    if not gpu_ids:
        raise DeviceError(
            f"{role} asks for GPUs ({fields} = {gpus}) but Ray assigned it none (is it "
            f"running outside a Ray actor, or on a cluster without GPU resources?); set "
            f"{fields}: 0 to run it on CPU")
    if not cuda.is_available():
        build = torch.version.cuda or "none: a CPU build of torch"
        raise DeviceError(
            f"{role} asks for GPUs ({fields} = {gpus}) and Ray assigned GPU(s) "
            f"{list(gpu_ids)}, but CUDA is not usable in its process (torch "
            f"{torch.__version__}, CUDA build {build}): the NVIDIA driver is missing or older "
            f"than this torch build needs, or the node has no GPU. Install a driver that "
            f"supports CUDA {torch.version.cuda or '(a CUDA build of torch first)'} and the "
            f"GPU extra (pip install '.[gpu]'), or set {fields}: 0 to run on CPU; harpo does "
            f"not fall back to CPU on its own")
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        index = int(gpu_ids[0])  # every GPU is visible: pick Ray's by its physical id
    else:
        index = 0  # Ray narrowed CUDA_VISIBLE_DEVICES to the assigned GPUs
    if index >= cuda.device_count():
        raise DeviceError(f"{role}: Ray assigned GPU {gpu_ids[0]} but this process sees "
                          f"{cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def process_group_backend(device) -> str:
    """NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"
