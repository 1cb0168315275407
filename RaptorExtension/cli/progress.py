"""Command-line progress: one bar for volumes, one for the slices of the current volume.

The engine reports progress through plain callbacks, so the same job shows
tqdm bars here and a Qt progress bar in Slicer.
"""

from __future__ import annotations

import sys


class Progress:
    """tqdm bars (volumes, slices) with rate and ETA; a no-op when disabled."""

    def __init__(self, total_volumes: int, enabled: bool = True) -> None:
        self.enabled = enabled and total_volumes > 0
        self._volumes = self._slices = None
        self._current = None
        if self.enabled:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._volumes = tqdm(total=total_volumes, desc="volumes", unit="vol", position=0, file=sys.stderr, dynamic_ncols=True)

    def slices(self, volume_id: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._current != volume_id:
            if self._slices is not None:
                self._slices.close()
            self._slices = self._tqdm(total=total, desc=f"{volume_id[:24]:24s}", unit="slice", position=1,
                                      leave=False, file=sys.stderr, dynamic_ncols=True)
            self._current = volume_id
        self._slices.n = done
        self._slices.refresh()

    def volume_done(self) -> None:
        if self._volumes is not None:
            self._volumes.update(1)

    def write(self, message: str) -> None:
        if self.enabled:
            self._tqdm.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        for bar in (self._slices, self._volumes):
            if bar is not None:
                bar.close()
