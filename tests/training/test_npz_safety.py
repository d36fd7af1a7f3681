"""The original-format .npz stores `test_data` as a pickle, and unpickling runs whatever a file says. By default
only plain data is rebuilt: the paper's own files load, a file whose pickle calls anything else is refused
without running it; `--trust-pickle` unpickles as numpy would (for a file the user trusts)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import CITEULIKE
from training.cli import main
from training.data import DataError, load_npz


class Payload:
    """Unpickling this runs `os.system(command)`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_npz(path, test_data) -> str:
    np.savez(path, train_data=np.array([[0, 0], [0, 1], [1, 1], [2, 0]], dtype=np.uint32),
             test_data=np.array(test_data, dtype=object))
    return str(path)


@pytest.mark.skipif(not CITEULIKE.exists(), reason=f"the paper's data set is not at {CITEULIKE}")
def test_the_papers_citeulike_a_loads_by_default():
    data = load_npz(str(CITEULIKE))
    assert (data.n_users, data.n_items, len(data.train), len(data.test)) == (5551, 16980, 199435, 5551)
    assert data.test.negatives.shape == (5551, 100)


def test_plain_data_written_by_this_numpy_loads(tmp_path):
    test = {0: (np.int64(2), [np.int64(3), 4]), 1: (3, np.array([0, 2])), 2: (1, (0, 3))}
    data = load_npz(write_npz(tmp_path / "plain.npz", test))
    assert data.test.users.tolist() == [0, 1, 2] and data.test.positives.tolist() == [2, 3, 1]
    assert data.test.negatives.tolist() == [[3, 4], [0, 2], [0, 3]]


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = write_npz(tmp_path / "evil.npz", {0: (Payload(f"touch {marker}"), [1])})
    with pytest.raises(DataError, match=r"pickle that calls (posix|nt)\.system.*refused without running it"):
        load_npz(path)
    assert main(["baselines", "--data", path]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_trust_pickle_unpickles_as_it_is(tmp_path):
    """What the flag is for, and why it is not the default: a trusted file's pickle is run, whatever it holds
    (here the positive item is whatever `os.system` returns: 0)."""
    marker = tmp_path / "ran"
    path = write_npz(tmp_path / "trusted.npz", {0: (Payload(f"touch {marker}"), [1])})
    with pytest.raises(DataError):
        load_npz(path)
    assert not marker.exists()
    data = load_npz(path, trust_pickle=True)
    assert marker.exists() and data.test.positives.tolist() == [0]
