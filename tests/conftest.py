import logging
import os
import signal
import sys

# Before torch loads: idle OpenMP workers sleep instead of spinning, which on
# a 2-core machine otherwise starves the other processes (and the test itself).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Studies run serially unless a test asks for workers: a monkeypatch reaches
# this process only (test_scenario.py checks the default of one job per core).
os.environ.setdefault("LORAMIX_JOBS", "1")
# Where stderr is not a terminal (pytest's capture) a command says how far it is once a
# minute: a test that a loaded machine slows past that would find a stray line in its
# stderr. The tests of those lines set the interval themselves (tests/test_progress.py).
os.environ.setdefault("LORAMIX_PROGRESS_EVERY", "86400")
# A study cache or a write mode exported in the caller's shell (as for a long study run
# beside the suite) must not reach the tests: they would read and write that cache (a
# test of `cache clean` found the user's entries there), and each test that wants one
# sets its own. LORAMIX_MODELS / LORAMIX_DATA stay: they say where the real files are.
for _name in ("LORAMIX_CACHE", "LORAMIX_DIRECT_IO"):
    os.environ.pop(_name, None)
# The Ctrl-C tests send SIGINT to the loramix processes they start, which inherit this
# process's disposition: a suite started as a background job of a non-interactive shell
# (`nohup ... &`, a CI script) has SIGINT ignored, so those processes kept running and
# nine tests failed. A handler is not inherited across exec: the children get the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests draw the same examples in every run: a red CI must be a draw
# anyone can reproduce. HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("suite", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

from .factories import SHARED_DATA, SMOL_GGUF  # noqa: E402

# Two cores here: keep torch from oversubscribing them in tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


class _CurrentStderr:
    """``sys.stderr`` as it is at each write. transformers' logging handler keeps
    the stream of its first use, which under pytest is not the one ``capsys``
    captures: its warnings printed before a one-line error went unseen."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.get_logger("transformers")  # makes transformers' handler
for _h in logging.getLogger("transformers").handlers:
    if isinstance(_h, logging.StreamHandler):
        _h.setStream(_CurrentStderr())


@pytest.fixture(scope="session", autouse=True)
def _loramix_cache_dir(tmp_path_factory):
    """loramix caches model layouts and file hashes in ``$LORAMIX_CACHE_DIR``
    (default ``~/.cache/loramix``): keep the tests' out of the user's home."""
    old = os.environ.get("LORAMIX_CACHE_DIR")
    os.environ["LORAMIX_CACHE_DIR"] = str(tmp_path_factory.mktemp("loramix-cache"))
    yield
    if old is None:
        os.environ.pop("LORAMIX_CACHE_DIR", None)
    else:
        os.environ["LORAMIX_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """SmolLM2-135M-Instruct imported once per session from the GGUF in
    ``../shared/models`` (``loramix base import``); skips where it is absent."""
    if not SMOL_GGUF.is_file():
        pytest.skip(f"real model not found at {SMOL_GGUF} (see README: Real model)")
    from loramix.cli import main

    out = tmp_path_factory.mktemp("smol") / "base"
    assert main(["base", "import", str(SMOL_GGUF), "--out", str(out)]) == 0
    return out


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    skip_data = pytest.mark.skip(reason=f"real QA data not found at {SHARED_DATA} (see README: Data)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "realdata" in item.keywords and not (SHARED_DATA / "math.jsonl").exists():
            item.add_marker(skip_data)


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only mount (a 1 MiB tmpfs), where unlink fails with EROFS
    even for a name that is not there; skipped where mounting is not allowed."""
    from .factories import mounted

    ro = tmp_path / "ro"
    ro.mkdir()
    with mounted(ro, "tmpfs", "ro,size=1m"):
        yield ro
