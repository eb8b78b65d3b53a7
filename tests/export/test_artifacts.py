"""Opening an export directory: foreign, corrupted and unsafe directories give clear errors."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from hstu.export.artifacts import ExportDirError, check_pickle_free, open_export_dir


@pytest.fixture
def copy_of(smoke_export, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(smoke_export.export_dir, target)
    return target


def test_a_directory_without_manifest_is_not_an_export(tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"not a program")
    with pytest.raises(
        ExportDirError, match="not an export directory of this project .* model.pt2"
    ):
        open_export_dir(tmp_path)
    with pytest.raises(ExportDirError, match="no such export directory"):
        open_export_dir(tmp_path / "missing")


def test_a_foreign_manifest_is_refused(copy_of):
    (copy_of / "export_manifest.json").write_text(json.dumps({"format": "mlflow", "files": {}}))
    with pytest.raises(ExportDirError, match="not an hstu export manifest"):
        open_export_dir(copy_of)
    (copy_of / "export_manifest.json").write_text('{"format": "hstu-export", ')
    with pytest.raises(
        ExportDirError, match=r"export_manifest.json is corrupted: not valid JSON \(line 1"
    ):
        open_export_dir(copy_of)


def test_a_flipped_byte_is_reported_as_corruption_of_that_file(copy_of):
    program = copy_of / "model.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(ExportDirError, match="model.pt2 is corrupted: sha256"):
        open_export_dir(copy_of)


def test_a_truncated_or_missing_file_is_reported(copy_of):
    config = copy_of / "pipeline.config"
    config.write_text(config.read_text()[:100])
    with pytest.raises(ExportDirError, match="pipeline.config is corrupted: 100 bytes"):
        open_export_dir(copy_of)
    config.unlink()
    with pytest.raises(ExportDirError, match="pipeline.config is missing"):
        open_export_dir(copy_of)


def _rewrite(archive_path, edit):
    """Rewrite a zip archive, passing (name, bytes) of every member through `edit`."""
    source = archive_path.with_suffix(".orig")
    archive_path.rename(source)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(archive_path, "w") as new:
        for info in old.infolist():
            new.writestr(info, edit(info.filename, old.read(info.filename)))
    source.unlink()


def test_an_archive_with_a_pickled_weight_is_refused_before_loading(copy_of, monkeypatch):
    import torch

    def flag_pickle(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    _rewrite(copy_of / "model.pt2", flag_pickle)
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: pytest.fail("load was called"))
    with pytest.raises(ExportDirError, match="stored pickled; refusing to load it"):
        check_pickle_free(copy_of / "model.pt2")


def test_an_archive_with_example_inputs_is_refused(tmp_path):
    """torch.export.save keeps example inputs as a pickle (loaded with weights_only=False as a
    fallback); the exporter strips them, and an archive that has them is refused."""
    import torch

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    program = torch.export.export(Double(), (torch.ones(3),))
    torch.export.save(program, tmp_path / "with_inputs.pt2")
    with pytest.raises(ExportDirError, match="pickled example inputs"):
        check_pickle_free(tmp_path / "with_inputs.pt2")
    program.example_inputs = None
    torch.export.save(program, tmp_path / "without.pt2")
    check_pickle_free(tmp_path / "without.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(ExportDirError, match="not a readable torch.export archive"):
        check_pickle_free(tmp_path / "junk.pt2")


def test_the_exporters_archive_is_pickle_free_and_loads(smoke_export, smoke_predictor):
    check_pickle_free(smoke_export.export_dir / "model.pt2")
    # smoke_predictor opened the directory with open_export_dir (checks, then torch.export.load).
    assert smoke_predictor.manifest["format"] == "hstu-export"
