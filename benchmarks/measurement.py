"""What the speed and memory scripts measure with: device synchronisation, peak memory and the machine's matmul peak."""

import time

import torch


def synchronize(device: str) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so that a timer measures the work itself."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(call, device: str = "cpu") -> tuple[object, float]:
    """`call()`'s value and the seconds it took, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    value = call()
    synchronize(device)
    return value, time.perf_counter() - start


def interleaved_times(calls: dict, rounds: int, device: str = "cpu") -> tuple[dict, dict]:
    """Seconds of each call over `rounds` interleaved rounds after a warm-up round, the order reversed every other
    round (so that neither always goes first), and each call's warm-up value."""
    times, first = {name: [] for name in calls}, {}
    for round_ in range(rounds + 1):
        for name in list(calls)[:: 1 if round_ % 2 else -1]:
            value, seconds = timed(calls[name], device)
            if round_:
                times[name].append(seconds)
            else:
                first[name] = value
    return times, first


def reset_peak(device: str) -> int:
    """Start a peak-memory window; returns what is resident now (CUDA bytes allocated; 0 on the CPU)."""
    if not str(device).startswith("cuda"):
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: unlike `ru_maxrss`, not inherited from the parent across exec).
    Self-contained, so the ONNX benchmark runs it in an interpreter without torch."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024


def peak_memory_mib(device: str, baseline: int = 0) -> float:
    """CUDA: peak bytes allocated since `reset_peak`, above `baseline` (what was resident then); CPU: the process's
    peak resident set."""
    if str(device).startswith("cuda"):
        return (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return peak_rss_mib()


def matmul_peak_flops(device: str = "cpu", size: int = 2048, dtype: torch.dtype = torch.float32, rounds: int = 5) -> float:
    """The device's dense matrix-multiply rate in FLOP/s: the best of `rounds` timed `size`² products after a warm-up."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)
