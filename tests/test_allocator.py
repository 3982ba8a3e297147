"""The compiled CPU step's allocator setting: freed buffers stay in the process instead of faulting back."""

import subprocess
import sys

import pytest
import torch

from resnetlab import TrainConfig
from resnetlab.training import engine
from resnetlab.training.distributed import SINGLE_PROCESS

# A fresh process allocates, fills and frees a tensor ten times and counts the minor page faults of
# the last eight: 32 MiB (above glibc's own largest threshold) before and after keep_freed_memory(),
# then 128 MiB (above the one it sets), which is still given back to the system each time.
PROBE = r"""
import resource, sys, torch
from resnetlab.training.allocator import keep_freed_memory

def faults(mib):
    for _ in range(2):  # the first allocations at this size may fault either way (the heap grows)
        torch.empty(mib * 2**18).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.empty(mib * 2**18).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults(32)
took = keep_freed_memory()
print(default, took, faults(32), faults(128))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_instead_of_faulting_back_in():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    default, took, kept, large = done.stdout.split()
    assert took == "True"
    # glibc's default maps each 32 MiB block afresh: all 8,192 of its 4 KiB pages fault on every fill
    assert int(default) >= 8 * 8_192
    assert int(kept) <= 8_192 + 100  # now at most once (seen here: 0, at times one block's pages)
    assert int(large) >= 8 * 32_768  # a 128 MiB block is not kept in the process


def test_only_a_compiled_cpu_run_changes_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(1))
    data = "synthetic:3x8x8:2:64"
    engine.Trainer(TrainConfig(model="resnet20", data=data, batch_size=16), torch.device("cpu"), SINGLE_PROCESS)
    assert calls == []
    trainer = engine.Trainer(
        TrainConfig(model="resnet20", data=data, batch_size=16, compile=True), torch.device("cpu"), SINGLE_PROCESS
    )
    assert calls == [1] and trainer.model is not trainer.core  # compiled lazily: nothing compiled yet
