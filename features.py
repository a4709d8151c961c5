"""The public features format: features.npy (N, P, C) float16/float32 + names.json (+ meta.json).

A folder written by `write_features` (feature extraction, `--mode extract`) or by any other tool
in this format can be trained on and evaluated with `--features_dir`.
Letters in shape comments: N images, P encoder positions, C encoder channels.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from fileio import fsync_dir, replace, write_json


class FeatureStore:
    """Read side of the format.

    The array is memory-mapped, so opening a large file costs nothing and memory does not grow
    with it; `get` copies one image's features out as float32.
    """

    def __init__(self, directory: Path, names: list[str], array: np.ndarray, meta: dict):
        self.directory = directory
        self.names = names
        self.meta = meta
        self._array = array
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureStore:
        directory = Path(directory)
        npy, names_file = directory / "features.npy", directory / "names.json"
        for f in (npy, names_file):
            if not f.is_file():
                raise FileNotFoundError(f"features folder {directory} has no {f.name} "
                                        "(expected features.npy + names.json)")
        try:
            array = np.load(npy, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise ValueError(f"{npy} is not a readable .npy file: {exc}") from None
        names = json.loads(names_file.read_text(encoding="utf-8"))
        if array.ndim != 3 or array.dtype not in (np.float16, np.float32):
            raise ValueError(f"{npy}: expected a (N, P, C) float16/float32 array, "
                             f"got {array.shape} {array.dtype}")
        if not isinstance(names, list) or len(names) != array.shape[0]:
            raise ValueError(f"{directory}: names.json has {len(names)} names for {array.shape[0]} rows")
        meta_file = directory / "meta.json"
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        return cls(directory, names, array, meta)

    @property
    def num_positions(self) -> int:
        return int(self._array.shape[1])

    @property
    def channels(self) -> int:
        return int(self._array.shape[2])

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(f"{name} is not in the features file {self.directory}")
        row = np.array(self._array[self._index[name]], dtype=np.float32)   # (P, C), a copy off the map
        return torch.from_numpy(row)

    # Workers started with spawn pickle the data set: send the path, not the mapped array.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = np.load(self.directory / "features.npy", mmap_mode="r")


def _fill(path: Path, n: int, batches: Iterable[np.ndarray], positions: int, channels: int) -> None:
    """Write (b, P, C) batches into a new float16 (N, P, C) .npy file, checking every shape."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, positions, channels))
    filled = 0
    for batch in batches:
        batch = np.asarray(batch)
        if batch.ndim != 3 or batch.shape[1:] != (positions, channels):
            raise ValueError(f"write_features: batch of shape {batch.shape}, "
                             f"expected (b, {positions}, {channels})")
        if filled + len(batch) > n:
            raise ValueError(f"write_features: more rows than the {n} names")
        out[filled:filled + len(batch)] = batch
        filled += len(batch)
    if filled != n:
        raise ValueError(f"write_features: {filled} rows written for {n} names")
    out.flush()
    del out
    with open(path, "rb") as f:   # the memory map is flushed; make it durable before the rename
        os.fsync(f.fileno())


def write_features(directory: str | os.PathLike, names: Sequence[str], batches: Iterable[np.ndarray],
                   positions: int, channels: int, meta: dict | None = None) -> None:
    """Write features in the public format, atomically (a temporary folder renamed into place).

    `batches` yields (b, P, C) arrays in the order of `names`; stored as float16.
    """
    directory = Path(directory)
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("write_features: names must be unique")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _fill(tmp / "features.npy", len(names), batches, positions, channels)
        write_json(tmp / "names.json", names)
        write_json(tmp / "meta.json", meta or {})
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            replace(directory, old)
            replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(directory.parent)
