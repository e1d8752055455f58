"""Device selection (npu / cuda / cpu) and dtype; the only module that knows torch_npu."""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass

import torch

from vlserve.errors import DeviceUnavailableError

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_PROBE_TIMEOUT_S = 60.0
_CPU_THREADS = torch.get_num_threads()  # the process's intra-op threads, read at import


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "npu" | "cuda" | "cpu"
    dtype: torch.dtype
    index: int = 0  # the device this process uses (ASCEND_RT_VISIBLE_DEVICES / CUDA_... pick it)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _npu_status() -> tuple[bool, str]:
    """Whether an Ascend NPU is usable, and why not.

    ``import torch_npu`` fails in two distinct ways without the CANN toolkit (see FACTS.md); both
    are reported, never raised, so that ``--device auto`` can fall back.
    """
    try:
        importlib.import_module("torch_npu")
    except ImportError as exc:
        return False, f"torch_npu is not importable ({exc.__class__.__name__}: {exc})"
    except Exception as exc:  # the backend extension itself failed to load
        return False, f"torch_npu failed to load ({exc.__class__.__name__}: {exc})"
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available() or npu.device_count() == 0:
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "<unset>")
        return False, (
            "torch_npu loaded but no NPU is available (ASCEND_RT_VISIBLE_DEVICES="
            f"{visible}); are the devices held by another container or process? "
            "Check `npu-smi info` and `docker ps`."
        )
    return True, ""


def _cuda_status() -> tuple[bool, str]:
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        return False, f"no CUDA device is available (CUDA_VISIBLE_DEVICES={visible})"
    return True, ""


def resolve_device(requested: str = "auto", dtype: str = "auto") -> DeviceInfo:
    """Pick the device: ``auto`` prefers npu, then cuda, then cpu; bf16 on accelerators, fp32 on cpu.

    An explicitly requested accelerator that is not usable raises DeviceUnavailableError with the
    reason, and so does one that fails a small allocation within a minute (a device held by
    someone else must never give a server that is up but hangs on inference).
    """
    requested = requested.lower()
    if requested not in ("auto", "npu", "cuda", "cpu"):
        raise DeviceUnavailableError(f"unknown device {requested!r}; use auto, npu, cuda or cpu")
    if dtype != "auto" and dtype not in _DTYPES:
        raise DeviceUnavailableError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    kind = requested
    if requested == "auto":
        if os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") != "0" and _npu_status()[0]:
            kind = "npu"
        elif _cuda_status()[0]:
            kind = "cuda"
        else:
            kind = "cpu"
    elif requested in ("npu", "cuda"):
        ok, why = _npu_status() if requested == "npu" else _cuda_status()
        if not ok:
            raise DeviceUnavailableError(f"--device {requested} was requested but {why}")
    chosen = (
        _DTYPES[dtype] if dtype != "auto" else (torch.float32 if kind == "cpu" else torch.bfloat16)
    )
    info = DeviceInfo(type=kind, dtype=chosen)
    if kind != "cpu":
        _probe(info)
    return info


def _probe(info: DeviceInfo) -> None:
    """Allocate and compute on the device in a thread, with a deadline."""
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            bind_thread(info)
            x = torch.ones(16, 16, device=info.torch_device, dtype=info.dtype)
            float((x @ x).sum().item())
            outcome.append(None)
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=work, name="device-probe", daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S)
    if not outcome:
        raise DeviceUnavailableError(
            f"the {info.type} device did not answer a small computation within "
            f"{_PROBE_TIMEOUT_S:.0f} s; is it held by another process or container?"
        )
    if outcome[0] is not None:
        raise DeviceUnavailableError(f"the {info.type} device is not usable: {outcome[0]}")


def bind_thread(info: DeviceInfo, *, side: bool = False) -> None:
    """Prepare the calling thread for model work on ``info``'s device; every thread that touches
    the device calls it first (the probe, the inference thread, the encoder thread).

    On an accelerator it selects the device in this thread: torch_npu requires that in every new
    thread (Ascend/pytorch#13), and on CUDA it is harmless. On CPU a ``side`` thread (the encoder,
    beside the inference thread) gets half the intra-op threads, a per-thread setting, so the two
    share the cores instead of oversubscribing them.
    """
    if info.type == "cpu":
        if side:
            share_cpu(info, busy=True)
        return
    getattr(torch, info.type).set_device(info.index)


def share_cpu(info: DeviceInfo, *, busy: bool) -> None:
    """On CPU, the calling side thread takes half the intra-op threads while the inference
    thread is busy, and all of them while it is idle (a lone request's image then encodes at full
    speed: 19 ms instead of 28 for 448x448 on two cores). No-op on accelerators."""
    if info.type == "cpu":
        torch.set_num_threads(max(1, _CPU_THREADS // 2) if busy else _CPU_THREADS)


def empty_cache(info: DeviceInfo) -> None:
    """Return cached device memory after an out-of-memory error."""
    module = getattr(torch, info.type, None) if info.type != "cpu" else None
    if module is not None and hasattr(module, "empty_cache"):
        module.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory_bytes(info: DeviceInfo) -> int:
    """Memory free for the KV cache now: the device's free memory on an accelerator, the host's
    available memory on CPU."""
    if info.type != "cpu":
        free, _total = getattr(torch, info.type).mem_get_info(info.index)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
