"""benchmarks/gpu_lease/run.sh, the steps that need no GPU: the parts of the staged tarball
gathered in order and checked before anything is installed, and the refusals (an unknown step,
a step that needs TorchRec before the install)."""

import hashlib
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "gpu_lease" / "run.sh"


def _run(step, staged, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"),
           "LEASE_TMP": str(tmp_path / "lease")}
    return subprocess.run(["bash", str(RUN), step, str(staged)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _stage(tmp_path, checksum_ok=True):
    """A staged folder as stage.sh leaves it, with a tiny package instead of fbgemm-gpu."""
    package = tmp_path / "pkg" / "fbgemm_gpu"
    package.mkdir(parents=True)
    (package / "marker.txt").write_text("gathered in order\n" * 200)
    tarball = tmp_path / "fbx.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(package, arcname="fbgemm_gpu")
    data = tarball.read_bytes()
    staged = tmp_path / "staged"
    (staged / "small").mkdir(parents=True)
    (staged / "grpc").mkdir()
    third = len(data) // 3 + 1
    for index in range(3):
        (staged / f"fbx.part.0{index}").write_bytes(data[index * third:(index + 1) * third])
    digest = hashlib.sha256(data if checksum_ok else data + b"x").hexdigest()
    (staged / "fbx.sha256").write_text(f"{digest}  fbx.tar.xz\n")
    return staged


def test_unknown_step_is_refused(tmp_path):
    result = _run("warp", tmp_path, tmp_path)
    assert result.returncode == 2 and "unknown step warp" in result.stdout


def test_serving_needs_the_install_first(tmp_path):
    result = _run("serving", tmp_path, tmp_path)
    assert result.returncode == 4 and "TorchRec is not installed" in result.stdout


def test_parts_are_gathered_in_order_and_checked(tmp_path):
    staged = _stage(tmp_path)
    assert _run("part0", staged, tmp_path).returncode == 0
    assert _run("part1", staged, tmp_path).returncode == 0
    result = _run("install", staged, tmp_path)
    # The tarball was whole (its checksum held) and unpacked; with no wheels staged, pip
    # fails, and the machine is not marked as installed.
    site = tmp_path / "lease" / "site"
    assert (site / "fbgemm_gpu" / "marker.txt").read_text().startswith("gathered in order")
    assert result.returncode == 5, result.stdout + result.stderr
    assert not (site / ".installed").exists()


def test_a_bad_checksum_stops_the_install(tmp_path):
    staged = _stage(tmp_path, checksum_ok=False)
    for step in ("part0", "part1"):
        assert _run(step, staged, tmp_path).returncode == 0
    result = _run("install", staged, tmp_path)
    assert result.returncode == 3 and "checksum failed" in result.stdout
    assert not (tmp_path / "lease" / "site" / "fbgemm_gpu").exists()
