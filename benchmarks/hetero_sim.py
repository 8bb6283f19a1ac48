"""bench_hetero's simulated devices: a modelled clock in the Ray workers, and the machine's load.

Kept apart from the benchmark so that it stays readable; Ray pickles this module's
functions by value (the workers do not have benchmarks/ on their path).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

# ---------------------------------------------------------------------------
# the machine


def _proc_stat_busy() -> int:
    """Busy jiffies of the whole machine (all CPUs)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def _tree_jiffies(root: int) -> int:
    """CPU jiffies of `root` and its descendants (with their reaped children)."""
    parent, times = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        times[int(pid)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    mine, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        children = [c for c, pp in parent.items() if pp == p and c not in mine]
        mine.update(children)
        frontier += children
    return sum(times.get(p, 0) for p in mine)


class ForeignLoad:
    """Share of the machine's cores that processes outside this benchmark used."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start()

    def start(self) -> None:
        self.t, self.busy = time.monotonic(), _proc_stat_busy()
        self.mine = _tree_jiffies(os.getpid())

    def share(self) -> float:
        seconds = time.monotonic() - self.t
        foreign = (_proc_stat_busy() - self.busy) - (_tree_jiffies(os.getpid()) - self.mine)
        return max(0.0, foreign / self.hz / seconds / self.cores)

    def wait_quiet(self, max_wait_s: float, threshold: float = 0.1) -> float:
        """Wait until others use < threshold of the cores over 1 s (at most max_wait_s)."""
        deadline = time.monotonic() + max_wait_s
        while True:
            self.start()
            time.sleep(1)
            share = self.share()
            if share < threshold or time.monotonic() > deadline:
                return share


# ---------------------------------------------------------------------------
# the simulated devices' clock


@dataclass(frozen=True)
class Reference:
    """This machine's quiet time for the demo model's work: one thread, memory accounting on.

    A simulated device of speed s takes `micro(b) / s` per micro-step of b samples
    (forward and backward) and `optimizer_s / s` per optimizer step, like a GPU whose
    time model is a line: the work is run for real, then the device sleeps the rest.
    """

    fixed_s: float  # forward + backward: fixed_s + per_sample_s * b
    per_sample_s: float
    backward_fixed_s: float  # the backward alone, likewise
    backward_per_sample_s: float
    optimizer_s: float

    def micro(self, b: int) -> float:
        return self.fixed_s + self.per_sample_s * b

    def backward(self, b: int) -> float:
        return self.backward_fixed_s + self.backward_per_sample_s * b


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares t = a + c * b."""
    mb = statistics.fmean(b for b, _ in points)
    mt = statistics.fmean(t for _, t in points)
    c = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    return max(0.0, mt - c * mb), c


def calibrate(task_args: dict, repeats: int = 20) -> Reference:
    """Time the work in this process, one thread, memory accounting on, sizes interleaved so
    a burst of load on the shared cores does not hit one size only. The modelled times are
    the minimum over `repeats` rounds (the machine undisturbed, as timeit does); the
    backward, which the training loop's pacer must predict before it runs, the median."""
    import torch

    from autobatch.probe.simulated import TensorMemory
    from autobatch.tasks.tiny_gpt import tiny_gpt_task

    torch.set_num_threads(1)
    task = tiny_gpt_task(**task_args)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    memory = TensorMemory(model=model, optimizer=opt)
    sizes = (1, 4, 16, 48)
    runs: dict[int, list[tuple[float, float, float]]] = {b: [] for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            batch = task.batch(range(b))
            with memory:
                t0 = time.perf_counter()
                loss = task.loss_fn(model, batch)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            runs[b].append((t2 - t0, t2 - t1, t3 - t2))
    total = [(b, min(r[0] for r in rs)) for b, rs in runs.items()]
    backward = [(b, statistics.median(r[1] for r in rs)) for b, rs in runs.items()]
    optimizer_s = min(r[2] for rs in runs.values() for r in rs)
    return Reference(*_line(total), *_line(backward), optimizer_s=optimizer_s)


def worker_setup(ref: Reference | None) -> Callable[[], None]:
    """A Ray worker set-up hook: simulated devices on `ref`'s time model.

    With `ref` it replaces `autobatch.probe.simulated.Pacer` in the worker (the launcher's training
    loop and the probe) by one that sleeps until the modelled duration, instead of
    stretching the measured one by 1/speed: on these shared cores the same
    micro-step's real time varies by +-40% with the neighbours' load, and the
    product's Pacer multiplies that by 1/speed (x10 on the T4), which would measure
    the machine, not the plan (docs/measuring.md: sleep for the difference between the
    modelled and the measured duration). The real work still runs; the optimizer
    step, the all-reduce, data loading and metrics are paid as they come."""

    def hook() -> None:
        if ref is not None:
            pace_on_model(ref)

    return hook


def pace_on_model(ref: Reference) -> None:
    """In a Ray worker: simulated devices sleep until `ref`'s modelled time / speed."""
    import contextlib

    import autobatch.probe.measure
    import autobatch.probe.simulated
    import launcher.job.train

    size: dict[str, int | None] = {"b": None}  # the probe's micro-batch in progress

    class ModelPacer:
        def __init__(self, speed: float, *, backward_factor: float = 3.0) -> None:
            self.speed, self.backward_factor, self.slept_s = speed, backward_factor, 0.0

        def _until(self, t0: float, seconds: float) -> None:
            delay = seconds - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
                self.slept_s += delay

        @contextlib.contextmanager
        def micro_step(self):  # noqa: ANN202  (the probe: a micro-step or the optimizer)
            b, t0 = size["b"], time.perf_counter()
            yield
            self._until(t0, (ref.micro(b) if b else ref.optimizer_s) / self.speed)

        def wrap_loss_fn(self, loss_fn):  # noqa: ANN001, ANN202  (training)
            """The micro-step (forward and backward) lasts the modelled time: a hook on the
            loss queues the sleep for the end of the backward pass, before DDP waits for
            its all-reduce (DDP queues that wait later in the same pass)."""
            import torch

            def paced(model, batch):  # noqa: ANN001, ANN202
                t0 = time.perf_counter()
                loss = loss_fn(model, batch)
                b = len(next(iter(batch.values())))
                until = ref.micro(b) / self.speed

                def at_backward_start(grad):  # noqa: ANN001, ANN202
                    engine = torch.autograd.Variable._execution_engine
                    engine.queue_callback(lambda: self._until(t0, until))
                    return grad

                if loss.requires_grad:
                    loss.register_hook(at_backward_start)
                return loss

            return paced

        def attach(self, optimizer):  # noqa: ANN001, ANN202
            started: list[float] = []
            pre = optimizer.register_step_pre_hook(lambda *_: started.append(time.perf_counter()))
            post = optimizer.register_step_post_hook(
                lambda *_: self._until(started.pop(), ref.optimizer_s / self.speed)
            )

            def detach() -> None:
                pre.remove()
                post.remove()

            return detach

    runner_step = autobatch.probe.measure.StepRunner._micro_step

    def probe_micro_step(self, b, weight):  # noqa: ANN001, ANN202
        size["b"] = b
        try:
            return runner_step(self, b, weight)
        finally:
            size["b"] = None

    autobatch.probe.measure.StepRunner._micro_step = probe_micro_step
    autobatch.probe.simulated.Pacer = ModelPacer
    autobatch.probe.measure.Pacer = launcher.job.train.Pacer = ModelPacer
