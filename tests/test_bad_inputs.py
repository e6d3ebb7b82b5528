"""Bad inputs across the public API and the command lines, one table per entry point.

Every row names its input, the exception (API) or exit status (CLI) it must give, and text the
message must hold: the option or file at fault. For operations on files, the file system below the
test's folder must be unchanged afterwards (hashed before and after), and a CLI must print one or
two lines, never a traceback.

Tables, each with its own test function: CONVERT_CASES (convert.import_checkpoint /
export_checkpoint), CONVERT_CLI_CASES (`python -m convert`), RESTORE_CASES
(huginn_jax.checkpoint.restore on damaged folders), LOAD_HF_CASES (huginn_jax.load_hf_checkpoint
on damaged Hugging Face folders), FORWARD_CASES and SAMPLER_CASES (the model's and the samplers'
options and parameter trees), SCRIPT_CASES (the experiment scripts). Helpers for new tables: `tree_digest` (the
file system check), `Case` / `CliCase` (a row), LAUNCHER and FAULTS (a CLI run with a failure
injected into its process).
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, Callable

import jax
import pytest

from convert import export_checkpoint, import_checkpoint
from huginn_jax import checkpoint
from huginn_jax.loading import CheckpointError
from samplers import SamplingConfig
from tests.conftest import CHECKPOINT_DIR

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Relative path -> sha256 of the contents (files), 'dir', or 'link -> target', hidden entries included."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = os.fspath(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: `setup(root)` prepares the files under `root` and returns what the call needs."""

    name: str
    setup: Callable[[Path], dict[str, Any]]
    error: type[BaseException]
    says: tuple[str, ...]  # text the message must hold; "{root}" stands for the test's folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The fixture checkpoint converted (bfloat16)."""
    out = tmp_path_factory.mktemp("bad-inputs") / "converted"
    import_checkpoint(str(CHECKPOINT_DIR), out, progress=False)
    return out


def _hf_copy(root: Path) -> Path:
    shutil.copytree(CHECKPOINT_DIR, root / "hf")
    return root / "hf"


def _hub_cache(root: Path) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: snapshot files link to blobs."""
    repo = root / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for file in CHECKPOINT_DIR.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.name.encode()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def _nan_weights(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.ln_f.weight"][3] = float("nan")
    save_file(tensors, folder / "model.safetensors")


def _offline_hub(snapshot: Path) -> types.SimpleNamespace:
    return types.SimpleNamespace(snapshot_download=lambda *args, **kwargs: os.fspath(snapshot))


# ---------------------------------------------------------------- convert: the API

def _import(**kwargs: Any) -> dict[str, Any]:
    return {"call": import_checkpoint, **kwargs}


def _export(**kwargs: Any) -> dict[str, Any]:
    return {"call": export_checkpoint, **kwargs}


CONVERT_CASES = [
    Case("import onto its own source folder",
         lambda r: _import(source=str(_hf_copy(r)), output=r / "hf", overwrite=True),
         ValueError, ("output {root}/hf is the source",)),
    Case("import into a parent of the source",
         lambda r: _import(source=str(_hf_copy(r)), output=r, overwrite=True),
         ValueError, ("output {root} contains the source",)),
    Case("import into a folder inside the source",
         lambda r: _import(source=str(_hf_copy(r)), output=r / "hf" / "jax"),
         ValueError, ("output {root}/hf/jax lies inside the source",)),
    Case("import through a symlink to the source",
         lambda r: (os.symlink(_hf_copy(r), r / "link"), _import(source=str(r / "hf"), output=r / "link",
                                                                 overwrite=True))[1],
         ValueError, ("output {root}/link is the source",)),
    Case("import of a weights file onto the file",
         lambda r: _import(source=str(_hf_copy(r) / "model.safetensors"), output=r / "hf" / "model.safetensors",
                           overwrite=True),
         ValueError, ("model.safetensors is the source",)),
    Case("import of a weights file onto its folder",
         lambda r: _import(source=str(_hf_copy(r) / "model.safetensors"), output=r / "hf", overwrite=True),
         ValueError, ("output {root}/hf contains the source",)),
    Case("import onto its --config",
         lambda r: _import(source=str(_hf_copy(r) / "model.safetensors"), output=r / "cfg.json", overwrite=True,
                           config_path=str(Path(shutil.copy(CHECKPOINT_DIR / "config.json", r / "cfg.json")))),
         ValueError, ("output {root}/cfg.json is the source",)),
    Case("import of a Hub id onto its cache folder",
         lambda r: _import(source="org/tiny", output=_hub_cache(r).parent.parent, overwrite=True),
         ValueError, ("output {root}/hub/models--org--tiny contains the source",)),
    Case("import of a Hub id into its blobs",
         lambda r: _import(source="org/tiny", output=_hub_cache(r).parent.parent / "blobs" / "jax"),
         ValueError, ("lies inside the source", "models--org--tiny/blobs")),
    Case("import of a Hub id into the whole cache",
         lambda r: _import(source="org/tiny", output=(_hub_cache(r), r / "hub")[1], overwrite=True),
         ValueError, ("output {root}/hub contains the source",)),
    Case("import of a missing source",
         lambda r: _import(source=str(r / "nowhere"), output=r / "out"),
         CheckpointError, ("source {root}/nowhere", "no such file or folder")),
    Case("import of a folder without weights",
         lambda r: (r.joinpath("empty").mkdir(), _import(source=str(r / "empty"), output=r / "out"))[1],
         CheckpointError, ("{root}/empty", "no weights found")),
    Case("import with an unknown dtype",
         lambda r: _import(source=str(CHECKPOINT_DIR), output=r / "out", dtype="float16"),
         ValueError, ("dtype must be one of", "float16")),
    Case("import with a broken config.json",
         lambda r: (_hf_copy(r).joinpath("config.json").write_text("{oops"),
                    _import(source=str(r / "hf"), output=r / "out"))[1],
         CheckpointError, ("config.json: not valid JSON",)),
    Case("import refused midway (--strict) into new nested folders",
         lambda r: (_nan_weights(_hf_copy(r)), _import(source=str(r / "hf"), output=r / "new" / "deeper" / "out",
                                                       strict=True))[1],
         CheckpointError, ("NaN or Inf", "(--strict)")),
    Case("import onto an existing output",
         lambda r: (r.joinpath("out").mkdir(), _import(source=str(CHECKPOINT_DIR), output=r / "out"))[1],
         FileExistsError, ("output {root}/out already exists", "overwrite")),
    Case("export onto its own source",
         lambda r: _export(source=r / "ckpt", output=r / "ckpt", overwrite=True),
         ValueError, ("output {root}/ckpt is the source",)),
    Case("export into a folder inside its source",
         lambda r: _export(source=r / "ckpt", output=r / "ckpt" / "params", overwrite=True),
         ValueError, ("output {root}/ckpt/params lies inside the source",)),
    Case("export into a parent of its source",
         lambda r: _export(source=r / "ckpt", output=r, overwrite=True),
         ValueError, ("output {root} contains the source",)),
    Case("export of a folder that is no converted checkpoint",
         lambda r: _export(source=_hf_copy(r), output=r / "out"),
         CheckpointError, ("{root}/hf", "huginn_jax.json and params are missing: not a converted")),
    Case("export of a missing folder",
         lambda r: _export(source=r / "nowhere", output=r / "out"),
         CheckpointError, ("{root}/nowhere", "does not exist")),
    Case("export with a malformed max_shard_size",
         lambda r: _export(source=r / "ckpt", output=r / "out", max_shard_size="lots"),
         ValueError, ("max_shard_size", "'lots'")),
    Case("export with a max_shard_size of 0",
         lambda r: _export(source=r / "ckpt", output=r / "out", max_shard_size="0MB"),
         ValueError, ("max_shard_size must be positive",)),
    Case("export of a damaged checkpoint",
         lambda r: (_overwrite_8_bytes(r), _export(source=r / "ckpt", output=r / "out"))[1],
         CheckpointError, ("{root}/ckpt", "checksum", "the stored data changed")),
    Case("export onto an existing output",
         lambda r: (r.joinpath("out").mkdir(), _export(source=r / "ckpt", output=r / "out"))[1],
         FileExistsError, ("output {root}/out already exists", "overwrite")),
]


@pytest.mark.parametrize("case", CONVERT_CASES, ids=[c.name for c in CONVERT_CASES])
def test_convert_api_rejects_bad_input_and_changes_nothing(case, converted, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(converted, root / "ckpt")
    kwargs = case.setup(root)
    if kwargs["source"] == "org/tiny":
        monkeypatch.setitem(sys.modules, "huggingface_hub", _offline_hub(root / "hub" / "models--org--tiny" /
                                                                         "snapshots" / "abc123"))
    call = kwargs.pop("call")
    before = tree_digest(tmp_path)
    with pytest.raises(case.error) as err:
        call(progress=False, **kwargs)
    for text in case.says:
        assert text.format(root=root) in str(err.value), str(err.value)
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------- convert: the command line

@dataclasses.dataclass(frozen=True)
class CliCase:
    """A command line: `setup(root)` prepares the folder and returns the arguments; `fault` names a
    failure injected into the converter's process (see FAULTS)."""

    name: str
    setup: Callable[[Path], list[str]]
    status: int
    says: tuple[str, ...]
    fault: str | None = None


# Failures the machine cannot be asked for, injected into the converter's process before it runs:
# the system calls fail as they do when the disk is full, or the folder read-only (root ignores a
# folder's permissions, so chmod alone cannot make one read-only in CI).
FAULTS = {
    "full disk": """
import builtins, errno, io, os
real_open = builtins.open
class FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
def open_on_a_full_disk(file, mode="r", *args, **kwargs):
    if mode == "wb" and "/.out.incomplete-" in os.path.abspath(os.fspath(file)):
        return FullDisk(file, "w")
    return real_open(file, mode, *args, **kwargs)
builtins.open = open_on_a_full_disk
""",
    "read-only folder": """
import errno, os
real_mkdir = os.mkdir
def mkdir(path, *args, **kwargs):
    if os.path.dirname(os.path.abspath(os.fspath(path))) == os.environ["READ_ONLY"]:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
    return real_mkdir(path, *args, **kwargs)
os.mkdir = mkdir
""",
}
LAUNCHER = """
import runpy, sys
exec(sys.argv.pop(1))
sys.argv = ["convert", *sys.argv[1:]]
runpy.run_module("convert", run_name="__main__", alter_sys=True)
"""


def _read_only(root: Path) -> list[str]:
    (root / "ro").mkdir()
    os.chmod(root / "ro", 0o555)  # enough for a user other than root; FAULTS covers root
    return ["import", f"--source={CHECKPOINT_DIR}", f"--output={root / 'ro' / 'out'}"]


CONVERT_CLI_CASES = [
    CliCase("no command", lambda r: [f"--source={CHECKPOINT_DIR}", f"--output={r / 'out'}"], 2,
            ("usage", "expected one command")),
    CliCase("unknown command", lambda r: ["sideways", f"--source={CHECKPOINT_DIR}", f"--output={r / 'out'}"], 2,
            ("usage", "sideways")),
    CliCase("no --source", lambda r: ["import", f"--output={r / 'out'}"], 2, ("usage", "--source must be given")),
    CliCase("no --output", lambda r: ["export", f"--source={r / 'ckpt'}"], 2, ("usage", "--output must be given")),
    CliCase("unknown flag", lambda r: ["import", "--sourse=x", f"--output={r / 'out'}"], 2, ("usage", "sourse")),
    CliCase("bad --dtype", lambda r: ["import", f"--source={CHECKPOINT_DIR}", f"--output={r / 'out'}",
                                      "--dtype=float16"], 2, ("usage", "--dtype")),
    CliCase("bad --max_shard_size", lambda r: ["export", f"--source={r / 'ckpt'}", f"--output={r / 'out'}",
                                               "--max_shard_size=huge"], 2, ("usage", "--max_shard_size")),
    CliCase("missing --source", lambda r: ["import", f"--source={r / 'nowhere'}", f"--output={r / 'out'}"], 1,
            ("source {root}/nowhere", "no such file or folder")),
    CliCase("--source is no converted checkpoint", lambda r: ["export", f"--source={CHECKPOINT_DIR}",
                                                              f"--output={r / 'out'}"], 1,
            (f"{CHECKPOINT_DIR}", "huginn_jax.json and params are missing: not a converted")),
    CliCase("import onto its source", lambda r: ["import", f"--source={_hf_copy(r)}", f"--output={r / 'hf'}",
                                                 "--overwrite"], 1,
            ("output {root}/hf is the source", "--output")),
    CliCase("export onto its source", lambda r: ["export", f"--source={r / 'ckpt'}", f"--output={r}",
                                                 "--overwrite"], 1,
            ("output {root} contains the source", "--output")),
    CliCase("existing --output", lambda r: (r.joinpath("out").mkdir(), ["import", f"--source={CHECKPOINT_DIR}",
                                                                        f"--output={r / 'out'}"])[1], 1,
            ("{root}/out already exists", "--overwrite")),
    CliCase("read-only output folder", _read_only, 1,
            ("cannot write --output={root}/ro/out", "Permission denied"), fault="read-only folder"),
    CliCase("full disk on import", lambda r: ["import", f"--source={CHECKPOINT_DIR}", f"--output={r / 'out'}"], 1,
            ("cannot write --output={root}/out", "No space left on device"), fault="full disk"),
    CliCase("full disk on export", lambda r: ["export", f"--source={r / 'ckpt'}", f"--output={r / 'out'}"], 1,
            ("cannot write --output={root}/out", "No space left on device"), fault="full disk"),
]


@pytest.mark.parametrize("case", CONVERT_CLI_CASES, ids=[c.name for c in CONVERT_CLI_CASES])
def test_convert_cli_prints_one_or_two_lines_and_changes_nothing(case, converted, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(converted, root / "ckpt")
    args = case.setup(root)
    before = tree_digest(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", READ_ONLY=str(root / "ro"))
    try:
        run = subprocess.run([sys.executable, "-c", LAUNCHER, FAULTS.get(case.fault, ""), *args, "--noprogress"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    finally:
        if (root / "ro").exists():
            os.chmod(root / "ro", 0o755)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == case.status, run.stderr[-3000:]
    assert 1 <= len(lines) <= 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    for text in case.says:
        assert text.format(root=root) in run.stderr, run.stderr
    assert tree_digest(tmp_path) == before


def test_a_real_write_failure_in_the_storage_layer_is_one_line(tmp_path):
    """A write that the kernel refuses (past the file size limit: EFBIG, for root as for anyone)
    inside TensorStore, Orbax's C++ storage layer, where no Python code can be patched: one line,
    exit 1, nothing left."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))"
    before = tree_digest(tmp_path)
    run = subprocess.run([sys.executable, "-c", LAUNCHER, limit, "import", f"--source={CHECKPOINT_DIR}",
                          f"--output={tmp_path / 'out'}", "--noprogress"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), cwd=REPO, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [f"convert import: error: cannot write --output={tmp_path / 'out'}: "
                                               f"{os.strerror(errno.EFBIG)}"]
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------- checkpoint.restore

def _largest_data_file(folder: Path) -> Path:
    return Path(max(glob.glob(str(folder / "params" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize))


def _overwrite_8_bytes(root: Path) -> None:
    file = _largest_data_file(root / "ckpt")
    data = bytearray(file.read_bytes())
    data[len(data) // 2:len(data) // 2 + 8] = bytes(8 - i for i in range(8))
    file.write_bytes(bytes(data))


def _truncate(root: Path) -> None:
    file = _largest_data_file(root / "ckpt")
    file.write_bytes(file.read_bytes()[: os.path.getsize(file) // 2])


def _edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        file = root / "ckpt" / name
        value = json.loads(file.read_text())
        change(value)
        file.write_text(json.dumps(value))
    return edit


RESTORE_CASES = [
    Case("8 overwritten bytes in a data file", _overwrite_8_bytes, CheckpointError,
         ("{root}/ckpt", "checksum", "the stored data changed")),
    Case("a truncated data file", _truncate, CheckpointError, ("{root}/ckpt", "params/ cannot be read")),
    Case("a deleted data file", lambda r: os.remove(_largest_data_file(r / "ckpt")), CheckpointError,
         ("{root}/ckpt", "params/ cannot be read")),
    Case("no params/_METADATA", lambda r: os.remove(r / "ckpt" / "params" / "_METADATA"), CheckpointError,
         ("params/_METADATA is missing",)),
    Case("a damaged params/_METADATA", lambda r: (r / "ckpt" / "params" / "_METADATA").write_text("{"),
         CheckpointError, ("{root}/ckpt", "params/")),
    Case("no params/manifest.ocdbt", lambda r: os.remove(r / "ckpt" / "params" / "manifest.ocdbt"),
         CheckpointError, ("params/manifest.ocdbt is missing",)),
    Case("no params/", lambda r: shutil.rmtree(r / "ckpt" / "params"), CheckpointError, ("params is missing",)),
    Case("huginn_jax.json claims another dtype", _edit_json("huginn_jax.json", lambda d: d.update(dtype="float32")),
         CheckpointError, ("stored as bfloat16, but huginn_jax.json says float32",)),
    Case("huginn_jax.json claims no known dtype", _edit_json("huginn_jax.json", lambda d: d.update(dtype="int7")),
         CheckpointError, ("huginn_jax.json: dtype 'int7'",)),
    Case("huginn_jax.json names no dtype", _edit_json("huginn_jax.json", lambda d: d.pop("dtype")),
         CheckpointError, ("huginn_jax.json: dtype None",)),
    Case("a wrong checksum recorded",
         _edit_json("huginn_jax.json", lambda d: d["checksums"].update(wte=(d["checksums"]["wte"] + 1) % 2**32)),
         CheckpointError, ("wte: checksum",)),
    Case("a malformed checksum recorded", _edit_json("huginn_jax.json", lambda d: d["checksums"].update(wte="x")),
         CheckpointError, ("huginn_jax.json: checksums must map",)),
    Case("an unknown checksum scheme", _edit_json("huginn_jax.json", lambda d: d.update(checksum_scheme="md5")),
         CheckpointError, ("checksum scheme 'md5' is unknown",)),
    Case("a broken huginn_jax.json", lambda r: (r / "ckpt" / "huginn_jax.json").write_text("[1,"), CheckpointError,
         ("{root}/ckpt/huginn_jax.json", "is not valid JSON")),
    Case("huginn_jax.json holds a list", lambda r: (r / "ckpt" / "huginn_jax.json").write_text("[]"),
         CheckpointError, ("{root}/ckpt/huginn_jax.json", "not an object")),
    Case("a broken config.json", lambda r: (r / "ckpt" / "config.json").write_text("{oops"), CheckpointError,
         ("{root}/ckpt/config.json", "is not valid JSON")),
    Case("a config.json with an impossible value", _edit_json("config.json", lambda d: d.update(n_heads=5)),
         CheckpointError, ("{root}/ckpt/config.json", "n_embd=64 is not divisible by n_heads=5")),
    Case("a config.json of another model", _edit_json("config.json", lambda d: d.update(intermediate_size=96)),
         CheckpointError, ("core.0.w_down: shape [128, 64] but the config needs [96, 64]",)),
    Case("a file instead of a folder", lambda r: None, CheckpointError, ("is not a folder",)),
    Case("a folder that does not exist", lambda r: shutil.rmtree(r / "ckpt"), CheckpointError, ("does not exist",)),
]


@pytest.mark.parametrize("case", RESTORE_CASES, ids=[c.name for c in RESTORE_CASES])
def test_restore_of_a_damaged_folder_is_one_checkpoint_error(case, converted, tmp_path, capfd):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(converted, root / "ckpt")
    case.setup(root)
    target = root / "ckpt" / "params" / "_METADATA" if case.name == "a file instead of a folder" else root / "ckpt"
    before = tree_digest(tmp_path)
    capfd.readouterr()
    with pytest.raises(case.error) as err:
        checkpoint.restore(target)
    for text in case.says:
        assert text.format(root=root) in str(err.value), str(err.value)
    assert all(len(line) < 400 for line in str(err.value).splitlines()), str(err.value)  # no TensorStore specs
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed  # nothing from Orbax or TensorStore
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------- huginn_jax.load_hf_checkpoint

def _sharded(root: Path) -> Path:
    from tests.test_params_and_loading import fixture_tensors, write_checkpoint

    return write_checkpoint(root / "hf", fixture_tensors(), shards=2)


def _cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-1000])


LOAD_HF_CASES = [
    Case("a folder that does not exist", lambda r: r / "nowhere", CheckpointError,
         ("{root}/nowhere", "does not exist")),
    Case("a broken config.json", lambda r: (_hf_copy(r).joinpath("config.json").write_text("{oops"), r / "hf")[1],
         CheckpointError, ("{root}/hf/config.json", "is not valid JSON")),
    Case("no config.json", lambda r: (_hf_copy(r).joinpath("config.json").unlink(), r / "hf")[1],
         CheckpointError, ("{root}/hf/config.json", "does not exist")),
    Case("a broken index",
         lambda r: (_sharded(r).joinpath("model.safetensors.index.json").write_text("{"), r / "hf")[1],
         CheckpointError, ("{root}/hf/model.safetensors.index.json", "is not valid JSON")),
    Case("a truncated shard", lambda r: (_cut(_sharded(r) / "model-00002-of-00002.safetensors"), r / "hf")[1],
         CheckpointError, ("1 problem(s)", "model-00002-of-00002.safetensors: cannot be read as safetensors")),
    Case("a truncated single file", lambda r: (_cut(_hf_copy(r) / "model.safetensors"), r / "hf")[1],
         CheckpointError, ("{root}/hf/model.safetensors", "cannot be read as safetensors")),
]


@pytest.mark.parametrize("case", LOAD_HF_CASES, ids=[c.name for c in LOAD_HF_CASES])
def test_load_hf_checkpoint_of_a_damaged_folder_is_one_checkpoint_error(case, tmp_path):
    from huginn_jax.loading import load_hf_checkpoint

    root = tmp_path / "root"
    root.mkdir()
    folder = case.setup(root)
    before = tree_digest(tmp_path)
    with pytest.raises(case.error) as err:
        load_hf_checkpoint(folder)
    for text in case.says:
        assert text.format(root=root) in str(err.value), str(err.value)
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------- forward and the samplers

def _without_last_core_layer(params: dict) -> dict:
    return {**params, "core": params["core"][:-1]}


def _mixed_dtypes(params: dict) -> dict:
    return {**params, "wte": params["wte"].astype("bfloat16")}


def _another_model(params: dict) -> dict:
    from huginn_jax.config import TINY
    from huginn_jax.params import init_params

    return init_params(TINY.replace(n_embd=32, intermediate_size=64), jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class CallCase:
    """A call of the public API with `options` (or parameters changed by `params`) that must raise
    `error` with a message holding every text of `says`."""

    name: str
    call: str  # "forward", or a sampler's short name
    options: dict[str, Any]
    error: type[BaseException]
    says: tuple[str, ...]
    params: Callable[[dict], dict] | None = None


def _ids(*rows: list[int]) -> Any:
    return jax.numpy.asarray(rows, jax.numpy.int32)


FORWARD_CASES = [
    CallCase("token id past the vocabulary (jax array)", "forward", {"input_ids": _ids([1, 256])}, ValueError,
             ("token ids must lie in [0, 256)", "[1, 256]")),
    CallCase("negative token id (jax array)", "forward", {"input_ids": _ids([-1, 3])}, ValueError,
             ("token ids must lie in [0, 256)", "[-1, 3]")),
    CallCase("a core layer missing from the tree", "forward", {}, ValueError,
             ("params do not match the config", "core.3.wqkv: missing"), params=_without_last_core_layer),
    CallCase("a bfloat16 embedding with float32 elsewhere", "forward", {}, ValueError,
             ("parameters must share one dtype", "bfloat16 (e.g. wte)"), params=_mixed_dtypes),
    CallCase("the parameters of another model", "forward", {}, ValueError,
             ("params do not match the config", "wte: shape [256, 32] but the config needs [256, 64]"),
             params=_another_model),
    CallCase("num_steps that is no integer", "forward", {"num_steps": 2.5}, ValueError,
             ("num_steps must be an integer, got 2.5",)),
    CallCase("init_scale NaN", "forward", {"init_scale": float("nan"), "key": jax.random.key(0)}, ValueError,
             ("init_scale must be a finite number, got nan",)),
]

SAMPLER_CASES = [
    CallCase("diffusion exit_t 0", "diffusion", {"exit_t": 0.0}, ValueError, ("exit_t must be > 0.0, got 0.0",)),
    CallCase("diffusion exit_t NaN", "diffusion", {"exit_t": float("nan")}, ValueError,
             ("exit_t must be a finite number, got nan",)),
    CallCase("adaptive exit_threshold below 0", "adaptive", {"exit_threshold": -0.1}, ValueError,
             ("exit_threshold must be >= 0.0, got -0.1",)),
    CallCase("adaptive min_steps past num_steps", "adaptive", {"num_steps": 4, "min_steps": 5}, ValueError,
             ("min_steps must be <= 4, got 5",)),
    CallCase("speculative draft_steps 0", "speculative", {"draft_steps": 0}, ValueError,
             ("draft_steps must be >= 1, got 0",)),
    CallCase("init_scale NaN", "ar", {"init_scale": float("nan")}, ValueError,
             ("init_scale must be a finite number, got nan",)),
    CallCase("a stop token id that is no integer", "ar", {"stop_token_ids": [2.7]}, ValueError,
             ("stop_token_ids[0] must be an integer, got 2.7",)),
    CallCase("stop_token_ids that is no list", "speculative", {"stop_token_ids": 5}, ValueError,
             ("stop_token_ids must be a list of token ids, got 5",)),
    CallCase("top_k that is no integer", "diffusion",
             {"sampling": SamplingConfig(do_sample=True, top_k=2.7), "key": jax.random.key(0)}, ValueError,
             ("top_k must be an integer, got 2.7",)),
    CallCase("max_new_tokens that is no integer", "adaptive", {"max_new_tokens": 2.5}, ValueError,
             ("max_new_tokens must be an integer, got 2.5",)),
    CallCase("a key that is an int", "ar", {"key": 7}, ValueError, ("key must be a PRNG key", "got 7 (int)")),
    CallCase("a key that is a string", "diffusion", {"key": "seed"}, ValueError,
             ("key must be a PRNG key", "got 'seed' (str)")),
    CallCase("stop strings without a tokenizer", "ar", {"stop_strings": ["Q:"]}, ValueError,
             ("stop_strings", "pass the tokenizer too")),
    CallCase("an unknown sampler", "generate_quickly", {}, ValueError, ("unknown sampler 'generate_quickly'",)),
    CallCase("a streamer that is not callable", "ar", {"streamer": 3}, ValueError, ("streamer must be callable",)),
    CallCase("a parameter tree with a core layer missing", "diffusion", {}, ValueError,
             ("core.3.wqkv: missing",), params=_without_last_core_layer),
]


@pytest.mark.parametrize("case", FORWARD_CASES + SAMPLER_CASES, ids=[c.name for c in FORWARD_CASES + SAMPLER_CASES])
def test_the_api_names_the_bad_option(case, reference):
    from huginn_jax.model import forward
    from samplers import generate

    params = case.params(reference.params) if case.params else reference.params
    options = dict(case.options)
    if case.call == "forward":
        ids = options.pop("input_ids", _ids([1, 2, 3]))
        steps = options.pop("num_steps", 2)
        options.setdefault("init_scale", 0.0)
        with pytest.raises(case.error) as raised:
            forward(params, ids, steps, config=reference.config, **options)
    else:
        options = {"max_new_tokens": 4, "init_scale": 0.0, **options}
        with pytest.raises(case.error) as raised:
            generate(params, [[1, 2, 3]], config=reference.config, sampler=case.call, **options)
    for text in case.says:
        assert text in str(raised.value), str(raised.value)


# ---------------------------------------------------------------- the experiment scripts

SCRIPT_CASES = [
    ("generate", ["--checkpoint=/nonexistent", "--prompt=hi"], 1, ("/nonexistent", "does not exist")),
    ("generate", ["--checkpoint={root}", "--prompt=hi"], 1, ("is neither a converted checkpoint",)),
    ("generate", [f"--checkpoint={CHECKPOINT_DIR}", "--prompt_ids=1,x"], 2,
     ("--prompt_ids='1,x' must be comma-separated integers",)),
    ("generate", ["--problem="], 2, ("--problem='' is not an addition",)),
    ("generate", ["--problem=12+3x"], 2, ("--problem='12+3x' is not an addition",)),
    ("generate", ["--problem=123456789+1"], 2, ("at most 7 digits",)),
    ("generate", ["--problem=1+2", "--prompt_ids=1"], 2, ("--problem is for the embedded arithmetic model",)),
    ("generate", [f"--checkpoint={CHECKPOINT_DIR}", "--prompt=hi"], 1, ("has no tokenizer.json",)),
    ("generate", [f"--checkpoint={CHECKPOINT_DIR}", "--prompt=hi", "--gen_kwargs=num_steps"], 1,
     ("has no tokenizer.json",)),
    ("chat", [], 2, ("--checkpoint is required",)),
    ("chat", ["--checkpoint={embedded}"], 2, ("has no chat template",)),
]


@pytest.mark.parametrize("script, args, status, says", SCRIPT_CASES,
                         ids=[f"{s} {' '.join(a)}" for s, a, _, _ in SCRIPT_CASES])
def test_the_scripts_print_one_or_two_lines(script, args, status, says, tmp_path):
    from huginn_jax.tasks.arithmetic import EMBEDDED_MODEL

    args = [a.format(root=tmp_path, embedded=EMBEDDED_MODEL) for a in args]
    before = tree_digest(tmp_path)
    run = subprocess.run([sys.executable, "-m", f"experiments.{script}", *args], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO, timeout=300, stdin=subprocess.DEVNULL)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == status, run.stderr[-3000:]
    assert 1 <= len(lines) <= 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    for text in says:
        assert text in run.stderr, run.stderr
    assert tree_digest(tmp_path) == before
