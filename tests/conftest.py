"""Fixtures shared by the tests."""

import sys
from typing import ClassVar

import pytest


class RecordingBar:
    """A stand-in for tqdm that records its count, its total, and what it showed when each unit of work began;
    every bar made is appended to ``made``."""

    made: ClassVar[list] = []

    def __init__(self, iterable=None, total=None, **kwargs):
        self.total, self.n, self.postfix, self.started = total, 0, "", []
        self.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n

    def set_description(self, desc):
        self.started.append((desc, self.postfix))

    def set_postfix(self, refresh=True, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def refresh(self):
        pass

    def close(self):
        pass

    @staticmethod
    def write(text, file=None):
        print(text, file=file or sys.stdout)


@pytest.fixture
def recording_bar():
    """:class:`RecordingBar`, with no bar made yet: patch it in where the code under test looks tqdm up."""
    RecordingBar.made = []
    return RecordingBar
