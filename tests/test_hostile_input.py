"""Hostile and careless input, round two: names that look like console markup, rows of another
run or job, pickles that ask for more memory than they hold, glob characters in paths, export
names that collide, file system errors, plan.json of the wrong shape, deep or oddly typed input.

Each case ends in one clear error (exit 2, naming the file, field or path, no traceback) or in
output that shows the input as it is; nothing committed is lost or counted twice."""

from __future__ import annotations

import collections
import copyreg
import json
import pickle
import resource
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from analytics_data import write_sweep
from pipeline.cli import app
from pipeline.errors import CheckpointError
from pipeline.models.safe_pickle import read_pickle


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def clean_exit_2(result, *words):
    """The command refused its input: exit 2, one message naming `words`, no traceback."""
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for word in words:
        assert str(word) in text, (word, text)


@pytest.fixture
def run(tmp_path) -> str:
    return write_sweep(str(tmp_path / "runs" / "sweep-0001"), images=False)


# -- 1: every table cell is text, never console markup ---------------------------------------------


def test_names_in_brackets_show_as_they_are(run):
    result = invoke("report", run, "--section", "summary")
    assert result.exit_code == 0, result.output
    assert "rdc-optimal[timesteps=5]" in result.output and "rdc-optimal[timesteps=20]" in result.output
    result = invoke("compare", run, "--a", "rdc-optimal[timesteps=5]", "--b", "rdc-optimal[timesteps=20]",
                    "--resamples", "10")
    assert result.exit_code == 0, result.output
    assert "rdc-optimal[timesteps=5]" in result.output
    result = invoke("sql", run, """SELECT '[/x]' AS "[/y]", '[link=http://example.com]z[/link]' AS w, '[bold]b' AS v""")
    assert result.exit_code == 0, result.output
    for text in ("[/x]", "[/y]", "[link=http://example.com]z[/link]", "[bold]b"):
        assert text in result.output


# -- 3: pickles that ask for memory they do not hold, or rewrite the reader's records -------------


def test_a_stride_zero_memory_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps({"ema": torch.zeros(1).as_strided((100_000, 100_000), (0, 0))}))
    assert path.stat().st_size < 1000  # 40 GB declared in a few hundred bytes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"bomb\.pkl: tensor of size \(100000, 100000\) has 10000000000 elements, "
                                              r"more than its storage"):
        read_pickle(path)
    assert time.perf_counter() - start < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # under 100 MiB more, at peak
    # A repeated element along a dimension is refused even within the storage's size.
    path.write_bytes(pickle.dumps({"ema": torch.zeros(4).as_strided((2, 2), (0, 1))}))
    with pytest.raises(CheckpointError, match=r"stride \(0, 1\): a zero stride repeats one element"):
        read_pickle(path)
    path.write_bytes(pickle.dumps({"ema": torch.arange(6.0).view(2, 3).t()}))  # an ordinary view still reads
    assert torch.equal(read_pickle(path)["ema"], torch.arange(6.0).view(2, 3).t())


class _WithState:
    """Pickles as `reduce` plus a BUILD of `state` onto what it returns."""

    def __init__(self, reduce, args, state):
        self.reduce, self.args, self.state = reduce, args, state

    def __reduce__(self):
        return (self.reduce, self.args, self.state)


@pytest.fixture
def persistence(monkeypatch):
    """A module torch_utils.persistence whose hook only pickles (the reader never imports it)."""
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("only pickled")

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)
    return _reconstruct_persistent_obj


def test_build_opcodes_cannot_rewrite_the_readers_records(tmp_path, persistence):
    from torch._utils import _rebuild_tensor_v2

    path = tmp_path / "build.pkl"
    meta = {"type": "class", "version": 6, "module_src": "", "class_name": "VPPrecond", "state": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, yet it is what a plain pickle of a tensor holds
        storage = torch.zeros(4).storage()
    cases = {
        "PersistentObject": _WithState(persistence, (meta,), {"class_name": 5, "state": 1}),
        "TensorRef": _WithState(_rebuild_tensor_v2, (storage, 0, (2,), (1,), False, collections.OrderedDict()),
                                {"size": "xx"}),
        "Sequential": _WithState(copyreg._reconstructor, (torch.nn.Sequential, object, None), [1, 2]),
    }
    for name, payload in cases.items():
        path.write_bytes(pickle.dumps({"ema": payload}, protocol=2))
        with pytest.raises(CheckpointError, match=r"build\.pkl.*the pickle sets .*state on "):
            read_pickle(path)
    # What one load sets on a stand-in function does not reach the next load.
    from pipeline.models import safe_pickle

    first, second = safe_pickle._globals(), safe_pickle._globals()
    assert first[("torch._utils", "_rebuild_tensor_v2")] is not second[("torch._utils", "_rebuild_tensor_v2")]
