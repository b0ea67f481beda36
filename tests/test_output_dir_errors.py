"""An output directory the filesystem refuses is one line naming the flag and what to do, exit code 2, for the
main job and compare (issue #34, item 5): a read-only filesystem, met for real in a mount namespace of our own
(``unshare``), and the lock's own creation of the directory (``lib.artifacts.output_dir_lock``), which a run
reaches when the directory goes bad after the preflight. /proc, /sys and a file in the way are in the bad-input
corpus (tests/bad_inputs)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs.cases import GOOD

from philo_dataflow.lib.artifacts import output_dir_lock
from philo_dataflow.testing import tree


def _can_mount_read_only(directory: Path) -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {directory}"],
                           capture_output=True, timeout=60)
    return probe.returncode == 0


def test_the_commands_name_the_flag_on_a_read_only_filesystem(tmp_path, tiny_model_dir):
    mount_point = tmp_path / "read-only"
    mount_point.mkdir()
    if not _can_mount_read_only(mount_point):
        pytest.skip("no user and mount namespaces here (unshare -rm) to mount a read-only filesystem")
    run = f"{sys.executable} -m philo_dataflow"
    main_job = f"{run} --data-path {GOOD} --model-id {tiny_model_dir} --no-graph --output-dir {mount_point}/out"
    compare = (f"{run} compare {tiny_model_dir} --base {tiny_model_dir} --data-path {GOOD} "
               f"--output-dir {mount_point}/comparison")
    # each command on its own line of stderr, after its exit status on stdout
    script = (f"mount -t tmpfs -o ro tmpfs {mount_point} && for command in '{main_job}' '{compare}'; do "
              "$command; echo $?; done")
    before = tree(tmp_path)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.stdout.split() == ["2", "2"], done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [
        f"error: output_dir='{mount_point}/out' (--output-dir): {mount_point} is on a read-only filesystem; give a "
        "directory on a writable disk.",
        f"error: --output-dir {mount_point}/comparison: {mount_point} is on a read-only filesystem; give a directory "
        "on a writable disk.",
    ], done.stderr[-3000:]
    assert tree(tmp_path) == before


def test_the_lock_names_the_flag_when_the_directory_cannot_be_made(tmp_path):
    """The lock creates the directory: what the filesystem answers there is the same one line (/proc answers
    ENOENT to root and to anyone else)."""
    (tmp_path / "plain_file").write_text("x")
    expected = {
        "/proc/philo_dataflow_out/run": "--output-dir /proc/philo_dataflow_out/run: cannot be created in /proc, which "
                                        "takes no new directories (a virtual filesystem such as /proc or /sys); give "
                                        "a directory on a disk you can write to.",
        str(tmp_path / "plain_file" / "out"): f"--output-dir {tmp_path / 'plain_file' / 'out'}: "
                                               f"{tmp_path / 'plain_file'} is a file, not a directory; give a "
                                               "directory path.",
        str(tmp_path / "plain_file"): f"--output-dir {tmp_path / 'plain_file'}: {tmp_path / 'plain_file'} is a "
                                      "file, not a directory; give a directory path.",
    }
    for output_dir, message in expected.items():
        with pytest.raises(ValueError) as raised:
            with output_dir_lock(output_dir, "--output-dir"):
                pass
        assert str(raised.value) == message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plain_file"]
