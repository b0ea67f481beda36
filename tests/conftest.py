"""Shared fixtures: a tiny Llama model (2 layers, hidden 32) with the embedded model's real tokenizer,
built in seconds, so every stage is tested on CPU without a download."""

import contextlib
import os

# Tests never reach a hub. Set before anything imports huggingface_hub, which reads it once at import: set
# later, the hub client still tried the network, and each lookup of a model not in the cache spent ~45 s in
# connection retries before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from philo_dataflow.testing import EXAMPLE_DATA, example_subset  # noqa: E402,F401 (EXAMPLE_DATA: for the test modules)
from philo_dataflow.testing import tiny_model_dir as tiny_model_dir_with  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "phillm" / "main_data.json"


def _session_package_cache() -> str:
    """A package cache (``$PHILO_DATAFLOW_CACHE``) of the test session's own: run.py's dataflow cache starts
    empty in every session, so no test reuses a result another session computed; the dense copies of GGUF
    models already made are linked in, not made again."""
    import atexit
    import shutil
    import tempfile

    from philo_dataflow.lib.model_sources import cache_root

    real, session = cache_root(), Path(tempfile.mkdtemp(prefix="philo-test-cache-"))
    atexit.register(shutil.rmtree, session, True)
    for entry in real.iterdir() if real.is_dir() else ():
        if entry.name != "dataflow":
            (session / entry.name).symlink_to(entry)
    return str(session)


os.environ["PHILO_DATAFLOW_CACHE"] = _session_package_cache()
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models gain nothing from a second one, and on a busy 2-core
    machine two contending threads made a training step 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The embedded SmolLM2 GGUF converted (once per machine) to a safetensors directory."""
    from philo_dataflow.lib.inputs import EMBEDDED_MODEL_ID
    from philo_dataflow.lib.model_sources import resolve_model_path

    return resolve_model_path(EMBEDDED_MODEL_ID)


@pytest.fixture(scope="session")
def chat_tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture(scope="session")
def alpaca_tokenizer(embedded_model_dir):
    """The same vocabulary with no chat template, so the alpaca prompt is used."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, chat_tokenizer) -> str:
    """A randomly initialised 2-layer Llama with the chat tokenizer, saved as a local model dir."""
    return tiny_model_dir_with(tmp_path_factory.mktemp("tiny-chat"), chat_tokenizer)


@pytest.fixture(scope="session")
def tiny_alpaca_model_dir(tmp_path_factory, alpaca_tokenizer) -> str:
    return tiny_model_dir_with(tmp_path_factory.mktemp("tiny-alpaca"), alpaca_tokenizer)


def logits_against_base(model, tiny_model_dir: str) -> dict:
    """Logits (1, 6, vocab) of one short sequence from a freshly loaded ``tiny_model_dir`` (``base``) and
    from the PEFT ``model`` with its adapter disabled and enabled."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 520, 33, 2164, 17, 198]])  # (1, 6)
    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        logits = {"base": fresh_base(ids).logits}
        with model.disable_adapter():
            logits["adapter_disabled"] = model(input_ids=ids).logits
        logits["adapter_enabled"] = model(input_ids=ids).logits
    return logits


@pytest.fixture
def small_jsonl(tmp_path) -> str:
    """30 alpaca records from the example data (three schools), as a JSONL file."""
    return example_subset(tmp_path / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))


#: Inputs that make a tiny-model run take seconds.
FAST_INPUTS = {
    "max_steps": 2,
    "eval_steps": 1,
    "logging_steps": 1,
    "per_device_train_batch_size": 4,
    "max_new_tokens": 8,
    "max_seq_length": 256,
    "hold_out_fraction": 0.2,
    "validation_fraction": 0.2,
    # Eager training: compiling the layers costs ~10 s per process and recompiles as tests switch models and
    # settings (the suite took minutes longer with it). The compiled path, CPU's default, is tested by the
    # embedded model's run.py test, the determinism test and tests/test_training.py's compile tests.
    "torch_compile": False,
}


def cli_flags(settings: dict) -> list[str]:
    """``settings`` (input name: value) as run.py's flags (``lib.problems.flag``); a bool as ``--name`` or
    ``--no-name``."""
    from philo_dataflow.lib.problems import flag

    flags = []
    for name, value in settings.items():
        if isinstance(value, bool):
            flags.append(flag(name) if value else "--no-" + flag(name).removeprefix("--"))
        else:
            flags += [flag(name), str(value)]
    return flags


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A finished tiny LoRA run (``DEFAULT_OUTPUTS`` of the tiny chat model on 30 example records, a few
    steps): its ``output_dir``, holding ``adapter/``, the hold-out predictions, ``metrics.json`` and the
    reports. Shared by the tests of what reads a run back (chat page, export, comparison); treat as
    read-only."""
    import philo_dataflow

    work = tmp_path_factory.mktemp("tiny-run")
    data = example_subset(work / "small.jsonl", 10, ("Stoicism", "Taoism", "Hedonism"))
    inputs = {**FAST_INPUTS, "data_path": data, "model_id": tiny_model_dir, "output_dir": str(work / "out"),
              "max_steps": 4}
    philo_dataflow.build_driver({"start": "base"}).execute(list(philo_dataflow.DEFAULT_OUTPUTS), inputs=inputs)
    return str(work / "out")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """``python -m llama_cpp.server`` with the embedded GGUF on a free loopback port, stopped by PID."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        pytest.fail(f"llama-cpp-python[server] is a dev requirement: run `bash setup.sh --dev` ({error})")
    from philo_dataflow.lib.model_sources import embedded_gguf_path

    from judge_servers import LlamaCppServer

    server = LlamaCppServer(str(embedded_gguf_path()), tmp_path_factory.mktemp("llama") / "server.log")
    try:
        server.wait_until_ready()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size_bytes: int):
    """A real filesystem of ``size_bytes`` (a tmpfs) for the ``with`` block, mounted at ``mount_point`` in a
    user and mount namespace of its own (``unshare -r -m``: no root needed where unprivileged user
    namespaces are allowed, and nothing is mounted for the rest of the machine), held by a sleeping process.
    Yields the path through which this process reaches it: ``/proc/PID/root`` + ``mount_point``. Skips the
    test where ``unshare`` or the mount is not permitted.
    """
    import shutil
    import subprocess
    import time

    if shutil.which("unshare") is None:
        pytest.skip("a small real filesystem needs util-linux's unshare, which is not installed")
    mount_point = mount_point.absolute()
    mount_point.mkdir(parents=True, exist_ok=True)
    ready = mount_point.with_name(mount_point.name + ".mounted")
    script = f'mount -t tmpfs -o size={size_bytes} tmpfs "$1" && touch "$2" && exec sleep 3600'
    holder = subprocess.Popen(["unshare", "-r", "-m", "sh", "-c", script, "sh", str(mount_point), str(ready)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if holder.poll() is not None:
                pytest.skip("a small real filesystem needs a tmpfs mounted in a user and mount namespace, which is "
                            f"not permitted here: {holder.stderr.read().strip()[:200]}")
            assert time.monotonic() < deadline, "unshare never mounted the tmpfs"
            time.sleep(0.05)
        yield Path(f"/proc/{holder.pid}/root{mount_point}")
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stderr.close()
        ready.unlink(missing_ok=True)
