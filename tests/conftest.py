"""Session-wide test setup: the Triton mode, one torch thread, shared fixtures, and the skip gate.

The skip gate: a skip is allowed only for a reason in ALLOWED_SKIPS, each for something a machine
truly lacks (a CUDA device, TensorRT) and only where it does lack it. Any other skip (a package of
the `test` extra missing, MTCNN weights absent, a fixture that gave up) fails the test it skipped,
so a green run cannot hide a broken install. It is always on: CI runs the README's test command
as it is, and pyproject's `-rfEs` prints every skip with its reason at the end of a run.
"""

import importlib.util
import os
import threading
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

CUDA = torch.cuda.is_available()

# Triton fixes interpreter mode when a kernel is decorated, i.e. when its module is first
# imported, and that can happen from any test directory: set it for the whole session, before
# any pidrt import (a GPU run keeps compiled kernels; setdefault lets TRITON_INTERPRET=0 force it).
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

from pidrt.models.build import build_random  # noqa: E402
from pidrt.models.presets import TINY  # noqa: E402
from pidrt.runtime.pipeline import Pipeline  # noqa: E402

NO_COMPILED_GPU = "needs a CUDA device" if not CUDA else "needs a CUDA device with compiled Triton (TRITON_INTERPRET=1 is set)"

# reason prefix -> (does this machine lack it?, why that is fine)
ALLOWED_SKIPS = {
    "needs a CUDA device": (not CUDA or INTERPRET, "no GPU here: `gpu`-marked tests"),
    "TensorRT and a CUDA GPU are needed": (importlib.util.find_spec("tensorrt") is None or not CUDA,
                                           "tensorrt cannot be installed on these machines"),
    "no TensorRT headers": (not os.environ.get("PIDRT_TEST_TRT_INCLUDE"),
                            "TensorRT's headers are not installable here (tests/kernels/test_native.py)"),
    "the CPU smoke form": (CUDA, "a GPU machine runs the real benchmark (benchmarks/gpu_session.sh)"),
}
_skips: Counter = Counter()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _gate(report):
    if not report.skipped or hasattr(report, "wasxfail"):
        return report
    reason = _skip_reason(report)
    allowed = next((p for p, (lacking, _) in ALLOWED_SKIPS.items() if reason.startswith(p) and lacking), None)
    if allowed is not None:
        _skips[allowed] += 1
        return report
    _skips["refused"] += 1
    report.outcome = "failed"
    report.longrepr = (f"skip not allowed: {reason}\nOnly the reasons in tests/conftest.py's ALLOWED_SKIPS may "
                       f"skip, where this machine lacks what they name; anything else is a broken install "
                       f"(the README's test command installs all the suite needs) or a test that gave up.")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _gate((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _gate((yield))


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests skip where no CUDA device runs compiled Triton; a test that skips for the
    lack of a GPU must carry the mark (so `-m gpu` selects every GPU check)."""
    unmarked = [item.nodeid for item in items if "gpu" not in item.keywords and any(
        "CUDA" in m.kwargs.get("reason", "") or "GPU" in m.kwargs.get("reason", "")
        for m in item.iter_markers("skipif"))]
    if unmarked:
        raise pytest.UsageError("tests that need a GPU but are not marked `gpu`: " + ", ".join(unmarked))
    for item in items:  # compiled on a GPU, interpreted on a CPU: `-m on_device` selects them on a GPU
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.on_device)
    if CUDA and not INTERPRET:
        return
    skip = pytest.mark.skip(reason=NO_COMPILED_GPU)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    refused = _skips.pop("refused", 0)
    allowed = ", ".join(f"{n} '{reason}' ({ALLOWED_SKIPS[reason][1]})" for reason, n in _skips.items())
    line = f"skip gate: {sum(_skips.values())} allowed skips" + (f": {allowed}" if allowed else "")
    if refused:
        line += f"; {refused} refused (reported as failures above)"
    terminalreporter.write_line(line, red=bool(refused), green=not refused)


@pytest.fixture
def device() -> str:
    """Where Triton kernel inputs live: CPU tensors for the interpreter, else the GPU."""
    return "cpu" if INTERPRET else "cuda"


@pytest.fixture
def ieee_fp32(monkeypatch):
    """fp32 means IEEE fp32 on a GPU too: cuDNN runs fp32 convolutions as TF32 by default, so two
    layouts of one model (NCHW, channels_last) would differ by far more than fp32 tolerances."""
    if CUDA:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny models run in milliseconds; with 2+ intra-op threads on a shared CI box the
    # thread pool's spin-waits made a reference UNet call 40x slower (3.5 s instead of 0.08 s).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_pipe():
    return Pipeline(build_random(TINY, seed=0))


@contextmanager
def _held(generator):
    """Keep `generator`'s worker inside a one-step job until the block ends: what is submitted
    meanwhile queues up (and batches) behind it, however fast the machine."""
    from pidrt.runtime.requests import GenerationRequest

    started, release = threading.Event(), threading.Event()

    def hold(event):
        if event.type == "started":  # the worker thread itself calls this
            started.set()
            release.wait(120)

    job = generator.submit(GenerationRequest("hold", seed=0, steps=1), on_event=hold)
    assert started.wait(120), "the worker never started the holding job"
    try:
        yield job
    finally:
        release.set()


@pytest.fixture(scope="session")
def hold_worker():
    """hold_worker(generator): a context manager; see `_held`."""
    return _held


@pytest.fixture(scope="session")
def photos() -> tuple[bytes, bytes]:
    """A real face photo shipped in an installed package and its mirror image (two identities)."""
    from pidrt.bench.identities import face_photos

    (first, _), (mirrored, _) = face_photos()
    return first, mirrored


@pytest.fixture(scope="session")
def engines():
    """The tiny export folder the ort tests serve from: a UNet per method, text encoder, VAE decoder."""
    from pidrt.export.testing import tiny_export

    for method in ("sca", "ip", "eaa"):
        tiny_export(method)
    return tiny_export("none", kinds=("unet", "text_encoder", "vae_decoder"))
