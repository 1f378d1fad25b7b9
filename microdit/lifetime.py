"""Processes that end with the job that started them: a stage's helper processes, and a trainer
whose workflow manager was killed.

`kill -9` of a stage (the OOM killer, a user's `kill`, a manager that lost track of it) gives it
no chance to stop its worker processes. Left alone they finish the shard in hand after the rerun
has started on it, or wait for work forever (img2dataset's logger polls the output folder for
good). Linux can deliver a signal to a child when its parent dies (PR_SET_PDEATHSIG); elsewhere
this does nothing, as there is no equivalent.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have `sig` sent to this process when `parent_pid`, its parent, dies (a pool initializer:
    the pool's work is atomic, so a worker killed mid-way leaves only a temp file behind)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before we asked: no signal will come
        os.kill(os.getpid(), sig)


def _end_own_group(*_) -> None:
    os.killpg(0, signal.SIGKILL)


def lead_group_that_dies_with_parent(parent_pid: int) -> None:
    """Make this process the leader of a new process group that is killed, whole, when
    `parent_pid` dies: for a library (img2dataset) whose own processes we cannot reach, they are
    all started after this call and so belong to the group."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, _end_own_group)
    die_with_parent(parent_pid, signal.SIGTERM)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
