"""The export directory: its layout, its manifest, and opening it safely.

    <export_dir>/
      export_manifest.json   what this is (format, version), the program's inputs and outputs,
                             and the sha256 and size of every other file
      model.pt2              torch.export program (torch.export.save): CPU, fp32, eval mode
      aoti/model.pt2         AOTInductor package, only when exported on a CUDA machine
      model_acc.json         serving settings (TorchEasyRec-style keys + --additional_export_config)
      pipeline.config        the resolved pipeline config (protobuf text format)
      sample_schema.json     the input columns the model reads, and the prediction columns

Opening a directory (`open_export_dir`) checks, before any byte of the program is interpreted:
that the manifest is this project's, that every file has the recorded size and sha256 (a
truncated copy or a flipped byte is reported as corruption, naming the file), and that the
program archive holds no pickled payload. torch.export.load (torch 2.13) stores plain tensors
as raw bytes, but unpickles tensor subclasses, torchbind / opaque objects and the saved example
inputs (torch.load with weights_only=True, then weights_only=False on failure); the exporter
writes none of those, and this check refuses an archive that has any, so loading never
unpickles an object. The AOTInductor package is native code (a shared library) and is never
loaded here: load it only from a directory you exported yourself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

MANIFEST_FILE = "export_manifest.json"
PROGRAM_FILE = "model.pt2"
AOTI_FILE = "aoti/model.pt2"
MODEL_ACC_FILE = "model_acc.json"
CONFIG_FILE = "pipeline.config"
SAMPLE_SCHEMA_FILE = "sample_schema.json"

FORMAT = "hstu-export"
FORMAT_VERSION = 1


class ExportDirError(ValueError):
    """An export directory that cannot be used: missing, foreign, corrupted or unsafe.
    The message names the directory and the file."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(directory: Path, names: list[str]) -> dict[str, dict]:
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
        for name in names
    }


def read_json(path: Path, directory: Path) -> dict:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ExportDirError(
            f"{directory}: {path.name} is corrupted: not valid JSON (line {error.lineno}, "
            f"column {error.colno}: {error.msg})"
        ) from None
    except UnicodeDecodeError:
        raise ExportDirError(f"{directory}: {path.name} is corrupted: not UTF-8 text") from None
    if not isinstance(payload, dict):
        raise ExportDirError(f"{directory}: {path.name} is corrupted: expected a JSON object")
    return payload


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an export directory, after checking that it is one of ours."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportDirError(f"{directory}: no such export directory")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())[:10]
        raise ExportDirError(
            f"{directory}: not an export directory of this project (no {MANIFEST_FILE}; it "
            f"holds {', '.join(present) or 'nothing'}). Make one with `python launch.py export`."
        )
    manifest = read_json(path, directory)
    if manifest.get("format") != FORMAT:
        raise ExportDirError(
            f"{directory}: {MANIFEST_FILE} is not an hstu export manifest "
            f"(format {manifest.get('format')!r}, expected {FORMAT!r})"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportDirError(
            f"{directory}: export format version {manifest.get('format_version')!r}; this code "
            f"reads version {FORMAT_VERSION}. Re-export the checkpoint with this version."
        )
    for key in ("files", "inputs", "tasks", "uih_sequence", "candidate_sequence"):
        if key not in manifest:
            raise ExportDirError(f"{directory}: {MANIFEST_FILE} is corrupted: no {key!r} entry")
    return manifest


def verify_files(directory: str | os.PathLike, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size and sha256."""
    directory = Path(directory)
    for name, record in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ExportDirError(f"{directory}: {name} is missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise ExportDirError(
                f"{directory}: {name} is corrupted: {size} bytes, the export wrote "
                f"{record.get('bytes')} (truncated or replaced copy?). Copy it again or re-export."
            )
        digest = sha256_of(path)
        if digest != record.get("sha256"):
            raise ExportDirError(
                f"{directory}: {name} is corrupted: sha256 {digest[:12]}... differs from the "
                f"{str(record.get('sha256'))[:12]}... the export recorded. Copy it again or "
                "re-export."
            )


def check_pickle_free(path: Path) -> None:
    """Refuse a torch.export archive that would make torch.export.load unpickle something."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ExportDirError(f"{path}: not a readable torch.export archive ({error})") from None
    with archive:
        names = archive.namelist()
        configs = [
            n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))
        ]
        if not any(n.endswith("_weights_config.json") for n in names):
            raise ExportDirError(f"{path}: not a torch.export archive (no weights config)")
        for name in configs:
            try:
                entries = json.loads(archive.read(name)).get("config", {})
            except (json.JSONDecodeError, AttributeError):
                raise ExportDirError(f"{path}: {name} is corrupted") from None
            for fqn, payload in entries.items():
                if payload.get("use_pickle"):
                    raise ExportDirError(
                        f"{path}: {fqn} is stored pickled; refusing to load it (this exporter "
                        "never writes pickled payloads)"
                    )
                if name.endswith("_constants_config.json") and not str(
                    payload.get("path_name", "")
                ).startswith("tensor_"):
                    raise ExportDirError(
                        f"{path}: constant {fqn} is a serialized Python/TorchBind object; "
                        "refusing to load it"
                    )
        for name in names:
            if "/data/sample_inputs/" in name and archive.getinfo(name).file_size:
                raise ExportDirError(
                    f"{path}: {name} holds pickled example inputs; refusing to load it (this "
                    "exporter writes the program without them)"
                )


def load_program(directory: str | os.PathLike, manifest: dict):
    """The torch.export program of a verified export directory (see the module docstring)."""
    import torch

    path = Path(directory) / PROGRAM_FILE
    check_pickle_free(path)
    # torch warns that the program's data-dependent size symbols (from .item()) "did not
    # appear in the graph": expected for this program, and not actionable by a user.
    serde_log = logging.getLogger("torch._export.serde.serialize")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        return torch.export.load(str(path))
    except Exception as error:  # torch's own message, with where it happened
        raise ExportDirError(
            f"{path}: torch.export.load failed ({type(error).__name__}: {error}); exported with "
            f"torch {manifest.get('torch_version')}, loading with torch {torch.__version__}"
        ) from error
    finally:
        serde_log.setLevel(level)


def open_export_dir(directory: str | os.PathLike):
    """(manifest, program): the checks of the module docstring, then torch.export.load."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    return manifest, load_program(directory, manifest)
