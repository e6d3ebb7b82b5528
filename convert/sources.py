"""Where a Hugging Face checkpoint comes from, and reading its tensors one at a time.

A source is a local folder (config.json plus safetensors: one file, shards with
`model.safetensors.index.json`, or bare shards; or PyTorch state dicts: `pytorch_model.bin`, shards
with `pytorch_model.bin.index.json`, `*.pt`), a single weights file, or a Hugging Face Hub id
(downloaded with `huggingface_hub` when it is installed and the network is there).

`open_source` returns a reader with the interface of `huginn_jax.loading.TensorReader` (`files`,
`header`, calling it reads a tensor), so `huginn_jax.loading.check_checkpoint` validates it, plus
every structural problem found on the way: damaged or truncated files, a tensor stored twice,
an index that names a file or a tensor that is not there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from convert.safetensors_io import Entry, SafetensorsFormatError, read_header, read_tensor
from huginn_jax.loading import INDEX_FILE, SINGLE_FILE, CheckpointError

TORCH_SINGLE_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")
"""Files copied along (with the model code, *.py) so that a converted checkpoint describes itself."""
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.jinja"]


@dataclasses.dataclass
class Source:
    """An opened checkpoint: its tensors, its config file and side files, and what is wrong with it."""

    description: str  # for messages: the folder, file or hub id
    folder: Path
    config_path: Path
    reader: Any  # SafetensorsReader or TorchReader
    problems: list[str]
    unreadable_keys: set[str]  # tensors that an index puts in a file that cannot be read
    kind: str  # "safetensors" or "torch"

    @property
    def side_files(self) -> list[Path]:
        names = set(SIDE_FILES) | {Path(p).name for p in glob.glob(str(self.folder / "*.py"))}
        return sorted(self.folder / n for n in names if (self.folder / n).is_file())

    def nbytes(self, key: str) -> int:
        return self.reader.nbytes(key)


class SafetensorsReader:
    """Tensors of safetensors files, read with positioned reads (no memory map, see safetensors_io)."""

    def __init__(self, files: dict[str, str], entries: dict[str, Entry]):
        self.files = files
        self._entries = entries

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        if key not in self._entries:
            raise KeyError(f"{os.path.basename(self.files[key])} does not hold it")
        entry = self._entries[key]
        return entry.shape, entry.dtype

    def nbytes(self, key: str) -> int:
        entry = self._entries[key]
        return entry.end - entry.begin

    def __call__(self, key: str) -> np.ndarray:
        return read_tensor(self.files[key], self._entries[key])


class TorchReader:
    """Tensors of PyTorch state-dict files, memory-mapped where the file format allows."""

    def __init__(self, files: dict[str, str], load: Callable[[str], dict[str, Any]]):
        self.files = files
        self._load = load
        self._state: dict[str, dict[str, Any]] = {}

    def _tensor(self, key: str) -> Any:
        path = self.files[key]
        if path not in self._state:
            self._state[path] = self._load(path)
        if key not in self._state[path]:
            raise KeyError(f"{os.path.basename(path)} does not hold it")
        return self._state[path][key]

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        tensor = self._tensor(key)
        return tuple(tensor.shape), _TORCH_DTYPE_NAMES.get(str(tensor.dtype), str(tensor.dtype))

    def nbytes(self, key: str) -> int:
        tensor = self._tensor(key)
        return tensor.numel() * tensor.element_size()

    def __call__(self, key: str) -> np.ndarray:
        import torch

        tensor = self._tensor(key).detach().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return tensor.numpy().copy()


_TORCH_DTYPE_NAMES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                      "torch.float64": "F64", "torch.int64": "I64", "torch.int32": "I32", "torch.bool": "BOOL"}


def source_paths(location: str | os.PathLike[str], config_path: str | os.PathLike[str] | None = None,
                 files: Iterable[str | os.PathLike[str]] = (),
                 side_files: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """What an output must keep clear of (`huginn_jax.checkpoint.check_output_path`): the source
    (a folder, or a single weights file), its config and every other file it reads; behind a
    symlink, the folder of its target too (the blobs of a Hugging Face cache); for a source inside
    a Hugging Face cache (.../models--org--name/snapshots/REV), the model's whole cache folder.

    So an output may not be, contain or lie inside a source folder; beside a single weights file it
    may be a new folder in the same folder, but not the file, its config, or a folder holding them.
    """
    location = Path(location)
    paths = [location]
    for file in [*([config_path] if config_path else []), *files, *side_files]:
        paths.append(Path(file))
        if os.path.islink(file):
            paths.append(Path(os.path.realpath(file)).parent)
    real = Path(os.path.realpath(location if location.is_dir() else location.parent))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        paths.append(real.parent.parent)
    return paths


def resolve(source: str, revision: str | None = None) -> Path:
    """A local path for `source`: itself when it exists, else a download of that Hub id."""
    if os.path.exists(source):
        return Path(source)
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"source {source}", ["no such file or folder (nor a Hugging Face Hub id such as "
                                                   "org/name)"])
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(source, [
            "is not a local folder, and downloading it from the Hugging Face Hub needs huggingface_hub "
            "(pip install huggingface_hub); or pass a local folder"]) from None
    try:
        folder = Path(huggingface_hub.snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS))
        if not glob.glob(str(folder / "*.safetensors")):
            folder = Path(huggingface_hub.snapshot_download(
                source, revision=revision, allow_patterns=HUB_PATTERNS + ["*.bin", "*.pt"]))
    except Exception as err:  # network, authentication, missing repository: all reported the same way
        raise CheckpointError(source, [
            f"cannot be downloaded from the Hugging Face Hub ({type(err).__name__}: {err}); check the "
            "network connection and the repository id, or pass a local folder"]) from None
    return folder


def open_source(path: str | os.PathLike[str], config_path: str | os.PathLike[str] | None = None,
                description: str | None = None) -> Source:
    """Finds the weight files of a folder (or takes one file) and checks their structure."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = Path(config_path) if config_path else folder / "config.json"
    if path.is_file():
        kind = "safetensors" if path.suffix == ".safetensors" else "torch"
        key_files, index_problems = None, []
        weight_files = [path]
    else:
        kind, weight_files, key_files, index_problems = _find_weights(folder)
    reader, problems, broken = (_open_safetensors if kind == "safetensors" else _open_torch)(weight_files, key_files)
    unreadable = {key for key, name in (key_files or {}).items() if name in broken}
    return Source(description or os.fspath(path), folder, config, reader, index_problems + problems, unreadable, kind)


def _find_weights(folder: Path) -> tuple[str, list[Path], dict[str, str] | None, list[str]]:
    """(kind, weight files, key -> file name from an index or None, problems of the index)."""
    for kind, index_name, single in (("safetensors", INDEX_FILE, SINGLE_FILE),
                                     ("torch", TORCH_INDEX_FILE, TORCH_SINGLE_FILE)):
        index = folder / index_name
        if index.exists():
            key_files, problems = _read_index(index)
            names = sorted(set(key_files.values()))
            return kind, [folder / n for n in names], key_files, problems
        if (folder / single).exists():
            return kind, [folder / single], None, []
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return "safetensors", shards, None, []
    torch_files = sorted(p for p in folder.iterdir() if p.suffix in TORCH_SUFFIXES)
    if torch_files:
        return "torch", torch_files, None, []
    raise CheckpointError(os.fspath(folder), [
        f"no weights found: neither {SINGLE_FILE}, {INDEX_FILE}, *.safetensors, {TORCH_SINGLE_FILE}, "
        f"{TORCH_INDEX_FILE} nor *.pt"])


def _read_index(index: Path) -> tuple[dict[str, str], list[str]]:
    problems: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out and isinstance(value, str):
                problems.append(f"{key}: listed twice in {index.name} ({out[key]} and {value})")
            out[key] = value
        return out

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=pairs).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(os.fspath(index), [f"is not a valid index ({err})"]) from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(os.fspath(index), ["has no 'weight_map' object"])
    return weight_map, problems


def _locate_keys(files: list[Path], key_files: dict[str, str] | None, read_keys: Callable[[Path], Any],
                 unreadable: tuple[type[BaseException], ...], describe: Callable[[BaseException], str]
                 ) -> tuple[dict[str, str], list[str], set[str]]:
    """Reads which keys each weight file holds (`read_keys`) and checks them against the index:
    (key -> path of the file to read it from, every problem found, the files that cannot be read)."""
    problems: list[str] = []
    broken: set[str] = set()
    holders: dict[str, list[str]] = {}
    for file in files:
        if not file.exists():
            problems.append(f"{file.name}: listed in the index but does not exist")
            broken.add(file.name)
            continue
        try:
            keys = read_keys(file)
        except unreadable as err:
            problems.append(f"{file.name}: {describe(err)}")
            broken.add(file.name)
            continue
        for key in keys:
            holders.setdefault(key, []).append(file.name)
    for key, names in sorted(holders.items()):
        if len(names) > 1:
            problems.append(f"{key}: stored more than once (in {', '.join(names)})")
        elif key_files is not None and key not in key_files:
            problems.append(f"{key}: stored in {names[0]} but not listed in the index")
    if key_files is None:
        key_files = {key: names[0] for key, names in holders.items()}
    for key, name in sorted(key_files.items()):
        if name not in broken and name not in holders.get(key, []):
            problems.append(f"{key}: the index puts it in {name}, which does not hold it")
    folder = files[0].parent
    paths = {k: os.fspath(folder / n) for k, n in key_files.items() if n in holders.get(k, [])}
    return paths, problems, broken


def _open_safetensors(files: list[Path], key_files: dict[str, str] | None
                      ) -> tuple[SafetensorsReader, list[str], set[str]]:
    headers: dict[str, dict[str, Entry]] = {}

    def read_keys(file: Path) -> Any:
        headers[os.fspath(file)] = read_header(file)[0]
        return headers[os.fspath(file)]

    paths, problems, broken = _locate_keys(files, key_files, read_keys, (SafetensorsFormatError,), str)
    return SafetensorsReader(paths, {k: headers[p][k] for k, p in paths.items()}), problems, broken


def _open_torch(files: list[Path], key_files: dict[str, str] | None) -> tuple[TorchReader, list[str], set[str]]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(os.fspath(files[0]), [
            "PyTorch state dicts (.bin, .pt) need torch installed (pip install torch); "
            "safetensors checkpoints do not"]) from None
    states: dict[str, dict[str, Any]] = {}

    def read_keys(file: Path) -> Any:
        path = os.fspath(file)
        with contextlib.suppress(RuntimeError):  # the legacy (non-zip) format cannot be memory-mapped
            states[path] = _state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            return states[path]
        states[path] = _state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return states[path]

    paths, problems, broken = _locate_keys(
        files, key_files, read_keys, (Exception,),  # torch raises many types for damaged files
        lambda err: f"cannot be read as a PyTorch state dict ({type(err).__name__}: {err})")
    return TorchReader(paths, states.__getitem__), problems, broken


def _state_dict(loaded: Any) -> dict[str, Any]:
    """The tensors of a loaded file: a state dict, or one wrapped as {'state_dict': ...} / {'model': ...}."""
    import torch

    if isinstance(loaded, dict) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                return _state_dict(loaded[wrapper])
    if not isinstance(loaded, dict):
        raise ValueError(f"holds a {type(loaded).__name__}, not a state dict")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
